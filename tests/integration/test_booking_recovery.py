"""Booking survives what production does to it: a Redis restart that loses everything, several
replicas sweeping expired holds at once, Redis Cluster, and a waiting room not built yet."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.type.money_pb2 import Money
from redis.asyncio import Redis
from ticketping.booking.v1 import booking_service_pb2 as pb
from ticketping.booking.v1 import booking_service_pb2_grpc as pb_grpc
from ticketping.events.v1 import events_pb2 as ev
from ticketping.queue.v1 import queue_service_pb2_grpc as qpb_grpc

from meshkit.errors import DomainError, error_info
from meshkit.events import new_envelope
from meshkit.server import start
from svc_booking.adapters import postgres as db
from svc_booking.adapters.admission import StaticAdmission
from svc_booking.adapters.inventory import SWEEP_KEY, HoldResult, Inventory
from svc_booking.adapters.payment_events import PaymentEvents
from svc_booking.bootstrap import Wired, wire
from svc_booking.config import Settings
from svc_booking.domain import model
from svc_booking.domain.model import Order, OrderState
from svc_booking.service import Booking

from .test_booking_support import Clock, fan, new_event

pytestmark = pytest.mark.integration

INTERNAL = (("x-user-id", "payment-svc"),)


def rid() -> str:
    return str(uuid.uuid4())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A redis-server of this test alone, without persistence: a restart loses every key."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        assert exe, "redis-server is installed by devstack"
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                assert time.monotonic() < deadline, "private redis-server did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    r = PrivateRedis(tmp_path_factory.mktemp("redis"))
    r.start()
    yield r
    r.stop()


def settings(pg_dsn: str, redis_url: str, kafka: str, **kw: object) -> Settings:
    values: dict[str, object] = {"queue_addr": "127.0.0.1:1", "seats_cache_seconds": 0,
                                 "run_consumer": False,
                                 "run_sweeper": False, **kw}
    return Settings(grpc_port=0, postgres_dsn=pg_dsn, redis_url=redis_url, kafka_bootstrap=kafka,
                    **values)  # type: ignore[arg-type]


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def wired(pg_dsn: str, private_redis: PrivateRedis, kafka_bootstrap: str
                ) -> AsyncIterator[Wired]:
    w = await wire(settings(pg_dsn, private_redis.url, kafka_bootstrap), admission=StaticAdmission())
    await start(w.app)
    yield w
    await w.app.stop(1.0)


async def retry(call, attempts: int = 20):  # type: ignore[no-untyped-def]
    """The first calls after a Redis restart may meet the dead connections; a client retries."""
    for _ in range(attempts - 1):
        try:
            return await call()
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.INTERNAL:
                raise
            await asyncio.sleep(0.1)
    return await call()


async def test_real_redis_restart_loses_holds_never_sales(
    wired: Wired, private_redis: PrivateRedis
) -> None:
    event_id = await new_event(wired, sections=(("A", 1, 8, "VIP"),), limit=8)
    parent = f"events/{event_id}"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{wired.app.port}") as ch:
        stub = pb_grpc.BookingServiceStub(ch)
        h = await stub.CreateHold(pb.CreateHoldRequest(parent=parent, seat_ids=["A-1-1", "A-1-2"],
                                                       request_id=rid()), metadata=fan("u1", event_id))
        o = await stub.CreateOrder(pb.CreateOrderRequest(hold=h.name, request_id=rid()),
                                   metadata=fan("u1", event_id))
        await stub.ConfirmOrder(pb.ConfirmOrderRequest(order=o.name, payment="payments/1",
                                                       request_id=rid()), metadata=INTERNAL)
        live = await stub.CreateHold(pb.CreateHoldRequest(parent=parent, seat_ids=["A-1-3"],
                                                          request_id=rid()), metadata=fan("u2", event_id))

        private_redis.stop()
        private_redis.start()  # empty: no RDB, no AOF
        probe = Redis.from_url(private_redis.url)
        assert await probe.dbsize() == 0
        await probe.aclose()

        resp = await retry(lambda: stub.ListSeats(pb.ListSeatsRequest(parent=parent,
                                                                      view=pb.SEAT_VIEW_COMPACT)))
        assert resp.sections[0].statuses == "SSHAAAAA"  # rebuilt from PostgreSQL
        # 200 fans now race for the 8 seats, all of them wanting A-1-1 (sold) and one more
        async def one(i: int) -> pb.Hold | None:
            try:
                return await stub.CreateHold(
                    pb.CreateHoldRequest(parent=parent, seat_ids=["A-1-1", f"A-1-{2 + i % 7}"],
                                         request_id=rid()), metadata=fan(f"r{i}", event_id))
            except grpc.aio.AioRpcError as err:
                info = error_info(err)
                assert info is not None and info.reason == "SEAT_UNAVAILABLE"
                return None
        assert [r for r in await asyncio.gather(*(one(i) for i in range(200))) if r] == []
        # the live hold survived the restart too (PostgreSQL had it) and can be ordered and paid
        o2 = await stub.CreateOrder(pb.CreateOrderRequest(hold=live.name, request_id=rid()),
                                    metadata=fan("u2", event_id))
        await stub.ConfirmOrder(pb.ConfirmOrderRequest(order=o2.name, payment="payments/2",
                                                       request_id=rid()), metadata=INTERNAL)
    async with wired.booking.pool.connection() as conn:
        cur = await conn.execute("SELECT seat_id FROM sold_seats WHERE event_id = %s ORDER BY 1",
                                 (event_id,))
        assert [r[0] for r in await cur.fetchall()] == ["A-1-1", "A-1-2", "A-1-3"]


async def test_two_replicas_sweeping_expire_each_hold_once(
    wired: Wired, private_redis: PrivateRedis
) -> None:
    event_id = await new_event(wired, sections=(("A", 10, 10, "VIP"),), limit=2)
    clock = Clock()
    replicas = [wired.booking,
                Booking(wired.booking.pool, Inventory(Redis.from_url(private_redis.url)), clock=clock)]
    wired.booking.clock = clock
    try:
        for i in range(40):
            await wired.booking.create_hold(f"f{i}", event_id, [f"A-{1 + i // 5}-{1 + i % 5}"],
                                            uuid.uuid4())
        clock.offset += timedelta(minutes=6)
        for r in replicas:
            r.forget_event_ids()
        counts = await asyncio.gather(*(r.sweep_once(batch=7) for r in replicas * 3))
        assert sum(counts) == 40
        async with wired.booking.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT o.headers->>'event_type', count(*) FROM outbox o JOIN holds h "
                "ON o.key = h.hold_id::text WHERE h.event_id = %s GROUP BY 1 ORDER BY 1", (event_id,))
            assert await cur.fetchall() == [("hold_created", 40), ("hold_expired", 40)]
        _, values = await wired.booking.seat_statuses(event_id)
        assert Counter(values.values()) == {"A": 100}
    finally:
        wired.booking.clock = Clock()
        await replicas[1].inventory.redis.aclose()


async def test_unbuilt_waiting_room_fails_closed(pg_dsn: str, private_redis: PrivateRedis,
                                                 kafka_bootstrap: str, wired: Wired) -> None:
    queue = grpc.aio.server()
    qpb_grpc.add_QueueServiceServicer_to_server(qpb_grpc.QueueServiceServicer(), queue)
    qport = queue.add_insecure_port("127.0.0.1:0")
    await queue.start()
    try:
        event_id = await new_event(wired)
        w = await wire(settings(pg_dsn, private_redis.url, kafka_bootstrap,
                                queue_addr=f"127.0.0.1:{qport}"))
    except BaseException:
        await queue.stop(0)
        raise
    await start(w.app)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{w.app.port}") as ch:
            stub = pb_grpc.BookingServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await stub.CreateHold(pb.CreateHoldRequest(parent=f"events/{event_id}",
                                                           seat_ids=["A-1-1"], request_id=rid()),
                                      metadata=fan("u1", event_id))
            info = error_info(exc.value)
            assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert info is not None and info.reason == "NOT_ADMITTED"
    finally:
        await w.app.stop(1.0)
        await queue.stop(0)


async def test_holds_on_redis_cluster(pg_dsn: str, redis_cluster_url: str, kafka_bootstrap: str,
                                      wired: Wired) -> None:
    w = await wire(settings(pg_dsn, redis_cluster_url, kafka_bootstrap, redis_cluster=True),
                   admission=StaticAdmission())
    try:
        b = w.booking
        events = [await new_event(wired, sections=(("A", 2, 10, "VIP"),)) for _ in range(3)]

        async def try_hold(e: str, i: int) -> bool:
            try:
                await b.create_hold(f"c{i}", e, [f"A-1-{1 + i % 10}", f"A-2-{1 + i % 10}"], uuid.uuid4())
                return True
            except Exception as exc:
                assert getattr(exc, "reason", "") == "SEAT_UNAVAILABLE", exc
                return False

        for e in events:
            won = sum(await asyncio.gather(*(try_hold(e, i) for i in range(100))))
            assert won == 10
            _, values = await b.seat_statuses(e)
            assert sum(v.startswith("H") for v in values.values()) == 20
        b.clock = lambda: Clock()() + timedelta(minutes=6)
        assert await b.sweep_once() >= 30
        for e in events:
            _, values = await b.seat_statuses(e)
            assert set(values.values()) == {"A"}

        # Best available on the cluster, after the sweep gave every seat back: 100 fans ask for
        # two together per event, ten pairs go, nobody gets a seat twice.
        async def try_best(e: str, i: int) -> tuple[str, ...]:
            try:
                return (await b.create_hold(f"p{i}", e, [], uuid.uuid4(), quantity=2)).hold.seat_ids
            except Exception as exc:
                assert getattr(exc, "reason", "") in ("SOLD_OUT", "NO_SEATS_TOGETHER"), exc
                return ()

        for e in events:
            pairs = [p for p in await asyncio.gather(*(try_best(e, i) for i in range(100))) if p]
            assert len(pairs) == 10 and len({s for p in pairs for s in p}) == 20
            _, values = await b.seat_statuses(e)
            assert sum(v.startswith("H") for v in values.values()) == 20
    finally:
        await w.app.stop(1.0)


async def test_background_sweeper_expires_holds_in_real_time(
    pg_dsn: str, private_redis: PrivateRedis, kafka_bootstrap: str, wired: Wired
) -> None:
    w = await wire(settings(pg_dsn, private_redis.url, kafka_bootstrap, run_sweeper=True,
                            hold_ttl_seconds=1.0, sweep_interval_seconds=0.1),
                   admission=StaticAdmission())
    try:
        event_id = await new_event(wired)
        priced = await w.booking.create_hold("u-rt", event_id, ["A-1-1", "A-1-2"], uuid.uuid4())
        t0 = time.monotonic()
        while True:
            _, values = await w.booking.seat_statuses(event_id)
            if values["A-1-1"] == values["A-1-2"] == "A":
                break
            assert time.monotonic() - t0 < 8, "the sweeper did not expire the hold"
            await asyncio.sleep(0.05)
        waited = time.monotonic() - t0
        assert waited >= 0.8  # not before its deadline
        async with w.booking.pool.connection() as conn:
            cur = await conn.execute("SELECT state FROM holds WHERE hold_id = %s", (priced.hold.hold_id,))
            assert await cur.fetchone() == ("EXPIRED",)
    finally:
        await w.app.stop(1.0)


class LosesRedisAfterFirstHold(Inventory):
    """Redis loses everything right after the first hold script succeeds, and another replica
    rebuilds the state from PostgreSQL before this one has written the hold down there."""

    def __init__(self, redis: Redis, lose: Callable[[], Awaitable[None]]) -> None:
        super().__init__(redis)
        self.lose: Callable[[], Awaitable[None]] | None = lose

    async def hold(self, *args: Any, **kwargs: Any) -> HoldResult:
        res = await super().hold(*args, **kwargs)
        if res.outcome == "OK" and self.lose is not None:
            lose, self.lose = self.lose, None
            await lose()
        return res


async def test_a_hold_lost_with_redis_before_its_row_was_written_is_never_given_twice(
    wired: Wired, private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    event_id = await new_event(wired, sections=(("A", 1, 4, "VIP"),), limit=4)
    other = wired.booking  # another replica: the sweeper or the next request rebuilds
    await other.ensure_live(await other.layout(event_id))
    redis = Redis.from_url(private_redis.url)

    async def flush_and_rebuild() -> None:
        await redis.flushall()
        await other.ensure_live(await other.layout(event_id))  # PostgreSQL has no hold yet

    first = Booking(other.pool, LosesRedisAfterFirstHold(redis, flush_and_rebuild))
    try:
        won = await first.create_hold("u-lost", event_id, ["A-1-1", "A-1-2"], uuid.uuid4())
        assert "made again" in caplog.text  # the first attempt was taken back, not written down
        # The fan holds exactly what the answer says, in Redis and in PostgreSQL, and nobody
        # else can take it.
        _, values = await other.seat_statuses(event_id)
        assert values["A-1-1"] == values["A-1-2"] == f"H{won.hold.hold_id}"
        with pytest.raises(model.SeatUnavailable):
            await other.create_hold("u-next", event_id, ["A-1-2", "A-1-3"], uuid.uuid4())
        async with other.pool.connection() as conn:
            cur = await conn.execute("SELECT hold_id, seat_ids FROM holds WHERE event_id = %s "
                                     "AND state IN ('ACTIVE', 'ORDERED')", (event_id,))
            assert await cur.fetchall() == [(won.hold.hold_id, ["A-1-1", "A-1-2"])]
    finally:
        await redis.aclose()


class LosesTheRebuildsReply(Inventory):
    """The first rebuild script runs in Redis, then its caller never hears back: the request was
    cancelled (an edge timeout, a fan who gave up) or the connection dropped."""

    def __init__(self, redis: Redis) -> None:
        super().__init__(redis)
        self.lost = False

    async def rebuild(self, *args: Any, **kwargs: Any) -> bool:
        built = await super().rebuild(*args, **kwargs)
        if not self.lost:
            self.lost = True
            raise asyncio.CancelledError
        return built


async def test_a_rebuild_whose_reply_was_lost_is_built_again_not_stuck(
    wired: Wired, private_redis: PrivateRedis
) -> None:
    """Redis ran the rebuild (a new stamp is live there) but PostgreSQL's transaction rolled back
    (the old stamp stays): a build nobody vouches for. It must be dropped and built again, not
    left live with every hold failing the stamp check for good."""
    event_id = await new_event(wired, sections=(("A", 1, 4, "VIP"),), limit=4)
    redis = Redis.from_url(private_redis.url)
    try:
        booking = Booking(wired.booking.pool, LosesTheRebuildsReply(redis))
        with pytest.raises(asyncio.CancelledError):
            await booking.create_hold("u-cut", event_id, ["A-1-1"], uuid.uuid4())
        held = await booking.create_hold("u-next", event_id, ["A-1-2"], uuid.uuid4())
        assert list(held.hold.seat_ids) == ["A-1-2"]
        _, values = await wired.booking.seat_statuses(event_id)
        assert (values["A-1-1"], values["A-1-2"]) == ("A", f"H{held.hold.hold_id}")
    finally:
        await redis.aclose()


class Died(Exception):
    """Stands for a kill -9: raised past every handler, so nothing after the script runs."""


class DiesAfterHoldScript(Inventory):
    """The first hold script succeeds, then its process dies before the row is written down."""

    def __init__(self, redis: Redis) -> None:
        super().__init__(redis)
        self.dead = False

    async def hold(self, *args: Any, **kwargs: Any) -> HoldResult:
        res = await super().hold(*args, **kwargs)
        if res.outcome == "OK" and not self.dead:
            self.dead = True
            raise Died
        return res


class PausesAfterHoldScript(Inventory):
    """The first hold script succeeds, then its attempt stalls (a slow replica) until released."""

    def __init__(self, redis: Redis) -> None:
        super().__init__(redis)
        self.scripted = asyncio.Event()
        self.resume = asyncio.Event()

    async def hold(self, *args: Any, **kwargs: Any) -> HoldResult:
        res = await super().hold(*args, **kwargs)
        if res.outcome == "OK" and not self.scripted.is_set():
            self.scripted.set()
            await self.resume.wait()
        return res


async def _hold_rows(w: Wired, event_id: str) -> list[tuple[uuid.UUID, list[str], str]]:
    async with w.booking.pool.connection() as conn:
        cur = await conn.execute("SELECT hold_id, seat_ids, state FROM holds WHERE event_id = %s",
                                 (event_id,))
        return list(await cur.fetchall())


async def _hold_created(w: Wired, hold_id: uuid.UUID) -> int:
    async with w.booking.pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM outbox WHERE key = %s", (str(hold_id),))
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


async def test_a_retry_writes_down_the_hold_its_dead_first_attempt_left_in_redis_alone(
    wired: Wired, private_redis: PrivateRedis
) -> None:
    """A kill -9 between the hold script and the row: the fan's retry (same request id) must get
    a hold that exists, not a promise answered from Redis that no row will ever back."""
    event_id = await new_event(wired, sections=(("A", 1, 4, "VIP"),), limit=4)
    live = wired.booking
    await live.ensure_live(await live.layout(event_id))
    redis = Redis.from_url(private_redis.url)
    dead = Booking(live.pool, DiesAfterHoldScript(redis))
    request = uuid.uuid4()
    try:
        with pytest.raises(Died):
            await dead.create_hold("u-died", event_id, ["A-1-1", "A-1-2"], request)
        _, values = await live.seat_statuses(event_id)
        assert values["A-1-1"] == values["A-1-2"] != "A"
        assert await _hold_rows(wired, event_id) == []  # in Redis alone

        retried = await live.create_hold("u-died", event_id, ["A-1-1", "A-1-2"], request)
        assert values["A-1-1"] == f"H{retried.hold.hold_id}"  # the hold the first attempt made
        assert await _hold_rows(wired, event_id) == [(retried.hold.hold_id, ["A-1-1", "A-1-2"], "ACTIVE")]
        assert await _hold_created(wired, retried.hold.hold_id) == 1
        again = await live.create_hold("u-died", event_id, ["A-1-1", "A-1-2"], request)
        assert again.hold.hold_id == retried.hold.hold_id
        order = await live.create_order("u-died", event_id, retried.hold.hold_id, uuid.uuid4())
        assert order.seat_ids == ("A-1-1", "A-1-2")
        with pytest.raises(model.SeatUnavailable):
            await live.create_hold("u-next", event_id, ["A-1-2", "A-1-3"], uuid.uuid4())
    finally:
        await redis.aclose()


async def test_a_replica_that_never_served_the_event_sweeps_a_hold_left_in_redis_alone(
    wired: Wired, private_redis: PrivateRedis
) -> None:
    """A kill -9 between the hold script and the row, and nobody retries: no row names the event
    and the sweeping replica never served it; the sweep index (in Redis) still brings it to the
    deadline. An event with no deadline left is not looked at again for half a hold's life."""
    event_id = await new_event(wired, sections=(("A", 1, 4, "VIP"),), limit=4)
    quiet = await new_event(wired, sections=(("A", 1, 4, "VIP"),), limit=4)
    redis = Redis.from_url(private_redis.url)
    clock = Clock()
    dead = Booking(wired.booking.pool, DiesAfterHoldScript(redis), clock=clock)
    fresh = Booking(wired.booking.pool, Inventory(redis), clock=clock)
    try:
        await dead.ensure_live(await dead.layout(quiet))
        with pytest.raises(Died):
            await dead.create_hold("u-gone", event_id, ["A-1-1", "A-1-2"], uuid.uuid4())
        assert await _hold_rows(wired, event_id) == []
        await fresh.sweep_once()
        _, values = await fresh.seat_statuses(event_id)
        assert values["A-1-1"] == values["A-1-2"] != "A"  # not due yet
        now_ms = int(clock().timestamp() * 1000)
        assert await redis.zscore(SWEEP_KEY, quiet) >= now_ms + 149_000  # type: ignore[operator]

        clock.offset += timedelta(minutes=5, seconds=1)
        await fresh.sweep_once()
        _, values = await fresh.seat_statuses(event_id)
        assert set(values.values()) == {"A"}
    finally:
        await redis.aclose()


