"""Catalog's rules without I/O: validation reasons, seat expansion, paging tokens, EventPublished."""

from __future__ import annotations

import gzip
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from ticketping.events.v1.events_pb2 import EventPublished

from meshkit.errors import InvalidArgument
from meshkit.events import sales_end_ms
from meshkit.outbox import MAX_ENVELOPE_BYTES
from svc_catalog.adapters.messages import envelope_for, seat_map_of
from svc_catalog.convert import populated_fields, spec_of, to_proto
from svc_catalog.domain import paging, rules
from svc_catalog.domain.model import (
    Event,
    EventSpec,
    EventState,
    Money,
    PriceTier,
    SeatMap,
    Section,
    Venue,
)

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def spec(**changes: object) -> EventSpec:
    base = EventSpec(
        title="Winter Tour - Seoul",
        artist="Someone",
        venue=Venue("KSPO Dome", "Seoul"),
        start_time=NOW + timedelta(days=30),
        queue_open_time=NOW + timedelta(days=1),
        sale_open_time=NOW + timedelta(days=1, minutes=30),
        seat_limit_per_fan=4,
        price_tiers=(PriceTier("VIP", Money("KRW", 165_000)), PriceTier("R", Money("KRW", 132_000))),
        seat_map=SeatMap((Section("A", 10, 20, "VIP"), Section("B", 30, 40, "R"))),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def reason_of(s: EventSpec) -> str:
    with pytest.raises(InvalidArgument) as exc:
        rules.validate_spec(s)
    return exc.value.reason


def test_a_valid_event_counts_its_seats() -> None:
    assert rules.validate_spec(spec()) == 10 * 20 + 30 * 40


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"title": ""}, "MISSING_FIELD"),
        ({"title": "   "}, "MISSING_FIELD"),
        ({"venue": Venue("")}, "MISSING_FIELD"),
        ({"start_time": None}, "MISSING_FIELD"),
        ({"price_tiers": ()}, "MISSING_FIELD"),
        ({"title": "x" * 201}, "FIELD_TOO_LONG"),
        ({"title": "a\x00b"}, "INVALID_CHARACTERS"),  # PostgreSQL refuses NUL: it was a 500
        ({"artist": "\x1b[31m"}, "INVALID_CHARACTERS"),
        ({"venue": Venue("Hall\x00")}, "INVALID_CHARACTERS"),
        ({"price_tiers": (PriceTier("V\x00", Money("KRW", 1)), PriceTier("R", Money("KRW", 1)))},
         "INVALID_CHARACTERS"),
        ({"price_tiers": (PriceTier("VIP", Money("USD", 2**63 - 1)), PriceTier("R", Money("USD", 1)))},
         "PRICE_TOO_HIGH"),  # two seats' total overflowed a hold's int64 amount after the seats were taken
        # times: queue opens <= sale opens < show starts
        ({"queue_open_time": NOW + timedelta(days=2)}, "INVALID_TIMES"),
        ({"sale_open_time": NOW + timedelta(days=30)}, "INVALID_TIMES"),
        ({"sale_open_time": NOW + timedelta(days=31), "queue_open_time": NOW}, "INVALID_TIMES"),
        ({"sale_close_time": NOW + timedelta(days=31)}, "INVALID_TIMES"),
        ({"sale_close_time": NOW}, "INVALID_TIMES"),
        ({"start_time": datetime(2030, 2, 1)}, "INVALID_TIMES"),  # no time zone
        ({"seat_map": SeatMap()}, "EMPTY_SEAT_MAP"),
        ({"price_tiers": (PriceTier("VIP", Money("KRW", -1)), PriceTier("R", Money("KRW", 1)))},
         "NEGATIVE_PRICE"),
        ({"price_tiers": (PriceTier("VIP", Money("USD", 0, -5)), PriceTier("R", Money("USD", 1)))},
         "NEGATIVE_PRICE"),
        ({"price_tiers": (PriceTier("VIP", Money("KRW", 10, 500_000_000)), PriceTier("R", Money("KRW", 1)))},
         "INVALID_PRICE"),  # KRW has no minor unit
        ({"price_tiers": (PriceTier("VIP", Money("USD", 10, 10**9)), PriceTier("R", Money("USD", 1)))},
         "INVALID_PRICE"),
        ({"price_tiers": (PriceTier("VIP", Money("USD", 10, 1)), PriceTier("R", Money("USD", 1)))},
         "INVALID_PRICE"),  # below a cent
        ({"price_tiers": (PriceTier("VIP", Money("krw", 1)), PriceTier("R", Money("krw", 1)))},
         "INVALID_CURRENCY"),
        ({"price_tiers": (PriceTier("VIP", Money("KRWX", 1)), PriceTier("R", Money("KRW", 1)))},
         "INVALID_CURRENCY"),
        ({"price_tiers": (PriceTier("VIP", Money("KRW", 1)), PriceTier("R", Money("USD", 1)))},
         "MIXED_CURRENCIES"),
        ({"price_tiers": (PriceTier("VIP", Money("KRW", 1)), PriceTier("VIP", Money("KRW", 1)))},
         "DUPLICATE_TIER"),
        ({"seat_map": SeatMap((Section("A", 1, 1, "GOLD"),))}, "UNKNOWN_TIER"),
        ({"seat_map": SeatMap((Section("A", 1, 1, "VIP"), Section("A", 2, 2, "R")))}, "DUPLICATE_SEAT"),
        ({"seat_map": SeatMap((Section("A-1", 1, 1, "VIP"),))}, "INVALID_SEAT_MAP"),
        ({"seat_map": SeatMap((Section("A 1", 1, 1, "VIP"),))}, "INVALID_SEAT_MAP"),
        ({"seat_map": SeatMap((Section("", 1, 1, "VIP"),))}, "MISSING_FIELD"),
        ({"seat_map": SeatMap((Section("A", 0, 10, "VIP"),))}, "INVALID_SEAT_MAP"),
        ({"seat_map": SeatMap((Section("A", 10, -1, "VIP"),))}, "INVALID_SEAT_MAP"),
        ({"seat_map": SeatMap((Section("A", 250, 200, "VIP"), Section("B", 1, 1, "R")))},
         "SEAT_MAP_TOO_LARGE"),  # 50,001 seats
        ({"seat_map": SeatMap((Section("A", 2**31 - 1, 2**31 - 1, "VIP"),))}, "SEAT_MAP_TOO_LARGE"),
        ({"seat_map": SeatMap(tuple(Section(f"S{i}", 1, 1, "R") for i in range(1001)))},
         "SEAT_MAP_TOO_LARGE"),
        ({"seat_limit_per_fan": 0}, "INVALID_SEAT_LIMIT"),
        ({"seat_limit_per_fan": -3}, "INVALID_SEAT_LIMIT"),
        ({"seat_limit_per_fan": 21}, "INVALID_SEAT_LIMIT"),
        ({"seat_limit_per_fan": 3, "seat_map": SeatMap((Section("A", 1, 2, "VIP"),))},
         "INVALID_SEAT_LIMIT"),  # more than the event has
    ],
)
def test_each_broken_rule_has_its_reason(changes: dict[str, object], reason: str) -> None:
    assert reason_of(spec(**changes)) == reason


