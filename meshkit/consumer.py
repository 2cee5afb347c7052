"""The Kafka consumer loop: exactly-once effects on top of at-least-once delivery.

For every record the loop opens one PostgreSQL transaction, inserts ``(consumer_group, event_id)``
into ``processed_events`` and runs the handler on the same connection. If the row already exists the
event was handled before (a redelivery) and is skipped. The effect and the de-duplication mark
commit together, and the Kafka offset is committed only after that: a crash in between re-delivers
records whose effect is already there, and the mark turns them into no-ops. A consumer told which
payload types its handler acts on (``event_types``) passes over the others without a transaction:
on a topic shared by many event types most records are none of its business.

A handler that raises is retried ``max_retries`` times with exponential backoff (each attempt in a
new transaction), then the original record (value, key, headers, plus ``error`` and provenance
headers) is produced to ``<topic><dlq_suffix>`` and the loop goes on. A value that is not a valid
``EventEnvelope`` goes to the DLQ at once. Errors that say the database itself is unreachable
(lost connection, pool exhausted, server shutting down) are not the record's fault: those are
retried until they pass or the consumer is stopped, and never park a record.

Records of one key (the aggregate id) are handled in order, one at a time; records of different keys
side by side, whether they share a partition or not, up to ``max_concurrency`` at once. A
partition's offset only moves past a record once every earlier record of that partition is done,
so a crash redelivers whatever was not finished (and the de-duplication mark skips what was). A
graceful stop starts no new record except those that close such a gap, so the offset it commits
covers every record handled. Offsets are committed after a fetched batch at most every
``commit_interval`` (1 s; the first batch after a quiet second at once), on a rebalance (for
revoked partitions) and on :meth:`EventConsumer.stop`. In a flash sale a consumer fetched a
batch every few tens of milliseconds, and committing after each cost it and the broker a
request each time; a crash now redelivers up to a second more, which the marks skip.

A mark is kept ``mark_retention`` (8 days: longer than Kafka keeps a record, 7 days by default, so
a group sent back to the earliest offset still finds the marks of everything it could re-read),
then deleted by the consumer itself every ``purge_interval``, a few thousand rows at a time: the
table does not grow with every purchase the platform ever made.
Cancelling the task running :meth:`EventConsumer.run` is a hard stop: it commits nothing (the
processed records are redelivered and skipped), like a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import timedelta
from typing import Any, Literal

import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord
from opentelemetry import propagate, trace
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from meshkit import events, metrics
from meshkit.db import delete_in_chunks
from meshkit.events import EventEnvelope
from meshkit.outbox import MAX_REQUEST_SIZE

log = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)

Handler = Callable[[EventEnvelope, psycopg.AsyncConnection[Any]], Awaitable[None]]
# Test hook: called after a record's transaction committed, before its offset is committed.
AfterCommitHook = Callable[[ConsumerRecord[Any, Any], EventEnvelope], Awaitable[None]]
# A look at an event before its transaction: False when nothing is left to do for it, so it is
# passed over without a transaction or a de-duplication mark. Either handling it would change
# nothing, or the precheck handled it itself by statements that are idempotent on their own.
Precheck = Callable[[EventEnvelope], Awaitable[bool]]
# What one attempt at a record came to.
Outcome = Literal["processed", "duplicate", "passed"]

_MARK_PROCESSED = """
INSERT INTO processed_events (consumer_group, event_id, topic, "partition", "offset")
VALUES (%s, %s, %s, %s, %s)
ON CONFLICT (consumer_group, event_id) DO NOTHING
"""

COMMIT_INTERVAL = 1.0  # seconds: how often offsets are committed at most while records flow

# This group's marks older than the retention, a chunk at a time (processed_events_processed_at_idx).
_PURGE_MARKS = """
DELETE FROM processed_events WHERE (consumer_group, event_id) IN (
    SELECT consumer_group, event_id FROM processed_events
    WHERE consumer_group = %s AND processed_at < now() - %s
    LIMIT %s
)
"""
MARK_RETENTION = timedelta(days=8)
PURGE_CHUNK = 5000

# SQLSTATE classes meaning "the database is unavailable", not "this record is bad":
# 08 connection exception, 53 insufficient resources, 57 operator intervention, 58 system error.
_INFRA_SQLSTATE_CLASSES = frozenset({"08", "53", "57", "58"})
_NOT_INFRA_SQLSTATES = frozenset({"57014"})  # query_canceled (statement_timeout): may be the record

ERROR_HEADER = "error"
MAX_ERROR_LEN = 2000
MAX_INFRA_BACKOFF = 5.0
REVOKE_WAIT = 10.0  # how long a rebalance waits for the record in hand


def is_database_unavailable(exc: BaseException) -> bool:
    """True if ``exc`` says PostgreSQL is unreachable or refusing work (not the record's fault)."""
    if isinstance(exc, PoolTimeout):
        return True
    if isinstance(exc, psycopg.OperationalError):
        sqlstate = exc.sqlstate
        if sqlstate is None:  # raised by the client: connection refused, lost, closed
            return True
        return sqlstate[:2] in _INFRA_SQLSTATE_CLASSES and sqlstate not in _NOT_INFRA_SQLSTATES
    return False


def describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text[:MAX_ERROR_LEN]


class _Abandon(Exception):
    """Stop was requested while a record could not be finished: leave it uncommitted."""


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: EventConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self.owner._on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        log.info(
            "partitions assigned",
            extra={
                "consumer_group": self.owner.group_id,
                "partitions": sorted(f"{tp.topic}:{tp.partition}" for tp in assigned),
            },
        )


class _PartitionProgress:
    """Which records of one partition's batch are done; the offset that may be committed is the
    one after the last record before which every record is done."""

    def __init__(self, records: list[ConsumerRecord[Any, Any]]) -> None:
        self.partition = TopicPartition(records[0].topic, records[0].partition)
        self._offsets = [r.offset for r in records]  # increasing (gaps: compaction, markers)
        self._finished: set[int] = set()
        self._next = 0  # index of the first record not known done
        self.highest = -1  # the highest offset started (in hand or done)

    def started(self, offset: int) -> None:
        self.highest = max(self.highest, offset)

    def behind(self, offset: int) -> bool:
        """A record after ``offset`` is in hand or done already: until ``offset`` is done too, the
        committable offset stops short of that record, which would come back after a stop."""
        return offset < self.highest

    def finished(self, offset: int) -> int | None:
        """Mark ``offset`` done; the new committable offset if it moved, else None."""
        self._finished.add(offset)
        moved = False
        while self._next < len(self._offsets) and self._offsets[self._next] in self._finished:
            self._finished.discard(self._offsets[self._next])
            self._next += 1
            moved = True
        return self._offsets[self._next - 1] + 1 if moved else None


class EventConsumer:
    """Consume ``topics`` as ``group_id``; run ``handler(envelope, conn)`` once per event."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        bootstrap_servers: str,
        group_id: str,
        topics: Iterable[str],
        handler: Handler,
        *,
        max_retries: int = 3,
        retry_backoff: float = 0.2,
        dlq_suffix: str = ".dlq",
        max_batch: int = 100,
        max_concurrency: int = 8,
        client_id: str | None = None,
        is_transient: Callable[[BaseException], bool] = is_database_unavailable,
        after_commit: AfterCommitHook | None = None,
        consumer_config: Mapping[str, Any] | None = None,
        event_types: Iterable[str] | None = None,
        precheck: Precheck | None = None,
        mark_retention: timedelta = MARK_RETENTION,
        purge_interval: float = 300.0,
        commit_interval: float = COMMIT_INTERVAL,
    ) -> None:
        self._pool = pool
        self._bootstrap = bootstrap_servers
        self.group_id = group_id
        self.topics = tuple(topics)
        if not self.topics:
            raise ValueError("at least one topic is needed")
        self._handler = handler
        # The payload types the handler acts on (see events.event_type); the others change
        # nothing, so they are passed over without a transaction or a de-duplication mark.
        # None: every record goes to the handler.
        self.event_types = frozenset(event_types) if event_types is not None else None
        # The same for records of those types that the handler would find nothing to do for,
        # which only a read can tell (e.g. an order confirmed by its only payment), or that the
        # precheck handled itself with writes that are idempotent without a mark (e.g. a sale
        # by a statement that only sells a pending order). Either is safe to repeat: a
        # redelivery looks again, and finds nothing left to do or goes the marked way.
        # It runs in the retry loop, as the handler does.
        self._precheck = precheck
        self.mark_retention = mark_retention
        self.purge_interval = purge_interval
        if commit_interval < 0:
            raise ValueError("commit_interval must be >= 0")
        self.commit_interval = commit_interval  # 0: after every batch
        self._committed_at = float("-inf")  # monotonic time of the last offset commit
        self.marks_purged_total = 0
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.dlq_suffix = dlq_suffix
        self.max_batch = max_batch
        # Records handled at once (each of its own key). Each holds a pooled connection for its
        # transaction and the handler may take another: keep 2 x this under the pool size.
        self.max_concurrency = max_concurrency
        self._client_id = client_id or f"meshkit-{group_id}"
        self._is_transient = is_transient
        self._after_commit = after_commit
        self._consumer_config = dict(consumer_config or {})
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._stopping = False
        self._finished = asyncio.Event()
        self._run_task: asyncio.Task[Any] | None = None
        self._commit_lock = asyncio.Lock()
        self._in_hand = 0  # records being handled now (one at most per key)
        self._idle = asyncio.Condition()  # notified when _in_hand drops to 0
        self._generation = 0  # bumped at every revocation
        self._done: dict[TopicPartition, int] = {}  # next offset after the last handled record
        self._committed: dict[TopicPartition, int] = {}
        # Counters for metrics.
        self.processed_total = 0
        self.skipped_total = 0  # records of a type the handler does not act on
        self.passed_total = 0  # records the precheck found nothing left to do for
        self.duplicates_total = 0
        self.retries_total = 0
        self.dlq_total = 0
        self.commit_failures_total = 0
        self._counted = metrics.consumer_counters(group_id)
        metrics.watch_consumer(self)

    def lag(self) -> int:
        """Records in its partitions past the last one handled, as of the last fetch. Read from
        the metrics endpoint's thread: a rebalance racing the read gives 0 for that scrape."""
        consumer = self._consumer
        if consumer is None:
            return 0
        try:
            total = 0
            for tp in list(consumer.assignment()):
                high = consumer.highwater(tp)
                done = self._done.get(tp, self._committed.get(tp))
                if high is not None and done is not None:
                    total += max(0, high - done)
            return total
        except Exception:  # noqa: BLE001 (a changing assignment: next scrape)
            return 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Join the group (subscribe) and start the DLQ producer. :meth:`run` calls it if needed."""
        if self._stopping:
            raise RuntimeError("consumer was stopped: make a new one")
        if self._consumer is not None:
            return
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            **{
                "client_id": self._client_id,
                "auto_offset_reset": "earliest",
                "isolation_level": "read_committed",
                **self._consumer_config,
                # Not overridable: the loop's guarantees rest on these.
                "group_id": self.group_id,
                "enable_auto_commit": False,
            },
        )
        producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            client_id=f"{self._client_id}-dlq",
            enable_idempotence=True,
            acks="all",
            max_request_size=MAX_REQUEST_SIZE,
        )
        consumer.subscribe(list(self.topics), listener=_Rebalance(self))
        try:
            await consumer.start()
            await producer.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await consumer.stop()
            with contextlib.suppress(Exception):
                await producer.stop()
            raise
        self._consumer, self._producer = consumer, producer
        log.info(
            "consumer started",
            extra={"consumer_group": self.group_id, "topics": list(self.topics)},
        )

    async def stop(self, grace: float = 30.0) -> None:
        """Graceful stop: finish the record in hand, commit the offsets handled, leave the group."""
        self._stopping = True
        task = self._run_task
        if task is not None and not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._finished.wait()), grace)
            except TimeoutError:
                log.warning("consumer did not stop in time; cancelling", extra={"grace_s": grace})
                task.cancel()
                await asyncio.wait([task])
        else:
            await self._close()

    async def _joined(self) -> bool:
        """Start, retrying while Kafka cannot be reached (a replica started during an outage
        consumes once it ends, rather than serving with no consumer); False: stopped first."""
        backoff = 0.5
        while not self._stopping:
            try:
                await self.start()
                return True
            except KafkaError as exc:
                log.warning("Kafka unreachable; the consumer keeps trying",
                            extra={"consumer_group": self.group_id, "error": describe(exc),
                                   "retry_in_s": backoff})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_INFRA_BACKOFF)
        return False

    async def run(self) -> None:
        """Consume until :meth:`stop` (returns) or cancellation (hard stop, nothing committed).

        A stopped consumer stays stopped: make a new one to consume again.
        """
        if self._stopping:
            return
        self._run_task = asyncio.current_task()
        self._finished.clear()
        graceful = False
        purger = asyncio.create_task(self._purge_loop(), name=f"purge-marks-{self.group_id}")
        try:
            if not await self._joined():
                graceful = True
                return
            consumer = self._consumer
            assert consumer is not None
            while not self._stopping:
                try:
                    batch = await consumer.getmany(timeout_ms=500, max_records=self.max_batch)
                except KafkaError as exc:
                    log.warning(
                        "fetch failed; retrying",
                        extra={"consumer_group": self.group_id, "error": describe(exc)},
                    )
                    await asyncio.sleep(1.0)
                    continue
                try:
                    await self._handle_batch(batch)
                except _Abandon:
                    break
                if time.monotonic() - self._committed_at >= self.commit_interval:
                    await self._commit()
            graceful = True
        finally:
            purger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await purger
            try:
                if graceful:
                    await self._commit()
            finally:
                await self._close()
                self._finished.set()
                self._run_task = None
            if graceful:
                log.info(
                    "consumer stopped",
                    extra={
                        "consumer_group": self.group_id,
                        "processed_total": self.processed_total,
                        "duplicates_total": self.duplicates_total,
                        "dlq_total": self.dlq_total,
                    },
                )

    async def _close(self) -> None:
        consumer, self._consumer = self._consumer, None
        producer, self._producer = self._producer, None
        if consumer is not None:
            with contextlib.suppress(Exception):
                await consumer.stop()  # manual commit: stop() commits nothing
        if producer is not None:
            with contextlib.suppress(Exception):
                await producer.stop()
        self._done.clear()
        self._committed.clear()

    # -- de-duplication marks ---------------------------------------------------------------

    async def purge_marks(self, older_than: timedelta | None = None, chunk: int = PURGE_CHUNK) -> int:
        """Delete this group's marks older than ``older_than`` (default: ``mark_retention``), a
        chunk per statement; return how many."""
        older_than = self.mark_retention if older_than is None else older_than
        total = await delete_in_chunks(self._pool, _PURGE_MARKS, (self.group_id, older_than), chunk)
        if total:
            self.marks_purged_total += total
            self._counted["marks_purged"].inc(total)
            log.info("de-duplication marks purged", extra={"consumer_group": self.group_id, "count": total})
        return total

    async def _purge_loop(self) -> None:
        """purge_marks every ``purge_interval`` (jittered, the first within a minute of start)."""
        if self._pool is None:  # marks kept elsewhere (a subclass's store): nothing to purge here
            return
        wait = min(self.purge_interval, 60.0)
        while True:
            await asyncio.sleep(wait * random.uniform(0.5, 1.0))
            wait = self.purge_interval
            try:
                await self.purge_marks()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("purging de-duplication marks failed; trying again later",
                            extra={"consumer_group": self.group_id, "error": describe(exc)})

    # -- records -----------------------------------------------------------------------------

    async def _handle_batch(self, batch: dict[TopicPartition, list[ConsumerRecord[Any, Any]]]) -> None:
        """The records of a batch side by side, each key's records in order.

        A key always lands on one partition and ordering is only promised per key, so records of
        different keys need not wait for each other: one slow record (a handler's gRPC call, a
        lock) no longer holds up every later record of its partition. This is what a
        key-ordered parallel consumer does; a single partition's throughput is then bounded by
        ``max_concurrency``, not by one record's latency.
        """
        generation = self._generation
        slots = asyncio.Semaphore(self.max_concurrency)
        try:
            async with asyncio.TaskGroup() as group:
                for records in batch.values():
                    progress = _PartitionProgress(records)
                    lanes: dict[Any, list[ConsumerRecord[Any, Any]]] = {}
                    for rec in records:
                        if self._passed_by_header(rec):
                            progress.started(rec.offset)
                            done = progress.finished(rec.offset)
                            if done is not None:
                                self._done[progress.partition] = done
                            continue
                        lanes.setdefault(rec.key, []).append(rec)
                    for lane in lanes.values():
                        group.create_task(self._handle_lane(lane, progress, generation, slots))
        except BaseExceptionGroup as failed:
            other = failed.subgroup(lambda e: not isinstance(e, _Abandon))
            if other is not None:
                raise other.exceptions[0] from failed
            raise _Abandon() from None

    def _passed_by_header(self, rec: ConsumerRecord[Any, Any]) -> bool:
        """A record whose ``event_type`` header (the relay sends one with every record) names a
        type the handler does not act on: passed over before any task, parse or lane. On a
        shared topic that is most records (two of every purchase's three booking events for
        payment and the waiting room). A record without the header is parsed and judged by its
        envelope, as before."""
        if self.event_types is None:
            return False
        for name, value in rec.headers:
            if name == events.HEADER_EVENT_TYPE:
                if value.decode("utf-8", "replace") in self.event_types:
                    return False
                self.skipped_total += 1
                return True
        return False

    async def _handle_lane(self, records: list[ConsumerRecord[Any, Any]], progress: _PartitionProgress,
                           generation: int, slots: asyncio.Semaphore) -> None:
        """One key's records of a batch, in order."""
        for rec in records:
            async with slots:
                if self._generation != generation:
                    # A rebalance happened: drop the rest of this batch. Whoever owns each
                    # partition now (maybe us) fetches again from the offset committed then.
                    return
                if self._stopping and not progress.behind(rec.offset):
                    # Stopping: start nothing more, except what closes a gap below a record of
                    # another key in hand or done, so that the offset committed at the stop
                    # covers every record handled (a graceful restart redelivers nothing).
                    return
                progress.started(rec.offset)
                self._in_hand += 1
                try:
                    await self._handle_record(rec)
                    done = progress.finished(rec.offset)
                    if done is not None:
                        self._done[progress.partition] = done
                finally:
                    self._in_hand -= 1
                    if self._in_hand == 0:
                        async with self._idle:
                            self._idle.notify_all()

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Rebalance: start no more records, let those in hand finish, commit what was handled,
        drop the rest."""
        self._generation += 1
        try:
            async with asyncio.timeout(REVOKE_WAIT), self._idle:
                await self._idle.wait_for(lambda: self._in_hand == 0)
        except TimeoutError:
            log.warning(
                "record still in hand at rebalance; its redelivery will be skipped if it commits",
                extra={"consumer_group": self.group_id},
            )
        await self._commit(only=revoked)
        for tp in revoked:
            self._done.pop(tp, None)
            self._committed.pop(tp, None)

    def _fields(self, rec: ConsumerRecord[Any, Any], **more: Any) -> dict[str, Any]:
        fields = {
            "consumer_group": self.group_id,
            "topic": rec.topic,
            "partition": rec.partition,
            "offset": rec.offset,
        }
        fields.update(more)
        return fields

    async def _handle_record(self, rec: ConsumerRecord[Any, Any]) -> None:
        try:
            env = events.parse(rec.value)
        except events.EnvelopeError as exc:
            log.error("invalid record; sent to the DLQ", extra=self._fields(rec, error=str(exc)))
            await self._to_dlq(rec, f"invalid envelope: {exc}", attempts=0)
            return

        kind = events.event_type(env)
        if self.event_types is not None and kind not in self.event_types:
            self.skipped_total += 1
            return
        fields = self._fields(rec, event_id=env.event_id, event_type=kind)
        attempt = 0
        infra_backoff = self.retry_backoff or 0.1
        while True:
            attempt += 1
            try:
                outcome = await self._process_once(rec, env)
            except Exception as exc:
                if self._is_transient(exc):
                    # Not the record's fault: wait for the database, do not spend the retries.
                    attempt -= 1
                    if self._stopping:
                        raise _Abandon from exc
                    log.warning(
                        "database unavailable; will retry the record",
                        extra={**fields, "error": describe(exc), "retry_in_s": infra_backoff},
                    )
                    await asyncio.sleep(infra_backoff)
                    infra_backoff = min(infra_backoff * 2, MAX_INFRA_BACKOFF)
                    continue
                if attempt > self.max_retries:
                    log.error(
                        "handler failed; record sent to the DLQ",
                        exc_info=True,
                        extra={**fields, "attempt": attempt},
                    )
                    await self._to_dlq(rec, describe(exc), attempts=attempt)
                    return
                self.retries_total += 1
                self._counted["retries"].inc()
                delay = self.retry_backoff * (2 ** (attempt - 1))
                log.warning(
                    "handler failed; retrying",
                    extra={
                        **fields,
                        "attempt": attempt,
                        "error": describe(exc),
                        "retry_in_s": delay,
                    },
                )
                await asyncio.sleep(delay)
                continue
            if outcome == "duplicate":
                self.duplicates_total += 1
                self._counted["duplicates"].inc()
                log.info("duplicate event skipped", extra=fields)
            elif outcome == "passed":
                self.passed_total += 1
            else:
                self.processed_total += 1
                self._counted["processed"].inc()
                log.debug("event processed", extra={**fields, "attempt": attempt})
                if self._after_commit is not None:
                    await self._after_commit(rec, env)
            return

    async def _process_once(self, rec: ConsumerRecord[Any, Any], env: EventEnvelope) -> Outcome:
        """One attempt in one transaction: "processed", "duplicate" (processed before), or
        "passed" (the precheck found nothing left to do: no transaction)."""
        if self._precheck is not None and not await self._precheck(env):
            return "passed"
        async with self._pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                _MARK_PROCESSED,
                (self.group_id, uuid.UUID(env.event_id), rec.topic, rec.partition, rec.offset),
            )
            if cur.rowcount == 0:
                return "duplicate"
            with self.span(rec, env):
                await self._handler(env, conn)
        return "processed"

    def span(self, rec: ConsumerRecord[Any, Any], env: EventEnvelope) -> Any:
        """The consumer span of one record's processing, a child of the producer's trace."""
        ctx = propagate.extract({"traceparent": env.traceparent}) if env.traceparent else None
        return _tracer.start_as_current_span(
            f"{rec.topic} process",
            context=ctx,
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "messaging.system": "kafka",
                "messaging.destination.name": rec.topic,
                "messaging.consumer.group.name": self.group_id,
                "messaging.message.id": env.event_id,
            },
        )

    async def _to_dlq(self, rec: ConsumerRecord[Any, Any], error: str, attempts: int) -> None:
        """Produce the original record to the DLQ and wait for the ack (retrying until it lands)."""
        topic = rec.topic + self.dlq_suffix
        headers = list(rec.headers or ()) + [
            (ERROR_HEADER, error[:MAX_ERROR_LEN].encode()),
            ("original_topic", rec.topic.encode()),
            ("original_partition", str(rec.partition).encode()),
            ("original_offset", str(rec.offset).encode()),
            ("consumer_group", self.group_id.encode()),
            ("attempts", str(attempts).encode()),
        ]
        backoff = 0.5
        while True:
            producer = self._producer
            assert producer is not None
            try:
                fut = await producer.send(topic, value=rec.value, key=rec.key, headers=headers)
                await fut
                break
            except KafkaError as exc:
                if self._stopping:
                    raise _Abandon from exc
                log.warning(
                    "DLQ produce failed; retrying",
                    extra=self._fields(rec, dlq_topic=topic, error=describe(exc)),
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_INFRA_BACKOFF)
        self.dlq_total += 1
        self._counted["dead_lettered"].inc()
        log.warning("record parked on the DLQ", extra=self._fields(rec, dlq_topic=topic))

    # -- offsets -----------------------------------------------------------------------------

    async def _commit(self, only: set[TopicPartition] | None = None) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        async with self._commit_lock:
            # A record kept in hand past REVOKE_WAIT finishes after its partition went to another
            # replica, whose commits now count: forget it here, as aiokafka refuses the whole
            # commit (IllegalStateError) when one of its partitions is not assigned.
            assigned = consumer.assignment()
            for tp in [tp for tp in self._done if tp not in assigned]:
                del self._done[tp]
                self._committed.pop(tp, None)
            offsets = {
                tp: off
                for tp, off in self._done.items()
                if (only is None or tp in only) and off > self._committed.get(tp, -1)
            }
            if not offsets:
                return
            try:
                await consumer.commit(offsets)
                self._committed_at = time.monotonic()
            except KafkaError as exc:
                # The records stay handled (and marked): a redelivery is skipped as a duplicate.
                self.commit_failures_total += 1
                self._counted["commit_failures"].inc()
                log.warning(
                    "offset commit failed; records will be redelivered and skipped",
                    extra={"consumer_group": self.group_id, "error": describe(exc)},
                )
                return
            self._committed.update(offsets)
