"""The outbox relay and the consumer loop against real PostgreSQL and Kafka.

What a user cares about: an event exists on Kafka if and only if its change committed, and every
event's effect happens exactly once, in order per aggregate, through crashes, redeliveries,
poison messages and several relays running at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner
from opentelemetry import context as otel_context
from opentelemetry import trace
from psycopg_pool import AsyncConnectionPool
from ticketping.events.v1.events_pb2 import EventEnvelope, PaymentRefunded, Ping

from meshkit import outbox as outbox_module
from meshkit.consumer import EventConsumer
from meshkit.db import autocommit, close_pool, open_pool
from meshkit.events import EnvelopeError, new_envelope, payload_of
from meshkit.outbox import CHANNEL, Outboxed, OutboxError, OutboxRelay, enqueue

from .test_booking_recovery import free_port

pytestmark = pytest.mark.integration

SOURCE = "platform-test"

EFFECTS_SQL = """
CREATE TABLE effects (
    id             bigserial PRIMARY KEY,
    consumer_group text   NOT NULL,
    event_id       uuid   NOT NULL,   -- deliberately not unique: a double effect must show
    aggregate_id   text   NOT NULL,
    seq            bigint NOT NULL
);
"""


# -- fixtures and helpers ------------------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def pool(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    folder = tmp_path_factory.mktemp("migrations")
    (folder / "0001_effects.sql").write_text(EFFECTS_SQL)
    p = await open_pool(pg_dsn, migrations=Path(folder), max_size=20)
    yield p
    await close_pool(p)


@pytest_asyncio.fixture(loop_scope="session", autouse=True)
async def clean(pool: AsyncConnectionPool) -> None:
    async with pool.connection() as conn:
        await conn.execute("TRUNCATE outbox, processed_events, effects")


def group() -> str:
    return f"g-{uuid.uuid4().hex[:8]}"


def ping(aggregate: str, seq: int, note: str = "") -> EventEnvelope:
    return new_envelope(SOURCE, aggregate, Ping(note=note, sequence=seq))


async def enqueue_all(pool: AsyncConnectionPool, topic: str, envs: list[EventEnvelope]) -> None:
    async with pool.connection() as conn, conn.transaction():
        for env in envs:
            await enqueue(conn, topic, env)


def recorder(group_id: str) -> Callable[[EventEnvelope, Any], Awaitable[None]]:
    """A handler whose effect is one row in `effects`, written in the consumer's transaction."""

    async def handle(env: EventEnvelope, conn: Any) -> None:
        p = payload_of(env)
        assert isinstance(p, Ping)
        await conn.execute(
            "INSERT INTO effects (consumer_group, event_id, aggregate_id, seq) VALUES (%s, %s, %s, %s)",
            (group_id, env.event_id, env.aggregate_id, p.sequence),
        )

    return handle


async def scalar(pool: AsyncConnectionPool, sql: str, params: tuple[Any, ...] = ()) -> Any:
    async with pool.connection() as conn:
        cur = await conn.execute(sql, params)
        row = await cur.fetchone()
        assert row is not None
        return row[0]


async def effects(pool: AsyncConnectionPool, group_id: str) -> list[tuple[str, str, int]]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT event_id::text, aggregate_id, seq FROM effects WHERE consumer_group = %s ORDER BY id",
            (group_id,),
        )
        return [(r[0], r[1], r[2]) for r in await cur.fetchall()]


async def wait_for(
    probe: Callable[[], Awaitable[bool]], within: float, what: str, every: float = 0.02
) -> float:
    t0 = time.monotonic()
    while not await probe():
        if time.monotonic() - t0 > within:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(every)
    return time.monotonic() - t0


async def drain(relay: OutboxRelay) -> int:
    total = 0
    while n := await relay.publish_pending():
        total += n
    return total


