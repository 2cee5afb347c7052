"""Payment's rules without I/O: the webhook's signature, its body, the state transitions."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from meshkit.errors import DomainError, InvalidArgument, Unauthenticated
from svc_payment.domain import model
from svc_payment.domain.model import Effect, Money, Payment, PaymentState, WebhookEvent

SECRET = b"s3cret-s3cret-s3cret"
NOW = 1_800_000_000


def payment(state: PaymentState = PaymentState.PENDING, amount: Money | None = None) -> Payment:
    t = datetime.now(UTC)
    return Payment(uuid.uuid4(), uuid.uuid4(), "events/e/holds/h", "u1", state,
                   amount or Money("KRW", 330000), "sandbox", "sbx_1", "", t, t)


def event(kind: str = model.SUCCEEDED_TYPE, amount: str = "330000", currency: str = "KRW") -> WebhookEvent:
    return WebhookEvent("evt_1", kind, "sbx_1", Decimal(amount), currency)


def test_signature_round_trip_and_format() -> None:
    body = b'{"id":"evt_1"}'
    header = model.sign(SECRET, NOW, body)
    assert header.startswith(f"t={NOW},v1=") and len(header.split("v1=")[1]) == 64
    assert model.verify(SECRET, header, body, NOW + 10, 300) == NOW
    # several v1 values (a secret rotation): any one matching is enough
    assert model.verify(SECRET, f"t={NOW},v1={'0' * 64},{header.split(',')[1]}", body, NOW, 300) == NOW


@pytest.mark.parametrize("mutate", [
    lambda h, b: (h, b + b" "),                        # body changed
    lambda h, b: (h.replace(f"t={NOW}", f"t={NOW + 1}"), b),  # timestamp changed
    lambda h, b: ("", b),                              # no header
    lambda h, b: (h.split(",")[1], b),                 # no timestamp
    lambda h, b: (f"t={NOW}", b),                      # no signature
    lambda h, b: ("t=abc," + h.split(",")[1], b),      # bad timestamp
    lambda h, b: (model.sign(b"another-secret-123", NOW, b), b),
])
def test_bad_signatures_are_refused(mutate) -> None:  # type: ignore[no-untyped-def]
    body = b'{"id":"evt_1"}'
    header, body2 = mutate(model.sign(SECRET, NOW, body), body)
    with pytest.raises(Unauthenticated) as err:
        model.verify(SECRET, header, body2, NOW, 300)
    assert err.value.reason == "BAD_SIGNATURE"


@pytest.mark.parametrize("skew", [301, -301, 86400])
def test_stale_or_future_timestamps_are_refused(skew: int) -> None:
    body = b"{}"
    with pytest.raises(Unauthenticated) as err:
        model.verify(SECRET, model.sign(SECRET, NOW, body), body, NOW + skew, 300)
    assert err.value.reason == "STALE_TIMESTAMP"


def test_webhook_body_round_trip() -> None:
    body = model.webhook_body("evt_9", model.FAILED_TYPE, "sbx_2", Money("KRW", 132000, 500_000_000),
                              "CARD_DECLINED")
    assert json.loads(body) == {"id": "evt_9", "type": "payment.failed", "reference": "sbx_2",
                                "amount": "132000.5", "currency": "KRW", "reason": "CARD_DECLINED"}
    ev = model.parse_webhook(body)
    assert ev == WebhookEvent("evt_9", "payment.failed", "sbx_2", Decimal("132000.5"), "KRW",
                              "CARD_DECLINED")
    assert Money("KRW", 165000).text() == "165000"


@pytest.mark.parametrize("body", [
    b"not json", b"[]", b'{"type":"payment.succeeded"}',
    b'{"id":"e","type":"payment.refunded","reference":"r","amount":"1","currency":"KRW"}',
    b'{"id":"e","type":"payment.succeeded","reference":"r","amount":1.5,"currency":"KRW"}',
    b'{"id":"e","type":"payment.succeeded","reference":"r","amount":"x","currency":"KRW"}',
    b'{"id":"e","type":"payment.succeeded","reference":"r","amount":"NaN","currency":"KRW"}',
])
def test_bad_bodies_are_invalid(body: bytes) -> None:
    with pytest.raises(InvalidArgument):
        model.parse_webhook(body)


def test_success_of_a_pending_payment() -> None:
    t = model.on_webhook(payment(), event())
    assert (t.state, t.effect) == (PaymentState.SUCCEEDED, Effect.SUCCEEDED)


@pytest.mark.parametrize("amount,currency", [("330001", "KRW"), ("330000", "USD"), ("329999.99", "KRW")])
def test_success_with_the_wrong_amount_fails_and_refunds(amount: str, currency: str) -> None:
    t = model.on_webhook(payment(), event(amount=amount, currency=currency))
    assert (t.state, t.reason, t.effect) == (PaymentState.FAILED, "AMOUNT_MISMATCH", Effect.FAILED_AND_REFUND)


def test_fractional_amount_matches_exactly() -> None:
    p = payment(amount=Money("KRW", 132000, 500_000_000))
    assert model.on_webhook(p, event(amount="132000.50")).state is PaymentState.SUCCEEDED


def test_decline_of_a_pending_payment() -> None:
    t = model.on_webhook(payment(), event(model.FAILED_TYPE))
    assert (t.state, t.reason, t.effect) == (PaymentState.FAILED, "CARD_DECLINED", Effect.FAILED)


@pytest.mark.parametrize("state", [PaymentState.CANCELLED, PaymentState.FAILED])
def test_late_success_of_an_abandoned_payment_is_refunded(state: PaymentState) -> None:
    t = model.on_webhook(payment(state), event())
    assert (t.state, t.effect) == (PaymentState.REFUNDED, Effect.REFUND)


@pytest.mark.parametrize("state", [PaymentState.SUCCEEDED, PaymentState.REFUNDED])
def test_callbacks_after_the_end_change_nothing(state: PaymentState) -> None:
    for kind in (model.SUCCEEDED_TYPE, model.FAILED_TYPE):
        t = model.on_webhook(payment(state), event(kind))
        assert (t.state, t.effect) == (state, Effect.NONE)


def test_order_gone() -> None:
    assert model.on_order_gone(payment(), "ORDER_EXPIRED", refund=True).effect is Effect.CANCEL
    t = model.on_order_gone(payment(PaymentState.SUCCEEDED), "ORDER_EXPIRED", refund=True)
    assert (t.state, t.reason, t.effect) == (PaymentState.REFUNDED, "ORDER_EXPIRED", Effect.REFUND)
    # HoldExpired never refunds on its own: only the order's events decide that
    assert model.on_order_gone(payment(PaymentState.SUCCEEDED), "HOLD_EXPIRED", refund=False).effect \
        is Effect.NONE
    for s in (PaymentState.FAILED, PaymentState.REFUNDED, PaymentState.CANCELLED):
        assert model.on_order_gone(payment(s), "ORDER_EXPIRED", refund=True).effect is Effect.NONE


def test_refund_request() -> None:
    assert model.on_refund_request(payment(PaymentState.SUCCEEDED), "X").effect is Effect.REFUND
    assert model.on_refund_request(payment(PaymentState.REFUNDED), "X").effect is Effect.NONE
    with pytest.raises(DomainError) as err:
        model.on_refund_request(payment(), "X")
    assert err.value.reason == "PAYMENT_NOT_REFUNDABLE"


def test_names_and_ids() -> None:
    oid = uuid.uuid4()
    assert model.parse_order_name(f"orders/{oid}") == oid
    for bad in ("orders/", "order/x", f"payments/{oid}", "orders/not-a-uuid"):
        with pytest.raises(InvalidArgument):
            model.parse_order_name(bad)
    rid = uuid.uuid4()
    assert model.payment_id_for("u1", rid) == model.payment_id_for("u1", rid)
    assert model.payment_id_for("u1", rid) != model.payment_id_for("u2", rid)
