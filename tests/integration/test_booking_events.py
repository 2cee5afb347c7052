"""Booking builds its inventory from EventPublished read off the real Kafka broker, once.

The consumer is meshkit's EventConsumer in group "booking" (here on a fresh topic): the same
envelope delivered twice is skipped by the de-duplication mark, and a second envelope of the same
publication changes nothing either.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from aiokafka import AIOKafkaProducer
from ticketping.booking.v1 import booking_service_pb2 as pb
from ticketping.booking.v1 import booking_service_pb2_grpc as pb_grpc

from meshkit.events import new_envelope
from meshkit.server import start
from svc_booking.adapters.admission import StaticAdmission
from svc_booking.bootstrap import Wired, wire
from svc_booking.config import Settings

from .test_booking_support import event_published

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture(loop_scope="session")
async def wired(pg_dsn: str, redis_url: str, kafka_bootstrap: str, unique_topic: str
                ) -> AsyncIterator[Wired]:
    settings = Settings(grpc_port=0, postgres_dsn=pg_dsn, redis_url=redis_url,
                        kafka_bootstrap=kafka_bootstrap, queue_addr="127.0.0.1:1", seats_cache_seconds=0,
                        catalog_topic=unique_topic, consumer_group=f"booking-{uuid.uuid4().hex[:6]}",
                        run_sweeper=False)
    w = await wire(settings, admission=StaticAdmission())
    await start(w.app)
    yield w
    await w.app.stop(1.0)


async def seat_count(w: Wired, event_id: str) -> int:
    async with w.booking.pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM seats WHERE event_id = %s", (event_id,))
        row = await cur.fetchone()
        return int(row[0]) if row else 0


async def test_event_published_from_kafka_builds_the_inventory_once(
    wired: Wired, kafka_bootstrap: str, unique_topic: str
) -> None:
    assert wired.consumer is not None
    event_id = str(uuid.uuid4())
    msg = event_published(event_id, sections=(("A", 20, 50, "VIP"), ("B", 10, 100, "R")))
    first = new_envelope("catalog", event_id, msg)
    second = new_envelope("catalog", event_id, msg)  # a re-publication: another event_id
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        for env in (first, first, second):  # the first one delivered twice (at-least-once)
            await producer.send_and_wait(unique_topic, env.SerializeToString(), key=event_id.encode())
    finally:
        await producer.stop()

    deadline = time.monotonic() + 30
    while wired.consumer.processed_total + wired.consumer.duplicates_total < 3:
        assert time.monotonic() < deadline, "the consumer did not handle the three records"
        await asyncio.sleep(0.1)
    assert wired.consumer.duplicates_total == 1 and wired.consumer.dlq_total == 0
    assert await seat_count(wired, event_id) == 2000
    assert await wired.booking.inventory.is_built(event_id)  # built at once, not on first use

    async with grpc.aio.insecure_channel(f"127.0.0.1:{wired.app.port}") as channel:
        stub = pb_grpc.BookingServiceStub(channel)
        resp = await stub.ListSeats(pb.ListSeatsRequest(parent=f"events/{event_id}",
                                                        view=pb.SEAT_VIEW_COMPACT))
    assert [(s.section, len(s.statuses), set(s.statuses)) for s in resp.sections] == [
        ("A", 1000, {"A"}), ("B", 1000, {"A"})]
