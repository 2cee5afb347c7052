"""The queue reacts to Kafka with no database: rooms open from catalog's EventPublished, and
booking's OrderConfirmed / OrderCancelled end the fan's session, each exactly once.

The service runs in process with its consumer on fresh topics (catalog's and booking's, made for
this test); the test produces the envelopes itself, as catalog's relay and booking would
(booking is not built yet). Redeliveries are simulated by producing the same envelope again.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message
from ticketping.events.v1 import events_pb2 as ev
from ticketping.queue.v1 import queue_service_pb2 as pb
from ticketping.queue.v1 import queue_service_pb2_grpc as pb_grpc

from meshkit.errors import error_info
from meshkit.events import EventEnvelope, new_envelope
from meshkit.server import start
from svc_queue.adapters.rooms import RoomKeys, tag
from svc_queue.bootstrap import Wired, wire
from svc_queue.config import Settings

pytestmark = pytest.mark.integration

ADMIN = (("x-user-id", "admin-1"), ("x-user-role", "ADMIN"))
S = pb.QueueTicketState


def fan(user: str) -> tuple[tuple[str, str], ...]:
    return (("x-user-id", user), ("x-user-role", "USER"))


@pytest_asyncio.fixture(loop_scope="session")
async def topics(kafka_bootstrap: str) -> AsyncIterator[tuple[str, str]]:
    run = uuid.uuid4().hex[:8]
    names = (f"test.catalog.{run}.v1", f"test.booking.{run}.v1")
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, 3, 1) for t in names]
                                  + [NewTopic(f"{t}.dlq", 1, 1) for t in names])
        yield names
        await admin.delete_topics([*names, *(f"{t}.dlq" for t in names)])
    finally:
        await admin.close()


@pytest_asyncio.fixture(loop_scope="session")
async def wired(redis_url: str, kafka_bootstrap: str, topics: tuple[str, str]) -> AsyncIterator[Wired]:
    prefix = f"tp:queue:test:{uuid.uuid4().hex[:8]}"
    w = await wire(Settings(
        grpc_port=0, redis_url=redis_url, kafka_bootstrap=kafka_bootstrap, redis_key_prefix=prefix,
        consumer_group=f"queue-test-{uuid.uuid4().hex[:8]}", catalog_topic=topics[0],
        booking_topic=topics[1], admission_tick_seconds=0.02, admission_registry_refresh_seconds=0.05,
        default_admit_rate_per_second=1000.0,
    ))
    await start(w.app)
    yield w
    await w.queue.rooms.redis.delete(f"{prefix}:rooms", f"{prefix}:admission-keys")
    await w.app.stop(1.0)


@pytest_asyncio.fixture(loop_scope="session")
async def producer(kafka_bootstrap: str) -> AsyncIterator[AIOKafkaProducer]:
    p = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, enable_idempotence=True, acks="all")
    await p.start()
    yield p
    await p.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def stub(wired: Wired) -> AsyncIterator[pb_grpc.QueueServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{wired.app.port}") as channel:
        yield pb_grpc.QueueServiceStub(channel)


async def send(producer: AIOKafkaProducer, topic: str, env: EventEnvelope) -> None:
    await producer.send_and_wait(topic, env.SerializeToString(), key=env.aggregate_id.encode())


def envelope(source: str, aggregate: str, payload: Message) -> EventEnvelope:
    return new_envelope(source, aggregate, payload)


async def until(predicate: Any, within: float = 20.0) -> None:
    t0 = time.monotonic()
    while not await predicate():
        assert time.monotonic() - t0 < within, "condition not met in time"
        await asyncio.sleep(0.05)


def published(event_id: str) -> ev.EventPublished:
    now = int(time.time() * 1000)
    msg = ev.EventPublished(event=f"events/{event_id}", title="Test", seat_count=3200)
    msg.queue_open_time.FromMilliseconds(now - 60_000)
    msg.sale_open_time.FromMilliseconds(now - 30_000)
    msg.start_time.FromMilliseconds(now + 86_400_000)
    return msg


async def test_rooms_open_from_events_and_orders_end_sessions_once(
        wired: Wired, stub: pb_grpc.QueueServiceStub, producer: AIOKafkaProducer,
        topics: tuple[str, str]) -> None:
    catalog, booking = topics
    event_id = str(uuid.uuid4())
    join = pb.JoinQueueRequest(name=f"events/{event_id}/queue")
    with pytest.raises(grpc.aio.AioRpcError) as exc:  # not published yet
        await stub.JoinQueue(join, metadata=fan("a"), timeout=5)
    assert error_info(exc.value).reason == "EVENT_NOT_FOUND"  # type: ignore[union-attr]

    pub = envelope("catalog", event_id, published(event_id))
    await send(producer, catalog, pub)

    async def joinable() -> bool:
        try:
            await stub.JoinQueue(join, metadata=fan("a"), timeout=5)
            return True
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND
            return False

    await until(joinable)
    for u in ("b", "c"):
        await stub.JoinQueue(join, metadata=fan(u), timeout=5)
    me = pb.GetQueueTicketRequest(name=f"events/{event_id}/queue/me")

    async def state(u: str) -> int:
        return (await stub.GetQueueTicket(me, metadata=fan(u), timeout=5)).state

    async def active(u: str) -> bool:
        return await state(u) == S.QUEUE_TICKET_STATE_ACTIVE

    for u in ("a", "b", "c"):
        await until(lambda u=u: active(u))  # type: ignore[misc]

    confirmed = envelope("booking", "order-a", ev.OrderConfirmed(
        order="orders/order-a", event=f"events/{event_id}", user_id="a", seat_ids=["A-1-1"]))
    cancelled = envelope("booking", "order-b", ev.OrderCancelled(
        order="orders/order-b", event=f"events/{event_id}", user_id="b", reason="USER_CANCELLED"))
    await send(producer, booking, confirmed)
    await send(producer, booking, cancelled)

    async def ended(u: str) -> bool:
        return await state(u) == S.QUEUE_TICKET_STATE_EXPIRED

    await until(lambda: ended("a"))
    await until(lambda: ended("b"))
    assert await active("c")
    status = await stub.GetQueue(pb.GetQueueRequest(name=f"events/{event_id}/queue"), timeout=5)
    assert status.active_count == 1

    # "a" queues again and is admitted again; neither a redelivered OrderConfirmed nor a late one
    # (about the earlier session, arriving after the new one began) ends that session
    late = envelope("booking", "order-a2", ev.OrderConfirmed(
        order="orders/order-a2", event=f"events/{event_id}", user_id="a", seat_ids=["A-1-2"]))
    await asyncio.sleep(0.01)
    again = await stub.JoinQueue(join, metadata=fan("a"), timeout=5)
    assert again.number == 4
    await until(lambda: active("a"))
    consumer = wired.consumer
    assert consumer is not None
    duplicates = consumer.duplicates_total
    await send(producer, booking, confirmed)
    await until(lambda: _gt(consumer.duplicates_total, duplicates))
    assert await active("a")
    processed = consumer.processed_total
    await send(producer, booking, late)
    await until(lambda: _gt(consumer.processed_total, processed))
    assert await active("a")

    # a redelivered EventPublished does not undo an admin's change
    q = pb.Queue(name=f"events/{event_id}/queue", max_active=7)
    await stub.UpdateQueue(pb.UpdateQueueRequest(queue=q, update_mask=FieldMask(paths=["max_active"])),
                           metadata=ADMIN, timeout=5)
    processed = consumer.processed_total
    await send(producer, catalog, pub)
    await until(lambda: _gt(consumer.processed_total, processed))
    status = await stub.GetQueue(pb.GetQueueRequest(name=f"events/{event_id}/queue"), timeout=5)
    assert status.max_active == 7 and status.serving_number == 4

    # a poison event (no such event name) is parked on the DLQ; the loop goes on
    dlq = consumer.dlq_total
    await send(producer, booking, envelope("booking", "order-x", ev.OrderConfirmed(
        order="orders/order-x", event="not-an-event", user_id="x")))
    await until(lambda: _gt(consumer.dlq_total, dlq))

    redis = wired.queue.rooms.redis
    keys = RoomKeys.of(event_id).room() + [k async for k in redis.scan_iter(match=f"{tag(event_id)}:*")]
    await redis.delete(*keys)
    await wired.queue.registry.remove(event_id)


async def _gt(a: int, b: int) -> bool:
    return a > b
