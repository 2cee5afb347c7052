"""Transactional outbox: write events with the change, publish them to Kafka afterwards.

A service calls :func:`enqueue` on the connection of the transaction that makes the change, so the
event exists if and only if the change committed. An :class:`OutboxRelay` (one per replica) then
publishes unpublished rows in id order with one idempotent producer (acks=all), waits for every
acknowledgement, and only then stamps ``published_at`` in the same transaction that claimed the
rows. Delivery is at-least-once (a crash between the acks and the commit re-sends the batch);
consumers de-duplicate on ``event_id`` (see :mod:`meshkit.consumer`).

Several relays can run at once: rows are claimed with ``FOR UPDATE SKIP LOCKED``, so in the normal
case each row is published by one relay. Order per key is kept across relays too: a relay leaves
for later any claimed row whose key has an earlier unpublished row that another relay holds.

Wake-up: :func:`enqueue` notifies the channel ``outbox`` in the same transaction (delivered on
commit); the relay LISTENs on a dedicated connection and also polls every ``poll_interval`` (1 s:
only a notification lost while the listening connection was being replaced waits for it; at
0.2 s the polls of three idle relays cost PostgreSQL and the services about 1 % of a core).
A hot path's single statement in autocommit (:class:`Outboxed`) wakes the relay of its own
process instead, once the statement has returned (committed), and sends no NOTIFY: a notifying
commit cost PostgreSQL about 80 us of CPU more than a plain one and the listening relay about
55 us to receive it (8 writers, one listener, on the 2-core development machine), PostgreSQL
serialises notifying commits on one lock, and every replica's relay was woken to race for the
same rows. Any relay may publish any row, so the writer's own is enough; if that replica dies
before publishing, the others find the rows at their next poll.

Batching (``gather``): after a pass that published rows, the relay lets ``gather`` (60 ms) go by
before it claims again, so a busy service's events go out a batch at a time. Woken by every
commit, a relay in a flash sale otherwise ran a pass (BEGIN, claim, produce, wait for the acks,
mark, COMMIT) for one or two rows, and every consumer fetched, handled and committed offsets at
that pace: a gather of 25 ms cut the Kafka broker's CPU per purchase by about a third and the
whole platform's by about 4 %; 60 ms instead of 25 ms cut the platform's by another 2-3 %
(four alternated pairs of sales, against Envoy's CPU for the same requests; a relay pass costs
its service about 360 us of CPU even when it finds nothing), with webhook -> CONFIRMED no slower
beside the machine's swings. That is at most 60 ms more between a commit and its record. A
quiet relay (its last pass found nothing) still answers a notification at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import psycopg
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from psycopg import pq
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from meshkit import events, metrics
from meshkit.db import delete_in_chunks
from meshkit.events import EventEnvelope
from meshkit.listen import Listener, connect_like

log = logging.getLogger(__name__)

CHANNEL = "outbox"
MAX_REQUEST_SIZE = 8 * 1024 * 1024  # the brokers' message.max.bytes must be at least this
# Largest envelope enqueue() accepts: it must fit in one request with its key and headers, or the
# relay could never publish it and every later row would wait behind it.
MAX_ENVELOPE_BYTES = MAX_REQUEST_SIZE - 64 * 1024
DEFERRED_RETRY = 0.01  # seconds before claiming again rows held back for per-key order

_INSERT = """
WITH row AS (
    INSERT INTO outbox (event_id, topic, key, payload, headers)
    VALUES (%s, %s, %s, %s, %s)
    RETURNING id
)
SELECT pg_notify('outbox', '') FROM row
"""

# Claim the first unpublished rows nobody else holds, in id order, and flag those that must wait:
# an earlier unpublished row of the same topic and key exists that this batch did not claim (so
# another relay holds it and is publishing it right now). Claim and check share one snapshot.
_CLAIM = """
WITH claimed AS (
    SELECT id, topic, key, payload, headers
    FROM outbox
    WHERE published_at IS NULL
    ORDER BY id
    LIMIT %s
    FOR UPDATE SKIP LOCKED
)
SELECT c.id, c.topic, c.key, c.payload, c.headers,
       EXISTS (
           SELECT 1 FROM outbox o
           WHERE o.topic = c.topic AND o.key = c.key AND o.published_at IS NULL
             AND o.id < c.id AND o.id NOT IN (SELECT id FROM claimed)
       ) AS blocked