async def read_topic(bootstrap: str, topic: str, expect: int, within: float = 20.0) -> list[Any]:
    """Every record of `topic` from the beginning (no group), stopping at `expect` or `within`."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    await consumer.start()
    records: list[Any] = []
    try:
        deadline = time.monotonic() + within
        while len(records) < expect and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for recs in batch.values():
                records.extend(recs)
        # Anything beyond `expect` would be a duplicate: give it a moment to show up.
        batch = await consumer.getmany(timeout_ms=500)
        for recs in batch.values():
            records.extend(recs)
    finally:
        await consumer.stop()
    return records


def envelope_of(record: Any) -> EventEnvelope:
    env = EventEnvelope()
    env.ParseFromString(record.value)
    return env


@contextlib.asynccontextmanager
async def running(consumer: EventConsumer) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(consumer.run())
    try:
        yield task
    finally:
        if not task.done():
            await consumer.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def assert_in_order_per_aggregate(rows: list[tuple[str, int]]) -> None:
    last: dict[str, int] = {}
    for aggregate, seq in rows:
        assert seq > last.get(aggregate, -1), f"{aggregate}: {seq} after {last[aggregate]}"
        last[aggregate] = seq


# -- (b) committed → published and consumed once; rolled back → nothing --------------------------


async def test_committed_event_is_published_and_consumed_once_rolled_back_is_not(
    pool: AsyncConnectionPool, kafka_bootstrap: str, unique_topic: str
) -> None:
    g = group()
    # Polling every 30 s: only LISTEN/NOTIFY can make delivery quick.
    relay = OutboxRelay(pool, kafka_bootstrap, poll_interval=30.0)
    consumer = EventConsumer(pool, kafka_bootstrap, g, [unique_topic], recorder(g))
    await relay.start()
    try:
        async with running(consumer):
            await asyncio.sleep(0.3)  # the relay's first pass has run and found nothing

            # A traceparent in the context ends up in the envelope and the headers.
            span_ctx = trace.SpanContext(
                trace_id=0x0AF7651916CD43DD8448EB211C80319C,
                span_id=0xB7AD6B7169203331,
                is_remote=False,
                trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
            )
            token = otel_context.attach(trace.set_span_in_context(trace.NonRecordingSpan(span_ctx)))
            try:
                committed = ping("order-1", 1, "committed")
            finally:
                otel_context.detach(token)
            rolled_back = ping("order-2", 1, "rolled back")

            t0 = time.monotonic()
            async with pool.connection() as conn:
                async with conn.transaction():
                    await enqueue(conn, unique_topic, committed)
                with pytest.raises(RuntimeError):
                    async with conn.transaction():
                        await enqueue(conn, unique_topic, rolled_back)
                        raise RuntimeError("the change failed")

            async def published() -> bool:
                sql = "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL"
                return bool(await scalar(pool, sql) >= 1)

            relay_latency = await wait_for(published, 10, "the relay to publish")

            async def arrived() -> bool:
                return len(await effects(pool, g)) >= 1

            await wait_for(arrived, 20, "the committed event's effect")
            effect_latency = time.monotonic() - t0
            await asyncio.sleep(1.5)  # room for a wrong second delivery or the rolled-back one
    finally:
        await relay.stop()

    assert await effects(pool, g) == [(committed.event_id, "order-1", 1)]
    # NOTIFY woke the relay at once: it would otherwise have slept for 30 s.
    assert relay_latency < 3, f"commit -> published took {relay_latency:.2f}s"
    assert await scalar(pool, "SELECT count(*) FROM outbox") == 1
    assert await scalar(pool, "SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0
    assert await scalar(pool, "SELECT count(*) FROM processed_events") == 1

    records = await read_topic(kafka_bootstrap, unique_topic, expect=1)
    assert len(records) == 1
    rec = records[0]
    assert rec.key == b"order-1"
    assert envelope_of(rec) == committed
    headers = {k: v.decode() for k, v in rec.headers}
    assert headers["event_id"] == committed.event_id
    assert headers["event_type"] == "ping"
    assert headers["source"] == SOURCE
    assert headers["traceparent"] == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert committed.traceparent == headers["traceparent"]
    print(
        f"\ncommit -> published {relay_latency * 1000:.0f} ms, "
        f"commit -> effect committed {effect_latency * 1000:.0f} ms"
    )


async def test_a_consumer_purges_its_own_marks_once_past_their_retention(
    pool: AsyncConnectionPool, kafka_bootstrap: str, unique_topic: str
) -> None:
    """processed_events does not grow with every event ever handled: each consumer deletes its
    group's marks older than mark_retention, a chunk at a time, on its own every purge_interval;
    recent marks and other groups' marks stay."""
    mine, other = group(), group()
    ages = {"old": timedelta(days=9), "recent": timedelta(hours=1)}
    async with pool.connection() as conn, conn.transaction():
        for g in (mine, other):
            for age, n in (("old", 7), ("recent", 2)):
                for i in range(n):
                    await conn.execute(
                        "INSERT INTO processed_events (consumer_group, event_id, topic, \"partition\", "
                        "\"offset\", processed_at) VALUES (%s, %s, %s, 0, %s, now() - %s)",
                        (g, uuid.uuid4(), unique_topic, i, ages[age]))

    async def marks(g: str) -> int:
        sql = "SELECT count(*) FROM processed_events WHERE consumer_group = %s"
        return int(await scalar(pool, sql, (g,)))

    consumer = EventConsumer(pool, kafka_bootstrap, mine, [unique_topic], recorder(mine),
                             mark_retention=timedelta(days=8), purge_interval=0.2)
    assert await consumer.purge_marks(older_than=timedelta(days=30), chunk=3) == 0
    assert await consumer.purge_marks(chunk=3) == 7  # three statements of 3, 3 and 1
    assert (await marks(mine), await marks(other)) == (2, 9)

    other_consumer = EventConsumer(pool, kafka_bootstrap, other, [unique_topic], recorder(other),
                                   purge_interval=0.2)
    task = asyncio.create_task(other_consumer.run())
    try:
        async def purged() -> bool:
            return await marks(other) == 2
        await wait_for(purged, 20, "the running consumer to purge its old marks")
    finally:
        await other_consumer.stop()
        await asyncio.wait_for(task, 30)
    assert other_consumer.marks_purged_total == 7 and await marks(mine) == 2


async def test_enqueue_refuses_to_run_outside_a_transaction(
    pool: AsyncConnectionPool, unique_topic: str
) -> None:
    conninfo = pool.conninfo
    assert isinstance(conninfo, str)
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        with pytest.raises(RuntimeError, match="inside the transaction"):
            await enqueue(conn, unique_topic, ping("a", 1))
    assert await scalar(pool, "SELECT count(*) FROM outbox") == 0


