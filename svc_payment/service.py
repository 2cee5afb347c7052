"""Payment's use cases: what each step reads, writes, and tells the provider, in which order.

* create: the order is read from booking (amount, currency, owner, state: never from the client);
  the provider's checkout is opened with an id derived from (user, request id), so a retry or a
  crash between the two steps reuses the same checkout; then the payment row is written.
* webhook: signature and timestamp first (nothing is read before), then in ONE transaction: the
  provider event id is recorded (a replay stops here), the payment row is locked, the transition
  is applied, the outbox row (PaymentSucceeded / PaymentFailed / PaymentRefunded) is added.
* booking's events (OrderExpired, OrderCancelled, HoldExpired, OrderConfirmed) run in the consumer's
  de-duplication transaction: a pending payment is cancelled, a succeeded one of an order that
  cannot be confirmed is refunded through the provider (idempotent on the payment id) and
  PaymentRefunded is written.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import grpc
import psycopg
from prometheus_client import Counter
from psycopg_pool import AsyncConnectionPool
from ticketping.events.v1 import events_pb2 as ev

from meshkit.db import autocommit
from meshkit.errors import DomainError, NotFound, request_id_reused
from meshkit.events import event_type, payload_of
from meshkit.outbox import Outboxed, enqueue
from meshkit.written import Written

from .adapters import messages
from .adapters import postgres as db
from .adapters.booking import BookingClient
from .adapters.provider import Outcome, Provider, ProviderError, ProviderRefused
from .domain import model
from .domain.model import Effect, Money, Payment, PaymentState, Transition

log = logging.getLogger(__name__)

UNMATCHED_REFUNDS = Counter("payment_unmatched_refunds",
                            "Money a provider captured for no payment (no payment ever claimed its "
                            "success callback), refunded.")


def utcnow() -> datetime:
    return datetime.now(UTC)


def _money_of(amount: Decimal, currency: str) -> Money:
    units = int(amount)
    return Money(currency, units, int((amount - units) * model.NANOS))


class ProviderUnavailable(DomainError):
    code = grpc.StatusCode.UNAVAILABLE


class Payments:
    # The booking events payment acts on; its consumer passes over the others (HoldCreated,
    # OrderCreated: two of every purchase's three booking events), with no transaction.
    BOOKING_EVENT_TYPES = frozenset({"order_expired", "order_cancelled", "hold_expired", "order_confirmed",
                                     "payment_order_unknown"})

    def __init__(
        self,
        pool: AsyncConnectionPool,
        booking: BookingClient,
        provider: Provider,
        *,
        webhook_secret: bytes,
        webhook_tolerance: float = 300.0,
        topic: str = messages.TOPIC,
    ) -> None:
        self.pool = pool
        self.booking = booking
        self.provider = provider
        self._secret = webhook_secret
        # The payments this replica just opened, by provider reference: their callback (which
        # the edge may bring to this replica) applies to the payment as written, not read back.
        self.opened: Written[str, Payment] = Written()
        self.webhook_tolerance = webhook_tolerance
        self.topic = topic
        self.clock = utcnow
        self.wall = time.time  # the webhook's timestamp check (tests move it)

    # --- create / read ---------------------------------------------------------------------------

    async def create_payment(self, user_id: str, order_id: uuid.UUID, request_id: uuid.UUID,
                             outcome: Outcome | None = None) -> Payment:
        async with autocommit(self.pool) as conn:  # a retry, or the order's payment in progress
            prior, live, failed = await db.by_request_or_live(conn, user_id, request_id, order_id)
        if prior is not None and prior.order_id != order_id:
            raise request_id_reused(request_id, prior.name)
        if prior is not None and not model.is_dropped_checkout(prior):
            return prior
        order = await self.booking.order(order_id)
        name = f"orders/{order_id}"
        if order.user_id != user_id:
            raise NotFound("ORDER_NOT_FOUND", f"{name} not found", metadata={"order": name})
        now = self.clock()
        if order.state != "PENDING_PAYMENT" or (order.expire_time is not None and order.expire_time <= now):
            raise DomainError("ORDER_NOT_PAYABLE", f"{name} is {order.state}, not payable",
                              metadata={"order": name, "state": order.state})
        if live is not None:
            if live.state is PaymentState.PENDING:
                return live  # one checkout per order at a time: the fan gets the one in progress
            raise DomainError("ORDER_ALREADY_PAID", f"{name} was paid by {live.name}",
                              metadata={"payment": live.name})
        if failed is not None:  # PaymentFailed cancels the order: a new payment would be refunded
            raise DomainError("ORDER_NOT_PAYABLE",
                              f"{name} is being cancelled: {failed.name} failed ({failed.failure_reason})",
                              metadata={"order": name, "state": order.state, "payment": failed.name})
        if prior is not None:  # this request id's checkout was dropped; the id cannot open another
            raise request_id_reused(request_id, prior.name)
        payment_id = model.payment_id_for(user_id, request_id)
        try:
            reference = await self.provider.create_checkout(payment_id, name, order.amount, outcome)
        except ProviderError as exc:
            raise ProviderUnavailable("PROVIDER_UNAVAILABLE", f"the payment provider failed: {exc}") from exc
        payment = Payment(payment_id, order_id, order.hold, user_id, PaymentState.PENDING, order.amount,
                          self.provider.name, reference, "", now, now)
        first: Payment | None = None
        try:
            async with autocommit(self.pool) as conn:
                ended, inserted = await db.insert_unless_ended(conn, payment, request_id)
        except psycopg.errors.UniqueViolation:  # the order has a live payment: made meanwhile
            ended, inserted = None, False
        if inserted:
            self.opened.put(reference, payment)
            return payment
        if ended is None:  # this request's payment, or the order's live one, was made meanwhile
            async with autocommit(self.pool) as conn:
                made, live, _ = await db.by_request_or_live(conn, user_id, request_id, order_id)
            first = made or live
        if ended is not None:  # the order ended (or its payment failed) while the checkout opened
            await self._drop_checkout(payment, request_id)
            raise DomainError("ORDER_NOT_PAYABLE", f"{name} is {ended}, not payable",
                              metadata={"order": name, "state": ended})
        if first is None:
            raise DomainError("REQUEST_IN_PROGRESS", "another payment of this order is being made; retry",
                              code=grpc.StatusCode.ABORTED)
        if first.payment_id != payment_id:  # a concurrent attempt won: drop our checkout
            await self._drop_checkout(payment, request_id)
        return first

    async def _drop_checkout(self, payment: Payment, request_id: uuid.UUID) -> None:
        """Keep the checkout as a CANCELLED payment (model.CHECKOUT_DROPPED), then cancel it at the
        provider: if its money arrives anyway, the webhook refunds it like any late success."""
        dropped = dataclasses.replace(payment, state=PaymentState.CANCELLED,
                                      failure_reason=model.CHECKOUT_DROPPED)
        async with autocommit(self.pool) as conn:
            await db.insert_unless_ended(conn, dropped, request_id)
        await self.provider.cancel(payment.provider_reference)
        log.info("checkout dropped", extra={"payment": payment.name, "order": payment.order})

    async def get_payment(self, user_id: str | None, payment_id: uuid.UUID) -> Payment:
        async with autocommit(self.pool) as conn:
            p = await db.get(conn, payment_id)
        if p is None or (user_id is not None and p.user_id != user_id):
            raise model.payment_not_found(f"payments/{payment_id}")
        return p

    # --- the provider's callback -----------------------------------------------------------------

    async def handle_webhook(self, body: bytes, signature: str) -> tuple[Payment, bool]:
        """Apply a signed callback; returns the payment and whether this call changed anything."""
        model.verify(self._secret, signature, body, self.wall(), self.webhook_tolerance)
        event = model.parse_webhook(body)
        applied = await self._apply_callback(event)
        if applied is not None:
            return applied, True
        captured = _money_of(event.amount, event.currency)
        async with self.pool.connection() as conn, conn.transaction():
            p = await db.by_reference(conn, event.reference, lock=True)
            if p is not None:
                if not await db.record_provider_event(conn, p.provider, event.event_id, p.payment_id,
                                                      event.type):
                    log.info("webhook replay ignored", extra={"provider_event": event.event_id,
                                                              "payment": p.name})
                    return p, False
                t = model.on_webhook(p, event)
                after = await self._apply(conn, p, t, captured=captured)
                return after, after.state is not p.state
        # Unknown, or not written yet (the checkout is opened before the row): the provider
        # re-sends. Money captured is kept in mind, and refunded if no payment ever claims it
        # (refund_unmatched).
        if event.type == model.SUCCEEDED_TYPE:
            async with autocommit(self.pool) as conn:
                await db.record_unmatched(conn, self.provider.name, event.reference, event.event_id, captured)
        raise NotFound("PAYMENT_NOT_FOUND", "no payment has this provider reference",
                       metadata={"reference": event.reference})

    async def _apply_callback(self, event: model.WebhookEvent) -> Payment | None:
        """The common callback, a pending payment succeeding or failing, in two round trips: the
        payment read (not even that if this replica just opened it), then one statement that
        applies it if the payment is still as read and the callback new (db.apply_callback).
        None if not so: the transaction sorts that out."""
        async with autocommit(self.pool) as conn:
            p = self.opened.take(event.reference) or await db.by_reference(conn, event.reference)
            if p is None:
                return None
            t = model.on_webhook(p, event)
            if t.effect not in (Effect.SUCCEEDED, Effect.FAILED):  # a refund: the provider first
                return None
            after = dataclasses.replace(p, state=t.state, failure_reason=t.reason, update_time=self.clock())
            told = messages.of_effect(t.effect, after)
            assert told is not None
            try:
                if not await db.apply_callback(conn, p, after, event.event_id, event.type,
                                               Outboxed(self.topic, told)):
                    return None
            except psycopg.errors.UniqueViolation:  # recorded meanwhile: a replay
                return None
        self._log_transition(p, after, t)
        return after

    async def refund_unmatched(self, older_than: float, limit: int = 100) -> int:
        """Refund the money of success callbacks that no payment claimed for ``older_than`` seconds:
        the checkout was opened, then the process died before writing its payment, and the app
        never retried (a retry reuses the checkout and writes it). ``older_than`` must outlast the
        provider's re-sends and an order's payment deadline, so that no payment can still claim
        it. Several replicas may run this at once (SKIP LOCKED); a refund is asked once per
        reference (idempotency key). Returns how many were refunded."""
        done = 0
        async with self.pool.connection() as conn, conn.transaction():
            await db.forget_matched(conn)
            for u in await db.due_unmatched(conn, older_than, limit):
                try:
                    ref = await self.provider.refund(u.reference, u.captured, f"unmatched:{u.reference}")
                except ProviderRefused as exc:  # asking again changes nothing: an operator's case
                    await db.mark_unmatched_refused(conn, u, str(exc))
                    log.error("the provider refused to refund money captured for no payment",
                              extra={"reference": u.reference, "amount": u.captured.text(),
                                     "currency": u.captured.currency_code, "error": str(exc)})
                    continue
                except ProviderError:
                    log.warning("refund of an unmatched capture failed; retried on the next pass",
                                exc_info=True, extra={"reference": u.reference})
                    break
                await db.mark_unmatched_refunded(conn, u, ref)
                UNMATCHED_REFUNDS.inc()
                log.warning("money captured for no payment refunded",
                            extra={"reference": u.reference, "amount": u.captured.text(),
                                   "currency": u.captured.currency_code})
                done += 1
        return done

    async def sweep_unmatched(self, every: float, older_than: float) -> None:
        """refund_unmatched every ``every`` seconds (jittered), for the process' lifetime."""
        while True:
            try:
                await self.refund_unmatched(older_than)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("unmatched-callback sweep failed; retrying", exc_info=True)
            await asyncio.sleep(every * random.uniform(0.8, 1.2))

    # --- booking's events ------------------------------------------------------------------------

    async def needs_handling(self, env: ev.EventEnvelope) -> bool:
        """The consumer's precheck: an order confirmed by its only payment (every purchase) leaves
        nothing to refund, and is passed over without the de-duplication transaction (three
        round trips per purchase). Everything else is handled."""
        if event_type(env) != "order_confirmed":
            return True
        msg = payload_of(env)
        assert isinstance(msg, ev.OrderConfirmed)
        try:
            order_id = model.parse_order_name(msg.order)
            payment_id = model.parse_payment_name(msg.payment, "payment")
        except DomainError:
            return True  # the handler says what is wrong with it
        async with autocommit(self.pool) as conn:
            return await db.has_other_payment(conn, order_id, payment_id)

    async def on_booking_event(self, env: ev.EventEnvelope, conn: psycopg.AsyncConnection[Any]) -> None:
        """The consumer's handler (ticketping.booking.v1), in its de-duplication transaction."""
        if event_type(env) not in self.BOOKING_EVENT_TYPES:
            return
        msg = payload_of(env)
        if isinstance(msg, ev.HoldExpired):
            payments = await db.for_hold(conn, msg.hold)
            # A hold with payments was ordered, and the order's deadline is the hold's: its order
            # expired with it (OrderExpired may arrive before or after: another key, another
            # partition). Only a pending payment is abandoned here; the order's events decide refunds.
            for p in payments:
                await self._apply(conn, p, model.on_order_gone(p, "ORDER_EXPIRED", refund=False))
            return
        if isinstance(msg, ev.PaymentOrderUnknown):
            # Booking has no such order (its data lost): the money can buy nothing, give it back.
            try:
                payment_id = model.parse_payment_name(msg.payment, "payment")
            except DomainError:
                log.warning("PaymentOrderUnknown with a bad payment name ignored",
                            extra={"payment": msg.payment})
                return
            paid = await db.get(conn, payment_id, lock=True)
            if paid is None:
                log.warning("PaymentOrderUnknown for an unknown payment ignored",
                            extra={"payment": msg.payment})
                return
            await self._apply(conn, paid, model.on_order_gone(paid, "ORDER_UNKNOWN", refund=True))
            return
        assert isinstance(msg, ev.OrderExpired | ev.OrderCancelled | ev.OrderConfirmed)
        try:
            order_id = model.parse_order_name(msg.order)
        except DomainError:
            log.warning("booking event with a bad order name ignored", extra={"order": msg.order})
            return
        if not isinstance(msg, ev.OrderConfirmed):
            await db.lock_order(conn, order_id)
            await db.mark_order_ended(conn, order_id,
                                      "EXPIRED" if isinstance(msg, ev.OrderExpired) else "CANCELLED")
        for p in await db.for_order(conn, order_id):
            if isinstance(msg, ev.OrderConfirmed):
                if p.name == msg.payment:
                    continue
                t = model.on_order_gone(p, "ORDER_ALREADY_PAID", refund=True)
            elif isinstance(msg, ev.OrderExpired):
                t = model.on_order_gone(p, "ORDER_EXPIRED", refund=True)
            else:
                t = model.on_order_gone(p, "ORDER_CANCELLED", refund=True)
            await self._apply(conn, p, t)

    async def refund_payment(self, payment_id: uuid.UUID, reason: str) -> Payment:
        async with self.pool.connection() as conn, conn.transaction():
            p = await db.get(conn, payment_id, lock=True)
            if p is None:
                raise model.payment_not_found(f"payments/{payment_id}")
            return await self._apply(conn, p, model.on_refund_request(p, reason))

    # --- one transition, in the caller's transaction -------------------------------------------------

    async def _apply(self, conn: psycopg.AsyncConnection[Any], p: Payment, t: Transition,
                     captured: Money | None = None) -> Payment:
        if t.effect is Effect.NONE:
            return p
        refund_ref: str | None = None
        if t.effect in (Effect.REFUND, Effect.FAILED_AND_REFUND):
            # Before the commit, idempotent on the payment: a retry after a crash refunds once.
            # What the provider says it captured, when a callback is the cause (a late or wrong
            # success); otherwise the payment's own amount, which a success matched.
            amount = captured if captured is not None else p.amount
            try:
                refund_ref = await self.provider.refund(p.provider_reference, amount, str(p.payment_id))
            except ProviderRefused as exc:
                # Not retried forever (that would hold up every event behind this one): the
                # consumer tries a few times, then parks the event on its DLQ for an operator.
                log.error("the provider refused a refund", extra={"payment": p.name, "error": str(exc)})
                raise DomainError("PROVIDER_REFUSED", f"the payment provider refused the refund: {exc}",
                                  metadata={"payment": p.name}) from exc
            except ProviderError as exc:
                raise ProviderUnavailable("PROVIDER_UNAVAILABLE", f"refund failed: {exc}") from exc
        after = await db.set_state(conn, p.payment_id, t.state, t.reason, self.clock(), refund_ref)
        told = messages.of_effect(t.effect, after)
        if told is not None:
            await enqueue(conn, self.topic, told)
        if t.effect is Effect.CANCEL:
            try:
                await self.provider.cancel(p.provider_reference)
            except ProviderError:
                log.warning("checkout cancel failed (a late success is refunded)", exc_info=True)
        self._log_transition(p, after, t)
        return after

    @staticmethod
    def _log_transition(p: Payment, after: Payment, t: Transition) -> None:
        log.info("payment %s -> %s", p.state.value, after.state.value,
                 extra={"payment": p.name, "order": p.order, "reason": t.reason})
