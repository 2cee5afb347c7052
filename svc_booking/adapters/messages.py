"""Booking's Kafka side: the EventPublished it reads, the events it writes (through the outbox)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp
from google.type.money_pb2 import Money as PbMoney
from ticketping.events.v1 import events_pb2 as ev

from meshkit.events import new_envelope, sales_end_ms
from meshkit.seats import SeatMap, Section

from ..domain.model import Hold, Layout, Money, Order, PriceTier, event_name

SOURCE = "booking"
TOPIC = "ticketping.booking.v1"


def layout_of(msg: ev.EventPublished) -> Layout:
    """The inventory an EventPublished describes: ranges expanded by meshkit.seats."""
    return Layout(
        event_id=msg.event.removeprefix("events/"),
        title=msg.title,
        seat_limit_per_fan=msg.seat_limit_per_fan,
        seat_map=SeatMap(tuple(Section(r.section, r.rows, r.seats_per_row, r.tier)
                               for r in msg.seat_ranges)),
        tiers=tuple(PriceTier(t.name, Money(t.price.currency_code, t.price.units, t.price.nanos))
                    for t in msg.price_tiers),
        sales_end=(datetime.fromtimestamp(sales_end_ms(msg) / 1000, UTC)
                   if msg.HasField("start_time") else None),
    )


def money(m: Money) -> PbMoney:
    return PbMoney(currency_code=m.currency_code, units=m.units, nanos=m.nanos)


def ts(t: datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(t)
    return out


def hold_created(hold: Hold) -> ev.EventEnvelope:
    return new_envelope(SOURCE, str(hold.hold_id), ev.HoldCreated(
        hold=hold.name, event=event_name(hold.event_id), user_id=hold.user_id,
        seat_ids=hold.seat_ids, expire_time=ts(hold.expire_time)))


def hold_expired(hold: Hold) -> ev.EventEnvelope:
    return new_envelope(SOURCE, str(hold.hold_id), ev.HoldExpired(
        hold=hold.name, event=event_name(hold.event_id), user_id=hold.user_id,
        seat_ids=hold.seat_ids))


def order_created(order: Order) -> ev.EventEnvelope:
    return new_envelope(SOURCE, str(order.order_id), ev.OrderCreated(
        order=order.name, event=event_name(order.event_id), user_id=order.user_id,
        seat_ids=order.seat_ids, amount=money(order.amount),
        payment_deadline=ts(order.expire_time)))


def order_confirmed(order: Order) -> ev.EventEnvelope:
    return new_envelope(SOURCE, str(order.order_id), ev.OrderConfirmed(
        order=order.name, event=event_name(order.event_id), user_id=order.user_id,
        seat_ids=order.seat_ids, payment=order.payment))


def order_cancelled(order: Order, reason: str) -> ev.EventEnvelope:
    return new_envelope(SOURCE, str(order.order_id), ev.OrderCancelled(
        order=order.name, event=event_name(order.event_id), user_id=order.user_id,
        seat_ids=order.seat_ids, reason=reason))


def order_expired(order: Order) -> ev.EventEnvelope:
    return new_envelope(SOURCE, str(order.order_id), ev.OrderExpired(
        order=order.name, event=event_name(order.event_id), user_id=order.user_id,
        seat_ids=order.seat_ids))


def event_sold_out(event_id: str) -> ev.EventEnvelope:
    return new_envelope(SOURCE, event_id, ev.EventSoldOut(event=event_name(event_id)))


def payment_order_unknown(order_id: uuid.UUID, paid: ev.PaymentSucceeded) -> ev.EventEnvelope:
    """A PaymentSucceeded for an order booking does not have: payment refunds it."""
    return new_envelope(SOURCE, str(order_id), ev.PaymentOrderUnknown(
        payment=paid.payment, order=paid.order, user_id=paid.user_id, amount=paid.amount))
