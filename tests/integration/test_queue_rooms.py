"""svc_queue in process over gRPC, on a real Redis single node AND a real three-master Redis Cluster
(every test runs on both: the same Lua scripts, unchanged).

Metadata is what the edge sets after verifying tokens: `x-user-id` / `x-user-role`. Rooms are
made the way EventPublished makes them (``Queue.event_published`` / ``RoomStore.configure``), with
times relative to now; the admission loop of the server runs (tick 20 ms) as in production.

What fans and admins care about: nobody gets a duplicate number or a gap, even with 5,000 joining
at once; joining again keeps one's place; fans are admitted in their order (the lottery's for
early arrivals, who all go first); the room never holds more than max_active sessions, even with
three replicas' loops racing; abandoned turns, expired sessions and leavers free their slot;
sold out stops admission; an admin's change takes effect within a second.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import jwt
import pytest
import pytest_asyncio
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask
from prometheus_client import REGISTRY
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from ticketping.events.v1 import events_pb2 as ev
from ticketping.queue.v1 import queue_service_pb2 as pb
from ticketping.queue.v1 import queue_service_pb2_grpc as pb_grpc

from meshkit.errors import error_info
from meshkit.events import new_envelope
from meshkit.redis import AnyRedis, close, connect
from meshkit.server import start
from svc_queue.adapters.rooms import RoomKeys, tag, ticket_key
from svc_queue.bootstrap import Wired, wire
from svc_queue.config import Settings
from svc_queue.domain.room import RoomChange, RoomDefaults, TicketState, rfc3339

pytestmark = pytest.mark.integration

ADMIN = (("x-user-id", "admin-1"), ("x-user-role", "ADMIN"))
S = pb.QueueTicketState
WAITING, ACTIVE = S.QUEUE_TICKET_STATE_WAITING, S.QUEUE_TICKET_STATE_ACTIVE
EXPIRED, LEFT = S.QUEUE_TICKET_STATE_EXPIRED, S.QUEUE_TICKET_STATE_LEFT
SOLD_OUT, NOT_JOINED = S.QUEUE_TICKET_STATE_SOLD_OUT, S.QUEUE_TICKET_STATE_NOT_JOINED


def fan(user: str) -> tuple[tuple[str, str], ...]:
    return (("x-user-id", user), ("x-user-role", "USER"))


# -- fixtures ------------------------------------------------------------------------------------


@dataclass
class Backend:
    name: str
    url: str
    cluster: bool
    prefix: str


@pytest.fixture(scope="module", params=["single", "cluster"])
def backend(request: pytest.FixtureRequest, redis_url: str) -> Backend:
    prefix = f"tp:queue:test:{uuid.uuid4().hex[:8]}"
    if request.param == "cluster":
        url = request.getfixturevalue("redis_cluster_url")
        return Backend("cluster", url, True, prefix)
    return Backend("single", redis_url, False, prefix)


def settings_for(b: Backend, **over: Any) -> Settings:
    values: dict[str, Any] = dict(
        grpc_port=0, redis_url=b.url, redis_cluster=b.cluster, kafka_bootstrap="127.0.0.1:1",
        consume_events=False, redis_key_prefix=b.prefix, admission_tick_seconds=0.02,
        admission_registry_refresh_seconds=0.05, key_encryption_key="A" * 43,
    )
    values.update(over)
    return Settings(**values)


async def serve(b: Backend, **over: Any) -> Wired:
    w = await wire(settings_for(b, **over))
    await start(w.app)
    return w


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def raw(backend: Backend) -> AsyncIterator[AnyRedis]:
    client = await connect(backend.url, cluster=backend.cluster)
    yield client
    await client.delete(f"{backend.prefix}:rooms", f"{backend.prefix}:admission-keys")
    await close(client)


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def wired(backend: Backend, raw: AnyRedis) -> AsyncIterator[Wired]:
    w = await serve(backend)
    yield w
    await asyncio.wait_for(w.app.stop(1.0), 30)


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def stub(wired: Wired) -> AsyncIterator[pb_grpc.QueueServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{wired.app.port}") as channel:
        yield pb_grpc.QueueServiceStub(channel)


@pytest_asyncio.fixture(loop_scope="session")
async def rooms(wired: Wired, raw: AnyRedis) -> AsyncIterator[list[str]]:
    """Rooms a test opens; their keys are deleted afterwards."""
    made: list[str] = []
    yield made

    async def drop(event_id: str) -> None:
        await wired.queue.registry.remove(event_id)
        keys = RoomKeys.of(event_id).room()
        keys += [k async for k in raw.scan_iter(match=f"{tag(event_id)}:*", count=1000)]
        for i in range(0, len(keys), 500):
            await raw.delete(*keys[i:i + 500])

    for event_id in made:
        await asyncio.wait_for(drop(event_id), 30)


async def open_room(
    w: Wired, made: list[str], *, queue_open: float = -60, sale_open: float = -30,
    max_active: int = 1000, rate: float = 1000.0, ttl: float = 600, claim: float = 60,
    paused: bool = False, start: float = 86_400, tick: bool = True,
) -> str:
    """A published event's room (what EventPublished makes); times in seconds from now. With
    ``tick=False`` the room is left out of the registry: no admission loop runs it."""
    event_id = str(uuid.uuid4())
    now = int(time.time() * 1000)
    made.append(event_id)
    await w.queue.rooms.configure(
        event_id, queue_open_ms=now + int(queue_open * 1000), sale_open_ms=now + int(sale_open * 1000),
        closes_ms=now + int(start * 1000), seats=1000,
        defaults=RoomDefaults(max_active, rate, int(ttl * 1000), int(claim * 1000)))
    if paused:
        await w.queue.rooms.update(event_id, {"paused": "1"})
    if tick:
        await w.queue.registry.add(event_id)  # the admission loops tick it from now on
    return event_id


def qname(event_id: str) -> str:
    return f"events/{event_id}/queue"


async def join(stub: pb_grpc.QueueServiceStub, event_id: str, user: str) -> pb.QueueTicket:
    return await stub.JoinQueue(pb.JoinQueueRequest(name=qname(event_id)), metadata=fan(user), timeout=30)


async def me(stub: pb_grpc.QueueServiceStub, event_id: str, user: str) -> pb.QueueTicket:
    return await stub.GetQueueTicket(pb.GetQueueTicketRequest(name=f"{qname(event_id)}/me"),
                                     metadata=fan(user), timeout=30)


async def leave(stub: pb_grpc.QueueServiceStub, event_id: str, user: str) -> pb.QueueTicket:
    return await stub.LeaveQueue(pb.LeaveQueueRequest(name=qname(event_id)), metadata=fan(user), timeout=30)


async def room(stub: pb_grpc.QueueServiceStub, event_id: str) -> pb.Queue:
    return await stub.GetQueue(pb.GetQueueRequest(name=qname(event_id)), timeout=10)


async def update(stub: pb_grpc.QueueServiceStub, event_id: str, paths: list[str], **values: Any) -> pb.Queue:
    q = pb.Queue(name=qname(event_id), **values)
    return await stub.UpdateQueue(pb.UpdateQueueRequest(queue=q, update_mask=FieldMask(paths=paths)),
                                  metadata=ADMIN, timeout=10)


async def until(predicate: Any, within: float = 10.0, every: float = 0.02) -> float:
    """Wait until ``await predicate()`` is true; return the seconds it took."""
    t0 = time.monotonic()
    while True:
        if await predicate():
            return time.monotonic() - t0
        if time.monotonic() - t0 > within:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(every)


async def served(stub: pb_grpc.QueueServiceStub, event_id: str, n: int) -> bool:
    return (await room(stub, event_id)).serving_number >= n


_COUNT = "return {redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[2])}"


# -- joining -------------------------------------------------------------------------------------


# grpc-core cancels calls beyond its server's `grpc.server.max_pending_requests` (1,000 soft,
# 3,000 hard; meshkit's build_server keeps the default); the edge's circuit breaker keeps a
# service's requests in flight below that, and so does this test's client.
IN_FLIGHT = 900


async def test_5000_concurrent_joins_get_1_to_5000_and_repeats_keep_their_place(
        stub: pb_grpc.QueueServiceStub, wired: Wired, rooms: list[str], backend: Backend) -> None:
    event_id = await open_room(wired, rooms, paused=True)
    users = [f"fan-{i:05d}" for i in range(5000)]
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def gated_join(u: str) -> pb.QueueTicket:
        async with gate:
            return await join(stub, event_id, u)

    t0 = time.monotonic()
    tickets = await asyncio.gather(*(gated_join(u) for u in users))
    took = time.monotonic() - t0
    numbers = [t.number for t in tickets]
    assert sorted(numbers) == list(range(1, 5001)), "a duplicate or a gap"
    assert all(t.state == WAITING and t.position == t.number for t in tickets)
    print(f"\n[{backend.name}] 5,000 joins over gRPC ({IN_FLIGHT} in flight) in {took:.2f}s "
          f"({5000 / took:.0f}/s)")

    again = random.sample(range(5000), 500)
    repeats = await asyncio.gather(*(join(stub, event_id, users[i]) for i in again))
    assert [t.number for t in repeats] == [numbers[i] for i in again]
    mine = await asyncio.gather(*(me(stub, event_id, users[i]) for i in again[:50]))
    assert [t.number for t in mine] == [numbers[i] for i in again[:50]]
    status = await room(stub, event_id)
    assert (status.waiting_count, status.serving_number, status.active_count) == (5000, 0, 0)


async def test_5000_joins_at_once_on_redis_no_duplicate_no_gap(
        wired: Wired, rooms: list[str], backend: Backend) -> None:
    """All 5,000 join scripts in flight at the same moment (the service's Redis side, no gRPC)."""
    event_id = await open_room(wired, rooms, paused=True)
    users = [f"fan-{i:05d}" for i in range(5000)]
    t0 = time.monotonic()
    tickets = await asyncio.gather(*(wired.queue.join(event_id, u) for u in users))
    took = time.monotonic() - t0
    assert sorted(t.number for t in tickets) == list(range(1, 5001))
    repeats = await asyncio.gather(*(wired.queue.join(event_id, u) for u in users))
    assert [t.number for t in repeats] == [t.number for t in tickets]
    print(f"\n[{backend.name}] 5,000 simultaneous join scripts in {took:.2f}s")


async def test_post_opening_arrivals_are_admitted_in_join_order_and_lottery_fans_first(
        stub: pb_grpc.QueueServiceStub, wired: Wired, rooms: list[str]) -> None:
    """max_active=1: exactly one fan at a time is admitted, claims, and leaves, so the order in
    which fans become ACTIVE is the admission order itself."""
    opens = time.time() + 1.5
    event_id = await open_room(wired, rooms, queue_open=-5, sale_open=1.5, max_active=1, rate=1000)
    early = [f"early-{i:02d}" for i in range(15)]
    for u in early:  # arrival order
        t = await join(stub, event_id, u)
        assert (t.state, t.number, t.position) == (WAITING, 0, 0)  # no number before the draw
        assert t.eta_seconds >= 1  # at least until the sale opens
    status = await room(stub, event_id)
    assert (status.waiting_count, status.serving_number) == (15, 0)
    await asyncio.sleep(max(0.0, opens - time.time()) + 0.05)  # the sale opens
    late = [f"late-{i:02d}" for i in range(15)]
    late_numbers = [(await join(stub, event_id, u)).number for u in late]
    assert late_numbers == list(range(16, 31))  # FIFO behind the 15 lottery numbers

    order: list[str] = []
    waiting = set(early + late)
    t0 = time.monotonic()
    while waiting and time.monotonic() - t0 < 30:
        tickets = dict(zip(sorted(waiting), await asyncio.gather(
            *(me(stub, event_id, u) for u in sorted(waiting))), strict=True))
        active = [u for u, t in tickets.items() if t.state == ACTIVE]
        assert len(active) <= 1
        for u in active:
            order.append(u)
            waiting.discard(u)
            await leave(stub, event_id, u)
    assert not waiting, f"not admitted: {sorted(waiting)}"

    assert set(order[:15]) == set(early) and order[15:] == late
    assert order[:15] != early, "the lottery kept the arrival order"
    early_numbers = {u: (await me(stub, event_id, u)).number for u in early}
    assert sorted(early_numbers.values()) == list(range(1, 16))
    assert sorted(early, key=early_numbers.__getitem__) == order[:15]


async def test_the_lottery_is_a_fair_shuffle_of_early_arrivals(
        stub: pb_grpc.QueueServiceStub, wired: Wired, rooms: list[str]) -> None:
    opens = time.time() + 2.0
    event_id = await open_room(wired, rooms, queue_open=-5, sale_open=2.0, paused=True)
    early = [f"e-{i:04d}" for i in range(400)]
    for i in range(0, 400, 50):  # in waves: arrival wave k before wave k+1
        await asyncio.gather(*(join(stub, event_id, u) for u in early[i:i + 50]))
    rejoin = early[:20]  # leaving and joining again before the draw cannot re-roll one's place
    await asyncio.gather(*(leave(stub, event_id, u) for u in rejoin))
    await asyncio.gather(*(join(stub, event_id, u) for u in rejoin))
    await asyncio.sleep(max(0.0, opens - time.time()) + 0.05)  # the sale opens
    late = [(await join(stub, event_id, f"l-{i}")).number for i in range(5)]
    assert late == [401, 402, 403, 404, 405]
    numbers = [(t.number) for t in await asyncio.gather(*(me(stub, event_id, u) for u in early))]
    assert sorted(numbers) == list(range(1, 401))
    # Spearman's rank correlation of arrival and number: about N(0, 1/sqrt(399)) for a fair shuffle
    n = len(numbers)
    rho = 1 - 6 * sum((i + 1 - x) ** 2 for i, x in enumerate(numbers)) / (n * (n * n - 1))
    assert abs(rho) < 0.3, rho
    # each arrival wave spreads over the whole range
    for i in range(0, 400, 50):
        wave = numbers[i:i + 50]
        assert min(wave) < 100 and max(wave) > 300, (i, sorted(wave))


# -- admission -----------------------------------------------------------------------------------


async def test_three_replicas_racing_never_exceed_max_active(
        backend: Backend, wired: Wired, raw: AnyRedis, rooms: list[str]) -> None:
    """Three servers (three admission loops ticking every 5-10 ms) on one room of max_active=8;
    240 fans poll random replicas, hold their slot briefly, then leave, end (booking's EndSession)
    or let it lapse; a few never claim. A sampler reads active + reserved atomically all along."""
    replicas = [await serve(backend, admission_tick_seconds=t) for t in (0.005, 0.007, 0.01)]
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{r.app.port}") for r in replicas]
    stubs = [pb_grpc.QueueServiceStub(c) for c in channels]
    try:
        max_active = 8
        event_id = await open_room(replicas[0], rooms, max_active=max_active, rate=400, claim=1.0,
                                   ttl=1, paused=True)
        users = [f"r-{i:03d}" for i in range(240)]
        await asyncio.gather(*(join(random.choice(stubs), event_id, u) for u in users))
        keys = RoomKeys.of(event_id)
        samples: list[tuple[int, int]] = []
        lost_turns: list[str] = []  # polled too late (busy machine): their turn went back
        stop = asyncio.Event()

        async def sampler() -> None:
            count = raw.register_script(_COUNT)
            while not stop.is_set():
                active, pending = await count(keys=[keys.act, keys.pend])
                samples.append((int(active), int(pending)))

        async def fan_life(u: str, i: int) -> None:
            if i % 30 == 7:
                return  # never claims: the slot returns after the claim window
            while True:
                t = await me(random.choice(stubs), event_id, u)
                if t.state == ACTIVE:
                    break
                if t.state == EXPIRED:
                    lost_turns.append(u)
                    return
                assert t.state == WAITING, (u, t)
                await asyncio.sleep(0.05)
            await asyncio.sleep(random.uniform(0.01, 0.05))
            if i % 12 == 5:
                return  # the 1 s session runs out and the sweep frees it
            if i % 2:
                await leave(random.choice(stubs), event_id, u)
            else:
                await random.choice(stubs).EndSession(
                    pb.EndSessionRequest(event=f"events/{event_id}", user_id=u,
                                         reason=pb.SESSION_END_REASON_ORDER_CONFIRMED), timeout=10)

        sampling = asyncio.create_task(sampler())
        await update(stubs[1], event_id, ["paused"], paused=False)
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(asyncio.gather(*(fan_life(u, i) for i, u in enumerate(users))), 60)
        finally:
            stop.set()
            await sampling
        took = time.monotonic() - t0
        final = await replicas[0].queue.status(event_id)
    finally:
        for c in channels:
            await c.close()
        for r in replicas:
            await r.app.stop(0.5)
    worst = max(a + p for a, p in samples)
    print(f"\n[{backend.name}] 3 loops, {len(samples)} samples, worst active+reserved {worst}, "
          f"{len(users)} fans through {max_active} slots in {took:.1f}s, {len(lost_turns)} turns lost")
    assert len(samples) > 200
    assert all(a + p <= max_active for a, p in samples), worst
    assert worst == max_active  # the test did push the room to its limit
    assert final.serving_number == len(users) and final.waiting_count == 0  # nobody skipped
    assert len(lost_turns) < 30
    assert sum(r.loop.ticks for r in replicas) > 100


async def test_three_replicas_admit_at_the_configured_rate_not_three_times_it(
        backend: Backend, wired: Wired, rooms: list[str]) -> None:
    """The token bucket lives in the room: three loops share one rate."""
    replicas = [await serve(backend, admission_tick_seconds=t) for t in (0.01, 0.013, 0.017)]
    try:
        event_id = await open_room(replicas[0], rooms, rate=20, max_active=10_000, paused=True)
        await asyncio.gather(*(replicas[i % 3].queue.join(event_id, f"u{i}") for i in range(200)))
        await replicas[1].queue.update(event_id, RoomChange(paused=False))
        t0 = time.monotonic()
        await asyncio.sleep(2.0)
        serving = (await replicas[2].queue.status(event_id)).serving_number
        took = time.monotonic() - t0
    finally:
        for r in replicas:
            await r.app.stop(0.5)
    assert 0.75 * 20 * took <= serving <= 20 * took + 3, (serving, took)  # not 3 x 20 per second


async def test_an_unpaused_room_starts_at_its_rate_without_a_burst(
        backend: Backend, wired: Wired, rooms: list[str]) -> None:
    """A paused room is ticked once a minute at most: its bucket's last refill is long past when
    an admin unpauses it, and it must not pay out a whole second's worth at once."""
    replica = await serve(backend, admission_tick_seconds=0.01)
    try:
        event_id = await open_room(replica, rooms, rate=20, max_active=10_000, paused=True)
        await asyncio.gather(*(replica.queue.join(event_id, f"u{i}") for i in range(100)))
        await asyncio.sleep(1.5)  # paused: no tick since the last join's
        await replica.queue.update(event_id, RoomChange(paused=False))
        t0 = time.monotonic()
        await asyncio.sleep(0.5)
        serving = (await replica.queue.status(event_id)).serving_number
        took = time.monotonic() - t0
    finally:
        await replica.app.stop(0.5)
    assert serving <= 20 * took + 2, (serving, took)  # not 20 at once, then 20 per second
    assert serving >= 0.5 * 20 * took, (serving, took)


async def test_an_unclaimed_turn_returns_its_slot_and_the_fan_sees_expired(
        stub: pb_grpc.QueueServiceStub, wired: Wired, rooms: list[str]) -> None:
    event_id = await open_room(wired, rooms, max_active=1, claim=0.5)
    a, b = await join(stub, event_id, "a"), await join(stub, event_id, "b")
    assert (a.number, b.number) == (1, 2)
    await until(lambda: served(stub, event_id, 1))
    assert (await me(stub, event_id, "b")).position == 1
    # "a" closed the app: after the claim window "b" gets the slot without anyone leaving
    waited = await until(lambda: served(stub, event_id, 2), within=3)
    assert 0.2 < waited < 1.5
    assert (await me(stub, event_id, "a")).state == EXPIRED
    tb = await me(stub, event_id, "b")
    assert tb.state == ACTIVE and tb.admission_token
    # the fan who lost the turn may join again: at the back, with a new number
    again = await join(stub, event_id, "a")
    assert (again.state, again.number) == (WAITING, 3)


async def test_joining_again_after_a_lost_turn_or_session_places_the_fan_at_once(
        stub: pb_grpc.QueueServiceStub, wired: Wired, rooms: list[str]) -> None:
    """No queue/me in between: the join itself sees that the turn or the session ran out (the
    ticket still says served or active until someone reads it) and places the fan at the back,
    instead of answering EXPIRED and placing them only on a second join."""
    event_id = await open_room(wired, rooms, max_active=1, claim=0.5, ttl=1.0)
    assert [(await join(stub, event_id, u)).number for u in ("a", "b")] == [1, 2]
    await until(lambda: served(stub, event_id, 2), within=3)  # "a" never claimed its turn
    again = await join(stub, event_id, "a")
    assert (again.state, again.number) == (WAITING, 3)
    tb = await me(stub, event_id, "b")
    assert tb.state == ACTIVE
    await asyncio.sleep(max(0.0, tb.admission_expire_time.ToMilliseconds() / 1000 - time.time()) + 0.05)
    again = await join(stub, event_id, "b")
    assert (again.state, again.number) == (WAITING, 4)


async def test_keys_made_after_the_rooms_last_tick_still_expire(
        stub: pb_grpc.QueueServiceStub, wired: Wired, raw: AnyRedis, rooms: list[str]) -> None:
    """Each script that may create a room key gives it the room's expiry (two days after the
    show starts): a set a claim or a leave creates after the room's last tick does not live
    forever."""
    event_id = await open_room(wired, rooms, max_active=1, tick=False)
    for u in ("a", "b"):
        await wired.queue.rooms.join(event_id, u)
    for _ in range(2):  # the first tick starts the token bucket, the second serves "a"
        await wired.queue.rooms.tick(event_id)
        await asyncio.sleep(0.01)
    keys = RoomKeys.of(event_id)
    assert not await raw.exists(keys.act) and not await raw.exists(keys.left)
    assert (await wired.queue.rooms.ticket(event_id, "a", "jti-a")).ticket.state is TicketState.ACTIVE
    assert (await wired.queue.rooms.leave(event_id, "b")).state is TicketState.LEFT
    for key in (keys.act, keys.left):
        assert 86_400_000 < await raw.pttl(key) <= 3 * 86_400_000, key


async def test_an_expired_session_frees_its_slot(
        stub: pb_grpc.QueueServiceStub, wired: Wired, rooms: list[str]) -> None:
    event_id = await open_room(wired, rooms, max_active=1, ttl=1.0)
    for u in ("a", "b"):
        await join(stub, event_id, u)
    await until(lambda: served(stub, event_id, 1))
    ta = await me(stub, event_id, "a")
    assert ta.state == ACTIVE
    left = ta.admission_expire_time.ToMilliseconds() / 1000 - time.time()
    assert 0.5 < left <= 1.05
    check = pb.CheckAdmissionRequest(event=f"events/{event_id}", user_id="a", jti=_jti(ta))
    assert (await stub.CheckAdmission(check, timeout=5)).active
    assert not (await room(stub, event_id)).serving_number >= 2  # full: "b" waits
    await until(lambda: served(stub, event_id, 2), within=3)
    assert time.time() >= ta.admission_expire_time.ToMilliseconds() / 1000 - 0.05
    assert (await me(stub, event_id, "a")).state == EXPIRED
    assert not (await stub.CheckAdmission(check, timeout=5)).active
    assert (await me(stub, event_id, "b")).state == ACTIVE


async def test_leaving_frees_the_slot_at_once_and_left_places_cost_nothing(
        stub: pb_grpc.QueueServiceStub, wired: Wired, rooms: list[str]) -> None:
    event_id = await open_room(wired, rooms, max_active=1, rate=1000)
    for u in ("a", "b", "c", "d"):
        await join(stub, event_id, u)
    await until(lambda: served(stub, event_id, 1))
    assert (await me(stub, event_id, "a")).state == ACTIVE
    assert (await leave(stub, event_id, "b")).state == LEFT  # waiting: its number is skipped
    assert (await leave(stub, event_id, "b")).state == LEFT  # idempotent
    status = await room(stub, event_id)  # (a tick may already have stepped over b's number)
    assert (status.serving_number in (1, 2), status.waiting_count, status.active_count) == (True, 2, 1)
    t0 = time.monotonic()
    assert (await leave(stub, event_id, "a")).state == LEFT
    await until(lambda: served(stub, event_id, 3), within=2)
    assert time.monotonic() - t0 < 0.5  # the next tick
    assert (await me(stub, event_id, "c")).state == ACTIVE
    assert (await me(stub, event_id, "d")).position == 1
    status = await room(stub, event_id)
    assert (status.serving_number, status.waiting_count, status.active_count) == (3, 1, 1)
    assert (await join(stub, event_id, "b")).number == 5  # joining again: at the back


async def test_an_idle_room_is_ticked_once_a_minute_and_a_join_wakes_it_at_once(
        stub: pb_grpc.QueueServiceStub, wired: Wired, rooms: list[str]) -> None:
    """Rooms on sale weeks ahead, or nobody waits in, cost (almost) nothing: each tick answers
    when the room next needs one (at most IDLE_MS, a minute; to the millisecond of the sale's
    opening); a join puts the room back on every tick of its replica at once."""
    ahead = await open_room(wired, rooms, sale_open=80_000)
    soon = await open_room(wired, rooms, sale_open=2)
    empty = await open_room(wired, rooms)
    assert (await wired.queue.rooms.tick(ahead)).wait_ms == 60_000
    assert 1000 < (await wired.queue.rooms.tick(soon)).wait_ms <= 2000
    assert (await wired.queue.rooms.tick(empty)).wait_ms == 60_000
    # Fans wait, but nobody may be admitted: no tick on every round either (an unpause pokes).
    paused = await open_room(wired, rooms, paused=True)
    sold = await open_room(wired, rooms)
    for event_id in (paused, sold):
        await join(stub, event_id, "stuck-1")
    await wired.queue.mark_sold_out(sold)
    assert (await wired.queue.rooms.tick(paused)).wait_ms == 60_000
    assert (await wired.queue.rooms.tick(sold)).wait_ms == 60_000
    await until(lambda: _ticked_later(wired, empty))  # the loop too: not on every round
    t0 = time.monotonic()
    await join(stub, empty, "idle-1")
    await until(lambda: served(stub, empty, 1), within=5)
    assert time.monotonic() - t0 < 1.0  # the join's poke, not the idle wait


async def test_a_waiting_fans_read_wakes_a_room_whose_join_another_replica_saw(
        stub: pb_grpc.QueueServiceStub, wired: Wired, rooms: list[str]) -> None:
    """The join landed on a replica that died before ticking: this replica's loop still has the
    room idle for up to a minute, and the fan's next queue/me (served here) wakes it."""
    empty = await open_room(wired, rooms)
    await until(lambda: _ticked_later(wired, empty))
    await wired.queue.rooms.join(empty, "elsewhere")  # the script alone: no poke on this replica
    assert await _ticked_later(wired, empty)
    t0 = time.monotonic()
    assert (await me(stub, empty, "elsewhere")).state == WAITING
    await until(lambda: served(stub, empty, 1), within=5)
    assert time.monotonic() - t0 < 1.0  # the read's poke, not the idle wait


async def test_the_open_rooms_list_reads_a_quiet_room_only_now_and_then_or_when_used(
        stub: pb_grpc.QueueServiceStub, wired: Wired, rooms: list[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """ListOpenQueues (the edge's feed asks every second) reads each busy room's status afresh,
    and a quiet one (nobody waiting or active) again only after QUIET_SECONDS, or as soon as
    this replica sees it used: hundreds of quiet rooms on sale cost a few reads a second."""
    import svc_queue.service as service

    monkeypatch.setattr(service, "OPEN_ROOMS_FRESH_SECONDS", 0.0)  # no shared reading here
    monkeypatch.setattr(service, "QUIET_SECONDS", 1.0)
    here = await open_room(wired, rooms, paused=True)  # paused: nobody is admitted
    there = await open_room(wired, rooms, paused=True)
    store = wired.queue.rooms
    reads: list[str] = []
    status = store.status

    async def counted(event_id: str) -> Any:
        reads.append(event_id)
        return await status(event_id)

    monkeypatch.setattr(store, "status", counted)

    async def listed() -> dict[str, int]:
        return {s.event_id: s.waiting_count for s in await wired.queue.open_rooms()
                if s.event_id in (here, there)}

    assert await listed() == {here: 0, there: 0}
    assert reads.count(here) == reads.count(there) == 1
    await store.join(there, "elsewhere")  # through another replica: no poke here
    assert await listed() == {here: 0, there: 0}  # the quiet reading stands
    assert reads.count(there) == 1
    await join(stub, here, "here-1")  # a join on this replica: read at once
    assert await listed() == {here: 1, there: 0}
    assert (reads.count(here), reads.count(there)) == (2, 1)
    await asyncio.sleep(1.05)  # QUIET_SECONDS: the other replica's join shows
    assert await listed() == {here: 1, there: 1}
    assert await listed() == {here: 1, there: 1}
    assert (reads.count(here), reads.count(there)) == (4, 3)  # busy: read for every answer


async def test_a_room_used_while_the_open_rooms_are_read_is_not_taken_for_quiet(
        stub: pb_grpc.QueueServiceStub, wired: Wired, rooms: list[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A fan joins between the room's status read (nobody in it) and the reading's end: the
    quiet answer is not kept for QUIET_SECONDS, the next reading sees the fan."""
    import svc_queue.service as service

    monkeypatch.setattr(service, "OPEN_ROOMS_FRESH_SECONDS", 0.0)
    racing = await open_room(wired, rooms, paused=True)
    store = wired.queue.rooms
    status, reads = store.status, []

    async def join_meanwhile(event_id: str) -> Any:
        answer = await status(event_id)
        if event_id == racing:
            reads.append(answer.waiting_count)
            if len(reads) == 1:
                await join(stub, racing, "racer")  # after the read, before the reading ends
        return answer

    monkeypatch.setattr(store, "status", join_meanwhile)
    for _ in range(2):
        await wired.queue.open_rooms()
    assert reads == [0, 1]


async def test_a_room_lost_from_the_registry_is_healed_by_its_fans(
        stub: pb_grpc.QueueServiceStub, wired: Wired, rooms: list[str]) -> None:
    """The registry set is gone (on Redis Cluster it sits on another master than the room, which
    may fail over to an empty replica) but the room's keys are not: no recovery runs, since
    the room exists. A fan's join (or a waiting fan's queue/me) puts it back in the registry,
    and it is admitted."""
    event_id = await open_room(wired, rooms, tick=False)
    assert event_id not in await wired.queue.registry.members()
    assert (await join(stub, event_id, "a")).number == 1
    await until(lambda: served(stub, event_id, 1), within=5)
    assert (await me(stub, event_id, "a")).state == ACTIVE
    assert event_id in await wired.queue.registry.members()


async def _ticked_later(w: Wired, event_id: str) -> bool:
    return w.loop._due.get(event_id, 0.0) - time.monotonic() > 3.0


async def test_sold_out_stops_admission_and_waiting_fans_see_it(
        stub: pb_grpc.QueueServiceStub, wired: Wired, rooms: list[str]) -> None:
    event_id = await open_room(wired, rooms, max_active=2, rate=1000)
    for u in ("a", "b", "c", "d"):
        await join(stub, event_id, u)
    await until(lambda: served(stub, event_id, 2))
    assert (await me(stub, event_id, "a")).state == ACTIVE  # "b" is served but has not claimed
    q = await stub.MarkSoldOut(pb.MarkSoldOutRequest(event=f"events/{event_id}"), timeout=5)
    assert q.sold_out
    assert [(await me(stub, event_id, u)).state for u in "abcd"] == [ACTIVE, SOLD_OUT, SOLD_OUT, SOLD_OUT]
    late = await join(stub, event_id, "e")
    assert (late.state, late.number) == (SOLD_OUT, 0)
    # Nobody is taken in any more: the late fan's own ticket says so too, not NOT_JOINED.
    assert ((await me(stub, event_id, "e")).state, (await me(stub, event_id, "f")).state) == \
        (SOLD_OUT, SOLD_OUT)
    await leave(stub, event_id, "a")
    # Leaving and joining again is joining anew: no number either (not LEFT, nor a place).
    rejoined = await join(stub, event_id, "a")
    assert (rejoined.state, rejoined.number) == (SOLD_OUT, 0)
    assert (await join(stub, event_id, "b")).state == SOLD_OUT
    await asyncio.sleep(0.3)
    status = await room(stub, event_id)
    assert status.serving_number == 2 and status.sold_out and status.active_count == 0
    again = await stub.MarkSoldOut(pb.MarkSoldOutRequest(event=f"events/{event_id}"), timeout=5)
    assert again.sold_out  # idempotent


async def test_admin_changes_take_effect_within_a_second(
        stub: pb_grpc.QueueServiceStub, wired: Wired, rooms: list[str]) -> None:
    event_id = await open_room(wired, rooms, max_active=2, rate=1000, paused=True)
    for i in range(12):
        await join(stub, event_id, f"u{i}")
    await asyncio.sleep(0.3)
    assert (await room(stub, event_id)).serving_number == 0  # paused

    q = await update(stub, event_id, ["paused"], paused=False)
    assert not q.paused and q.max_active == 2
    assert await until(lambda: served(stub, event_id, 2), within=1) < 1
    await asyncio.sleep(0.3)
    assert (await room(stub, event_id)).serving_number == 2  # max_active holds it

    ttl = Duration(seconds=5)
    q = await update(stub, event_id, ["max_active", "session_ttl"], max_active=4, session_ttl=ttl)
    assert (q.max_active, q.session_ttl.seconds) == (4, 5)
    assert await until(lambda: served(stub, event_id, 4), within=1) < 1
    t = await me(stub, event_id, "u3")
    assert 4 < t.admission_expire_time.ToMilliseconds() / 1000 - time.time() <= 5.05

    q = await update(stub, event_id, ["admitRatePerSecond", "maxActive"], admit_rate_per_second=4.0,
                     max_active=100)
    assert q.admit_rate_per_second == 4.0
    t0 = time.monotonic()
    await until(lambda: served(stub, event_id, 12), within=4)
    # 8 more at 4 per second: a second's worth (4) at once, the other 4 over the next second
    assert 0.6 < time.monotonic() - t0 < 2.5

    # a body without a mask changes the fields it carries; refusals change nothing
    q = await stub.UpdateQueue(pb.UpdateQueueRequest(queue=pb.Queue(name=qname(event_id), paused=True)),
                               metadata=ADMIN, timeout=5)
    assert q.paused and q.max_active == 100
    for bad in ({"admit_rate_per_second": 0.0}, {"max_active": -1},
                {"session_ttl": Duration(seconds=7200)}):
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await update(stub, event_id, [], **bad)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await update(stub, event_id, ["serving_number"], paused=False)
    assert error_info(exc.value).reason == "INVALID_UPDATE_MASK"  # type: ignore[union-attr]
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stub.UpdateQueue(pb.UpdateQueueRequest(queue=pb.Queue(name=qname(event_id), paused=False)),
                               metadata=fan("u1"), timeout=5)
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (await room(stub, event_id)).paused


# -- tickets, tokens, errors ---------------------------------------------------------------------


def _jti(t: pb.QueueTicket) -> str:
    return str(jwt.decode(t.admission_token, options={"verify_signature": False})["jti"])


async def test_the_admission_token_is_es256_for_this_fan_and_event_and_checkable(
        stub: pb_grpc.QueueServiceStub, wired: Wired, rooms: list[str]) -> None:
    event_id = await open_room(wired, rooms, ttl=600)
    await join(stub, event_id, "fan-t")
    await until(lambda: served(stub, event_id, 1))
    t = await me(stub, event_id, "fan-t")
    assert t.state == ACTIVE and t.eta_seconds == 0 and t.position == 0
    again = await me(stub, event_id, "fan-t")
    assert again.admission_token == t.admission_token  # the same token on every read
    assert again.admission_expire_time == t.admission_expire_time

    jwks = await stub.GetAdmissionKeys(pb.GetAdmissionKeysRequest(), timeout=5)
    assert len(jwks.keys) == 2 and all(k.alg == "ES256" and k.crv == "P-256" for k in jwks.keys)
    header = jwt.get_unverified_header(t.admission_token)
    assert header["alg"] == "ES256" and header["kid"] == jwks.keys[0].kid  # signed by the current key
    key = jwt.PyJWK({f: getattr(jwks.keys[0], f) for f in ("kty", "crv", "x", "y", "kid", "use", "alg")})
    claims = jwt.decode(t.admission_token, key, algorithms=["ES256"], audience="ticketping-booking",
                        issuer="ticketping-queue")
    assert claims["sub"] == "fan-t" and claims["event"] == f"events/{event_id}"
    assert claims["exp"] == t.admission_expire_time.seconds
    assert 590 <= claims["exp"] - claims["iat"] <= 600

    check = pb.CheckAdmissionRequest(event=f"events/{event_id}", user_id="fan-t", jti=claims["jti"])
    reply = await stub.CheckAdmission(check, timeout=5)
    assert reply.active and reply.expire_time == t.admission_expire_time
    other_event = await open_room(wired, rooms)
    for e, u, j in ((event_id, "someone", claims["jti"]), (event_id, "fan-t", str(uuid.uuid4())),
                    (other_event, "fan-t", claims["jti"])):
        wrong = pb.CheckAdmissionRequest(event=f"events/{e}", user_id=u, jti=j)
        assert not (await stub.CheckAdmission(wrong, timeout=5)).active
    end = pb.EndSessionRequest(event=f"events/{event_id}", user_id="fan-t")
    ended = await stub.EndSession(end, timeout=5)
    assert ended.ended
    assert not (await stub.CheckAdmission(check, timeout=5)).active
    assert (await me(stub, event_id, "fan-t")).state == EXPIRED
    again_end = await stub.EndSession(end, timeout=5)
    assert not again_end.ended  # nothing left to end


async def test_a_batch_of_admission_checks_answers_each_in_order(
        stub: pb_grpc.QueueServiceStub, wired: Wired, rooms: list[str]) -> None:
    """BatchCheckAdmission: one answer per check, in their order, each what CheckAdmission
    says; a room that does not exist answers "not active" to all; a bad batch is refused whole
    with the reason and the field."""
    event_id = await open_room(wired, rooms, max_active=2)
    for u in ("a", "b", "waiting"):
        await join(stub, event_id, u)
    await until(lambda: served(stub, event_id, 2))
    a, b = await me(stub, event_id, "a"), await me(stub, event_id, "b")
    event = f"events/{event_id}"

    def req(user: str, jti: str, on: str = "") -> pb.CheckAdmissionRequest:
        return pb.CheckAdmissionRequest(event=on, user_id=user, jti=jti)

    checks = [req("a", _jti(a)), req("b", _jti(a)), req("waiting", str(uuid.uuid4())),
              req("b", _jti(b), on=event), req("nobody", _jti(b)), req("a", _jti(a))]
    got = await stub.BatchCheckAdmission(pb.BatchCheckAdmissionRequest(event=event, requests=checks),
                                         timeout=5)
    assert [r.active for r in got.responses] == [True, False, False, True, False, True]
    assert got.responses[0].expire_time == a.admission_expire_time
    assert got.responses[3].expire_time == b.admission_expire_time
    for one, answer in zip(checks, got.responses, strict=True):
        assert await stub.CheckAdmission(req(one.user_id, one.jti, on=event), timeout=5) == answer

    missing = f"events/{uuid.uuid4()}"
    nowhere = await stub.BatchCheckAdmission(
        pb.BatchCheckAdmissionRequest(event=missing, requests=checks[:2]), timeout=5)
    assert [r.active for r in nowhere.responses] == [False, False]

    for bad, reason, field in (
            ([], "MISSING_FIELD", "requests"),
            ([req("a", _jti(a)), req("b", "")], "MISSING_FIELD", "requests[1].jti"),
            ([req("", _jti(a))], "MISSING_FIELD", "requests[0].user_id"),
            ([req("a", _jti(a), on=missing)], "EVENT_MISMATCH", "requests[0].event"),
            ([req("a", _jti(a))] * 1001, "TOO_MANY_REQUESTS", "requests")):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.BatchCheckAdmission(pb.BatchCheckAdmissionRequest(event=event, requests=bad),
                                           timeout=5)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        info = error_info(refused.value)
        assert info is not None and info.reason == reason and info.metadata["field"] == field
    # 1,000 checks go in one call
    full = await stub.BatchCheckAdmission(
        pb.BatchCheckAdmissionRequest(event=event, requests=[req("b", _jti(b))] * 1000), timeout=10)
    assert len(full.responses) == 1000 and all(r.active for r in full.responses)


async def test_the_eta_follows_the_measured_rate(
        stub: pb_grpc.QueueServiceStub, wired: Wired, rooms: list[str]) -> None:
    event_id = await open_room(wired, rooms, rate=20, max_active=10_000)
    users = [f"u{i}" for i in range(200)]
    numbers = [t.number for t in await asyncio.gather(*(join(stub, event_id, u) for u in users))]
    last = users[numbers.index(200)]
    await asyncio.sleep(3.0)  # about 60 admitted at 20/s
    status = await room(stub, event_id)
    assert 40 <= status.serving_number <= 80, status.serving_number
    t = await me(stub, event_id, last)
    assert t.state == WAITING and abs(t.position - (200 - status.serving_number)) <= 3  # a tick apart
    expected = t.position / 20
    assert 0.7 * expected <= t.eta_seconds <= 1.4 * expected + 1, (t.eta_seconds, expected)
    # The public status says the same pace, for apps that estimate from it.
    assert status.HasField("measured_admit_rate_per_second")
    assert 14 <= status.measured_admit_rate_per_second <= 28, status.measured_admit_rate_per_second


async def test_a_full_room_says_it_admits_slower_than_its_configured_rate(
        stub: pb_grpc.QueueServiceStub, wired: Wired, rooms: list[str]) -> None:
    """While max_active fans are shopping, turns come only as they leave: the measured rate,
    not the configured one, is what a waiting fan's wait follows."""
    event_id = await open_room(wired, rooms, rate=100, max_active=5)
    fresh = await room(stub, event_id)
    assert not fresh.HasField("measured_admit_rate_per_second")  # nothing measured yet
    await asyncio.gather(*(join(stub, event_id, f"f{i}") for i in range(60)))
    await asyncio.sleep(3.0)  # 5 admitted at once, then nobody: nobody leaves
    status = await room(stub, event_id)
    assert status.serving_number == 5 and status.admit_rate_per_second == 100
    assert status.HasField("measured_admit_rate_per_second")
    assert status.measured_admit_rate_per_second < 5, status.measured_admit_rate_per_second


async def test_room_status_is_public_cacheable_and_small(
        stub: pb_grpc.QueueServiceStub, wired: Wired, rooms: list[str]) -> None:
    event_id = await open_room(wired, rooms, max_active=7, rate=3.5, paused=True)
    call = stub.GetQueue(pb.GetQueueRequest(name=qname(event_id)), timeout=5)  # no user at all
    q = await call
    assert ("cache-control", "public, max-age=1") in list(await call.initial_metadata())
    assert (q.name, q.max_active, q.admit_rate_per_second, q.paused) == (qname(event_id), 7, 3.5, True)
    assert q.session_ttl.seconds == 600 and q.ByteSize() < 100
    call = stub.GetQueueTicket(pb.GetQueueTicketRequest(name=f"{qname(event_id)}/me"),
                               metadata=fan("x"), timeout=5)
    assert (await call).state == NOT_JOINED
    # A fan's own answer: the service says nothing and the edge marks it private (test_sale_edge).
    assert "cache-control" not in dict(await call.initial_metadata())


@pytest.mark.parametrize(("name", "code", "reason"), [
    ("events/{missing}/queue", grpc.StatusCode.NOT_FOUND, "EVENT_NOT_FOUND"),
    ("events/not-a-uuid/queue", grpc.StatusCode.NOT_FOUND, "EVENT_NOT_FOUND"),
    ("events/{missing}", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_NAME"),
    ("queues/x", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_NAME"),
])
async def test_join_refuses_unknown_events_and_bad_names(
        stub: pb_grpc.QueueServiceStub, name: str, code: grpc.StatusCode, reason: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stub.JoinQueue(pb.JoinQueueRequest(name=name.format(missing=uuid.uuid4())),
                             metadata=fan("f"), timeout=5)
    assert exc.value.code() == code
    assert error_info(exc.value).reason == reason  # type: ignore[union-attr]


async def test_join_before_the_room_opens_is_412_with_the_opening_time(
        stub: pb_grpc.QueueServiceStub, wired: Wired, rooms: list[str]) -> None:
    event_id = await open_room(wired, rooms, queue_open=3600, sale_open=7200)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await join(stub, event_id, "early-bird")
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(exc.value)
    assert info is not None and info.reason == "QUEUE_NOT_OPEN"
    assert info.metadata["queue_open_time"].endswith("Z")
    assert (await me(stub, event_id, "early-bird")).state == NOT_JOINED
    # Once the show starts the room is no longer ticked: a new place would never be served.
    started = await open_room(wired, rooms, start=-1)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await join(stub, started, "latecomer")
    info = error_info(exc.value)
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info is not None and info.reason == "QUEUE_CLOSED" and info.metadata["close_time"].endswith("Z")
    assert (await me(stub, started, "latecomer")).state == NOT_JOINED
    with pytest.raises(grpc.aio.AioRpcError) as exc:  # no verified user: the edge would not pass it
        await stub.JoinQueue(pb.JoinQueueRequest(name=qname(event_id)), timeout=5)
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_the_room_closes_when_the_sale_closes_before_the_show(
        stub: pb_grpc.QueueServiceStub, wired: Wired, rooms: list[str]) -> None:
    """An event whose saleCloseTime (catalog) is before its show: the room closes then, as it
    would at the show's start, rather than let fans wait for a sale that is over."""
    event_id = str(uuid.uuid4())
    rooms.append(event_id)
    now = int(time.time() * 1000)
    msg = ev.EventPublished(event=f"events/{event_id}", seat_count=10)
    for field, at in (("queue_open_time", now - 3_600_000), ("sale_open_time", now - 1_800_000),
                      ("sale_close_time", now - 1_000), ("start_time", now + 30 * 86_400_000)):
        getattr(msg, field).FromMilliseconds(at)
    await wired.queue.event_published(msg)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await join(stub, event_id, "after-the-sale")
    info = error_info(exc.value)
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info is not None and info.reason == "QUEUE_CLOSED"
    assert info.metadata["close_time"] == rfc3339(now - 1_000)


# -- Redis Cluster -------------------------------------------------------------------------------


async def test_each_room_lives_in_one_slot_and_rooms_spread_over_slots(
        backend: Backend, stub: pb_grpc.QueueServiceStub, wired: Wired, raw: AnyRedis,
        rooms: list[str]) -> None:
    events = [await open_room(wired, rooms, max_active=1) for _ in range(40)]
    for e in events[:3]:
        for u in ("a", "b"):
            await join(stub, e, u)
        await until(lambda e=e: served(stub, e, 1))  # type: ignore[misc]
        await me(stub, e, "a")
        await leave(stub, e, "b")
    await asyncio.sleep(0.1)  # a tick after the last write
    for e in events[:3]:  # every key the scripts wrote for this room: one slot, and an expiry
        keys = [k async for k in raw.scan_iter(match=f"{tag(e)}:*", count=1000)]
        assert len(keys) >= 6 and ticket_key(e, "a").encode() in keys
        assert len({key_slot(k) for k in keys}) == 1
        ttls = [await raw.pttl(k) for k in keys]
        assert all(2 * 86_400_000 < t <= 3 * 86_400_000 for t in ttls), ttls  # show + 2 days
    slots = {key_slot(RoomKeys.of(e).cfg.encode()) for e in events}
    assert len(slots) >= 35  # 40 rooms, (almost) as many slots: no hot slot for all events
    if isinstance(raw, RedisCluster):
        for e in events[:5]:  # the servers agree with the client's CRC16
            k = RoomKeys.of(e).cfg
            assert int(await raw.cluster_keyslot(k)) == key_slot(k.encode())
        nodes = {raw.get_node_from_key(RoomKeys.of(e).cfg).port for e in events}
        assert len(nodes) == 3  # on all three masters


# -- booking's client against the real service ---------------------------------------------------


async def test_bookings_admission_client_works_against_the_real_queue(
        stub: pb_grpc.QueueServiceStub, wired: Wired, rooms: list[str]) -> None:
    """svc_booking's QueueAdmission (CheckAdmission, EndSession) on this service."""
    from svc_booking.adapters.admission import QueueAdmission

    event_id = await open_room(wired, rooms, max_active=1)
    for u in ("buyer", "next"):
        await join(stub, event_id, u)
    await until(lambda: served(stub, event_id, 1))
    jti = _jti(await me(stub, event_id, "buyer"))
    client = QueueAdmission(f"127.0.0.1:{wired.app.port}", timeout=2.0, cache_seconds=0)
    cached = QueueAdmission(f"127.0.0.1:{wired.app.port}", timeout=2.0, cache_seconds=60)
    try:
        # The cache answers for the session it saw, never for another token of the same fan, and
        # ending the session drops it at once.
        assert await cached.is_active(event_id, "buyer", jti)
        assert await cached.is_active(event_id, "buyer", jti)
        assert not await cached.is_active(event_id, "buyer", "another-jti")
        await cached.end_session(event_id, "other-fan", confirmed=False)
        assert await cached.is_active(event_id, "buyer", jti)
        assert await client.is_active(event_id, "buyer", jti)
        assert not await client.is_active(event_id, "next", jti)
        await cached.end_session(event_id, "buyer", confirmed=True)
        assert not await cached.is_active(event_id, "buyer", jti)
        assert not await client.is_active(event_id, "buyer", jti)
        await until(lambda: served(stub, event_id, 2), within=2)  # the freed slot goes on at once
    finally:
        await client.close()
        await cached.close()


def _calls(method: str) -> float:
    return REGISTRY.get_sample_value("grpc_server_started_total", {
        "grpc_service": "ticketping.queue.v1.QueueService", "grpc_method": method}) or 0.0


async def test_bookings_checks_made_at_once_go_in_few_batches_each_with_its_own_answer(
        stub: pb_grpc.QueueServiceStub, wired: Wired, rooms: list[str]) -> None:
    """Hundreds of fans holding at once: booking's client sends the checks that arrive while one
    call is under way together (BatchCheckAdmission), and asks for the same session once; every
    fan still gets the waiting room's answer about their own session."""
    from svc_booking.adapters.admission import QueueAdmission

    event_id = await open_room(wired, rooms, max_active=150)
    users = [f"f{i:03d}" for i in range(200)]
    for i in range(0, 200, 50):
        await asyncio.gather(*(join(stub, event_id, u) for u in users[i:i + 50]))
    await until(lambda: served(stub, event_id, 150))
    tickets = {u: await me(stub, event_id, u) for u in users}
    active = {u for u, t in tickets.items() if t.state == ACTIVE}
    assert len(active) == 150
    jtis = {u: _jti(t) if u in active else str(uuid.uuid4()) for u, t in tickets.items()}
    client = QueueAdmission(f"127.0.0.1:{wired.app.port}", timeout=5.0, cache_seconds=0)
    singles, batches = _calls("CheckAdmission"), _calls("BatchCheckAdmission")
    try:
        asks = [(u, jtis[u]) for u in users] * 3  # each fan three times (a hold, an order...)
        random.shuffle(asks)
        got = await asyncio.gather(*(client.is_active(event_id, u, j) for u, j in asks))
        assert got == [u in active for u, _ in asks]
        sent = _calls("CheckAdmission") - singles + _calls("BatchCheckAdmission") - batches
        assert 1 <= sent <= 5, f"{sent} calls for {len(asks)} checks"
        # one at a time, a check is one CheckAdmission, as before
        assert await client.is_active(event_id, users[0], jtis[users[0]]) == (users[0] in active)
    finally:
        await client.close()


async def test_booking_s_sold_out_event_closes_the_room(
        stub: pb_grpc.QueueServiceStub, wired: Wired, rooms: list[str]) -> None:
    """EventSoldOut (booking's outbox, on its topic): the room admits nobody more and the fans
    still waiting see SOLD_OUT. Delivered again, it changes nothing; for an event with no room
    here it is passed over, not retried."""
    event_id = await open_room(wired, rooms, paused=True)
    await join(stub, event_id, "still-waiting")
    said = new_envelope("booking", event_id, ev.EventSoldOut(event=f"events/{event_id}"))
    for _ in range(2):
        assert await wired.queue.on_event(said) is False
        status = await room(stub, event_id)
        assert status.sold_out and status.serving_number == 0
    assert (await me(stub, event_id, "still-waiting")).state == SOLD_OUT
    unknown = str(uuid.uuid4())
    assert await wired.queue.on_event(
        new_envelope("booking", unknown, ev.EventSoldOut(event=f"events/{unknown}"))) is False


async def test_identitys_jwks_client_gets_the_admission_keys(wired: Wired) -> None:
    """svc_identity's QueueKeys (merged into /.well-known/jwks.json) on this service."""
    from svc_identity.adapters.queue_keys import QueueKeys

    keys = QueueKeys(f"127.0.0.1:{wired.app.port}", timeout=2.0, cache_seconds=0)
    try:
        got = await keys.keys()
    finally:
        await keys.close()
    assert got == await wired.queue.jwks() and len(got) == 2