def test_errors_name_the_field() -> None:
    bad = spec(seat_map=SeatMap((Section("A", 1, 1, "VIP"), Section("B", 1, 1, "GOLD"))))
    with pytest.raises(InvalidArgument) as exc:
        rules.validate_spec(bad)
    assert exc.value.metadata == {"field": "event.seat_map.sections[1].tier"}


def test_free_seats_and_equal_times_are_allowed() -> None:
    s = spec(
        price_tiers=(PriceTier("VIP", Money("USD", 0)), PriceTier("R", Money("USD", 12, 500_000_000))),
        queue_open_time=NOW + timedelta(days=1, minutes=30),
    )
    assert rules.validate_spec(s) == 1400


def test_publishing_needs_the_sale_ahead() -> None:
    s = spec()
    assert rules.validate_for_publish(s, NOW) == 1400
    # the waiting room may already be open...
    assert rules.validate_for_publish(s, NOW + timedelta(days=1, minutes=1)) == 1400
    # ...but not the sale
    with pytest.raises(InvalidArgument) as exc:
        rules.validate_for_publish(s, NOW + timedelta(days=1, minutes=30))
    assert exc.value.reason == "INVALID_TIMES"


def test_50000_seats_expand_to_distinct_ids_quickly() -> None:
    sections = tuple(Section(name, 50, 200, "VIP") for name in ("A", "B", "C", "D", "E"))
    s = spec(seat_map=SeatMap(sections))
    assert rules.validate_spec(s) == rules.MAX_SEATS == 50_000
    t0 = time.perf_counter()
    ids = list(s.seat_map.seat_ids())
    elapsed = time.perf_counter() - t0
    assert len(ids) == len(set(ids)) == 50_000
    assert ids[0] == "A-1-1" and ids[199] == "A-1-200" and ids[200] == "A-2-1" and ids[-1] == "E-50-200"
    assert elapsed < 1.0
    seats = list(s.seat_map.seats())
    assert [x.seat_id for x in seats] == ids
    assert seats[12345].section == "B" and seats[12345].tier == "VIP"


def _event(s: EventSpec) -> Event:
    return Event(uuid.uuid4(), EventState.PUBLISHED, s, NOW, NOW, NOW, s.seat_map.seat_count)


def test_event_published_of_50000_seats_is_compact_and_expands_back() -> None:
    s = spec(seat_map=SeatMap(tuple(Section(n, 50, 200, "R") for n in "ABCDE")))
    env = envelope_for(_event(s))
    value = env.SerializeToString()
    assert len(value) < 1024  # five ranges, not 50,000 seats
    msg = env.event_published
    assert msg.seat_count == 50_000 and msg.event.startswith("events/")
    assert env.aggregate_id == msg.event.removeprefix("events/")
    ids = set(seat_map_of(msg).seat_ids())
    assert len(ids) == 50_000


