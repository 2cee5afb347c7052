"""Catalog's Kafka events: EventPublished, built from a published event.

The seat map travels compact (one SeatRange per section, booking expands it), so even a
50,000-seat event is a few hundred bytes; the relay also compresses, and the broker and producer
accept up to 8 MiB, far above the worst case MAX_SECTIONS allows (see tests/unit/test_catalog_*).
"""

from __future__ import annotations

from ticketping.events.v1 import events_pb2 as ev

from meshkit.events import new_envelope

from ..convert import money, timestamp
from ..domain import model
from ..domain.model import Event, PriceTier, SeatMap, Section

SOURCE = "catalog"


def event_published(event: Event) -> ev.EventPublished:
    spec = event.spec
    return ev.EventPublished(
        event=event.name,
        title=spec.title,
        start_time=timestamp(spec.start_time),
        queue_open_time=timestamp(spec.queue_open_time),
        sale_open_time=timestamp(spec.sale_open_time),
        seat_limit_per_fan=spec.seat_limit_per_fan,
        price_tiers=[
            ev.PriceTier(
                name=t.name,
                price=money(t.price),
            )
            for t in spec.price_tiers
        ],
        seat_ranges=[
            ev.SeatRange(section=s.name, rows=s.rows, seats_per_row=s.seats_per_row, tier=s.tier)
            for s in spec.seat_map.sections
        ],
        seat_count=event.seat_count,
        sale_close_time=timestamp(spec.sale_close_time),
    )


def envelope_for(event: Event) -> ev.EventEnvelope:
    """The outbox envelope of ``event``'s publication, keyed by the event id."""
    return new_envelope(SOURCE, str(event.id), event_published(event))


def seat_map_of(message: ev.EventPublished) -> SeatMap:
    """The seat map an EventPublished describes (what booking does to build its inventory)."""
    return SeatMap(
        tuple(Section(r.section, r.rows, r.seats_per_row, r.tier) for r in message.seat_ranges)
    )


def tiers_of(message: ev.EventPublished) -> tuple[PriceTier, ...]:
    return tuple(
        PriceTier(t.name, model.Money(t.price.currency_code, t.price.units, t.price.nanos))
        for t in message.price_tiers
    )