async def test_an_event_booking_does_not_know_leaves_the_sweep_index(
    wired: Wired, private_redis: PrivateRedis
) -> None:
    """The index outlived booking's database (a reset): the unknown event is dropped at its first
    sweep, and the known ones are swept all the same."""
    known = await new_event(wired, sections=(("A", 1, 4, "VIP"),), limit=4)
    unknown = str(uuid.uuid4())
    redis = Redis.from_url(private_redis.url)
    clock = Clock()
    booking = Booking(wired.booking.pool, Inventory(redis), clock=clock)
    try:
        await booking.ensure_live(await booking.layout(known))
        await redis.zadd(SWEEP_KEY, {unknown: 0, known: 0})
        await booking.sweep_once()
        assert await redis.zscore(SWEEP_KEY, unknown) is None
        assert await redis.zscore(SWEEP_KEY, known) > int(clock().timestamp() * 1000)  # type: ignore[operator]
    finally:
        await redis.aclose()


async def test_a_slow_first_attempt_and_its_retry_write_one_hold_and_take_nothing_back(
    wired: Wired, private_redis: PrivateRedis
) -> None:
    event_id = await new_event(wired, sections=(("A", 1, 4, "VIP"),), limit=4)
    live = wired.booking
    await live.ensure_live(await live.layout(event_id))
    redis = Redis.from_url(private_redis.url)
    stalls = PausesAfterHoldScript(redis)
    slow = Booking(live.pool, stalls)
    request = uuid.uuid4()
    try:
        first = asyncio.create_task(slow.create_hold("u-slow", event_id, ["A-1-3", "A-1-4"], request))
        await stalls.scripted.wait()
        retried = await live.create_hold("u-slow", event_id, ["A-1-3", "A-1-4"], request)
        stalls.resume.set()
        answered = await first
        assert answered.hold.hold_id == retried.hold.hold_id
        # Written once, announced once, and still held in Redis: the first attempt found the row
        # its retry wrote and took nothing back.
        assert await _hold_rows(wired, event_id) == [(retried.hold.hold_id, ["A-1-3", "A-1-4"], "ACTIVE")]
        assert await _hold_created(wired, retried.hold.hold_id) == 1
        _, values = await live.seat_statuses(event_id)
        assert values["A-1-3"] == values["A-1-4"] == f"H{retried.hold.hold_id}"
    finally:
        await redis.aclose()


