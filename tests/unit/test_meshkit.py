"""meshkit pieces that need no sockets: settings, errors, JSON logs, the unbuilt-method guard."""

from __future__ import annotations

import gc
import json
import logging

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from meshkit.config import ServiceSettings, SettingsError, load
from meshkit.errors import NotFound, status_of, to_status
from meshkit.logging import JsonFormatter
from meshkit.memory import tune_gc
from meshkit.server import mark_unimplemented


class _Settings(ServiceSettings):
    postgres_dsn: str


def test_settings_fail_fast_naming_the_variable(monkeypatch, capsys):
    monkeypatch.delenv("TP_POSTGRES_DSN", raising=False)
    monkeypatch.setenv("TP_GRPC_PORT", "not-a-port")
    with pytest.raises(SettingsError):
        load(_Settings, service_name="x")
    err = capsys.readouterr().err
    assert "TP_POSTGRES_DSN" in err and "TP_GRPC_PORT" in err


def test_gc_tuning_freezes_start_up_and_still_collects_cycles():
    before = gc.get_threshold()
    try:
        tune_gc(20_000)
        assert gc.get_threshold() == (20_000, before[1], before[2])
        assert gc.get_freeze_count() > 1000  # what imports built is out of the collector's walks

        class Node:
            pass

        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle: reference counting alone never frees it
        del a, b
        assert gc.collect() >= 2  # still found by a collection
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_gc_threshold_is_bounded(monkeypatch, capsys):
    monkeypatch.setenv("TP_GC_YOUNG_THRESHOLD", "0")
    with pytest.raises(SettingsError):
        load(ServiceSettings, service_name="x")
    assert "TP_GC_YOUNG_THRESHOLD" in capsys.readouterr().err


def test_kafka_compression_is_one_of_the_codecs(monkeypatch, capsys):
    assert load(ServiceSettings, service_name="x").kafka_compression == "none"
    monkeypatch.setenv("TP_KAFKA_COMPRESSION", "brotli")
    with pytest.raises(SettingsError):
        load(ServiceSettings, service_name="x")
    assert "TP_KAFKA_COMPRESSION" in capsys.readouterr().err


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("TP_POSTGRES_DSN", "postgresql://u@h/db")
    monkeypatch.setenv("TP_GRPC_PORT", "5000")
    s = load(_Settings, service_name="x")
    assert (s.postgres_dsn, s.grpc_port, s.otel_exporter) == ("postgresql://u@h/db", 5000, "none")


def _error_info(st: grpc.Status) -> error_details_pb2.ErrorInfo:
    (key, value), = [(k, v) for k, v in st.trailing_metadata if k == "grpc-status-details-bin"]
    proto = status_pb2.Status.FromString(value)
    info = error_details_pb2.ErrorInfo()
    assert proto.details[0].Unpack(info)
    return info


def test_status_carries_error_info():
    st = to_status(grpc.StatusCode.NOT_FOUND, "EVENT_NOT_FOUND", "no such event", {"event": "e1"})
    assert st.code == grpc.StatusCode.NOT_FOUND
    info = _error_info(st)
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "EVENT_NOT_FOUND", "ticketping.dev", {"event": "e1"})


def test_echoed_text_in_an_error_is_cut_so_the_trailers_stay_small():
    huge = "Z" * 50_000
    st = to_status(grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_SEAT", f"no seat {huge}", {"seats": huge})
    info = _error_info(st)
    assert info.reason == "UNKNOWN_SEAT" and len(info.metadata["seats"]) == 512
    assert len(st.details) == 512 and st.details.startswith("no seat ZZZ") and st.details.endswith("…")


def test_domain_error_maps_to_its_code():
    st = status_of(NotFound("ORDER_NOT_FOUND", "no such order"))
    assert st.code == grpc.StatusCode.NOT_FOUND and st.details == "no such order"


def test_json_log_carries_trace_id():
    provider = TracerProvider()
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "hello %s", ("fan",), None)
    record.event = "events/1"
    with provider.get_tracer("t").start_as_current_span("op") as span:
        line = json.loads(JsonFormatter("catalog").format(record))
        trace_id = format(span.get_span_context().trace_id, "032x")
    assert line["msg"] == "hello fan" and line["service"] == "catalog"
    assert line["trace_id"] == trace_id and line["event"] == "events/1"
    assert "trace_id" not in json.loads(JsonFormatter("catalog").format(record))
    assert trace.get_current_span().get_span_context().is_valid is False


