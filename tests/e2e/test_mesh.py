"""The skeleton mesh through the edge, as the mobile app (REST/JSON) and internal teams (gRPC) see it."""

from __future__ import annotations

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.layout import Layout
from meshkit.errors import error_info

pytestmark = pytest.mark.e2e

UNKNOWN_EVENT = "events/00000000-0000-4000-8000-000000000000"
# One public REST route per service, answered by that service (not by Envoy): (method, path,
# body, status, the service's own ErrorInfo reason). Methods whose issue has not landed yet
# answer 501 with a JSON error naming the issue.
ROUTES = {
    "identity": ("GET", "/.well-known/jwks.json", None, 200, None),
    "catalog": ("GET", "/v1/events", None, 200, None),
    "queue": ("GET", f"/v1/{UNKNOWN_EVENT}/queue", None, 404, "EVENT_NOT_FOUND"),
    "booking": ("GET", f"/v1/{UNKNOWN_EVENT}/seats", None, 404, "EVENT_NOT_FOUND"),
    "payment": ("POST", "/v1/payments/webhook", {"id": "evt_1"}, 401, "BAD_SIGNATURE"),
}


def test_whole_mesh_healthy_through_the_edge(http: httpx.Client, mesh: Layout):
    for path in ("/healthz", *(f"/healthz/{s.name}" for s in mesh.services)):
        resp = http.get(path)
        # Healthy is not dressed as an error: only the edge's error answers take that shape.
        assert resp.status_code == 200 and "EDGE_ERROR" not in resp.text, (path, resp.text)


def test_the_edges_own_errors_keep_the_json_error_shape(http: httpx.Client):
    resp = http.get("/no/such/route")
    assert resp.status_code == 404 and resp.headers["content-type"] == "application/json"
    assert resp.json()["details"][0]["reason"] == "ROUTE_NOT_FOUND"
    resp = http.get("/v1/events", headers={"x-big": "a" * 40_000})  # over max_request_headers_kb
    assert resp.status_code == 431, resp.text
    assert resp.json()["details"][0]["reason"] == "HEADERS_TOO_LARGE"


async def test_each_service_answers_grpc_health_through_the_edge(mesh: Layout):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{mesh.edge_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for s in mesh.services:
            reply = await stub.Check(
                health_pb2.HealthCheckRequest(service=s.proto_service),
                metadata=[("x-tp-service", s.name)], timeout=5,
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, s.name


@pytest.mark.parametrize("service", sorted(ROUTES))
def test_rest_reaches_each_service_transcoded(http: httpx.Client, service: str):
    method, path, body, status, reason = ROUTES[service]
    resp = http.request(method, path, json=body)
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    # The gRPC call's own headers (grpc-status, grpc-message, grpc-accept-encoding) are not the
    # app's business; native gRPC keeps them (the two tests below).
    assert not [h for h in resp.headers if h.startswith("grpc-")], resp.headers
    if reason is not None:
        err = resp.json()
        (info,) = err["details"]
        assert info["reason"] == reason and info["domain"] == "ticketping.dev"


async def test_native_grpc_through_the_same_port(mesh: Layout):
    from ticketping.queue.v1 import queue_service_pb2 as pb
    from ticketping.queue.v1 import queue_service_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{mesh.edge_port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await pb_grpc.QueueServiceStub(channel).GetQueue(
                pb.GetQueueRequest(name=f"{UNKNOWN_EVENT}/queue"), timeout=5)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    info = error_info(exc.value)
    assert info is not None and info.reason == "EVENT_NOT_FOUND"


def test_unknown_route_is_a_json_404(http: httpx.Client):
    resp = http.get("/v1/nothing-here")
    assert resp.status_code == 404
    assert resp.json()["details"][0]["reason"] == "ROUTE_NOT_FOUND"


def test_internal_methods_are_not_reachable_through_the_edge(http: httpx.Client):
    resp = http.post("/v1/internal/events/e1/queue:markSoldOut", json={})
    assert resp.status_code == 404
    assert resp.json()["details"][0]["reason"] == "ROUTE_NOT_FOUND"


async def test_internal_methods_are_not_reachable_over_grpc_either(mesh: Layout):
    from ticketping.queue.v1 import queue_service_pb2 as pb
    from ticketping.queue.v1 import queue_service_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{mesh.edge_port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await pb_grpc.QueueServiceStub(channel).MarkSoldOut(
                pb.MarkSoldOutRequest(event="events/e1"), timeout=5)
    # Envoy's own 404 (no service reached): no ErrorInfo of a service in the answer.
    assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED
    info = error_info(exc.value)
    assert info is None or info.reason != "NOT_IMPLEMENTED"
