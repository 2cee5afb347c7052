"""Booking's side of payment: PaymentSucceeded confirms the order, PaymentFailed cancels it.

Consumed from ``ticketping.payment.v1`` by meshkit's EventConsumer (group ``<consumer_group>.payment``,
de-duplicated on the envelope's event id). The work itself is Booking's own idempotent use cases
(each in its own transaction, then its Redis and waiting-room steps), and the de-duplication mark
commits only after they return: a redelivery after a crash in between changes nothing in
PostgreSQL and redoes the Redis step the crash may have cut off (seats SOLD, or released):

* PaymentSucceeded → ``confirm_order`` (sold_seats under PRIMARY KEY (event_id, seat_id),
  OrderConfirmed). If booking answers ORDER_NOT_PAYABLE (the deadline passed, the order was
  expired or cancelled, or a seat was sold to someone else) and the order is still
  PENDING_PAYMENT, it is expired now: OrderExpired tells payment to refund, and the seats go back.
  An order already EXPIRED or CANCELLED has emitted its event before: payment refunds on it.
  A PaymentSucceeded whose amount is not the order's is treated the same way (never confirmed).
* PaymentFailed → ``cancel_order`` (reason PAYMENT_FAILED): seats released, OrderCancelled.
* A PaymentSucceeded for an order booking does not have (its data lost, restored from an older
  backup) → PaymentOrderUnknown, written in the de-duplication transaction: payment refunds the
  money, which can buy nothing. (A PaymentFailed for one changes nothing and is only logged.)

A PaymentSucceeded for an order this replica made and still keeps as written (``sell_own``, the
consumer's precheck) is handled before any transaction and gets no mark: every step of it is
idempotent by itself, and a redelivery goes the marked way.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC
from typing import Any

import psycopg
from ticketping.events.v1 import events_pb2 as ev

from meshkit.errors import DomainError, NotFound
from meshkit.events import event_type, payload_of
from meshkit.outbox import enqueue

from ..domain import model
from ..domain.model import Order, OrderState
from ..service import Booking
from . import messages

log = logging.getLogger(__name__)


class PaymentEvents:
    # What the handler acts on; the consumer passes over the rest (PaymentRefunded...).
    TYPES = frozenset({"payment_succeeded", "payment_failed"})

    def __init__(self, booking: Booking) -> None:
        self.booking = booking
        self.confirmed = 0  # counters for tests and metrics
        self.refused = 0
        self.cancelled = 0
        self.unknown = 0  # PaymentSucceeded for an order booking does not have

    async def sell_own(self, env: ev.EventEnvelope) -> bool:
        """The consumer's precheck: a PaymentSucceeded for an order this replica made (every
        purchase whose fan stayed on one replica) is handled here, without the de-duplication
        transaction, and False says so; anything else is left to :meth:`handle` (True).

        Nothing it does needs the mark: the sale is one statement that only sells a pending order
        paid in time, and everything after it (the Redis step, the sold-out signal, expiring an
        order the payment cannot buy) is safe to repeat. A redelivery finds the order no longer
        kept here (it is used once) and goes the marked way, which sees it confirmed by this
        payment and changes nothing. Saves the transaction's three round trips per purchase."""
        if event_type(env) != "payment_succeeded":
            return True
        msg = payload_of(env)
        assert isinstance(msg, ev.PaymentSucceeded)
        try:
            order_id = model.parse_order_name(msg.order, "order")
        except DomainError:
            return True  # the handler says what is wrong with it
        made = self.booking.written_orders.take(order_id)
        if made is None:
            return True
        await self._succeeded(made, msg)
        return False

    async def handle(self, env: ev.EventEnvelope, conn: psycopg.AsyncConnection[Any]) -> None:
        if event_type(env) not in self.TYPES:
            return
        msg = payload_of(env)
        assert isinstance(msg, ev.PaymentSucceeded | ev.PaymentFailed)
        try:
            order_id = model.parse_order_name(msg.order, "order")
        except DomainError:
            log.warning("payment event with a bad order name ignored", extra={"order": msg.order})
            return
        try:
            order = await self.booking.get_order(None, order_id)
        except NotFound:
            if isinstance(msg, ev.PaymentSucceeded):
                await enqueue(conn, self.booking.topic, messages.payment_order_unknown(order_id, msg))
                self.unknown += 1
                log.error("PaymentSucceeded for an order booking does not have; payment refunds it",
                          extra={"order": msg.order, "payment": msg.payment})
            else:
                log.warning("PaymentFailed for an unknown order ignored", extra={"order": msg.order})
            return
        if isinstance(msg, ev.PaymentSucceeded):
            await self._succeeded(order, msg)
        else:
            await self._failed(order, msg)

    async def _succeeded(self, order: Order, msg: ev.PaymentSucceeded) -> None:
        paid = (msg.amount.currency_code, msg.amount.units, msg.amount.nanos)
        due = (order.amount.currency_code, order.amount.units, order.amount.nanos)
        if paid != due:
            log.error("PaymentSucceeded amount differs from the order's; not confirmed",
                      extra={"order": order.name, "payment": msg.payment, "paid": str(paid), "due": str(due)})
            await self._give_back(order.order_id, "AMOUNT_MISMATCH")
            return
        try:
            paid_at = msg.succeed_time.ToDatetime(tzinfo=UTC) if msg.HasField("succeed_time") else None
            await self.booking.confirm_order(order.order_id, msg.payment, known=order, paid_at=paid_at)
            self.confirmed += 1
        except DomainError as err:
            if err.reason == "ORDER_NOT_PAYABLE":
                cause = err.metadata.get("cause") or err.metadata.get("state", "")
                await self._give_back(order.order_id, cause)
            elif err.reason == "ORDER_ALREADY_PAID":
                # Paid by another payment: payment refunds this one on OrderConfirmed.
                log.warning("order already paid by another payment",
                            extra={"order": order.name, "payment": msg.payment})
                self.refused += 1
            else:
                raise

    async def _give_back(self, order_id: uuid.UUID, cause: str) -> None:
        """The payment cannot buy the order: end the order EXPIRED (OrderExpired → refund)."""
        self.refused += 1
        current = await self.booking.get_order(None, order_id)
        if current.state is OrderState.PENDING_PAYMENT:
            await self.booking.expire_order(order_id)
        log.warning("paid order not confirmable; expired, the payment is refunded",
                    extra={"order": current.name, "state": current.state.value, "cause": cause})

    async def _failed(self, order: Order, msg: ev.PaymentFailed) -> None:
        if order.state not in (OrderState.PENDING_PAYMENT, OrderState.CANCELLED):
            return  # CANCELLED again: its seats are released again, in case a crash cut that off
        try:
            await self.booking.cancel_order(order.user_id, order.order_id, reason="PAYMENT_FAILED")
            self.cancelled += order.state is OrderState.PENDING_PAYMENT
        except DomainError as err:
            if err.reason != "ORDER_NOT_CANCELLABLE":  # raced with expiry: nothing left to do
                raise