async def test_one_statement_writes_its_event_only_with_its_change_and_wakes_the_relay(
    pool: AsyncConnectionPool, kafka_bootstrap: str, unique_topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outboxed: the change and its outbox row in ONE statement (autocommit), as booking's and
    payment's hot paths write them. A change that matched no row adds no event; a failed
    statement adds nothing. The relay of the writer's own process is woken in the process (no
    NOTIFY: nobody listening hears one); a relay elsewhere (none registered here) by the
    statement's NOTIFY. Either way a relay that would otherwise sleep for 30 s publishes at once."""
    async with pool.connection() as conn:
        await conn.execute("CREATE TABLE IF NOT EXISTS seats_probe (id int PRIMARY KEY, state text)")
        await conn.execute("INSERT INTO seats_probe VALUES (1, 'FREE'), (4, 'FREE') ON CONFLICT DO NOTHING")
    sold, missed, failed = ping("seat-1", 1, "sold"), ping("seat-2", 1, "no such seat"), ping("seat-1", 2)
    elsewhere = ping("seat-4", 1, "sold")

    async def sell(seat: int, env: EventEnvelope, new_id: int | None = None) -> int:
        ob = Outboxed(unique_topic, env)
        async with autocommit(pool) as conn:
            cur = await conn.execute(
                f"""WITH s AS (UPDATE seats_probe SET state = 'SOLD', id = coalesce(%(new)s, id)
                               WHERE id = %(seat)s RETURNING id),
                         ob AS ({ob.cte("s")})
                    SELECT count(*), {ob.notified("ob", conn)} FROM s""",
                {"seat": seat, "new": new_id, **ob.params})
            row = await cur.fetchone()
            assert row is not None and row[0] == row[1]  # one row counted per event
            ob.sent(row[1])
            return int(row[0])

    def published(n: int) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return await scalar(pool, "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL") == n
        return check

    conninfo = pool.conninfo
    assert isinstance(conninfo, str)
    listening = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
    await listening.execute(f"LISTEN {CHANNEL}")
    relay = OutboxRelay(pool, kafka_bootstrap, poll_interval=30.0)
    await relay.start()
    try:
        await asyncio.sleep(0.3)  # the relay's first pass has run and found nothing
        assert await sell(2, missed) == 0
        async with pool.connection() as conn:
            await conn.execute("INSERT INTO seats_probe VALUES (3, 'FREE') ON CONFLICT DO NOTHING")
        with pytest.raises(psycopg.errors.UniqueViolation):
            await sell(1, failed, new_id=3)  # the change fails: its event goes with it
        t0 = time.monotonic()
        assert await sell(1, sold) == 1
        latency = await wait_for(published(1), 10, "the relay to publish")
        assert latency < 3, f"statement -> published took {time.monotonic() - t0:.2f}s"
        heard = [n async for n in listening.notifies(timeout=0.3)]
        assert heard == []  # woken in the process, not through PostgreSQL

        monkeypatch.setattr(outbox_module, "_LOCAL", {})  # as if the relay ran elsewhere
        await asyncio.sleep(0.3)  # past the relay's gather: asleep for 30 s again
        t0 = time.monotonic()
        assert await sell(4, elsewhere) == 1
        latency = await wait_for(published(2), 10, "the relay to publish on NOTIFY")
        assert latency < 3, f"statement -> published took {time.monotonic() - t0:.2f}s"
        heard = [n async for n in listening.notifies(timeout=0.3)]
        assert [n.channel for n in heard] == [CHANNEL]
    finally:
        await relay.stop()
        await listening.close()
    records = await read_topic(kafka_bootstrap, unique_topic, expect=2)
    got = sorted((envelope_of(r) for r in records), key=lambda e: e.aggregate_id)  # two keys:
    assert got == [sold, elsewhere]  # two partitions, read in no set order
    assert await scalar(pool, "SELECT count(*) FROM outbox") == 2


async def test_a_busy_relay_publishes_what_commits_while_it_gathers_in_one_batch(
    pool: AsyncConnectionPool, kafka_bootstrap: str, unique_topic: str
) -> None:
    """After a pass that published, the relay lets ``gather`` go by before it claims again: rows
    committed one by one meanwhile (each its own transaction and notification, as a sale's
    purchases are) go out in one pass, not one pass each. A relay that had nothing to publish
    answers the first notification at once."""
    relay = OutboxRelay(pool, kafka_bootstrap, poll_interval=30.0, gather=0.5)
    passes: list[int] = []
    real_pass = relay.publish_pending

    async def counted() -> int:
        n = await real_pass()
        passes.append(n)
        return n

    relay.publish_pending = counted  # type: ignore[method-assign]

    def published(n: int) -> Callable[[], Awaitable[bool]]:
        async def probe() -> bool:
            return await scalar(pool, "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL") >= n
        return probe

    await relay.start()
    try:
        await asyncio.sleep(0.3)  # the first pass ran and found nothing: the relay is quiet
        t0 = time.monotonic()
        await enqueue_all(pool, unique_topic, [ping("a", 0)])
        await wait_for(published(1), 10, "the first row")
        first = time.monotonic() - t0
        for i in range(1, 6):  # committed one by one while the relay gathers
            await enqueue_all(pool, unique_topic, [ping(f"k{i}", i)])
        await wait_for(published(6), 10, "the gathered rows")
    finally:
        await relay.stop()
    assert first < 0.4, f"a quiet relay took {first:.2f}s to answer a notification"
    assert [n for n in passes if n] == [1, 5], passes
    assert len(await read_topic(kafka_bootstrap, unique_topic, expect=6)) == 6


async def test_the_relay_refuses_a_negative_gather(pool: AsyncConnectionPool) -> None:
    with pytest.raises(ValueError, match="gather"):
        OutboxRelay(pool, "127.0.0.1:1", gather=-1)


@pytest.mark.parametrize("compression", ["none", "gzip"])
async def test_the_relay_publishes_with_the_configured_codec(
    pool: AsyncConnectionPool, kafka_bootstrap: str, unique_topic: str, compression: str
) -> None:
    """TP_KAFKA_COMPRESSION: uncompressed by default, gzip (or another installed codec) when
    set; consumers read either, so replicas may differ while a change rolls out."""
    envs = [ping(f"order-{i}", i, note="x" * 200) for i in range(6)]
    await enqueue_all(pool, unique_topic, envs)
    relay = OutboxRelay(pool, kafka_bootstrap, compression=compression)
    try:
        assert await drain(relay) == len(envs)
    finally:
        await relay.stop()
    records = await read_topic(kafka_bootstrap, unique_topic, expect=len(envs))
    assert sorted((envelope_of(r) for r in records), key=lambda e: e.event_id) == sorted(
        envs, key=lambda e: e.event_id)


# -- (c) crash between the DB commit and the offset commit ---------------------------------------


