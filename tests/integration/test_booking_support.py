"""Helpers shared by the booking integration tests (in-process service, edge-like metadata).

No tests here: a module of the booking suite so it sits under its own name."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from google.type.money_pb2 import Money
from ticketping.events.v1 import events_pb2 as ev

from meshkit.events import new_envelope
from svc_booking.bootstrap import Wired
from svc_booking.service import Booking


class Clock:
    """The service's clock, movable forward by tests (holds expire without waiting)."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


def event_published(
    event_id: str, *, sections: tuple[tuple[str, int, int, str], ...] = (("A", 10, 10, "VIP"),),
    limit: int = 4, closes_in: timedelta | None = None,
) -> ev.EventPublished:
    tiers = [ev.PriceTier(name="VIP", price=Money(currency_code="KRW", units=165000)),
             ev.PriceTier(name="R", price=Money(currency_code="KRW", units=132000, nanos=500_000_000))]
    ranges = [ev.SeatRange(section=s, rows=r, seats_per_row=n, tier=t) for s, r, n, t in sections]
    msg = ev.EventPublished(event=f"events/{event_id}", title="Test show", seat_limit_per_fan=limit,
                            price_tiers=tiers, seat_ranges=ranges,
                            seat_count=sum(r * n for _, r, n, _ in sections))
    if closes_in is not None:  # the sale closes then, a month before the show
        now = datetime.now(UTC)
        msg.start_time.FromDatetime(now + timedelta(days=30))
        msg.sale_close_time.FromDatetime(now + closes_in)
    return msg


async def publish(booking: Booking, msg: ev.EventPublished) -> None:
    """What the catalog consumer does with one EventPublished (same handler, same transaction)."""
    env = new_envelope("catalog", msg.event.removeprefix("events/"), msg)
    async with booking.pool.connection() as conn, conn.transaction():
        await booking.on_event(env, conn)


async def new_event(w: Wired, **kw: object) -> str:
    event_id = str(uuid.uuid4())
    await publish(w.booking, event_published(event_id, **kw))  # type: ignore[arg-type]
    return event_id


def fan(user: str, event_id: str | None, *, sub: str | None = None, jti: str | None = None
        ) -> tuple[tuple[str, str], ...]:
    """Metadata as the edge sets it for a signed-in fan with (optionally) an admission token."""
    md: list[tuple[str, str]] = [("x-user-id", user), ("x-user-role", "USER")]
    if event_id is not None:
        md += [("x-admission-sub", sub or user), ("x-admission-event", f"events/{event_id}"),
               ("x-admission-jti", jti or f"jti-{user}")]
    return tuple(md)
