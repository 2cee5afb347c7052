"""svc_catalog in process over gRPC, with real PostgreSQL and Kafka (its outbox relay runs).

What admins and fans care about: an event goes from draft to published and is then listed and
readable by everyone; bad input is refused with its reason and changes nothing; fans cannot use
admin methods; pages never repeat or skip events while others are published; the browse load is
served from memory and still sees every write at once, in every replica.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import psycopg
import pytest
import pytest_asyncio
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp
from google.type.money_pb2 import Money
from ticketping.catalog.v1 import catalog_service_pb2 as pb
from ticketping.catalog.v1 import catalog_service_pb2_grpc as pb_grpc

from devstack.layout import ROOT
from meshkit.errors import error_info
from meshkit.server import start
from svc_catalog.bootstrap import Wired, wire
from svc_catalog.config import Settings
from svc_catalog.demo import load_demo

pytestmark = pytest.mark.integration

ADMIN = (("x-user-id", "admin-1"), ("x-user-role", "ADMIN"))
FAN = (("x-user-id", "fan-1"), ("x-user-role", "USER"))
PUBLIC_CC = "public, max-age=5"


# -- fixtures and helpers ------------------------------------------------------------------------


async def _serve(pg_dsn: str, kafka_bootstrap: str, **settings: Any) -> Wired:
    wired = await wire(
        Settings(grpc_port=0, postgres_dsn=pg_dsn, kafka_bootstrap=kafka_bootstrap, **settings)
    )
    await start(wired.app)
    return wired


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def wired(pg_dsn: str, kafka_bootstrap: str) -> AsyncIterator[Wired]:
    w = await _serve(pg_dsn, kafka_bootstrap)
    yield w
    await w.app.stop(1.0)


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def stub(wired: Wired) -> AsyncIterator[pb_grpc.CatalogServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{wired.app.port}") as channel:
        yield pb_grpc.CatalogServiceStub(channel)


@pytest.fixture(scope="module")
def db(pg_dsn: str) -> Callable[..., list[tuple[Any, ...]]]:
    def query(sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            cur = conn.execute(sql, params)  # type: ignore[call-overload]
            return cur.fetchall() if cur.description else []

    return query


def ts(t: datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(t)
    return out


def new_event(title: str = "Winter Tour - Seoul", *, start_in: timedelta = timedelta(days=30),
              start: datetime | None = None, **fields: Any) -> pb.Event:
    now = datetime.now(UTC).replace(microsecond=0)
    start = start or now + start_in
    event = pb.Event(
        title=title,
        artist="Someone",
        venue=pb.Venue(name="KSPO Dome", address="Seoul"),
        start_time=ts(start),
        queue_open_time=ts(now + timedelta(hours=1)),
        sale_open_time=ts(now + timedelta(hours=2)),
        seat_limit_per_fan=4,
        price_tiers=[
            pb.PriceTier(name="VIP", price=Money(currency_code="KRW", units=165000)),
            pb.PriceTier(name="R", price=Money(currency_code="KRW", units=132000)),
        ],
        seat_map=pb.SeatMap(
            sections=[
                pb.SeatSection(name="A", rows=10, seats_per_row=20, tier="VIP"),
                pb.SeatSection(name="B", rows=30, seats_per_row=40, tier="R"),
            ]
        ),
    )
    for k, v in fields.items():
        if isinstance(v, list):
            event.ClearField(k)  # type: ignore[arg-type]
            getattr(event, k).extend(v)
        elif hasattr(v, "CopyFrom"):
            getattr(event, k).CopyFrom(v)
        else:
            setattr(event, k, v)
    return event


async def create(stub: pb_grpc.CatalogServiceStub, event: pb.Event | None = None, **kw: Any) -> pb.Event:
    return await stub.CreateEvent(pb.CreateEventRequest(event=event or new_event(), **kw), metadata=ADMIN)


async def publish(stub: pb_grpc.CatalogServiceStub, name: str) -> pb.Event:
    return await stub.PublishEvent(pb.PublishEventRequest(name=name), metadata=ADMIN)


async def published(stub: pb_grpc.CatalogServiceStub, event: pb.Event | None = None) -> pb.Event:
    return await publish(stub, (await create(stub, event)).name)


async def fails(call: Any, code: grpc.StatusCode, reason: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call
    err = exc.value
    info = error_info(err)
    assert (err.code(), info.reason if info else None) == (code, reason), err.details()
    assert info is not None and info.domain == "ticketping.dev"
    return err


async def cache_control(call: Any) -> str:
    md = dict(await call.initial_metadata())
    await call
    return str(md.get("cache-control"))


def rename(name: str, title: str) -> pb.UpdateEventRequest:
    mask = FieldMask(paths=["title"])
    return pb.UpdateEventRequest(event=pb.Event(name=name, title=title), update_mask=mask)


def count_events(db: Callable[..., list[tuple[Any, ...]]]) -> int:
    return int(db("SELECT count(*) FROM events")[0][0])


# -- create, publish, read -------------------------------------------------------------------------


async def test_create_publish_then_everyone_reads_it(stub: pb_grpc.CatalogServiceStub) -> None:
    draft = await create(stub, new_event("Create Publish Read"))
    assert draft.name.startswith("events/") and draft.state == pb.EVENT_STATE_DRAFT
    assert draft.seat_count == 10 * 20 + 30 * 40
    assert draft.HasField("create_time") and not draft.HasField("publish_time")
    assert [s.name for s in draft.seat_map.sections] == ["A", "B"]
    assert draft.price_tiers[0].price.units == 165000

    # a draft is invisible to fans, visible to admins (never cached downstream)
    await fails(stub.GetEvent(pb.GetEventRequest(name=draft.name), metadata=FAN),
                grpc.StatusCode.NOT_FOUND, "EVENT_NOT_FOUND")
    admin_read = stub.GetEvent(pb.GetEventRequest(name=draft.name), metadata=ADMIN)
    assert await cache_control(admin_read) == "no-store"
    listed = await stub.ListEvents(pb.ListEventsRequest(page_size=100))
    assert draft.name not in {e.name for e in listed.events}

    event = await publish(stub, draft.name)
    assert event.state == pb.EVENT_STATE_PUBLISHED and event.HasField("publish_time")
    assert event.title == draft.title and event.seat_count == draft.seat_count

    call = stub.GetEvent(pb.GetEventRequest(name=draft.name))  # anonymous
    assert await cache_control(call) == PUBLIC_CC
    got = await call
    assert got == event
    call = stub.ListEvents(pb.ListEventsRequest(page_size=100), metadata=FAN)
    assert await cache_control(call) == PUBLIC_CC
    assert event in (await call).events


async def test_create_is_idempotent_per_request_id(stub: pb_grpc.CatalogServiceStub, db: Any) -> None:
    """A retry (the same request id, the same request) answers the first event; the same id with
    another request is the client's mistake, refused with the event it did make: answering that
    event would tell an admin who changed the title that an event with the new title exists."""
    before = count_events(db)
    rid = str(uuid.uuid4())
    asked = new_event("Idempotent")
    first = await create(stub, asked, request_id=rid)
    again = await create(stub, asked, request_id=rid)
    assert again == first
    err = await fails(create(stub, new_event("Idempotent, changed"), request_id=rid),
                      grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_ID_REUSED")
    info = error_info(err)
    assert info is not None and info.metadata["used_for"] == first.name
    chosen = str(uuid.uuid4())  # another event id is another request too
    await fails(create(stub, asked, request_id=rid, event_id=chosen),
                grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_ID_REUSED")
    rid2 = str(uuid.uuid4())
    once = new_event("Burst")
    burst = await asyncio.gather(*(create(stub, once, request_id=rid2) for _ in range(8)))
    assert len({e.name for e in burst}) == 1
    assert count_events(db) == before + 2


async def test_client_chosen_event_ids(stub: pb_grpc.CatalogServiceStub) -> None:
    eid = str(uuid.uuid4())
    event = await create(stub, new_event("Chosen id"), event_id=eid)
    assert event.name == f"events/{eid}"
    await fails(create(stub, new_event("Chosen id again"), event_id=eid),
                grpc.StatusCode.ALREADY_EXISTS, "EVENT_EXISTS")
    await fails(create(stub, new_event("Bad id"), event_id="not a uuid"),
                grpc.StatusCode.INVALID_ARGUMENT, "INVALID_EVENT_ID")
    await fails(create(stub, new_event("Bad request id"), request_id="nope"),
                grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST_ID")


# -- validation --------------------------------------------------------------------------------------


def _bad_events() -> list[tuple[str, pb.Event]]:
    now = datetime.now(UTC)
    vip = pb.PriceTier(name="VIP", price=Money(currency_code="KRW", units=1000))
    return [
        ("MISSING_FIELD", new_event("")),
        ("MISSING_FIELD", pb.Event(title="Only a title")),
        ("INVALID_TIMES", new_event(sale_open_time=ts(now + timedelta(days=40)))),  # after the show
        ("INVALID_TIMES", new_event(queue_open_time=ts(now + timedelta(hours=3)))),  # after the sale
        ("EMPTY_SEAT_MAP", new_event(seat_map=pb.SeatMap())),
        ("NEGATIVE_PRICE", new_event(price_tiers=[
            vip, pb.PriceTier(name="R", price=Money(currency_code="KRW", units=-5))])),
        ("INVALID_PRICE", new_event(price_tiers=[
            vip, pb.PriceTier(name="R", price=Money(currency_code="KRW", units=5, nanos=5))])),
        ("INVALID_CURRENCY", new_event(price_tiers=[
            pb.PriceTier(name="VIP", price=Money(currency_code="WON", units=1)),
            pb.PriceTier(name="R", price=Money(currency_code="", units=1))])),
        ("UNKNOWN_TIER", new_event(seat_map=pb.SeatMap(sections=[
            pb.SeatSection(name="A", rows=1, seats_per_row=1, tier="GOLD")]))),
        ("DUPLICATE_SEAT", new_event(seat_map=pb.SeatMap(sections=[
            pb.SeatSection(name="A", rows=1, seats_per_row=1, tier="VIP"),
            pb.SeatSection(name="A", rows=2, seats_per_row=2, tier="R")]))),
        ("SEAT_MAP_TOO_LARGE", new_event(seat_map=pb.SeatMap(sections=[
            pb.SeatSection(name="A", rows=250, seats_per_row=201, tier="VIP")]))),
        ("INVALID_SEAT_LIMIT", new_event(seat_limit_per_fan=0)),
        ("INVALID_SEAT_MAP", new_event(seat_map=pb.SeatMap(sections=[
            pb.SeatSection(name="A-1", rows=1, seats_per_row=1, tier="VIP")]))),
    ]


@pytest.mark.parametrize(("reason", "event"), _bad_events())
async def test_bad_input_is_refused_with_its_reason_and_changes_nothing(
    stub: pb_grpc.CatalogServiceStub, db: Any, reason: str, event: pb.Event
) -> None:
    before = count_events(db)
    err = await fails(create(stub, event, request_id=str(uuid.uuid4())),
                      grpc.StatusCode.INVALID_ARGUMENT, reason)
    assert "field" in error_info(err).metadata  # type: ignore[union-attr]
    assert count_events(db) == before


async def test_update_a_draft_and_never_a_published_event(stub: pb_grpc.CatalogServiceStub, db: Any) -> None:
    draft = await create(stub, new_event("Before"))
    patch = pb.Event(name=draft.name, title="After", seat_limit_per_fan=2)
    updated = await stub.UpdateEvent(
        pb.UpdateEventRequest(event=patch, update_mask=FieldMask(paths=["title", "seat_limit_per_fan"])),
        metadata=ADMIN,
    )
    assert (updated.title, updated.seat_limit_per_fan, updated.artist) == ("After", 2, "Someone")
    assert updated.update_time.ToDatetime() > draft.update_time.ToDatetime()
    # no mask: the fields set in the request
    updated = await stub.UpdateEvent(
        pb.UpdateEventRequest(event=pb.Event(name=draft.name, venue=pb.Venue(address="Olympic Park"))),
        metadata=ADMIN,
    )
    assert (updated.venue.name, updated.venue.address) == ("KSPO Dome", "Olympic Park")
    # a new seat map is re-validated and re-counted
    updated = await stub.UpdateEvent(
        pb.UpdateEventRequest(
            event=pb.Event(name=draft.name, seat_map=pb.SeatMap(sections=[
                pb.SeatSection(name="Floor", rows=5, seats_per_row=10, tier="R")])),
            update_mask=FieldMask(paths=["seat_map"]),
        ),
        metadata=ADMIN,
    )
    assert updated.seat_count == 50

    # bad updates change nothing
    for patch, mask, code, reason in [
        (pb.Event(name=draft.name, seat_map=pb.SeatMap()), ["seat_map"],
         grpc.StatusCode.INVALID_ARGUMENT, "EMPTY_SEAT_MAP"),
        (pb.Event(name=draft.name, title="x"), ["title", "bogus"], grpc.StatusCode.INVALID_ARGUMENT,
         "INVALID_UPDATE_MASK"),
        (pb.Event(name=f"events/{uuid.uuid4()}", title="x"), ["title"], grpc.StatusCode.NOT_FOUND,
         "EVENT_NOT_FOUND"),
    ]:
        await fails(stub.UpdateEvent(pb.UpdateEventRequest(event=patch, update_mask=FieldMask(paths=mask)),
                                     metadata=ADMIN), code, reason)
    assert await stub.GetEvent(pb.GetEventRequest(name=draft.name), metadata=ADMIN) == updated

    await publish(stub, draft.name)
    await fails(
        stub.UpdateEvent(pb.UpdateEventRequest(event=pb.Event(name=draft.name, title="Too late"),
                                               update_mask=FieldMask(paths=["title"])), metadata=ADMIN),
        grpc.StatusCode.FAILED_PRECONDITION, "EVENT_NOT_DRAFT",
    )
    assert (await stub.GetEvent(pb.GetEventRequest(name=draft.name))).title == "After"


async def test_publish_validates_against_the_clock_and_emits_once(
    stub: pb_grpc.CatalogServiceStub, db: Any
) -> None:
    draft = await create(stub, new_event("Late"))
    eid = draft.name.removeprefix("events/")
    # the sale opened while it was still a draft (moved in the database, as time would)
    db(
        "WITH u AS (UPDATE events SET queue_open_time = now() - interval '2 hours', "
        "sale_open_time = now() - interval '1 hour' WHERE id = %s) SELECT pg_notify('catalog_changed', %s)",
        eid, eid,
    )
    await fails(publish(stub, draft.name), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_TIMES")
    assert db("SELECT state, publish_time FROM events WHERE id = %s", eid) == [("DRAFT", None)]
    assert db("SELECT count(*) FROM outbox WHERE key = %s", eid) == [(0,)]

    ok = await create(stub, new_event("Twice"))
    oid = ok.name.removeprefix("events/")
    first, second = await publish(stub, ok.name), await publish(stub, ok.name)
    concurrent = await asyncio.gather(*(publish(stub, ok.name) for _ in range(5)))
    assert first == second and all(c == first for c in concurrent)
    rows = db("SELECT topic, headers->>'event_type' FROM outbox WHERE key = %s", oid)
    assert rows == [("ticketping.catalog.v1", "event_published")]
    await fails(publish(stub, f"events/{uuid.uuid4()}"), grpc.StatusCode.NOT_FOUND, "EVENT_NOT_FOUND")


async def test_unknown_events_are_404(stub: pb_grpc.CatalogServiceStub) -> None:
    for name in (f"events/{uuid.uuid4()}", "events/no-such-event"):
        await fails(stub.GetEvent(pb.GetEventRequest(name=name)), grpc.StatusCode.NOT_FOUND,
                    "EVENT_NOT_FOUND")
    await fails(stub.GetEvent(pb.GetEventRequest(name="orders/1")), grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_NAME")


async def test_fans_and_strangers_cannot_use_admin_methods(stub: pb_grpc.CatalogServiceStub, db: Any) -> None:
    draft = await create(stub, new_event("Admin only"))
    before = count_events(db)
    calls: list[Callable[[Any], Any]] = [
        lambda md: stub.CreateEvent(pb.CreateEventRequest(event=new_event("Fan made")), metadata=md),
        lambda md: stub.UpdateEvent(rename(draft.name, "Fan"), metadata=md),
        lambda md: stub.PublishEvent(pb.PublishEventRequest(name=draft.name), metadata=md),
    ]
    for call in calls:
        await fails(call(FAN), grpc.StatusCode.PERMISSION_DENIED, "ADMIN_ONLY")
        await fails(call((("x-user-role", "ADMIN"),)), grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")
        await fails(call(()), grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")
    assert count_events(db) == before
    got = await stub.GetEvent(pb.GetEventRequest(name=draft.name), metadata=ADMIN)
    assert (got.title, got.state) == ("Admin only", pb.EVENT_STATE_DRAFT)


# -- pagination ---------------------------------------------------------------------------------------


async def test_pages_stay_stable_while_events_are_published(stub: pb_grpc.CatalogServiceStub) -> None:
    tag = uuid.uuid4().hex[:6]
    base = datetime.now(UTC).replace(microsecond=0) + timedelta(days=400)  # after other tests' events

    def at(day: int, title: str) -> pb.Event:
        return new_event(f"{tag} {title}", start=base + timedelta(days=day))

    # 25 events, five of them at the same instant (ordered by id among themselves)
    original = [await published(stub, at(d if d % 5 else 10, f"orig {d}")) for d in range(1, 26)]
    seen: list[pb.Event] = []
    added_before: list[pb.Event] = []
    added_after: list[pb.Event] = []
    token = ""
    pages = 0
    while True:
        page = await stub.ListEvents(pb.ListEventsRequest(page_size=7, page_token=token))
        pages += 1
        seen += [e for e in page.events if e.title.startswith(tag)]
        token = page.next_page_token
        if not token:
            break
        # between pages: events published before the cursor, at it, and after it
        day = (seen[-1].start_time.ToDatetime(tzinfo=UTC) - base).days
        added_before.append(await published(stub, at(day - 1, f"before {pages}")))
        added_after.append(await published(stub, at(day + 30, f"after {pages}")))
        await published(stub, at(day, f"tie {pages}"))
    names = [e.name for e in seen]
    assert len(names) == len(set(names)), "an event was listed twice"
    assert {e.name for e in original} <= set(names), "an event listed from the start was skipped"
    assert {e.name for e in added_after} <= set(names)
    assert not {e.name for e in added_before} & set(names)
    keys = [(e.start_time.ToDatetime(), e.name.removeprefix("events/")) for e in seen]
    assert keys == sorted(keys) and [str(uuid.UUID(k[1])) for k in keys] == [k[1] for k in keys]
    assert pages >= 4


async def test_page_sizes_and_bad_tokens(stub: pb_grpc.CatalogServiceStub) -> None:
    for _ in range(3):
        await published(stub, new_event("Paging"))
    page = await stub.ListEvents(pb.ListEventsRequest(page_size=2))
    assert len(page.events) == 2 and page.next_page_token
    big = await stub.ListEvents(pb.ListEventsRequest(page_size=1000))
    assert len(big.events) <= 100
    default = await stub.ListEvents(pb.ListEventsRequest())
    assert len(default.events) == min(20, len(big.events))
    for token in ("garbage", page.next_page_token[:-2] + "!!"):
        await fails(stub.ListEvents(pb.ListEventsRequest(page_token=token)),
                    grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")
    await fails(stub.ListEvents(pb.ListEventsRequest(page_size=-1)),
                grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_SIZE")


# -- the read cache -------------------------------------------------------------------------------------


async def _heard(wired: Wired, notifications: int) -> None:
    deadline = time.monotonic() + 10
    while wired.listener.notifications < notifications:
        assert time.monotonic() < deadline, "the writes' notifications never arrived"
        await asyncio.sleep(0.02)


async def test_reads_are_served_from_memory_and_see_writes_at_once(
    stub: pb_grpc.CatalogServiceStub, wired: Wired
) -> None:
    repo = wired.catalog.repo
    heard = wired.listener.notifications
    event = await published(stub, new_event("Cached"))
    # This process hears its own writes' NOTIFY too, a moment later, and drops its cache then: wait
    # for both (create, publish), or a late one would empty the cache warmed below.
    await _heard(wired, heard + 2)
    req = pb.GetEventRequest(name=event.name)
    await stub.GetEvent(req)
    await stub.ListEvents(pb.ListEventsRequest())
    reads = repo.reads
    got = await asyncio.gather(*(stub.GetEvent(req) for _ in range(300)))
    pages = await asyncio.gather(*(stub.ListEvents(pb.ListEventsRequest()) for _ in range(100)))
    assert all(g == event for g in got) and all(p == pages[0] for p in pages)
    assert repo.reads == reads, "a cached read went to PostgreSQL"

    # an update is visible to the very next read (drafts are cached too, for admins)
    heard = wired.listener.notifications
    draft = await create(stub, new_event("Cached draft"))
    await _heard(wired, heard + 1)  # the create's own NOTIFY, or it could empty the cache below
    dreq = pb.GetEventRequest(name=draft.name)
    assert (await stub.GetEvent(dreq, metadata=ADMIN)).title == "Cached draft"
    await fails(stub.GetEvent(dreq), grpc.StatusCode.NOT_FOUND, "EVENT_NOT_FOUND")  # cached as a draft
    reads = repo.reads
    assert (await stub.GetEvent(dreq, metadata=ADMIN)).title == "Cached draft"
    assert repo.reads == reads
    await stub.UpdateEvent(rename(draft.name, "Renamed"), metadata=ADMIN)
    assert (await stub.GetEvent(dreq, metadata=ADMIN)).title == "Renamed"
    # publishing is visible at once too, in get and list
    await publish(stub, draft.name)
    assert (await stub.GetEvent(dreq)).state == pb.EVENT_STATE_PUBLISHED
    listed = await stub.ListEvents(pb.ListEventsRequest(page_size=100))
    assert draft.name in {e.name for e in listed.events}


async def test_every_replica_sees_a_write_at_once(
    stub: pb_grpc.CatalogServiceStub, pg_dsn: str, kafka_bootstrap: str
) -> None:
    # replica B caches for five minutes: only the NOTIFY can make it see A's writes in time
    b = await _serve(pg_dsn, kafka_bootstrap, cache_ttl_seconds=300)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{b.app.port}") as channel:
            stub_b = pb_grpc.CatalogServiceStub(channel)
            heard = b.listener.notifications
            draft = await create(stub, new_event("Replicated"))
            # B hears the create's own NOTIFY too, which empties its copy: once it has, what B
            # reads next stays in memory (otherwise the NOTIFY may land between the reads below)
            await _heard(b, heard + 1)
            req = pb.GetEventRequest(name=draft.name)
            assert (await stub_b.GetEvent(req, metadata=ADMIN)).title == "Replicated"
            await fails(stub_b.GetEvent(req), grpc.StatusCode.NOT_FOUND, "EVENT_NOT_FOUND")
            first_page = await stub_b.ListEvents(pb.ListEventsRequest(page_size=100))
            reads = b.catalog.repo.reads
            await stub_b.GetEvent(req, metadata=ADMIN)
            assert b.catalog.repo.reads == reads  # B serves it from memory now

            await stub.UpdateEvent(rename(draft.name, "Renamed on A"), metadata=ADMIN)
            await _eventually(lambda: stub_b.GetEvent(req, metadata=ADMIN),
                              lambda e: e.title == "Renamed on A")
            await publish(stub, draft.name)
            await _eventually(lambda: stub_b.GetEvent(req), lambda e: e.state == pb.EVENT_STATE_PUBLISHED)
            await _eventually(lambda: stub_b.ListEvents(pb.ListEventsRequest(page_size=100)),
                              lambda p: draft.name in {e.name for e in p.events} and p != first_page)
            assert b.listener.notifications >= 2
    finally:
        await b.app.stop(1.0)


async def _eventually(call: Callable[[], Any], ok: Callable[[Any], bool], within: float = 2.0) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            if ok(await call()):
                return
        except grpc.aio.AioRpcError:
            pass
        assert time.monotonic() < deadline, "replica B did not see the write in time"
        await asyncio.sleep(0.02)


# -- the demo event ------------------------------------------------------------------------------------


async def test_demo_event_loads_once(wired: Wired, db: Any) -> None:
    target = f"127.0.0.1:{wired.app.port}"
    first = await load_demo(target)
    again = await load_demo(target)
    assert first == again and first.state == pb.EVENT_STATE_PUBLISHED
    assert first.seat_count == 3200 and {t.name for t in first.price_tiers} == {"VIP", "R", "S"}
    assert first.price_tiers[0].price.currency_code == "KRW"
    sale = first.sale_open_time.ToDatetime(tzinfo=UTC)
    assert timedelta(0) < sale - datetime.now(UTC) <= timedelta(minutes=2)
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "svc_catalog.demo", "--grpc", target],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == first.name
    assert db("SELECT count(*) FROM events WHERE title = %s", first.title) == [(1,)]