class DiesAtRedisStep(Inventory):
    """The first sell (or release) after a commit never happens: the process died in between."""

    def __init__(self, redis: Redis, step: str) -> None:
        super().__init__(redis)
        self.step = step

    async def sell(self, *args: Any, **kwargs: Any) -> int:
        if self.step == "sell":
            raise Died
        return await super().sell(*args, **kwargs)

    async def release(self, *args: Any, **kwargs: Any) -> int:
        if self.step == "release":
            raise Died
        return await super().release(*args, **kwargs)


async def _ordered(live: Booking, event_id: str, user: str, seats: list[str]) -> Order:
    priced = await live.create_hold(user, event_id, seats, uuid.uuid4())
    return await live.create_order(user, event_id, priced.hold.hold_id, uuid.uuid4())


async def test_payment_succeeded_redelivered_after_a_crash_marks_the_seats_sold(
    wired: Wired, private_redis: PrivateRedis
) -> None:
    """A kill -9 after the sale committed but before Redis heard of it: the redelivered
    PaymentSucceeded confirms nothing twice but makes the seats SOLD (not HELD until the
    hold's deadline)."""
    event_id = await new_event(wired, sections=(("A", 1, 4, "VIP"),), limit=4)
    live = wired.booking
    order = await _ordered(live, event_id, "u-sold", ["A-1-1", "A-1-2"])
    redis = Redis.from_url(private_redis.url)
    try:
        with pytest.raises(Died):
            await Booking(live.pool, DiesAtRedisStep(redis, "sell")).confirm_order(order.order_id,
                                                                                   "payments/p1")
        _, values = await live.seat_statuses(event_id)
        assert values["A-1-1"] == f"H{order.hold_id}"  # sold in PostgreSQL, held in Redis
        again = await live.confirm_order(order.order_id, "payments/p1")  # the redelivery
        assert again.state is OrderState.CONFIRMED
        _, values = await live.seat_statuses(event_id)
        assert values["A-1-1"] == values["A-1-2"] == "S"
        assert await _outbox_of(wired, order.order_id, "order_confirmed") == 1
    finally:
        await redis.aclose()


