"""The waiting room comes back after Redis loses its data: a real catalog service in process (real
PostgreSQL), a real svc_queue in process on a Redis of this module alone (FLUSHALL is safe there).

What fans care about: after a FLUSHALL a published event's room answers again (join, status,
queue/me) and admits fans, whose admission tokens verify with the keys already published; an id
catalog does not know stays 404 and costs catalog one call per few seconds, however many ask at
once; a catalog that cannot be reached answers UNAVAILABLE, never a wrong 404.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import jwt
import pytest
import pytest_asyncio
from google.protobuf.field_mask_pb2 import FieldMask
from redis.asyncio import Redis
from ticketping.catalog.v1 import catalog_service_pb2 as cpb
from ticketping.catalog.v1 import catalog_service_pb2_grpc as cpb_grpc
from ticketping.queue.v1 import queue_service_pb2 as pb
from ticketping.queue.v1 import queue_service_pb2_grpc as pb_grpc

from meshkit.errors import error_info
from meshkit.server import start
from svc_catalog import bootstrap as catalog_bootstrap
from svc_catalog.config import Settings as CatalogSettings
from svc_queue.adapters.rooms import RoomKeys
from svc_queue.bootstrap import Wired, wire
from svc_queue.config import Settings
from svc_queue.recovery import RoomRecovery

from .test_booking_recovery import PrivateRedis, free_port
from .test_catalog_service import ADMIN, new_event, ts

pytestmark = pytest.mark.integration

S = pb.QueueTicketState


def fan(user: str) -> tuple[tuple[str, str], ...]:
    return (("x-user-id", user), ("x-user-role", "USER"))


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    r = PrivateRedis(tmp_path_factory.mktemp("queue-redis"))
    r.start()
    yield r
    r.stop()


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def catalog(pg_dsn: str, kafka_bootstrap: str) -> AsyncIterator[catalog_bootstrap.Wired]:
    w = await catalog_bootstrap.wire(
        CatalogSettings(grpc_port=0, postgres_dsn=pg_dsn, kafka_bootstrap=kafka_bootstrap))
    await start(w.app)
    yield w
    await w.app.stop(1.0)


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def catalog_stub(catalog: catalog_bootstrap.Wired) -> AsyncIterator[cpb_grpc.CatalogServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{catalog.app.port}") as channel:
        yield cpb_grpc.CatalogServiceStub(channel)


def queue_settings(redis_url: str, catalog_addr: str | None, **over: Any) -> Settings:
    values: dict[str, Any] = dict(
        grpc_port=0, redis_url=redis_url, kafka_bootstrap="127.0.0.1:1", consume_events=False,
        admission_tick_seconds=0.02, admission_registry_refresh_seconds=0.05,
        key_encryption_key="A" * 43, catalog_addr=catalog_addr, key_cache_seconds=0.2,
    )
    values.update(over)
    return Settings(**values)


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def queue(private_redis: PrivateRedis, catalog: catalog_bootstrap.Wired) -> AsyncIterator[Wired]:
    w = await wire(queue_settings(private_redis.url, f"127.0.0.1:{catalog.app.port}"))
    await start(w.app)
    yield w
    await asyncio.wait_for(w.app.stop(1.0), 30)


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def stub(queue: Wired) -> AsyncIterator[pb_grpc.QueueServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{queue.app.port}") as channel:
        yield pb_grpc.QueueServiceStub(channel)


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def redis(private_redis: PrivateRedis) -> AsyncIterator[Redis]:
    client = Redis.from_url(private_redis.url)
    yield client
    await client.aclose()


def recovery(w: Wired) -> RoomRecovery:
    assert w.queue.recovery is not None
    return w.queue.recovery


async def published_event(catalog_stub: cpb_grpc.CatalogServiceStub, sale_in: float = 1.0) -> str:
    """A published event whose room is open now and whose sale opens in ``sale_in`` seconds."""
    now = datetime.now(UTC)
    event = new_event(queue_open_time=ts(now), sale_open_time=ts(now + timedelta(seconds=sale_in)))
    created = await catalog_stub.CreateEvent(cpb.CreateEventRequest(event=event), metadata=ADMIN)
    done = await catalog_stub.PublishEvent(cpb.PublishEventRequest(name=created.name), metadata=ADMIN)
    assert done.state == cpb.EVENT_STATE_PUBLISHED
    return done.name.removeprefix("events/")


async def admitted(stub: pb_grpc.QueueServiceStub, event_id: str, user: str) -> pb.QueueTicket:
    name = f"events/{event_id}/queue/me"
    deadline = time.monotonic() + 15
    while True:
        ticket = await stub.GetQueueTicket(pb.GetQueueTicketRequest(name=name), metadata=fan(user))
        if ticket.state == S.QUEUE_TICKET_STATE_ACTIVE:
            return ticket
        assert time.monotonic() < deadline, f"never admitted: {ticket}"
        await asyncio.sleep(0.05)


async def verified(stub: pb_grpc.QueueServiceStub, token: str) -> dict[str, Any]:
    """The token checked the way the edge does: with the published keys."""
    keys = (await stub.GetAdmissionKeys(pb.GetAdmissionKeysRequest())).keys
    kid = jwt.get_unverified_header(token)["kid"]
    jwk = next(k for k in keys if k.kid == kid)
    public = jwt.PyJWK({"kty": jwk.kty, "crv": jwk.crv, "x": jwk.x, "y": jwk.y, "kid": jwk.kid})
    return jwt.decode(token, public, algorithms=["ES256"], audience="ticketping-booking")


async def fails(call: Any, code: grpc.StatusCode, reason: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call
    info = error_info(exc.value)
    assert (exc.value.code(), info.reason if info else None) == (code, reason), exc.value.details()


async def test_a_flushed_room_comes_back_from_catalog(
    queue: Wired, stub: pb_grpc.QueueServiceStub, catalog_stub: cpb_grpc.CatalogServiceStub,
    redis: Redis,
) -> None:
    event_id = await published_event(catalog_stub)
    queue_name = f"events/{event_id}/queue"
    # The room as EventPublished makes it (the consumer is off here: the same handler, fed the
    # message catalog would have sent).
    msg = await queue.queue.recovery.catalog.published(event_id)  # type: ignore[union-attr]
    assert msg is not None
    await queue.queue.event_published(msg)
    first = await stub.JoinQueue(pb.JoinQueueRequest(name=queue_name), metadata=fan("fan-a"))
    assert first.state == S.QUEUE_TICKET_STATE_WAITING
    before = await admitted(stub, event_id, "fan-a")
    kid_before = jwt.get_unverified_header(before.admission_token)["kid"]
    await verified(stub, before.admission_token)
    lookups = recovery(queue).lookups

    assert await redis.flushall()
    assert not await redis.exists(RoomKeys.of(event_id).cfg)
    await asyncio.sleep(0.3)  # past the queue's memory of its keys (key_cache_seconds=0.2)

    # The room answers again; the fan's ticket was lost with Redis: they join again, at the back
    # of a new room (here the only one), and are admitted.
    status = await stub.GetQueue(pb.GetQueueRequest(name=queue_name))
    assert status.name == queue_name and status.max_active == queue.queue.defaults.max_active
    me = await stub.GetQueueTicket(pb.GetQueueTicketRequest(name=f"{queue_name}/me"),
                                   metadata=fan("fan-a"))
    assert me.state == S.QUEUE_TICKET_STATE_NOT_JOINED
    again = await stub.JoinQueue(pb.JoinQueueRequest(name=queue_name), metadata=fan("fan-a"))
    assert (again.state, again.number) == (S.QUEUE_TICKET_STATE_WAITING, 1)
    after = await admitted(stub, event_id, "fan-a")
    assert after.admission_token != before.admission_token
    # The admission-token keys came back as they were: what the edge cached still verifies.
    assert jwt.get_unverified_header(after.admission_token)["kid"] == kid_before
    claims = await verified(stub, after.admission_token)
    assert (claims["sub"], claims["event"]) == ("fan-a", f"events/{event_id}")
    check = pb.CheckAdmissionRequest(event=f"events/{event_id}", user_id="fan-a", jti=claims["jti"])
    assert (await stub.CheckAdmission(check)).active
    # The room is back in the registry the admission loops tick.
    assert event_id in await queue.queue.registry.members()
    # One catalog call rebuilt it, for every operation above.
    assert recovery(queue).lookups == lookups + 1


async def test_every_room_operation_rebuilds_a_deleted_room(
    queue: Wired, stub: pb_grpc.QueueServiceStub, catalog_stub: cpb_grpc.CatalogServiceStub,
    redis: Redis,
) -> None:
    queue_name = f"events/{await published_event(catalog_stub, sale_in=60)}/queue"
    change = pb.UpdateQueueRequest(queue=pb.Queue(name=queue_name, max_active=7),
                                   update_mask=FieldMask(paths=["max_active"]))
    calls = [
        lambda: stub.JoinQueue(pb.JoinQueueRequest(name=queue_name), metadata=fan("fan-b")),
        lambda: stub.GetQueueTicket(pb.GetQueueTicketRequest(name=f"{queue_name}/me"),
                                    metadata=fan("fan-b")),
        lambda: stub.LeaveQueue(pb.LeaveQueueRequest(name=queue_name), metadata=fan("fan-b")),
        lambda: stub.GetQueue(pb.GetQueueRequest(name=queue_name)),
        lambda: stub.UpdateQueue(change, metadata=ADMIN),
    ]
    event_id = queue_name.split("/")[1]

    async def lose_room() -> None:
        # out of the registry first, so the admission loop does not rebuild it before the call
        await queue.queue.registry.remove(event_id)
        await asyncio.sleep(0.15)  # > the loop's registry refresh (0.05 s)
        await redis.delete(*RoomKeys.of(event_id).room())

    for call in calls:
        await lose_room()
        await call()
        assert await redis.exists(RoomKeys.of(event_id).cfg)
    # Booking's check: the room comes back, the lost session is not active.
    await lose_room()
    check = pb.CheckAdmissionRequest(event=f"events/{event_id}", user_id="fan-b", jti="x")
    assert not (await stub.CheckAdmission(check)).active
    assert await redis.exists(RoomKeys.of(event_id).cfg)


async def test_the_admission_loop_rebuilds_a_registered_room_by_its_sale_opening(
    queue: Wired, stub: pb_grpc.QueueServiceStub, catalog_stub: cpb_grpc.CatalogServiceStub,
    redis: Redis,
) -> None:
    """No fan asks: the loop's own tick finds the keys gone and rebuilds the room. A room whose
    sale has not opened is ticked again at the latest when it opens (IDLE_MS caps the wait at a
    minute), so the deadline is the sale's opening, however the loop's ticks fall."""
    sale_in = 2.0
    event_id = await published_event(catalog_stub, sale_in=sale_in)
    opens = time.monotonic() + sale_in
    await stub.GetQueue(pb.GetQueueRequest(name=f"events/{event_id}/queue"))  # made and registered
    assert event_id in await queue.queue.registry.members()
    await redis.delete(*RoomKeys.of(event_id).room())
    while not await redis.exists(RoomKeys.of(event_id).cfg):
        assert time.monotonic() < opens + 3, "the admission loop did not rebuild the room"
        await asyncio.sleep(0.05)
    assert event_id in await queue.queue.registry.members()


async def test_unknown_or_draft_events_stay_404_and_ask_catalog_once(
    queue: Wired, stub: pb_grpc.QueueServiceStub, catalog_stub: cpb_grpc.CatalogServiceStub,
) -> None:
    draft = await catalog_stub.CreateEvent(cpb.CreateEventRequest(event=new_event()), metadata=ADMIN)
    for event_id in (str(uuid.uuid4()), draft.name.removeprefix("events/")):
        queue_name = f"events/{event_id}/queue"
        lookups = recovery(queue).lookups
        # 50 fans at once, then more calls within the negative-cache window (5 s).
        joins = [stub.JoinQueue(pb.JoinQueueRequest(name=queue_name), metadata=fan(f"f{i}"))
                 for i in range(50)]
        answers = await asyncio.gather(*joins, return_exceptions=True)
        for answer in answers:
            assert isinstance(answer, grpc.aio.AioRpcError)
            assert answer.code() == grpc.StatusCode.NOT_FOUND
        await fails(stub.GetQueue(pb.GetQueueRequest(name=queue_name)),
                    grpc.StatusCode.NOT_FOUND, "EVENT_NOT_FOUND")
        await fails(stub.GetQueueTicket(pb.GetQueueTicketRequest(name=f"{queue_name}/me"),
                                        metadata=fan("f1")),
                    grpc.StatusCode.NOT_FOUND, "EVENT_NOT_FOUND")
        assert recovery(queue).lookups == lookups + 1


async def test_an_unreachable_catalog_answers_unavailable(private_redis: PrivateRedis) -> None:
    w = await wire(queue_settings(private_redis.url, f"127.0.0.1:{free_port()}",
                                  catalog_timeout_seconds=0.5, admission_loop=False))
    await start(w.app)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{w.app.port}") as channel:
            s = pb_grpc.QueueServiceStub(channel)
            queue_name = f"events/{uuid.uuid4()}/queue"
            await fails(s.JoinQueue(pb.JoinQueueRequest(name=queue_name), metadata=fan("f")),
                        grpc.StatusCode.UNAVAILABLE, "CATALOG_UNAVAILABLE")
            await fails(s.GetQueue(pb.GetQueueRequest(name=queue_name)),
                        grpc.StatusCode.UNAVAILABLE, "CATALOG_UNAVAILABLE")
            assert recovery(w).lookups == 1  # remembered for a second
    finally:
        await asyncio.wait_for(w.app.stop(1.0), 30)


async def test_without_a_catalog_a_missing_room_stays_404(private_redis: PrivateRedis) -> None:
    w = await wire(queue_settings(private_redis.url, None, admission_loop=False))
    await start(w.app)
    try:
        assert w.queue.recovery is None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{w.app.port}") as channel:
            s = pb_grpc.QueueServiceStub(channel)
            await fails(s.GetQueue(pb.GetQueueRequest(name=f"events/{uuid.uuid4()}/queue")),
                        grpc.StatusCode.NOT_FOUND, "EVENT_NOT_FOUND")
    finally:
        await asyncio.wait_for(w.app.stop(1.0), 30)
