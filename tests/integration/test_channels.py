"""meshkit.channels and the servers' connection age, against real gRPC servers on loopback.

Two replicas listen on the same port of two loopback addresses, as two pods behind one headless
Service: a client channel spreads its calls over both. A server whose connections age out
recycles them under a stream of calls without failing one.
"""

from __future__ import annotations

import asyncio
import collections
import socket

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshkit.channels import client_channel
from meshkit.config import ServiceSettings
from meshkit.server import server_options

pytestmark = pytest.mark.integration


class CountingHealth(health_pb2_grpc.HealthServicer):
    def __init__(self, replica: str, calls: collections.Counter[str]) -> None:
        self.replica, self.calls = replica, calls

    async def Check(self, request, context):  # noqa: N802 (gRPC's method name)
        self.calls[self.replica] += 1
        self.calls[f"peer {context.peer()}"] += 1
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _replica(host: str, port: int, calls: collections.Counter[str],
                   settings: ServiceSettings | None = None) -> grpc.aio.Server:
    settings = settings or ServiceSettings(service_name="test")
    server = grpc.aio.server(options=server_options(settings))
    health_pb2_grpc.add_HealthServicer_to_server(CountingHealth(host, calls), server)
    assert server.add_insecure_port(f"{host}:{port}") == port
    await server.start()
    return server


async def test_calls_spread_over_every_address_of_the_name() -> None:
    port, calls = _free_port(), collections.Counter[str]()
    servers = [await _replica(host, port, calls) for host in ("127.0.0.1", "127.0.0.2")]
    try:
        async with client_channel(f"ipv4:127.0.0.1:{port},127.0.0.2:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for _ in range(40):
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert calls["127.0.0.1"] + calls["127.0.0.2"] == 40
        assert calls["127.0.0.1"] >= 15 and calls["127.0.0.2"] >= 15, calls
    finally:
        for s in servers:
            await s.stop(None)


async def test_aged_connections_are_replaced_without_failing_a_call() -> None:
    port, calls = _free_port(), collections.Counter[str]()
    aged = ServiceSettings(service_name="test", grpc_max_connection_age_seconds=0.3)
    server = await _replica("127.0.0.1", port, calls, aged)
    try:
        async with client_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            loop = asyncio.get_running_loop()
            until, done = loop.time() + 2.0, 0
            while loop.time() < until:
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                done += 1
                await asyncio.sleep(0.01)
        peers = [k for k in calls if k.startswith("peer ")]
        assert calls["127.0.0.1"] == done
        assert len(peers) >= 3, f"{len(peers)} connections over 2 s with a 0.3 s age"
    finally:
        await server.stop(None)


def test_connection_age_is_off_unless_set() -> None:
    names = [name for name, _ in server_options(ServiceSettings(service_name="test"))]
    assert "grpc.max_connection_age_ms" not in names
    aged = dict(server_options(ServiceSettings(service_name="test", grpc_max_connection_age_seconds=300)))
    assert aged["grpc.max_connection_age_ms"] == 300_000
    assert aged["grpc.max_connection_age_grace_ms"] > 30_000  # booking's longest call (WaitOrder)