async def test_payment_failed_redelivered_after_a_crash_frees_the_seats(
    wired: Wired, private_redis: PrivateRedis
) -> None:
    """The same for a declined card: the cancel committed, the release was cut off; the
    redelivered PaymentFailed frees the seats at once."""
    event_id = await new_event(wired, sections=(("A", 1, 4, "VIP"),), limit=4)
    live = wired.booking
    order = await _ordered(live, event_id, "u-declined", ["A-1-3", "A-1-4"])
    redis = Redis.from_url(private_redis.url)
    try:
        with pytest.raises(Died):
            await Booking(live.pool, DiesAtRedisStep(redis, "release")).cancel_order(
                "u-declined", order.order_id, reason="PAYMENT_FAILED")
        _, values = await live.seat_statuses(event_id)
        assert values["A-1-3"] == f"H{order.hold_id}"  # cancelled in PostgreSQL, held in Redis
        failed = new_envelope("payment", str(order.order_id), ev.PaymentFailed(
            payment="payments/p2", order=order.name, user_id="u-declined", reason="CARD_DECLINED"))
        async with live.pool.connection() as conn:
            await PaymentEvents(live).handle(failed, conn)  # the redelivery
        _, values = await live.seat_statuses(event_id)
        assert values["A-1-3"] == values["A-1-4"] == "A"
        assert await _outbox_of(wired, order.order_id, "order_cancelled") == 1
        priced = await live.create_hold("u-next", event_id, ["A-1-3", "A-1-4"], uuid.uuid4())
        assert priced.hold.seat_ids == ("A-1-3", "A-1-4")
    finally:
        await redis.aclose()


