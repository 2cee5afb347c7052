"""EventPublished of a 50,000-seat event crosses the real Kafka broker intact, exactly once.

The service runs in process with its own outbox relay (as in production); the test reads
`ticketping.catalog.v1` from the broker like booking does and rebuilds the inventory from it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer, TopicPartition
from google.protobuf.timestamp_pb2 import Timestamp
from google.type.money_pb2 import Money
from ticketping.catalog.v1 import catalog_service_pb2 as pb
from ticketping.catalog.v1 import catalog_service_pb2_grpc as pb_grpc

from devstack.layout import KAFKA_PARTITIONS
from meshkit.events import parse, payload_of
from meshkit.outbox import MAX_ENVELOPE_BYTES
from meshkit.server import start
from svc_catalog.adapters.messages import seat_map_of
from svc_catalog.bootstrap import Wired, wire
from svc_catalog.config import Settings
from svc_catalog.convert import spec_of

pytestmark = pytest.mark.integration

TOPIC = "ticketping.catalog.v1"
ADMIN = (("x-user-id", "admin-1"), ("x-user-role", "ADMIN"))


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def wired(pg_dsn: str, kafka_bootstrap: str) -> AsyncIterator[Wired]:
    w = await wire(Settings(grpc_port=0, postgres_dsn=pg_dsn, kafka_bootstrap=kafka_bootstrap))
    await start(w.app)
    yield w
    await w.app.stop(1.0)


@pytest_asyncio.fixture(loop_scope="session")
async def consumer(kafka_bootstrap: str) -> AsyncIterator[AIOKafkaConsumer]:
    """Reads the catalog topic from its current end: only what this test causes."""
    c = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, enable_auto_commit=False, group_id=None)
    await c.start()
    try:
        parts = [TopicPartition(TOPIC, p) for p in range(KAFKA_PARTITIONS)]
        c.assign(parts)
        await c.seek_to_end(*parts)
        for tp in parts:
            await c.position(tp)  # resolve the end now, before anything is published
        yield c
    finally:
        await c.stop()


def ts(t: datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(t)
    return out


def stadium() -> pb.Event:
    """50,000 seats: ten sections of 25 rows x 200 seats, three tiers."""
    now = datetime.now(UTC).replace(microsecond=0)
    tiers = ["VIP", "R", "S"]
    return pb.Event(
        title="Stadium Tour - Seoul",
        artist="Someone Big",
        venue=pb.Venue(name="Seoul Olympic Stadium", address="Seoul"),
        start_time=ts(now + timedelta(days=60)),
        queue_open_time=ts(now + timedelta(days=1)),
        sale_open_time=ts(now + timedelta(days=1, hours=1)),
        seat_limit_per_fan=4,
        price_tiers=[
            pb.PriceTier(name=n, price=Money(currency_code="KRW", units=u))
            for n, u in zip(tiers, (220_000, 165_000, 110_000), strict=True)
        ],
        seat_map=pb.SeatMap(
            sections=[
                pb.SeatSection(name=f"{chr(ord('A') + i)}", rows=25, seats_per_row=200, tier=tiers[i % 3])
                for i in range(10)
            ]
        ),
    )


async def records_of(
    consumer: AIOKafkaConsumer, key: str, within: float, *, settle: float | None = None
) -> list[bytes]:
    """Record values with ``key`` arriving within ``within`` seconds; with ``settle``, stop that
    long after the first one (to catch a duplicate) instead of waiting the whole time."""
    found: list[bytes] = []
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if found and settle is not None:
            deadline = min(deadline, time.monotonic() + settle)
            settle = None
        batches = await consumer.getmany(timeout_ms=200)
        for records in batches.values():
            found += [r.value for r in records if r.key == key.encode() and r.value is not None]
    return found


async def test_event_published_of_50000_seats_crosses_the_broker(
    wired: Wired, consumer: AIOKafkaConsumer
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{wired.app.port}") as channel:
        stub = pb_grpc.CatalogServiceStub(channel)
        draft = await stub.CreateEvent(
            pb.CreateEventRequest(event=stadium(), request_id=str(uuid.uuid4())), metadata=ADMIN
        )
        assert draft.seat_count == 50_000
        event = await stub.PublishEvent(pb.PublishEventRequest(name=draft.name), metadata=ADMIN)
        event_id = event.name.removeprefix("events/")

        values = await records_of(consumer, event_id, within=30.0, settle=2.0)
        assert len(values) == 1, f"expected one EventPublished, got {len(values)}"
        value = values[0]
        print(f"\nEventPublished of a 50,000-seat event: {len(value)} bytes serialized "
              f"(limit {MAX_ENVELOPE_BYTES})")
        assert len(value) < 4096

        envelope = parse(value)
        assert envelope.aggregate_id == event_id and envelope.source == "catalog"
        msg = payload_of(envelope)
        assert msg.DESCRIPTOR.full_name == "ticketping.events.v1.EventPublished"
        assert msg.event == event.name and msg.title == event.title  # type: ignore[attr-defined]
        assert msg.seat_count == 50_000 and msg.seat_limit_per_fan == 4  # type: ignore[attr-defined]
        assert msg.sale_open_time == event.sale_open_time  # type: ignore[attr-defined]
        assert msg.start_time == event.start_time  # type: ignore[attr-defined]
        assert msg.queue_open_time == event.queue_open_time  # type: ignore[attr-defined]
        assert [(t.name, t.price.units) for t in msg.price_tiers] == [  # type: ignore[attr-defined]
            ("VIP", 220_000), ("R", 165_000), ("S", 110_000)
        ]

        # booking's side: expand the ranges into the inventory
        seats = list(seat_map_of(msg).seats())  # type: ignore[arg-type]
        ids = {s.seat_id for s in seats}
        assert len(seats) == len(ids) == 50_000
        assert ids == set(spec_of(event).seat_map.seat_ids())
        assert {"A-1-1", "A-25-200", "J-25-200"} <= ids and "K-1-1" not in ids
        assert sum(1 for s in seats if s.tier == "VIP") == 4 * 5_000

        # publishing again answers the same event and emits nothing more
        again = await stub.PublishEvent(pb.PublishEventRequest(name=draft.name), metadata=ADMIN)
        assert again == event
        assert await records_of(consumer, event_id, within=2.0) == []