class _Base:
    async def Built(self, request, context):  # noqa: N802 - gRPC method names
        raise NotImplementedError

    async def Unbuilt(self, request, context):  # noqa: N802
        raise NotImplementedError


class _Servicer(_Base):
    async def Built(self, request, context):  # noqa: N802
        return "built"


async def test_unbuilt_methods_answer_unimplemented_with_a_reason():
    from meshkit.errors import Unimplemented

    s = _Servicer()
    mark_unimplemented(s, _Base, "issue #9")
    assert await s.Built(None, None) == "built"
    with pytest.raises(Unimplemented) as exc:
        await s.Unbuilt(None, None)
    assert exc.value.reason == "NOT_IMPLEMENTED" and "issue #9" in exc.value.message


def test_caller_from_the_edges_metadata():
    from meshkit.access import caller_of

    assert caller_of([("x-user-id", "u1"), ("x-user-role", "ADMIN")]).is_admin
    assert not caller_of([("x-user-id", "u1"), ("x-user-role", "USER")]).is_admin
    assert not caller_of([("x-user-role", "ADMIN")]).is_admin  # no verified user
    assert not caller_of([("x-user-id", "u1"), ("x-user-role", "admin")]).is_admin
    # a repeated header is never trusted
    assert not caller_of([("x-user-id", "u1"), ("x-user-role", "USER"),
                          ("x-user-role", "ADMIN")]).is_admin
    assert caller_of([("x-user-id", "u1"), ("x-user-id", "u2")]).user_id is None


def test_access_levels_come_from_the_contract():
    import ticketping.catalog.v1.catalog_service_pb2  # noqa: F401 - registers the descriptors

    from meshkit import access
    from meshkit.errors import PermissionDenied, Unauthenticated

    level = access.level_of("/ticketping.catalog.v1.CatalogService/PublishEvent")
    assert level == access.ADMIN
    assert access.level_of("/ticketping.catalog.v1.CatalogService/ListEvents") == access.PUBLIC
    assert access.level_of("/grpc.health.v1.Health/Check") is None
    access.check(access.PUBLIC, access.Caller(None, None))
    with pytest.raises(Unauthenticated):
        access.check(level, access.Caller(None, None))
    with pytest.raises(PermissionDenied):
        access.check(level, access.Caller("u1", "USER"))
    access.check(level, access.Caller("u1", "ADMIN"))


def test_a_pools_use_is_exported_on_metrics() -> None:
    from prometheus_client import generate_latest

    from meshkit import metrics

    class FakePool:
        name = "unit-pool"

        def get_stats(self) -> dict[str, int]:
            return {"pool_max": 24, "pool_size": 5, "pool_available": 1, "requests_waiting": 3,
                    "requests_num": 40, "requests_queued": 7, "requests_wait_ms": 1234}

    pool = FakePool()
    metrics.watch_pool(pool)
    text = generate_latest().decode()
    assert 'meshkit_db_pool_max{pool="unit-pool"} 24.0' in text
    assert 'meshkit_db_pool_requests_waiting{pool="unit-pool"} 3.0' in text
    assert 'meshkit_db_pool_wait_milliseconds_total{pool="unit-pool"} 1234.0' in text
    assert 'meshkit_db_pool_requests_queued_total{pool="unit-pool"} 7.0' in text


def test_redis_unavailable_is_told_from_a_commands_own_error():
    import redis.exceptions as e

    from meshkit.redis import is_redis_unavailable

    for exc in (e.ConnectionError("refused"), e.TimeoutError(), e.ClusterDownError("down"),
                e.TryAgainError(), e.BusyLoadingError(), e.ReadOnlyError()):
        assert is_redis_unavailable(exc), exc
    assert not is_redis_unavailable(e.ResponseError("WRONGTYPE"))
    assert not is_redis_unavailable(ValueError())