async def _outbox_of(w: Wired, order_id: uuid.UUID, event_type: str) -> int:
    async with w.booking.pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM outbox WHERE key = %s AND headers->>'event_type' = %s",
                                 (str(order_id), event_type))
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


def _paid(order: Order, payment: str) -> ev.EventEnvelope:
    return new_envelope("payment", str(order.order_id), ev.PaymentSucceeded(
        payment=payment, order=order.name, user_id=order.user_id,
        amount=Money(currency_code=order.amount.currency_code, units=order.amount.units,
                     nanos=order.amount.nanos)))


async def test_a_replica_orders_and_sells_what_it_wrote_without_reading_it_back_and_a_change_still_counts(
    wired: Wired, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fan orders the hold this replica just made, and pays the order it just made: those
    steps use the rows as written (no read of them in PostgreSQL), and a hold released or an
    order cancelled meanwhile is still refused by the statement that would act on it."""
    event_id = await new_event(wired, sections=(("A", 1, 4, "VIP"),), limit=4)
    live = wired.booking
    reads: Counter[str] = Counter()

    def counting(name: str) -> Callable[..., Any]:
        real = getattr(db, name)

        def counted(*args: Any, **kw: Any) -> Any:
            reads[name] += 1
            return real(*args, **kw)
        return counted

    for name in ("get_hold", "get_order"):
        monkeypatch.setattr(db, name, counting(name))

    events = PaymentEvents(live)
    order = await _ordered(live, event_id, "u-own", ["A-1-1"])
    paid = _paid(order, "payments/p-own")
    assert await events.sell_own(paid) is False  # sold by the precheck: no marked transaction
    assert reads == Counter()
    assert (await live.get_order("u-own", order.order_id)).state is OrderState.CONFIRMED
    assert await _outbox_of(wired, order.order_id, "order_confirmed") == 1
    _, values = await live.seat_statuses(event_id)
    assert values["A-1-1"] == "S"
    # Redelivered: no longer kept here, so it goes the marked way, which changes nothing.
    reads.clear()
    assert await events.sell_own(paid) is True
    async with live.pool.connection() as conn, conn.transaction():
        await events.handle(paid, conn)
    # Read, then read again locked by the transaction that finds it sold to this payment.
    assert reads == Counter({"get_order": 2})
    assert await _outbox_of(wired, order.order_id, "order_confirmed") == 1
    assert events.confirmed == 2 and events.refused == 0

    # Released after it was made: ordering it is refused, and nothing is written.
    released = await live.create_hold("u-gone", event_id, ["A-1-2"], uuid.uuid4())
    await live.delete_hold("u-gone", event_id, released.hold.hold_id)
    with pytest.raises(DomainError) as refused:
        await live.create_order("u-gone", event_id, released.hold.hold_id, uuid.uuid4())
    assert refused.value.reason == "HOLD_EXPIRED"
    assert await live.list_orders("u-gone", None, 10) == []

    # Cancelled after it was made: a success for it sells nothing.
    cancelled = await _ordered(live, event_id, "u-cancel", ["A-1-3"])
    await live.cancel_order("u-cancel", cancelled.order_id)
    assert await events.sell_own(_paid(cancelled, "payments/p-late")) is False
    assert (await live.get_order("u-cancel", cancelled.order_id)).state is OrderState.CANCELLED
    assert await _outbox_of(wired, cancelled.order_id, "order_confirmed") == 0
    _, values = await live.seat_statuses(event_id)
    assert values["A-1-3"] == "A"

    # What another replica wrote is read, as before: a hold made here ordered there, and that
    # order's success handled here.
    reads.clear()
    other = Booking(live.pool, live.inventory)
    priced = await live.create_hold("u-two", event_id, ["A-1-4"], uuid.uuid4())
    made = await other.create_order("u-two", event_id, priced.hold.hold_id, uuid.uuid4())
    assert await events.sell_own(_paid(made, "payments/p-two")) is True
    async with live.pool.connection() as conn:
        await events.handle(_paid(made, "payments/p-two"), conn)
    assert reads == Counter({"get_hold": 1, "get_order": 1})
    assert (await live.get_order("u-two", made.order_id)).state is OrderState.CONFIRMED
