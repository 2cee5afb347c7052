"""Payment's rules and values, without I/O: states, transitions, the webhook's signature and body."""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation

from meshkit.errors import DomainError, InvalidArgument, NotFound, Unauthenticated

NANOS = 1_000_000_000
SIGNATURE_HEADER = "x-payment-signature"
# Namespace of payment ids derived from (user, request id): a retry gets the same id, so the
# provider (called before the row is written) sees the same idempotency key.
PAYMENT_ID_NAMESPACE = uuid.UUID("5d0c1b1e-6f0a-4c39-9a51-7d2f3f4f7a10")


class PaymentState(enum.Enum):
    PENDING = "PENDING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    REFUNDED = "REFUNDED"
    CANCELLED = "CANCELLED"


@dataclass(frozen=True)
class Money:
    currency_code: str
    units: int
    nanos: int = 0

    def as_decimal(self) -> Decimal:
        return Decimal(self.units) + Decimal(self.nanos) / NANOS

    def text(self) -> str:
        """The amount as the webhook carries it: a decimal string in major units ("165000", "12.5")."""
        d = self.as_decimal()
        return format(d.normalize(), "f") if d != d.to_integral() else str(int(d))


@dataclass(frozen=True)
class Payment:
    payment_id: uuid.UUID
    order_id: uuid.UUID
    hold: str
    user_id: str
    state: PaymentState
    amount: Money
    provider: str
    provider_reference: str
    failure_reason: str
    create_time: datetime
    update_time: datetime

    @property
    def name(self) -> str:
        return f"payments/{self.payment_id}"

    @property
    def order(self) -> str:
        return f"orders/{self.order_id}"


def payment_id_for(user_id: str, request_id: uuid.UUID) -> uuid.UUID:
    return uuid.uuid5(PAYMENT_ID_NAMESPACE, f"{user_id}/{request_id}")


# --- names ---------------------------------------------------------------------------------------


def _uuid_of(raw: str, prefix: str, field: str) -> uuid.UUID:
    head, _, tail = raw.partition("/")
    try:
        if head == prefix and tail:
            return uuid.UUID(tail)
    except ValueError:
        pass
    raise InvalidArgument("INVALID_NAME", f"{field} must be {prefix}/{{uuid}}",
                          metadata={"field": field})


def parse_order_name(raw: str, field: str = "order") -> uuid.UUID:
    return _uuid_of(raw, "orders", field)


def parse_payment_name(raw: str, field: str = "name") -> uuid.UUID:
    return _uuid_of(raw, "payments", field)


def parse_request_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise InvalidArgument("INVALID_REQUEST_ID", "request_id must be a UUID",
                              metadata={"field": "request_id"}) from None


def payment_not_found(name: str) -> NotFound:
    return NotFound("PAYMENT_NOT_FOUND", f"{name} not found", metadata={"name": name})


# A checkout CreatePayment opened and then did not use (another payment of the order was made
# first, or the order ended meanwhile) is kept as a CANCELLED payment with this reason: cancelling
# a checkout cannot stop a customer who is already paying, and a success that arrives anyway must
# find a payment to refund. The fan was never given it.
CHECKOUT_DROPPED = "CHECKOUT_DROPPED"


def is_dropped_checkout(p: Payment) -> bool:
    return p.state is PaymentState.CANCELLED and p.failure_reason == CHECKOUT_DROPPED


# --- the webhook's signature -----------------------------------------------------------------------


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The header value: ``t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">``."""
    mac = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: bytes, header: str, body: bytes, now: float, tolerance: float) -> int:
    """Check a signature header against the raw body; returns its timestamp.

    Unauthenticated ``BAD_SIGNATURE`` if the header is missing, malformed or no ``v1`` matches
    (compared in constant time); ``STALE_TIMESTAMP`` if a valid signature's timestamp is more than
    ``tolerance`` seconds from ``now`` (a replay of an old callback, or a wrong clock).
    """
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError:
                timestamp = None
        elif key == "v1" and value:
            candidates.append(value)
    if timestamp is None or not candidates:
        raise Unauthenticated("BAD_SIGNATURE", f"{SIGNATURE_HEADER} is missing or malformed")
    expected = sign(secret, timestamp, body).rpartition("v1=")[2]
    matched = False
    for c in candidates:  # every candidate is compared: no early exit
        matched |= hmac.compare_digest(expected.encode(), c.encode())
    if not matched:
        raise Unauthenticated("BAD_SIGNATURE", "the webhook signature does not match its body")
    if abs(now - timestamp) > tolerance:
        raise Unauthenticated("STALE_TIMESTAMP",
                              f"the signature's timestamp is more than {tolerance:g}s away from now",
                              metadata={"timestamp": str(timestamp), "tolerance_seconds": f"{tolerance:g}"})
    return timestamp


# --- the webhook's body ------------------------------------------------------------------------------

SUCCEEDED_TYPE = "payment.succeeded"
FAILED_TYPE = "payment.failed"