def test_the_largest_seat_map_allowed_fits_a_kafka_record_easily() -> None:
    # The worst case the rules allow: MAX_SECTIONS sections sharing MAX_SEATS seats, long names.
    n = rules.MAX_SECTIONS
    sections = tuple(
        Section(f"S{i:0{rules.MAX_NAME - 1}d}", 1, rules.MAX_SEATS // n, "T" * 32) for i in range(n)
    )
    s = spec(price_tiers=(PriceTier("T" * 32, Money("KRW", 1)),), seat_map=SeatMap(sections))
    assert rules.validate_spec(s) == rules.MAX_SEATS
    value = envelope_for(_event(s)).SerializeToString()
    assert len(value) < 100_000 < MAX_ENVELOPE_BYTES
    assert len(gzip.compress(value)) < len(value) // 5  # and the relay compresses it


def test_proto_round_trip_keeps_every_field() -> None:
    s = spec(sale_close_time=NOW + timedelta(days=29))
    e = Event(uuid.uuid4(), EventState.DRAFT, s, NOW, NOW, None, 1400)
    msg = to_proto(e)
    assert spec_of(msg) == s
    assert msg.name == f"events/{e.id}" and not msg.HasField("publish_time")
    parsed = EventPublished()
    env = envelope_for(replace(e, state=EventState.PUBLISHED))
    parsed.ParseFromString(env.event_published.SerializeToString())
    assert parsed.seat_limit_per_fan == 4 and [t.name for t in parsed.price_tiers] == ["VIP", "R"]
    assert parsed.price_tiers[0].price.units == 165_000 and parsed.price_tiers[0].price.currency_code == "KRW"
    # The queue and booking stop selling at the sale's close (or the show's start without one).
    assert parsed.sale_close_time.ToDatetime(tzinfo=UTC) == s.sale_close_time
    assert sales_end_ms(parsed) == parsed.sale_close_time.ToMilliseconds()
    parsed.ClearField("sale_close_time")
    assert sales_end_ms(parsed) == parsed.start_time.ToMilliseconds()


@pytest.mark.parametrize("field", ["start_time", "sale_close_time"])
@pytest.mark.parametrize(("seconds", "nanos"), [(10**12, 0), (253_402_300_800, 0), (-62_135_596_801, 0),
                                                (0, -1), (0, 2_000_000_000)])
def test_a_time_out_of_range_from_a_stub_is_invalid_argument(field: str, seconds: int, nanos: int) -> None:
    """Over gRPC a stub may send any Timestamp; it is the caller's mistake (400), never INTERNAL."""
    msg = to_proto(_event(spec()))
    getattr(msg, field).seconds, getattr(msg, field).nanos = seconds, nanos
    with pytest.raises(InvalidArgument) as exc:
        spec_of(msg)
    assert exc.value.reason == "INVALID_TIMES" and exc.value.metadata["field"] == f"event.{field}"


def test_update_paths() -> None:
    assert rules.update_paths([], {"title", "venue.name", "name"}) == {"title", "venue.name"}
    assert rules.update_paths(["title", "state", "update_time"], set()) == {"title"}
    assert "seat_map" in rules.update_paths(["*"], set())
    for bad in (["nope"], ["*", "title"], ["seat_map.sections"]):
        with pytest.raises(InvalidArgument) as exc:
            rules.update_paths(bad, set())
        assert exc.value.reason == "INVALID_UPDATE_MASK"
    merged = spec().merged(spec(title="New", venue=Venue("X", "Y")), frozenset({"title", "venue.address"}))
    assert merged.title == "New" and merged.venue == Venue("KSPO Dome", "Y")


def test_populated_fields_of_a_patch() -> None:
    msg = to_proto(_event(spec()))
    msg.ClearField("title")
    msg.venue.ClearField("address")
    fields = populated_fields(msg)
    assert "title" not in fields and "venue.name" in fields and "venue.address" not in fields


def test_names() -> None:
    eid = uuid.uuid4()
    assert rules.parse_event_name(f"events/{eid}") == eid
    for bad, reason in [("evts/x", "INVALID_NAME"), ("events/", "INVALID_NAME"),
                        ("events/a/b", "INVALID_NAME"), ("events/not-a-uuid", "EVENT_NOT_FOUND")]:
        with pytest.raises(Exception) as exc:
            rules.parse_event_name(bad)
        assert exc.value.reason == reason  # type: ignore[attr-defined]


def test_page_tokens_round_trip_and_reject_garbage() -> None:
    c = paging.Cursor(datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=UTC), uuid.uuid4())
    token = paging.encode(c)
    assert paging.decode(token) == c
    assert paging.decode("") is None
    for bad in ("x", "!!!!", token[:-3], "MS4xMjM", "Mi4xLjE"):
        with pytest.raises(InvalidArgument) as exc:
            paging.decode(bad)
        assert exc.value.reason == "INVALID_PAGE_TOKEN"
    assert paging.page_size(0) == 20 and paging.page_size(7) == 7 and paging.page_size(1000) == 100
    with pytest.raises(InvalidArgument):
        paging.page_size(-1)