async def test_crash_between_db_commit_and_offset_commit_keeps_every_effect_exactly_once(
    pool: AsyncConnectionPool, kafka_bootstrap: str, unique_topic: str
) -> None:
    n, crash_after = 200, 70
    envs = [ping(f"order-{i % 20}", i // 20) for i in range(n)]
    for i in range(0, n, 25):  # a few transactions, as services would write them
        await enqueue_all(pool, unique_topic, envs[i : i + 25])
    relay = OutboxRelay(pool, kafka_bootstrap)
    assert await drain(relay) == n
    await relay.stop()

    g = group()
    committed_effects = 0
    crashed = asyncio.Event()

    async def crash_after_db_commit(record: Any, env: EventEnvelope) -> None:
        nonlocal committed_effects
        committed_effects += 1
        if committed_effects == crash_after:
            crashed.set()
            await asyncio.Event().wait()  # hang here until killed: the offset is never committed

    # Small batches: some offsets are committed before the crash, some are not.
    first = EventConsumer(
        pool,
        kafka_bootstrap,
        g,
        [unique_topic],
        recorder(g),
        max_batch=16,
        after_commit=crash_after_db_commit,
    )
    t0 = time.monotonic()
    task = asyncio.create_task(first.run())
    await asyncio.wait_for(crashed.wait(), 30)
    task.cancel()  # the kill: no graceful stop, no offset commit
    with contextlib.suppress(asyncio.CancelledError):
        await task
    # The hung record's own effect is in; records of other keys, handled side by side, may have
    # committed theirs in the moment before the kill (their offsets were not committed).
    before_kill = len(await effects(pool, g))
    assert before_kill >= crash_after

    second = EventConsumer(pool, kafka_bootstrap, g, [unique_topic], recorder(g))
    async with running(second):

        async def all_arrived() -> bool:
            return await scalar(pool, "SELECT count(*) FROM effects WHERE consumer_group = %s", (g,)) >= n

        await wait_for(all_arrived, 60, f"{n} effects")
        # Let the rest of the redeliveries come through (and show up if they were not skipped).

        async def backlog_done() -> bool:
            return second.processed_total + second.duplicates_total >= n - before_kill + 1

        await wait_for(backlog_done, 30, "the second consumer to go through its backlog")
        await asyncio.sleep(1.0)
    elapsed = time.monotonic() - t0

    rows = await effects(pool, g)
    assert len(rows) == n, "an effect was lost or applied twice"
    assert sorted(r[0] for r in rows) == sorted(e.event_id for e in envs)
    assert await scalar(pool, "SELECT count(*) FROM processed_events WHERE consumer_group = %s", (g,)) == n
    # The crash really redelivered records whose effect had committed (they were skipped), and
    # only those: what the first consumer had committed offsets for was not delivered again.
    assert 1 <= second.duplicates_total < before_kill
    assert second.processed_total == n - before_kill
    assert_in_order_per_aggregate([(r[1], r[2]) for r in rows])
    print(
        f"\ncrash test: {n} events, first consumer killed after {crash_after} effects, "
        f"second consumer processed {second.processed_total} and skipped "
        f"{second.duplicates_total} redelivered duplicates in {elapsed:.1f}s"
    )


# -- (d) poison and garbage go to the DLQ, the loop goes on ---------------------------------------


async def test_failing_handler_parks_the_record_on_the_dlq_and_the_loop_goes_on(
    pool: AsyncConnectionPool, kafka_bootstrap: str, unique_topic: str
) -> None:
    g = group()
    record = recorder(g)
    attempts: defaultdict[str, int] = defaultdict(int)

    async def handler(env: EventEnvelope, conn: Any) -> None:
        await record(env, conn)  # the effect is written, then rolled back with the failure
        p = payload_of(env)
        assert isinstance(p, Ping)
        if p.note == "poison":
            attempts[env.event_id] += 1
            raise ValueError("cannot handle this one")

    aggregate = "order-dlq"  # one key: one partition, so the order below is the delivery order
    ok1, poison, ok2, ok3 = (
        ping(aggregate, 1),
        ping(aggregate, 2, "poison"),
        ping(aggregate, 3),
        ping(aggregate, 4),
    )
    await enqueue_all(pool, unique_topic, [ok1, poison, ok2])
    relay = OutboxRelay(pool, kafka_bootstrap)
    assert await drain(relay) == 3
    # Not an envelope at all, same key so it sits between ok2 and ok3 on the partition.
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(unique_topic, value=b"\xff\xfe not protobuf", key=aggregate.encode())
    finally:
        await producer.stop()
    await enqueue_all(pool, unique_topic, [ok3])
    assert await drain(relay) == 1
    await relay.stop()

    consumer = EventConsumer(
        pool, kafka_bootstrap, g, [unique_topic], handler, max_retries=2, retry_backoff=0.05
    )
    async with running(consumer):

        async def done() -> bool:
            return len(await effects(pool, g)) >= 3 and consumer.dlq_total >= 2

        await wait_for(done, 30, "three effects and two DLQ records")
        await asyncio.sleep(0.5)

    assert [(r[0], r[2]) for r in await effects(pool, g)] == [
        (ok1.event_id, 1),
        (ok2.event_id, 3),
        (ok3.event_id, 4),
    ]
    assert attempts[poison.event_id] == 3  # the first try and max_retries=2 retries
    assert consumer.dlq_total == 2
    processed = await scalar(
        pool, "SELECT count(*) FROM processed_events WHERE event_id = %s", (poison.event_id,)
    )
    assert processed == 0  # a fixed handler may still process it when it is replayed

    dlq = await read_topic(kafka_bootstrap, unique_topic + ".dlq", expect=2)
    assert len(dlq) == 2
    parked, garbage = dlq
    assert parked.key == aggregate.encode()
    assert envelope_of(parked) == poison  # the original bytes
    h = {k: v.decode() for k, v in parked.headers}
    assert h["event_id"] == poison.event_id and h["event_type"] == "ping"  # original headers kept
    assert "cannot handle this one" in h["error"]
    assert h["attempts"] == "3" and h["consumer_group"] == g
    assert h["original_topic"] == unique_topic
    assert garbage.value == b"\xff\xfe not protobuf"
    assert "invalid envelope" in dict(garbage.headers)["error"].decode()

    # Every offset, DLQ'd ones included, was committed: a new member of the group gets nothing.
    again = EventConsumer(pool, kafka_bootstrap, g, [unique_topic], handler)
    async with running(again):
        await asyncio.sleep(3.0)
    assert again.processed_total == again.duplicates_total == again.dlq_total == 0


# -- (e) two relays at once ----------------------------------------------------------------------


async def test_two_relays_at_once_publish_each_row_once_in_order_per_key(
    pool: AsyncConnectionPool, kafka_bootstrap: str, unique_topic: str
) -> None:
    n, keys = 400, 40
    envs = [ping(f"order-{i % keys}", i // keys) for i in range(n)]
    relays = [OutboxRelay(pool, kafka_bootstrap, batch_size=20, poll_interval=0.05) for _ in range(2)]
    await enqueue_all(pool, unique_topic, envs[:100])  # a backlog both compete for at start
    t0 = time.monotonic()
    await asyncio.gather(*(r.start() for r in relays))
    try:
        for i in range(100, n, 10):  # and more arriving while they run
            await enqueue_all(pool, unique_topic, envs[i : i + 10])
            await asyncio.sleep(0.005)

        async def all_published() -> bool:
            return await scalar(pool, "SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0

        await wait_for(all_published, 30, "the outbox to drain")
        elapsed = time.monotonic() - t0
    finally:
        await asyncio.gather(*(r.stop() for r in relays))

    counts = [r.published_total for r in relays]
    assert sum(counts) == n, counts  # each row marked published by exactly one relay
    records = await read_topic(kafka_bootstrap, unique_topic, expect=n)
    ids = [envelope_of(r).event_id for r in records]
    assert len(ids) == n, f"{len(ids)} records for {n} events"
    assert set(ids) == {e.event_id for e in envs}
    for rec in records:
        assert rec.key.decode() == envelope_of(rec).aggregate_id
    by_partition: defaultdict[int, list[Any]] = defaultdict(list)
    for rec in records:
        by_partition[rec.partition].append(rec)
    for recs in by_partition.values():
        recs.sort(key=lambda r: r.offset)
        assert_in_order_per_aggregate(
            [(envelope_of(r).aggregate_id, envelope_of(r).ping.sequence) for r in recs]
        )
    print(
        f"\ntwo relays: {n} rows in {elapsed:.2f}s, split {counts}, "
        f"deferred for key order {[r.deferred_total for r in relays]}"
    )


async def test_a_row_held_by_another_relay_holds_back_later_rows_of_its_key(
    pool: AsyncConnectionPool, kafka_bootstrap: str, unique_topic: str
) -> None:
    a1, b1, a2 = ping("agg-a", 1), ping("agg-b", 1), ping("agg-a", 2)
    await enqueue_all(pool, unique_topic, [a1, b1, a2])
    relay = OutboxRelay(pool, kafka_bootstrap)
    conninfo = pool.conninfo
    assert isinstance(conninfo, str)
    try:
        # Another relay is in the middle of publishing a1: it holds its row lock.
        async with await psycopg.AsyncConnection.connect(conninfo) as other:
            await other.execute("SELECT id FROM outbox WHERE event_id = %s FOR UPDATE", (a1.event_id,))
            assert await relay.publish_pending() == 1  # b1 only; a2 must wait for a1
            assert relay.deferred_total == 1
            await other.rollback()  # the other relay died: its row is back in the pool
        assert await drain(relay) == 2
    finally:
        await relay.stop()
    records = await read_topic(kafka_bootstrap, unique_topic, expect=3)
    order = [envelope_of(r).event_id for r in records if r.key == b"agg-a"]
    assert order == [a1.event_id, a2.event_id]


async def test_relay_purges_rows_published_longer_ago_than_the_retention(
    pool: AsyncConnectionPool, kafka_bootstrap: str, unique_topic: str
) -> None:
    old, recent, pending = ping("x", 1), ping("x", 2), ping("x", 3)
    await enqueue_all(pool, unique_topic, [old, recent, pending])
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE outbox SET published_at = now() - interval '2 days' WHERE event_id = %s",
            (old.event_id,),
        )
        await conn.execute(
            "UPDATE outbox SET published_at = now() - interval '1 hour' WHERE event_id = %s",
            (recent.event_id,),
        )
    relay = OutboxRelay(pool, kafka_bootstrap)
    try:
        assert await relay.purge_published() == 1
    finally:
        await relay.stop()
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT event_id::text FROM outbox ORDER BY id")
        left = [r[0] for r in await cur.fetchall()]
    assert left == [recent.event_id, pending.event_id]


# -- more failure modes --------------------------------------------------------------------------


async def test_a_row_that_cannot_be_sent_holds_back_only_its_own_key(
    pool: AsyncConnectionPool, kafka_bootstrap: str, unique_topic: str
) -> None:
    """One row cannot be sent (its topic is missing): the rows acknowledged around it are marked
    published at once and never sent again with it, while the rows of its own key wait behind it,
    in order, until it goes out."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    missing = f"{unique_topic}.missing"
    good, bad, later, bad_next = ping("o-1", 1), ping("o-2", 1), ping("o-3", 1), ping("o-2", 2)
    async with pool.connection() as conn, conn.transaction():
        await enqueue(conn, unique_topic, good)
        await enqueue(conn, missing, bad)  # no such topic (and no auto-creation)
        await enqueue(conn, unique_topic, later)
        await enqueue(conn, missing, bad_next)
    relay = OutboxRelay(pool, kafka_bootstrap, producer_config={"request_timeout_ms": 1500})
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    unpublished = "SELECT event_id::text FROM outbox WHERE published_at IS NULL ORDER BY id"
    try:
        with pytest.raises(OutboxError, match="2 not acknowledged.*2 marked published"):
            await relay.publish_pending()
        async with pool.connection() as conn:
            left = [r[0] for r in await (await conn.execute(unpublished)).fetchall()]
        assert left == [bad.event_id, bad_next.event_id]

        await admin.create_topics([NewTopic(missing, 1, 1)])
        async with asyncio.timeout(30):
            while True:  # the new topic's metadata can take a moment to reach every broker
                with contextlib.suppress(OutboxError):
                    if await relay.publish_pending() == 2:
                        break
        assert await scalar(pool, "SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0
        assert [envelope_of(r).event_id for r in await read_topic(kafka_bootstrap, missing, expect=2)] == [
            bad.event_id, bad_next.event_id]
    finally:
        await relay.stop()
        with contextlib.suppress(Exception):
            await admin.delete_topics([missing])
        await admin.close()
    # Each acknowledged row went out once: the failed pass did not send them again.
    records = await read_topic(kafka_bootstrap, unique_topic, expect=3, within=5)
    assert sorted(envelope_of(r).event_id for r in records) == sorted([good.event_id, later.event_id])


async def test_enqueue_refuses_an_envelope_too_large_to_ever_publish(
    pool: AsyncConnectionPool, unique_topic: str
) -> None:
    huge = ping("o-1", 1, "x" * (8 * 1024 * 1024))
    with pytest.raises(EnvelopeError, match="limit"):
        async with pool.connection() as conn, conn.transaction():
            await enqueue(conn, unique_topic, huge)
    assert await scalar(pool, "SELECT count(*) FROM outbox") == 0


async def test_graceful_stop_finishes_the_record_in_hand_and_commits_its_offset(
    pool: AsyncConnectionPool, kafka_bootstrap: str, unique_topic: str
) -> None:
    n = 40
    envs = [ping(f"order-{i % 4}", i // 4) for i in range(n)]
    await enqueue_all(pool, unique_topic, envs)
    relay = OutboxRelay(pool, kafka_bootstrap)
    assert await drain(relay) == n
    await relay.stop()

    g = group()
    record = recorder(g)
    in_handler = asyncio.Event()

    async def slow(env: EventEnvelope, conn: Any) -> None:
        in_handler.set()
        await asyncio.sleep(0.05)
        await record(env, conn)

    first = EventConsumer(pool, kafka_bootstrap, g, [unique_topic], slow)
    task = asyncio.create_task(first.run())

    async def some_done() -> bool:
        return first.processed_total >= 5

    await wait_for(some_done, 30, "a few records")
    in_handler.clear()
    await in_handler.wait()  # stop while a record is in the handler
    await first.stop()
    await task
    done_first = first.processed_total
    assert len(await effects(pool, g)) == done_first  # the record in hand was finished

    second = EventConsumer(pool, kafka_bootstrap, g, [unique_topic], record)
    async with running(second):

        async def all_done() -> bool:
            return len(await effects(pool, g)) >= n

        await wait_for(all_done, 30, "the rest")
        await asyncio.sleep(0.5)
    assert second.duplicates_total == 0  # every offset the first consumer handled was committed
    assert second.processed_total == n - done_first
    assert len(await effects(pool, g)) == n


async def test_a_busy_consumer_commits_offsets_once_an_interval_not_once_a_batch_and_all_at_stop(
    pool: AsyncConnectionPool, kafka_bootstrap: str, unique_topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records trickle in, a batch of a few at a time: the offsets are committed after the first
    batch and then not again within commit_interval (each commit is a request to the broker),
    and the graceful stop commits everything handled since, so nothing is delivered again."""
    n = 60
    envs = [ping(f"order-{i % 6}", i // 6) for i in range(n)]
    commits: list[dict[Any, int]] = []
    real_commit = AIOKafkaConsumer.commit

    async def counted(self: AIOKafkaConsumer, offsets: Any = None) -> None:
        commits.append(dict(offsets or {}))
        await real_commit(self, offsets)

    monkeypatch.setattr(AIOKafkaConsumer, "commit", counted)
    g = group()
    record = recorder(g)
    first = EventConsumer(pool, kafka_bootstrap, g, [unique_topic], record, max_batch=3, commit_interval=60)
    relay = OutboxRelay(pool, kafka_bootstrap)
    batches = 0
    real_handle = first._handle_batch

    async def counting_batches(batch: Any) -> None:
        nonlocal batches
        batches += bool(batch)
        await real_handle(batch)

    first._handle_batch = counting_batches  # type: ignore[method-assign]
    task = asyncio.create_task(first.run())
    try:
        for i in range(0, n, 3):
            await enqueue_all(pool, unique_topic, envs[i:i + 3])
            await drain(relay)
            await asyncio.sleep(0.02)

        async def all_done() -> bool:
            return first.processed_total >= n

        await wait_for(all_done, 30, "every record")
    finally:
        await relay.stop()
    assert batches >= 5
    assert len(commits) == 1  # the first batch's; the interval has not passed since
    await first.stop()
    await task
    assert len(commits) >= 2  # the stop committed the rest

    second = EventConsumer(pool, kafka_bootstrap, g, [unique_topic], record)
    async with running(second):
        await enqueue_all(pool, unique_topic, [ping("order-last", 0)])  # one new record after them
        relay = OutboxRelay(pool, kafka_bootstrap)
        assert await drain(relay) == 1
        await relay.stop()

        async def the_new_one() -> bool:
            return second.processed_total >= 1

        await wait_for(the_new_one, 30, "the record sent after the stop")
        await asyncio.sleep(0.5)
    assert (second.processed_total, second.duplicates_total) == (1, 0)  # none delivered again
    assert len(await effects(pool, g)) == n + 1


async def test_an_unavailable_database_is_waited_out_not_dead_lettered(
    pool: AsyncConnectionPool, kafka_bootstrap: str, unique_topic: str
) -> None:
    class DatabaseDown(Exception):
        pass

    env = ping("order-1", 1)
    await enqueue_all(pool, unique_topic, [env])
    relay = OutboxRelay(pool, kafka_bootstrap)
    assert await drain(relay) == 1
    await relay.stop()

    g = group()
    record = recorder(g)
    calls = 0

    async def flaky(e: EventEnvelope, conn: Any) -> None:
        nonlocal calls
        calls += 1
        if calls <= 5:
            raise DatabaseDown("connection refused")
        await record(e, conn)

    consumer = EventConsumer(
        pool,
        kafka_bootstrap,
        g,
        [unique_topic],
        flaky,
        max_retries=1,
        retry_backoff=0.01,
        is_transient=lambda exc: isinstance(exc, DatabaseDown),
    )
    async with running(consumer):

        async def done() -> bool:
            return len(await effects(pool, g)) >= 1

        await wait_for(done, 30, "the effect")
    assert calls == 6  # five outages waited out although max_retries is 1
    assert consumer.dlq_total == 0 and consumer.processed_total == 1


async def test_a_replica_joining_mid_stream_shares_the_work_and_no_effect_doubles(
    pool: AsyncConnectionPool, kafka_bootstrap: str, unique_topic: str
) -> None:
    n = 300
    envs = [ping(f"order-{i % 30}", i // 30) for i in range(n)]
    await enqueue_all(pool, unique_topic, envs)
    relay = OutboxRelay(pool, kafka_bootstrap)
    assert await drain(relay) == n
    await relay.stop()

    g = group()
    record = recorder(g)

    async def slow(env: EventEnvelope, conn: Any) -> None:
        await asyncio.sleep(0.01)
        await record(env, conn)

    # Quick heartbeats: a running member learns of the rebalance within 0.3 s.
    options: dict[str, Any] = {"max_batch": 20, "consumer_config": {"heartbeat_interval_ms": 300}}
    a = EventConsumer(pool, kafka_bootstrap, g, [unique_topic], slow, **options)
    b = EventConsumer(pool, kafka_bootstrap, g, [unique_topic], slow, **options)
    async with running(a):

        async def started() -> bool:
            return a.processed_total >= 30

        await wait_for(started, 30, "the first replica to get going")
        async with running(b):  # a rebalance in the middle of the stream

            async def all_done() -> bool:
                return len(await effects(pool, g)) >= n

            await wait_for(all_done, 60, f"{n} effects")
            await asyncio.sleep(1.0)

    rows = await effects(pool, g)
    assert len(rows) == n and len({r[0] for r in rows}) == n
    assert a.processed_total + b.processed_total == n
    assert b.processed_total > 0  # the newcomer got partitions
    assert_in_order_per_aggregate([(r[1], r[2]) for r in rows])
    print(
        f"\nrebalance: replica A {a.processed_total}, replica B {b.processed_total}, "
        f"duplicates skipped {a.duplicates_total + b.duplicates_total}"
    )


# -- partitions side by side ---------------------------------------------------------------------
async def _consume_slowly(pool: AsyncConnectionPool, kafka_bootstrap: str, topic: str,
                          keys: list[str], per_key: int, max_concurrency: int
                          ) -> tuple[str, int, float]:
    """Publish `per_key` records for each key and consume them with a 50 ms handler, checking
    each took effect once and each key's in order; return the consumer group, the most records
    ever in the handler at once, and how long it all took."""
    g = group()
    slow = recorder(g)
    in_hand, most = 0, 0

    async def handle(env: EventEnvelope, conn: Any) -> None:
        nonlocal in_hand, most
        in_hand += 1
        most = max(most, in_hand)
        try:
            await asyncio.sleep(0.05)
            await slow(env, conn)
        finally:
            in_hand -= 1

    await enqueue_all(pool, topic, [ping(k, s) for s in range(per_key) for k in keys])
    relay = OutboxRelay(pool, kafka_bootstrap)
    consumer = EventConsumer(pool, kafka_bootstrap, g, [topic], handle, max_concurrency=max_concurrency)
    await relay.start()
    try:
        async with running(consumer):
            async def all_done() -> bool:
                return len(await effects(pool, g)) >= len(keys) * per_key

            took = await wait_for(all_done, 60, "every effect")
    finally:
        await relay.stop()
    rows = await effects(pool, g)
    assert len(rows) == len(keys) * per_key and len({r[0] for r in rows}) == len(rows)  # each once
    assert_in_order_per_aggregate([(a, s) for _, a, s in rows])
    return g, most, took


async def test_partitions_are_handled_side_by_side_and_each_in_order(
    pool: AsyncConnectionPool, kafka_bootstrap: str, unique_topic: str
) -> None:
    """A slow handler over six partitions: at most max_concurrency records at once, more than
    one at once, and every aggregate's records still in order, each once."""
    aggregates = [f"order-{i}" for i in range(24)]  # spread over the six partitions by key
    _, most, took = await _consume_slowly(pool, kafka_bootstrap, unique_topic, aggregates, 5, 3)
    assert 1 < most <= 3, most
    # 120 records of 50 ms each would take 6 s one at a time.
    print(f"\n120 records, 3 at once: {took:.2f} s")


async def test_keys_of_one_partition_are_handled_side_by_side_each_in_order(
    pool: AsyncConnectionPool, kafka_bootstrap: str, unique_topic: str
) -> None:
    """Every record on one partition: a slow record of one key does not hold up the others
    (up to max_concurrency at once), while each key's records stay in order, each once."""
    partitions = list(range(6))
    keys = [k for k in (f"order-{i}" for i in range(400))
            if DefaultPartitioner()(k.encode(), partitions, partitions) == 0][:12]
    assert len(keys) == 12
    g, most, took = await _consume_slowly(pool, kafka_bootstrap, unique_topic, keys, 4, 4)
    on = await scalar(
        pool, "SELECT count(DISTINCT partition) FROM processed_events WHERE consumer_group = %s", (g,))
    assert on == 1  # Kafka put every record on one partition
    assert 1 < most <= 4, most
    print(f"\n48 records on one partition, 4 at once: {took:.2f} s")


async def test_a_consumer_passes_over_the_event_types_its_handler_does_not_act_on(
    pool: AsyncConnectionPool, kafka_bootstrap: str, unique_topic: str
) -> None:
    """Told its handler's types, the consumer hands it only those; the others take no
    transaction and leave no de-duplication mark, and the consumer still moves past them. Their
    event_type header is enough: a record of another type is not even parsed (this one's value
    is no envelope at all, which would otherwise go to the DLQ)."""
    g = group()
    other = new_envelope(SOURCE, "order-1", PaymentRefunded(payment="payments/x", order="orders/1"))
    wanted = [ping("order-1", 1), ping("order-1", 2)]
    await enqueue_all(pool, unique_topic, [wanted[0], other, wanted[1]])
    relay = OutboxRelay(pool, kafka_bootstrap)
    assert await drain(relay) == 3
    await relay.stop()
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(unique_topic, b"not an envelope", key=b"order-1",
                                     headers=[("event_type", b"payment_refunded")])
    finally:
        await producer.stop()
    consumer = EventConsumer(pool, kafka_bootstrap, g, [unique_topic], recorder(g), event_types={"ping"})
    async with running(consumer):
        async def all_seen() -> bool:
            return consumer.processed_total + consumer.skipped_total >= 4

        await wait_for(all_seen, 30, "four records")
    assert [r[0] for r in await effects(pool, g)] == [e.event_id for e in wanted]
    assert (consumer.processed_total, consumer.skipped_total, consumer.dlq_total) == (2, 2, 0)
    marks = await scalar(pool, "SELECT count(*) FROM processed_events WHERE consumer_group = %s", (g,))
    assert marks == 2


async def test_the_metrics_endpoint_sees_the_relay_publish_and_the_consumer_catch_up(
    pool: AsyncConnectionPool, kafka_bootstrap: str, unique_topic: str
) -> None:
    """What the alerts read (monitoring/alerts.yml): the relay's last pass and counts, and a
    consumer's lag, which grows while its handler is slow and falls to 0 once it catches up."""
    from prometheus_client import REGISTRY

    def sample(name: str, **labels: str) -> float:
        value = REGISTRY.get_sample_value(name, labels)
        return 0.0 if value is None else value

    n = 60
    await enqueue_all(pool, unique_topic, [ping(f"order-{i % 3}", i // 3) for i in range(n)])
    relay = OutboxRelay(pool, kafka_bootstrap)
    published_before = sample("meshkit_outbox_published_total")
    before = time.time()
    async with contextlib.AsyncExitStack() as stack:
        await relay.start()
        stack.push_async_callback(relay.stop)

        async def published() -> bool:
            return sample("meshkit_outbox_published_total") - published_before >= n

        await wait_for(published, 30, "the relay publishing")
        assert sample("meshkit_outbox_last_pass_timestamp_seconds") >= before

        g = group()
        record = recorder(g)
        lags: list[float] = []

        async def slow(env: EventEnvelope, conn: Any) -> None:
            lags.append(sample("meshkit_consumer_lag", group=g))
            await asyncio.sleep(0.02)
            await record(env, conn)

        consumer = EventConsumer(pool, kafka_bootstrap, g, [unique_topic], slow, max_concurrency=1)
        async with running(consumer):

            async def caught_up() -> bool:
                return sample("meshkit_consumer_processed_total", group=g) >= n

            await wait_for(caught_up, 60, "the consumer catching up")
            assert max(lags) > 0, lags  # behind while the slow handler worked
            assert sample("meshkit_consumer_lag", group=g) == 0


@contextlib.asynccontextmanager
async def forwarder(port: int, to: str) -> AsyncIterator[None]:
    """A TCP forwarder on ``port`` to the broker ``to``: a bootstrap address that starts to
    answer only now (the broker's metadata then points clients at its own listener)."""
    host, target = to.rsplit(":", 1)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(host, int(target))
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(serve, "127.0.0.1", port)
    try:
        yield
    finally:
        server.close()


async def test_a_replica_started_while_kafka_is_unreachable_serves_and_catches_up(
    pool: AsyncConnectionPool, kafka_bootstrap: str, unique_topic: str
) -> None:
    """Kafka down while a replica starts (a restart, or one an autoscaler adds during an outage):
    the relay and the consumer start anyway, events are committed meanwhile, and both go on once
    Kafka answers; before, the relay's start raised and the service could not start at all."""
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"  # nothing listens there yet
    g = group()
    relay = OutboxRelay(pool, bootstrap, poll_interval=0.2)
    consumer = EventConsumer(pool, bootstrap, g, [unique_topic], recorder(g))
    await relay.start()
    try:
        async with running(consumer):
            event = ping("order-down", 1, "committed while Kafka was unreachable")
            await enqueue_all(pool, unique_topic, [event])
            await asyncio.sleep(1.0)
            assert await effects(pool, g) == []
            async with forwarder(port, kafka_bootstrap):

                async def arrived() -> bool:
                    return len(await effects(pool, g)) >= 1

                await wait_for(arrived, 60, "the event committed during the outage")
    finally:
        await relay.stop()
    assert await effects(pool, g) == [(event.event_id, "order-down", 1)]
