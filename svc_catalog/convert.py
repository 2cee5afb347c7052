"""Proto ⇄ domain for CatalogService messages (the servicer's half of the translation)."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp
from google.type.money_pb2 import Money as PbMoney
from ticketping.catalog.v1 import catalog_service_pb2 as pb

from .domain import rules
from .domain.model import Event, EventSpec, EventState, Money, PriceTier, SeatMap, Section, Venue

_STATES = {
    EventState.DRAFT: pb.EVENT_STATE_DRAFT,
    EventState.PUBLISHED: pb.EVENT_STATE_PUBLISHED,
}


def _dt(msg: pb.Event, field: str) -> datetime | None:
    if not msg.HasField(field):  # type: ignore[arg-type]
        return None
    ts: Timestamp = getattr(msg, field)
    try:
        return ts.ToDatetime(tzinfo=UTC)  # microsecond precision, as PostgreSQL stores it
    except (ValueError, OverflowError):  # a stub may send any seconds and nanos; JSON cannot
        raise rules.invalid(
            "INVALID_TIMES", f"event.{field} is not a valid time (seconds {ts.seconds}, nanos "
            f"{ts.nanos}): it must fall in the years 0001-9999, nanos in 0-999999999",
            f"event.{field}") from None


def timestamp(t: datetime | None) -> Timestamp | None:
    if t is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(t)
    return ts


def money(m: Money) -> PbMoney:
    return PbMoney(currency_code=m.currency_code, units=m.units, nanos=m.nanos)


def spec_of(msg: pb.Event) -> EventSpec:
    return EventSpec(
        title=msg.title,
        artist=msg.artist,
        venue=Venue(msg.venue.name, msg.venue.address),
        start_time=_dt(msg, "start_time"),
        queue_open_time=_dt(msg, "queue_open_time"),
        sale_open_time=_dt(msg, "sale_open_time"),
        sale_close_time=_dt(msg, "sale_close_time"),
        seat_limit_per_fan=msg.seat_limit_per_fan,
        price_tiers=tuple(
            PriceTier(t.name, Money(t.price.currency_code, t.price.units, t.price.nanos))
            for t in msg.price_tiers
        ),
        seat_map=SeatMap(
            tuple(Section(s.name, s.rows, s.seats_per_row, s.tier) for s in msg.seat_map.sections)
        ),
    )


def populated_fields(msg: pb.Event) -> set[str]:
    """The mutable fields set in ``msg`` (the implied update mask of an UpdateEvent without one)."""
    fields = {f.name for f, _ in msg.ListFields()}
    if msg.HasField("venue"):
        fields.discard("venue")
        fields |= {f"venue.{f.name}" for f, _ in msg.venue.ListFields()}
        if not msg.venue.ListFields():
            fields.add("venue")
    return fields


def to_proto(event: Event) -> pb.Event:
    spec = event.spec
    return pb.Event(
        name=event.name,
        state=_STATES[event.state],
        title=spec.title,
        artist=spec.artist,
        venue=pb.Venue(name=spec.venue.name, address=spec.venue.address),
        start_time=timestamp(spec.start_time),
        queue_open_time=timestamp(spec.queue_open_time),
        sale_open_time=timestamp(spec.sale_open_time),
        sale_close_time=timestamp(spec.sale_close_time),
        seat_limit_per_fan=spec.seat_limit_per_fan,
        price_tiers=[
            pb.PriceTier(
                name=t.name,
                price=money(t.price),
            )
            for t in spec.price_tiers
        ],
        seat_map=pb.SeatMap(
            sections=[
                pb.SeatSection(name=s.name, rows=s.rows, seats_per_row=s.seats_per_row, tier=s.tier)
                for s in spec.seat_map.sections
            ]
        ),
        seat_count=event.seat_count,
        create_time=timestamp(event.create_time),
        update_time=timestamp(event.update_time),
        publish_time=timestamp(event.publish_time),
    )
