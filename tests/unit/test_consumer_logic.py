"""Envelopes and error classification of the event plumbing: no sockets."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from aiokafka.errors import IllegalStateError
from aiokafka.structs import ConsumerRecord, TopicPartition
from google.protobuf.message import Message
from google.protobuf.symbol_database import Default as default_symbol_db
from opentelemetry import context as otel_context
from opentelemetry import trace
from psycopg_pool import PoolTimeout
from ticketping.events.v1 import events_pb2
from ticketping.events.v1.events_pb2 import EventEnvelope, PaymentSucceeded, Ping

from meshkit import consumer as consumer_module
from meshkit import events
from meshkit.consumer import EventConsumer, _PartitionProgress, describe, is_database_unavailable
from meshkit.events import EnvelopeError, new_envelope, payload_of


def _payload_classes() -> list[type[Message]]:
    oneof = EventEnvelope.DESCRIPTOR.oneofs_by_name["payload"]
    db = default_symbol_db()
    return [db.GetSymbol(f.message_type.full_name) for f in oneof.fields]


@pytest.mark.parametrize("cls", _payload_classes(), ids=lambda c: c.DESCRIPTOR.name)
def test_every_payload_type_lands_in_its_own_oneof_field(cls: type[Message]) -> None:
    env = new_envelope("svc", "agg-1", cls())  # even an all-default payload selects its field
    field = env.WhichOneof("payload")
    assert field is not None
    assert EventEnvelope.DESCRIPTOR.fields_by_name[field].message_type is cls.DESCRIPTOR
    assert isinstance(payload_of(env), cls)
    assert events.event_type(env) == field


def test_new_envelope_fills_id_time_source_and_payload() -> None:
    before = datetime.now(UTC)
    env = new_envelope("payment", "payments/p1", PaymentSucceeded(payment="payments/p1"))
    assert uuid.UUID(env.event_id).version == 4
    assert env.aggregate_id == "payments/p1" and env.source == "payment"
    occurred = env.occurred_at.ToDatetime(tzinfo=UTC)
    assert before - timedelta(seconds=1) <= occurred <= datetime.now(UTC) + timedelta(seconds=1)
    assert env.payment_succeeded.payment == "payments/p1"
    assert env.traceparent == ""  # no trace in the context
    assert new_envelope("payment", "x", Ping()).event_id != env.event_id


def test_new_envelope_takes_the_traceparent_of_the_current_context() -> None:
    ctx = trace.SpanContext(trace_id=1, span_id=2, is_remote=False, trace_flags=trace.TraceFlags(1))
    token = otel_context.attach(trace.set_span_in_context(trace.NonRecordingSpan(ctx)))
    try:
        env = new_envelope("svc", "a", Ping())
    finally:
        otel_context.detach(token)
    assert env.traceparent == f"00-{1:032x}-{2:016x}-01"
    assert events.headers_for(env)["traceparent"] == env.traceparent


def test_not_a_payload_type_is_refused() -> None:
    with pytest.raises(EnvelopeError, match="not a payload"):
        new_envelope("svc", "a", events_pb2.PriceTier(name="vip"))
    with pytest.raises(EnvelopeError, match="aggregate_id"):
        new_envelope("svc", "", Ping())


def test_payload_of_an_envelope_without_payload_is_an_error() -> None:
    env = EventEnvelope(event_id=str(uuid.uuid4()), aggregate_id="a")
    assert events.event_type(env) == ""
    with pytest.raises(EnvelopeError, match="no \\(known\\) payload"):
        payload_of(env)


def test_headers_carry_id_type_source_and_skip_empty_values() -> None:
    env = new_envelope("booking", "orders/o1", events_pb2.OrderCreated(order="orders/o1"))
    assert events.headers_for(env) == {
        "event_id": env.event_id,
        "event_type": "order_created",
        "source": "booking",
    }


def test_parse_round_trips_and_rejects_what_cannot_be_deduplicated() -> None:
    env = new_envelope("svc", "a", Ping(sequence=7))
    assert events.parse(env.SerializeToString()) == env
    for bad in (None, b"", b"\xff\xfe not protobuf"):
        with pytest.raises(EnvelopeError):
            events.parse(bad)
    no_uuid = EventEnvelope(event_id="42", aggregate_id="a", ping=Ping())
    with pytest.raises(EnvelopeError, match="not a UUID"):
        events.parse(no_uuid.SerializeToString())
    no_key = EventEnvelope(event_id=str(uuid.uuid4()), ping=Ping())
    with pytest.raises(EnvelopeError, match="aggregate_id"):
        events.parse(no_key.SerializeToString())


@pytest.mark.parametrize(
    ("exc", "unavailable"),
    [
        (PoolTimeout("no connection in 30s"), True),
        # raised by the client (no SQLSTATE): connection refused, lost, closed
        (psycopg.OperationalError("connection refused"), True),
        (psycopg.errors.ConnectionFailure("lost"), True),  # 08006
        (psycopg.errors.AdminShutdown("bye"), True),  # 57P01
        (psycopg.errors.TooManyConnections("full"), True),  # 53300
        # statement_timeout (57014) may be caused by the record itself: counted, then DLQ
        (psycopg.errors.QueryCanceled("timeout"), False),
        (psycopg.errors.SerializationFailure("retry"), False),  # 40001: counted retries
        (psycopg.errors.UniqueViolation("dup"), False),
        (ValueError("bad payload"), False),
    ],
)
def test_database_unavailable_is_told_apart_from_a_bad_record(exc: BaseException, unavailable: bool) -> None:
    assert is_database_unavailable(exc) is unavailable


def test_describe_is_bounded() -> None:
    text = describe(ValueError("x" * 10_000))
    assert text.startswith("ValueError: x") and len(text) <= 2000


def test_a_partition_offset_moves_only_past_records_whose_predecessors_are_all_done() -> None:
    """Keys of one partition finish out of order; the committable offset never skips a record
    still in hand (offsets may have gaps: compaction, transaction markers)."""
    recs = [ConsumerRecord("t", 2, off, 0, 0, b"k", b"v", None, 1, 1, []) for off in (5, 6, 8, 9)]
    progress = _PartitionProgress(recs)
    assert progress.partition.partition == 2
    for off in (5, 6):
        progress.started(off)
    assert progress.finished(6) is None  # 5 is still in hand
    assert progress.behind(5) and not progress.behind(8)  # a stop still finishes 5, not 8
    progress.started(9)
    assert progress.behind(8)  # now 8 sits below 9, in hand: a stop finishes 8 too
    assert progress.finished(9) is None
    assert progress.finished(5) == 7  # 5 and 6 done; 8 is not
    progress.started(8)
    assert progress.finished(8) == 10
    assert not progress.behind(10)


class _Kafka:
    """What the consumer asks of aiokafka when it commits: the assignment, and a commit that is
    refused as a whole when it names a partition not assigned."""

    def __init__(self, assigned: set[TopicPartition]) -> None:
        self.assigned = set(assigned)
        self.commits: list[dict[TopicPartition, int]] = []

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def highwater(self, tp: TopicPartition) -> int:
        return 100

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        for tp in offsets:
            if tp not in self.assigned:
                raise IllegalStateError(f"Partition {tp} is not assigned")
        self.commits.append(dict(offsets))


async def test_a_record_finished_after_its_partition_moved_does_not_block_later_commits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A rebalance while a record is in hand longer than REVOKE_WAIT (a database outage): the
    record finishes after its partition went to another replica. The partitions this replica
    kept must still commit (before: every later commit named the lost partition and failed)."""
    monkeypatch.setattr(consumer_module, "REVOKE_WAIT", 0.05)
    release = asyncio.Event()

    async def handler(conn: Any, env: EventEnvelope) -> None:
        pass

    class Stuck(EventConsumer):
        async def _process_once(self, rec: ConsumerRecord[Any, Any], env: EventEnvelope) -> Any:
            if rec.partition == 1:
                await release.wait()
            return "processed"

    def record(partition: int, offset: int, key: str) -> ConsumerRecord[Any, Any]:
        env = new_envelope("ticketping.test", key, Ping(sequence=offset))
        return ConsumerRecord("t", partition, offset, 0, 0, key.encode(), env.SerializeToString(),
                              None, 1, 1, [])

    kept, lost = TopicPartition("t", 0), TopicPartition("t", 1)
    consumer = Stuck(None, "127.0.0.1:1", "g", ["t"], handler)  # type: ignore[arg-type]
    kafka = _Kafka({kept, lost})
    consumer._consumer = kafka  # type: ignore[assignment]
    batch = asyncio.create_task(consumer._handle_batch({kept: [record(0, 0, "a")],
                                                        lost: [record(1, 0, "b")]}))
    await asyncio.sleep(0.02)
    await consumer._on_revoked({kept, lost})  # gives up waiting for partition 1's record
    assert kafka.commits == [{kept: 1}]
    kafka.assigned = {kept}  # partition 1 now belongs to another replica
    release.set()
    await batch
    consumer._done[kept] = 7  # this replica goes on handling partition 0
    await consumer._commit()
    assert kafka.commits[-1] == {kept: 7}
    assert consumer.commit_failures_total == 0