FROM claimed c
ORDER BY c.id
"""

_MARK = "UPDATE outbox SET published_at = now() WHERE id = ANY(%s)"

_PURGE = """
DELETE FROM outbox WHERE id IN (
    SELECT id FROM outbox
    WHERE published_at < now() - %s
    LIMIT %s
    FOR UPDATE SKIP LOCKED
)
"""


class OutboxError(RuntimeError):
    pass


def _row(topic: str, envelope: EventEnvelope) -> tuple[uuid.UUID, str, str, bytes, Jsonb]:
    """The outbox row of ``envelope`` (event id, topic, key, payload, headers), checked."""
    event_id = events.validate(envelope)
    if not events.event_type(envelope):
        raise events.EnvelopeError(f"envelope {envelope.event_id} has no payload")
    value = envelope.SerializeToString()
    if len(value) > MAX_ENVELOPE_BYTES:
        raise events.EnvelopeError(
            f"envelope {envelope.event_id} is {len(value)} bytes; the limit is "
            f"{MAX_ENVELOPE_BYTES} (Kafka max request size less room for key and headers)"
        )
    return event_id, topic, envelope.aggregate_id, value, Jsonb(events.headers_for(envelope))


async def enqueue(conn: psycopg.AsyncConnection[Any], topic: str, envelope: EventEnvelope) -> None:
    """Add ``envelope`` to the outbox, to be published on ``topic`` once the transaction commits.

    Runs in the caller's transaction (one round trip); nothing is published if it rolls back.
    The record key is ``envelope.aggregate_id``.
    """
    row = _row(topic, envelope)
    if conn.autocommit and conn.info.transaction_status == pq.TransactionStatus.IDLE:
        raise OutboxError(
            "enqueue() must run inside the transaction that makes the change "
            "(use `async with conn.transaction():`)"
        )
    await conn.execute(_INSERT, row)


class Outboxed:
    """The outbox row of a change made by ONE data-modifying statement (CTEs), in that statement.

    A use case on a hot path (a hold, an order, a sale) can then be a single statement in
    autocommit: one round trip instead of BEGIN, each statement, COMMIT. On a flash sale's
    purchase path a round trip cost the service and PostgreSQL about 0.1 ms of CPU each.

    ``cte(source)`` is the body of a CTE that adds the row once per row of ``source`` (another CTE
    of the statement, the change: no change, no event), ``notified(name, conn)`` the expression
    that counts the rows added and lets the relays know, for the statement's final SELECT (a
    SELECT in a CTE runs only if it is read), and ``params`` the named parameters both use
    (``outbox_*``). Once the statement has returned, ``sent(count)`` with that count::

        ob = Outboxed(topic, envelope)
        cur = await conn.execute(f"WITH o AS (UPDATE ... RETURNING ...), ob AS ({ob.cte('o')}) "
                                 f"SELECT count(*), {ob.notified('ob', conn)} FROM o",
                                 {..., **ob.params})
        row = await cur.fetchone()
        ob.sent(row[-1])

    With ``conn`` in autocommit outside a transaction (the statement commits as it returns) and
    a relay of this process publishing the same database, the statement sends no NOTIFY and
    ``sent`` wakes that relay; otherwise the statement notifies the channel, as enqueue() does.
    """

    def __init__(self, topic: str, envelope: EventEnvelope) -> None:
        self.params = dict(zip(("outbox_event_id", "outbox_topic", "outbox_key", "outbox_payload",
                                "outbox_headers"), _row(topic, envelope), strict=True))
        self._relay: OutboxRelay | None = None

    @staticmethod
    def cte(source: str) -> str:
        return ("INSERT INTO outbox (event_id, topic, key, payload, headers) "
                "SELECT %(outbox_event_id)s, %(outbox_topic)s, %(outbox_key)s, %(outbox_payload)s, "
                f"%(outbox_headers)s FROM {source} RETURNING id")

    def notified(self, name: str, conn: psycopg.AsyncConnection[Any]) -> str:
        relay = None
        if conn.autocommit and conn.info.transaction_status == pq.TransactionStatus.IDLE:
            relays = _LOCAL.get(_database_of(conn))
            relay = relays[0] if relays else None
        self._relay = relay
        if relay is None:
            return f"(SELECT count(pg_notify('{CHANNEL}', '')) FROM {name})"
        return f"(SELECT count(*) FROM {name})"

    def sent(self, rows: int) -> None:
        """The statement returned, having added ``rows`` outbox rows (its notified() column)."""
        if rows and self._relay is not None:
            self._relay.wake()


# The relays running in this process, by the database whose outbox they publish.
_LOCAL: dict[tuple[str, int, str], list[OutboxRelay]] = {}


def _database_of(conn: psycopg.AsyncConnection[Any]) -> tuple[str, int, str]:
    info = conn.info
    return info.host, info.port, info.dbname


class OutboxRelay:
    """Publishes the outbox to Kafka. Start it in the service bootstrap, stop it at exit."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        bootstrap_servers: str,
        *,
        batch_size: int = 200,
        poll_interval: float = 1.0,
        gather: float = 0.06,
        retention: timedelta = timedelta(days=1),
        purge_interval: float = 300.0,
        client_id: str = "meshkit-outbox-relay",
        compression: str = "none",
        producer_config: Mapping[str, Any] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self._pool = pool
        self._bootstrap = bootstrap_servers
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        if gather < 0:
            raise ValueError("gather must be >= 0")
        self.gather = gather
        self.retention = retention
        self.purge_interval = purge_interval
        self._client_id = client_id
        self.compression = compression
        self._producer_config = dict(producer_config or {})
        self._producer: AIOKafkaProducer | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        # Every notification, and every moment some may have been missed, wakes the loop.
        self._listener = Listener(connect_like(pool), CHANNEL, lambda _note: self._wake.set(),
                                  meanwhile="polling meanwhile")
        self._pass_lock = asyncio.Lock()
        self._last_deferred = 0
        self._database: tuple[str, int, str] | None = None  # registered in _LOCAL while running
        # Counters for metrics (read them from a Prometheus collector).
        self.published_total = 0
        self.failed_passes_total = 0
        self.deferred_total = 0  # rows left for later to keep per-key order
        self.purged_total = 0
        self.last_pass_at = 0.0  # unix time of the last publish pass that succeeded
        metrics.watch_relay(self)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the producer, the LISTEN connection and the publishing loop."""
        if self._tasks:
            raise RuntimeError("relay already started")
        self._stopping = False
        try:
            await self._start_producer()
        except KafkaError as exc:
            # What the outbox is for: requests commit their events, and the loop sends them once
            # Kafka answers. A replica restarted (or added) during an outage serves meanwhile.
            log.warning("Kafka unreachable at start; the relay keeps trying",
                        extra={"bootstrap": self._bootstrap, "error": str(exc)})
        await self._listener.start(ready_within=0)  # it polls meanwhile
        self._tasks = [asyncio.create_task(self._publish_loop(), name="outbox-publish")]
        try:
            async with self._pool.connection() as conn:
                self._database = _database_of(conn)
            _LOCAL.setdefault(self._database, []).append(self)  # Outboxed statements wake it
        except (psycopg.Error, PoolTimeout):
            log.warning("outbox relay not registered in process: writers notify it",
                        exc_info=True)
        log.info(
            "outbox relay started",
            extra={
                "bootstrap": self._bootstrap,
                "compression": self.compression,
                "batch_size": self.batch_size,
            },
        )

    async def stop(self, grace: float = 10.0) -> None:
        """Finish the pass in progress (its rows are published and marked), then stop."""
        self._stopping = True
        self._wake.set()
        if self._database is not None:
            relays = _LOCAL.get(self._database, [])
            if self in relays:
                relays.remove(self)
            if not relays:
                _LOCAL.pop(self._database, None)
            self._database = None
        tasks, self._tasks = self._tasks, []
        await self._listener.stop()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._stop_producer()
        log.info("outbox relay stopped", extra={"published_total": self.published_total})

    async def _start_producer(self) -> None:
        config: dict[str, Any] = {
            "client_id": self._client_id,
            "compression_type": None if self.compression == "none" else self.compression,
            "max_request_size": MAX_REQUEST_SIZE,
            "linger_ms": 2,
            **self._producer_config,
            # Not overridable: no loss, no duplicates from producer retries, order per partition.
            "enable_idempotence": True,
            "acks": "all",
        }
        producer = AIOKafkaProducer(bootstrap_servers=self._bootstrap, **config)
        try:
            await producer.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await producer.stop()  # its connections and tasks, opened or not
            raise
        self._producer = producer

    async def _stop_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                await producer.stop()

    # -- one pass ----------------------------------------------------------------------------

    async def publish_pending(self) -> int:
        """Publish one batch of unpublished rows; return how many were published.

        Each row is marked published once Kafka acknowledged it. A row whose send fails stays
        unpublished, and so do the rows after it in the batch that share its key (they are not
        sent in this pass, so a key's records keep their order); every other row goes on. Then
        OutboxError is raised, after the acknowledged rows are marked: one row that cannot be
        sent (a topic gone, a partition without a leader) neither holds the others back nor has
        them sent again with it.
        """
        async with self._pass_lock:
            if self._producer is None:
                await self._start_producer()
            producer = self._producer
            assert producer is not None
            self._last_deferred = 0
            errors: list[BaseException] = []
            async with self._pool.connection() as conn, conn.transaction():
                cur = await conn.execute(_CLAIM, (self.batch_size,))
                rows = await cur.fetchall()
                if not rows:
                    return 0
                ready = [r for r in rows if not r[5]]
                self._last_deferred = len(rows) - len(ready)
                self.deferred_total += self._last_deferred
                if not ready:
                    return 0
                sent: list[tuple[int, asyncio.Future[Any]]] = []
                failed_keys: set[tuple[str, str]] = set()
                for row_id, topic, key, payload, headers, _blocked in ready:
                    if (topic, key) in failed_keys:
                        continue
                    try:
                        sent.append((row_id, await producer.send(
                            topic,
                            value=bytes(payload),
                            key=key.encode(),
                            headers=[(k, str(v).encode()) for k, v in headers.items()],
                        )))
                    except Exception as exc:  # e.g. unknown topic after request_timeout_ms
                        errors.append(exc)
                        failed_keys.add((topic, key))
                # Wait for every acknowledgement, even after a failure, so no send of this batch
                # is still in flight when the rows are released.
                results = await asyncio.gather(*(f for _, f in sent), return_exceptions=True)
                acked = [row_id for (row_id, _), r in zip(sent, results, strict=True)
                         if not isinstance(r, BaseException)]
                errors += [r for r in results if isinstance(r, BaseException)]
                if acked:
                    await conn.execute(_MARK, (acked,))
            self.published_total += len(acked)
            metrics.OUTBOX_PUBLISHED.inc(len(acked))
            if errors:
                raise OutboxError(
                    f"publishing {len(ready)} outbox rows: {len(ready) - len(acked)} not acknowledged "
                    f"({errors[0]!r}), sent again later; {len(acked)} marked published"
                ) from errors[0]
            return len(acked)

    async def purge_published(self, older_than: timedelta | None = None, chunk: int = 5000) -> int:
        """Delete rows published more than ``older_than`` (default: the retention) ago."""
        older_than = self.retention if older_than is None else older_than
        total = await delete_in_chunks(self._pool, _PURGE, (older_than,), chunk)
        self.purged_total += total
        metrics.OUTBOX_PURGED.inc(total)
        return total

    # -- loops -------------------------------------------------------------------------------

    async def _publish_loop(self) -> None:
        backoff = 0.0
        next_purge = time.monotonic() + min(self.purge_interval, 10.0)
        while not self._stopping:
            self._wake.clear()
            try:
                n = await self.publish_pending()
                self.last_pass_at = time.time()
                backoff = 0.0
            except asyncio.CancelledError:
                raise
            except Exception:
                self.failed_passes_total += 1
                metrics.OUTBOX_FAILED_PASSES.inc()
                backoff = min(max(backoff * 2, 0.5), 10.0)
                log.warning("outbox publish failed; retrying", exc_info=True, extra={"retry_in_s": backoff})
                # A failed idempotent producer may be wedged (sequence errors): start a new one.
                await self._stop_producer()
                await self._sleep(backoff)
                continue
            if n:
                log.debug("outbox published", extra={"count": n})
            if n >= self.batch_size:
                continue  # likely more waiting: no sleep
            if n and self.gather:
                # Busy: let the next rows gather into one batch (a notification that came
                # meanwhile is still set, so the next pass follows at once).
                await asyncio.sleep(self.gather)
            if self._last_deferred:
                # Rows wait behind another relay's batch, which commits within milliseconds.
                await self._sleep(min(self.poll_interval, DEFERRED_RETRY))
                continue
            if time.monotonic() >= next_purge:
                next_purge = time.monotonic() + self.purge_interval
                try:
                    purged = await self.purge_published()
                    if purged:
                        log.info("outbox purged", extra={"count": purged})
                except Exception:
                    log.warning("outbox purge failed", exc_info=True)
            await self._sleep(self.poll_interval)

    def wake(self) -> None:
        """Rows were committed to the outbox by this process: look now (or after the gather)."""
        self._wake.set()

    async def _sleep(self, seconds: float) -> None:
        """Sleep up to ``seconds``, waking early on a notification or stop()."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
