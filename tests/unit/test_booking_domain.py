"""Booking's rules without I/O: seat ids, prices, names, the EventPublished → layout mapping."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import grpc
import pytest
from google.type.money_pb2 import Money as PbMoney
from ticketping.events.v1 import events_pb2 as ev

from meshkit.config import SettingsError, load
from meshkit.errors import DomainError
from meshkit.seats import parse_seat_id
from svc_booking.adapters import inventory as inv
from svc_booking.adapters.messages import layout_of
from svc_booking.adapters.settled import SettledOrders, Settlement, parse_note
from svc_booking.config import Settings
from svc_booking.domain import model
from svc_booking.domain.model import Money, OrderState


def published() -> ev.EventPublished:
    return ev.EventPublished(
        event="events/0b0b0b0b-0000-4000-8000-000000000001", title="Show", seat_limit_per_fan=4,
        price_tiers=[ev.PriceTier(name="VIP", price=PbMoney(currency_code="KRW", units=165000)),
                     ev.PriceTier(name="R", price=PbMoney(currency_code="KRW", units=99,
                                                          nanos=900_000_000))],
        seat_ranges=[ev.SeatRange(section="A", rows=10, seats_per_row=20, tier="VIP"),
                     ev.SeatRange(section="B", rows=30, seats_per_row=40, tier="R")],
        seat_count=1400)


def test_layout_from_event_published_uses_the_shared_expansion() -> None:
    layout = layout_of(published())
    assert layout.event_id == "0b0b0b0b-0000-4000-8000-000000000001"
    assert layout.seat_count == 1400 == len(set(layout.seat_map.seat_ids()))
    assert layout.seat("A-10-20") is not None and layout.seat("A-10-20").tier == "VIP"  # type: ignore[union-attr]
    assert layout.seat("B-30-40").tier == "R"  # type: ignore[union-attr]
    for bad in ("A-11-1", "A-1-21", "C-1-1", "A-0-1", "A-01-1", "A-1", "A-1-1-1", "", "-1-1", "A-x-1"):
        assert layout.seat(bad) is None, bad
    assert layout.unknown(["A-1-1", "Z-1-1", "A-1-99"]) == ["Z-1-1", "A-1-99"]


def test_amount_comes_from_the_tiers_with_nanos_carried() -> None:
    layout = layout_of(published())
    assert layout.amount(["A-1-1", "B-1-1", "B-1-2"]) == Money("KRW", 165000 + 199, 800_000_000)
    with pytest.raises(DomainError) as exc:
        layout.amount(["A-1-1", "Q-1-1"])
    assert exc.value.reason == "UNKNOWN_SEAT"


def test_seat_id_parsing() -> None:
    assert parse_seat_id("VIP1-12-3") == ("VIP1", 12, 3)
    assert parse_seat_id("A-1-0") is None and parse_seat_id("A--1") is None
    # Unicode digits are not digits here ("²" made int() raise: a 500 instead of UNKNOWN_SEAT).
    assert parse_seat_id("A-\u00b2-1") is None and parse_seat_id("A-\u0661-1") is None
    assert parse_seat_id("Z" * 70 + "-1-1") is None  # longer than any seat id


def test_names() -> None:
    e, h, o = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    assert model.parse_event_name(f"events/{e}") == str(e)
    assert model.parse_hold_name(f"events/{e}/holds/{h}") == (str(e), h)
    assert model.parse_order_name(f"orders/{o}") == o
    for bad in ("events/", "event/x", f"events/{e}/x", "events/not-a-uuid"):
        with pytest.raises(DomainError) as exc:
            model.parse_event_name(bad)
        assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
    for bad in (f"events/{e}/holds/x", f"events/{e}/orders/{h}", f"events/x/holds/{h}"):
        with pytest.raises(DomainError):
            model.parse_hold_name(bad)
    assert model.normalize_event(f"events/{e}") == model.normalize_event(str(e)) == str(e)


def test_seat_list_checks_and_error_shapes() -> None:
    assert model.check_seat_ids(["A-1-1", "A-1-2"]) == ("A-1-1", "A-1-2")
    for bad, reason in (([], "NO_SEATS"), (["A-1-1", "A-1-1"], "DUPLICATE_SEAT"),
                        ([f"A-1-{i}" for i in range(1, 60)], "TOO_MANY_SEATS")):
        with pytest.raises(DomainError) as exc:
            model.check_seat_ids(bad)
        assert exc.value.reason == reason
    taken = model.SeatUnavailable(["A-1-1", "A-1-2"])
    assert (taken.code, taken.reason, taken.metadata) == (
        grpc.StatusCode.ABORTED, "SEAT_UNAVAILABLE", {"seat_ids": "A-1-1,A-1-2"})
    over = model.SeatLimitExceeded(3, 2, 4)
    assert (over.code, over.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SEAT_LIMIT_EXCEEDED")


def test_every_key_of_an_event_shares_one_hash_tag() -> None:
    e = "0b0b0b0b-0000-4000-8000-000000000001"
    keys = [inv.meta_key(e), inv.seats_key(e), inv.deadlines_key(e), inv.fans_key(e),
            inv.hold_key(e, "h"), inv.request_key(e, "u", "r"), inv.runs_key(e)]
    assert {k[: k.index("}") + 1] for k in keys} == {"{inv:" + e + "}"}


def test_a_pool_the_consumers_could_exhaust_stops_booking_at_start(monkeypatch, capsys):
    for name in ("POSTGRES_DSN", "REDIS_URL", "KAFKA_BOOTSTRAP", "QUEUE_ADDR"):
        monkeypatch.setenv(f"TP_{name}", "x")
    assert (load(Settings).postgres_pool_size, load(Settings).payment_consumer_concurrency) == (56, 24)
    monkeypatch.setenv("TP_POSTGRES_POOL_SIZE", "24")  # the other services' default
    with pytest.raises(SettingsError):
        load(Settings)
    assert "TP_PAYMENT_CONSUMER_CONCURRENCY" in capsys.readouterr().err
    monkeypatch.setenv("TP_PAYMENT_CONSUMER_CONCURRENCY", "8")
    assert load(Settings).payment_consumer_concurrency == 8


def test_a_settled_note_says_what_the_order_became_or_nothing_it_cannot_read() -> None:
    oid = uuid.uuid4()
    assert parse_note(str(oid)) == (oid, None)  # a trigger older than migration 0005
    assert parse_note(f"{oid} CONFIRMED 1796625385487669 payments/p1") == (oid, Settlement(
        OrderState.CONFIRMED, datetime(2026, 12, 7, 6, 36, 25, 487669, tzinfo=UTC), "payments/p1"))
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    assert parse_note(f"{oid} EXPIRED 0 ") == (oid, Settlement(OrderState.EXPIRED, epoch, ""))
    for unreadable in ("SHIPPED 1 x", "CONFIRMED soon x", "CONFIRMED", "PENDING_PAYMENT 1 "):
        assert parse_note(f"{oid} {unreadable}") == (oid, None)  # it reads the order instead
    with pytest.raises(ValueError):
        parse_note("not-an-id CONFIRMED 1 x")


def test_settled_orders_wake_the_waiters_of_that_order_or_all_when_unsure() -> None:
    settled = SettledOrders()
    a, b = uuid.uuid4(), uuid.uuid4()
    with settled.watch(a) as wa1, settled.watch(a) as wa2, settled.watch(b) as wb:
        assert len(settled) == 3
        settled.on_note(f"{a} CANCELLED 1000000 ")
        assert wa1.is_set() and wa2.is_set() and not wb.is_set()
        said = Settlement(OrderState.CANCELLED, datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC), "")
        assert wa1.take() == said and not wa1.is_set() and wa1.take() is None
        settled.on_note(str(a))  # woken, but not told how: it reads the order
        assert wa1.is_set() and wa1.take() is None
        settled.on_note("not an order id")  # ignored, not a crash of the listener
        settled.on_note(str(uuid.uuid4()))  # nobody waits for it
        assert not wb.is_set()
        settled.on_note(f"{a} CONFIRMED 5 payments/p")
        settled.on_note(None)  # notifications may have been lost: everyone looks again
        assert wb.is_set() and wa2.is_set() and wa2.take() is None
    assert len(settled) == 0 and not settled.listening()


def test_an_order_made_while_listening_is_known_until_a_note_may_have_been_missed() -> None:
    settled = SettledOrders(kept=2)
    t = datetime(2026, 12, 7, tzinfo=UTC)

    def order() -> model.Order:
        return model.Order(uuid.uuid4(), "e", uuid.uuid4(), "u", ("A-1-1",), Money("KRW", 1000),
                           OrderState.PENDING_PAYMENT, t, "", t, t)

    deaf = order()
    settled.made(deaf)  # not listening: its notes could be missed
    assert settled.known(deaf.order_id) is None
    settled.listening = lambda: True
    a, b, c = order(), order(), order()
    for o in (a, b):
        settled.made(o)
    assert settled.known(a.order_id) == a  # pending, as made
    settled.on_note(f"{a.order_id} CONFIRMED 5 payments/p")
    assert settled.known(a.order_id) == model.Order(
        a.order_id, "e", a.hold_id, "u", ("A-1-1",), Money("KRW", 1000), OrderState.CONFIRMED, t,
        "payments/p", t, datetime(1970, 1, 1, 0, 0, 0, 5, tzinfo=UTC))
    settled.on_note(str(b.order_id))  # changed, not said how: read it
    assert settled.known(b.order_id) is None
    settled.made(b)
    settled.made(c)  # past ``kept``: the oldest (a) is forgotten
    assert settled.known(a.order_id) is None and settled.known(c.order_id) == c
    settled.listening = lambda: False  # the connection is down: nothing is known
    assert settled.known(c.order_id) is None
    settled.listening = lambda: True
    settled.on_note(None)  # notes may have been missed: everything is read again
    assert settled.known(b.order_id) is None and settled.known(c.order_id) is None
