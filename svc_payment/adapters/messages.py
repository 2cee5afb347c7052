"""Payment's Kafka side: the events it writes (through the outbox), keyed by the order id."""

from __future__ import annotations

from google.type.money_pb2 import Money as PbMoney
from ticketping.events.v1 import events_pb2 as ev

from meshkit.events import new_envelope

from ..domain.model import Effect, Money, Payment

SOURCE = "payment"
TOPIC = "ticketping.payment.v1"


def money(m: Money) -> PbMoney:
    return PbMoney(currency_code=m.currency_code, units=m.units, nanos=m.nanos)


def payment_succeeded(p: Payment) -> ev.EventEnvelope:
    succeeded = ev.PaymentSucceeded(payment=p.name, order=p.order, user_id=p.user_id,
                                    amount=money(p.amount), provider_reference=p.provider_reference)
    succeeded.succeed_time.FromDatetime(p.update_time)  # the success recorded: SUCCEEDED's time
    return new_envelope(SOURCE, str(p.order_id), succeeded)


def payment_failed(p: Payment) -> ev.EventEnvelope:
    return new_envelope(SOURCE, str(p.order_id), ev.PaymentFailed(
        payment=p.name, order=p.order, user_id=p.user_id, reason=p.failure_reason))


def payment_refunded(p: Payment) -> ev.EventEnvelope:
    return new_envelope(SOURCE, str(p.order_id), ev.PaymentRefunded(
        payment=p.name, order=p.order, user_id=p.user_id, amount=money(p.amount),
        reason=p.failure_reason))


def of_effect(effect: Effect, after: Payment) -> ev.EventEnvelope | None:
    """The event a transition with this effect tells, of the payment as it is after it; None
    if it tells none (a cancelled checkout, no change)."""
    if effect is Effect.SUCCEEDED:
        return payment_succeeded(after)
    if effect in (Effect.FAILED, Effect.FAILED_AND_REFUND):
        return payment_failed(after)
    if effect is Effect.REFUND:
        return payment_refunded(after)
    return None
