"""A real service process: health, reflection, metrics, fail-fast config, graceful SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from devstack.components import service_env
from devstack.layout import ROOT, Layout

pytestmark = pytest.mark.integration
UNKNOWN_QUEUE = "events/00000000-0000-4000-8000-000000000000/queue"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def queue_service(infra: Layout, request):
    grpc_port, metrics_port = _free_port(), _free_port()
    env = {
        **os.environ,
        **service_env(infra, infra.service("queue")),  # what devstack gives the real one
        # Without catalog: a missing room is 404, not "catalog unreachable" (503) when no other
        # test happens to have left svc_catalog running.
        "TP_CATALOG_ADDR": "",
        **getattr(request, "param", {}),
        "TP_GRPC_PORT": str(grpc_port),
        "TP_METRICS_PORT": str(metrics_port),
        "TP_SHUTDOWN_GRACE_SECONDS": "3",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "svc_queue"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    grpc.channel_ready_future(channel).result(timeout=30)
    yield proc, channel, metrics_port
    channel.close()
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_serves_health_reflection_and_metrics(queue_service):
    proc, channel, metrics_port = queue_service
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "ticketping.queue.v1.QueueService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    (answer,) = refl.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    names = {s.name for s in answer.list_services_response.service}
    assert "ticketping.queue.v1.QueueService" in names and "grpc.health.v1.Health" in names

    from ticketping.queue.v1 import queue_service_pb2 as pb
    from ticketping.queue.v1 import queue_service_pb2_grpc as pb_grpc

    method = "GetQueue"
    with pytest.raises(grpc.RpcError) as exc:  # no such event
        pb_grpc.QueueServiceStub(channel).GetQueue(pb.GetQueueRequest(name=UNKNOWN_QUEUE),
                                                   timeout=5)
    code = exc.value.code().name
    assert code == "NOT_FOUND"

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
    text = text.decode()
    line = (
        f'grpc_server_handled_total{{grpc_code="{code}",grpc_method="{method}",'
        f'grpc_service="ticketping.queue.v1.QueueService"}} 1.0'
    )
    assert line in text
    assert "grpc_server_handling_seconds_bucket" in text
    assert "grpc_server_errors_total" in text


def test_sigterm_drains_and_exits_cleanly(queue_service):
    proc, channel, _ = queue_service
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    assert time.monotonic() - t0 < 10
    logs = proc.stderr.read()
    assert '"msg": "shutting down"' in logs and '"msg": "stopped"' in logs


def test_bad_configuration_stops_before_listening(infra: Layout):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TP_")}
    env["TP_GRPC_PORT"] = "70000"
    proc = subprocess.run(
        [sys.executable, "-m", "svc_catalog"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "TP_POSTGRES_DSN" in proc.stderr and "TP_GRPC_PORT" in proc.stderr


@pytest.mark.parametrize("queue_service", [{"TP_OTEL_EXPORTER": "console"}], indirect=True)
def test_tracing_exports_a_span_per_call(queue_service):
    proc, channel, _ = queue_service
    from ticketping.queue.v1 import queue_service_pb2 as pb
    from ticketping.queue.v1 import queue_service_pb2_grpc as pb_grpc

    with pytest.raises(grpc.RpcError):
        pb_grpc.QueueServiceStub(channel).GetQueue(pb.GetQueueRequest(name=UNKNOWN_QUEUE),
                                                   timeout=5)
    proc.send_signal(signal.SIGTERM)  # flushes the batch span processor
    assert proc.wait(timeout=15) == 0
    spans = proc.stdout.read()
    assert '"name": "/ticketping.queue.v1.QueueService/GetQueue"' in spans
    assert '"kind": "SpanKind.SERVER"' in spans