@dataclass(frozen=True)
class WebhookEvent:
    event_id: str
    type: str
    reference: str
    amount: Decimal
    currency: str
    reason: str = ""


def parse_webhook(body: bytes) -> WebhookEvent:
    """The provider's JSON body: {id, type, reference, amount, currency[, reason]}."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument("INVALID_WEBHOOK_BODY", "the body is not JSON") from None
    if not isinstance(data, dict):
        raise InvalidArgument("INVALID_WEBHOOK_BODY", "the body is not a JSON object")
    fields = {}
    for key in ("id", "type", "reference", "currency"):
        value = data.get(key)
        if not isinstance(value, str) or not value:
            raise InvalidArgument("INVALID_WEBHOOK_BODY", f"{key} must be a non-empty string",
                                  metadata={"field": key})
        fields[key] = value
    if fields["type"] not in (SUCCEEDED_TYPE, FAILED_TYPE):
        raise InvalidArgument("UNKNOWN_WEBHOOK_TYPE", f"unknown type {fields['type']!r}",
                              metadata={"type": fields["type"]})
    raw_amount = data.get("amount")
    if isinstance(raw_amount, bool) or not isinstance(raw_amount, str | int):
        raise InvalidArgument("INVALID_WEBHOOK_BODY", "amount must be a decimal string",
                              metadata={"field": "amount"})
    try:
        amount = Decimal(str(raw_amount))
    except InvalidOperation:
        raise InvalidArgument("INVALID_WEBHOOK_BODY", "amount must be a decimal string",
                              metadata={"field": "amount"}) from None
    if not amount.is_finite():
        raise InvalidArgument("INVALID_WEBHOOK_BODY", "amount must be finite", metadata={"field": "amount"})
    reason = data.get("reason")
    return WebhookEvent(fields["id"], fields["type"], fields["reference"], amount,
                        fields["currency"], reason if isinstance(reason, str) else "")


def webhook_body(event_id: str, type_: str, reference: str, amount: Money, reason: str = "") -> bytes:
    data = {"id": event_id, "type": type_, "reference": reference, "amount": amount.text(),
            "currency": amount.currency_code}
    if reason:
        data["reason"] = reason
    return json.dumps(data, separators=(",", ":")).encode()


# --- transitions -----------------------------------------------------------------------------------


class Effect(enum.Enum):
    """What a transition asks the service to do besides writing the new state."""

    NONE = "none"
    SUCCEEDED = "succeeded"  # PaymentSucceeded
    FAILED = "failed"  # PaymentFailed
    FAILED_AND_REFUND = "failed_and_refund"  # money taken but wrong: refund, PaymentFailed
    REFUND = "refund"  # refund through the provider, PaymentRefunded
    CANCEL = "cancel"  # abandon the checkout at the provider (no event)


@dataclass(frozen=True)
class Transition:
    state: PaymentState
    reason: str
    effect: Effect


def on_webhook(p: Payment, event: WebhookEvent) -> Transition:
    """The provider says the money was captured (or not)."""
    keep = Transition(p.state, p.failure_reason, Effect.NONE)
    if event.type == FAILED_TYPE:
        if p.state is PaymentState.PENDING:
            return Transition(PaymentState.FAILED, event.reason or "CARD_DECLINED", Effect.FAILED)
        return keep
    # payment.succeeded
    if p.state is PaymentState.PENDING:
        if event.currency != p.amount.currency_code or event.amount != p.amount.as_decimal():
            return Transition(PaymentState.FAILED, "AMOUNT_MISMATCH", Effect.FAILED_AND_REFUND)
        return Transition(PaymentState.SUCCEEDED, "", Effect.SUCCEEDED)
    if p.state in (PaymentState.CANCELLED, PaymentState.FAILED):
        # The order is gone (or the failure was reported) and the money arrived anyway: give it back.
        return Transition(PaymentState.REFUNDED, p.failure_reason or "PAYMENT_NOT_EXPECTED",
                          Effect.REFUND)
    return keep


def on_order_gone(p: Payment, reason: str, *, refund: bool) -> Transition:
    """The order can no longer be paid (expired, cancelled, paid by another payment)."""
    if p.state is PaymentState.PENDING:
        return Transition(PaymentState.CANCELLED, reason, Effect.CANCEL)
    if refund and p.state is PaymentState.SUCCEEDED:
        return Transition(PaymentState.REFUNDED, reason, Effect.REFUND)
    return Transition(p.state, p.failure_reason, Effect.NONE)


def on_refund_request(p: Payment, reason: str) -> Transition:
    if p.state is PaymentState.SUCCEEDED:
        return Transition(PaymentState.REFUNDED, reason or "REFUND_REQUESTED", Effect.REFUND)
    if p.state is PaymentState.REFUNDED:
        return Transition(p.state, p.failure_reason, Effect.NONE)
    raise DomainError("PAYMENT_NOT_REFUNDABLE", f"{p.name} is {p.state.value}",
                      metadata={"state": p.state.value})
