"""Readiness probes: each answers once, quickly, and raises (or returns False) when not ready."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

T = TypeVar("T")
PROBE_KEY = b"devstack-probe"  # key (and header) of the messages the Kafka probe writes


def run_async(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion, also when called from inside a running event loop
    (then in a helper thread with a loop of its own)."""
    async def main() -> T:
        return await make()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, main()).result()


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Silence a library's connection-refused noise while polling a server that is starting."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def redis_ping(port: int) -> bool:
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    finally:
        client.close()


def postgres_select1(dsn: str) -> bool:
    import psycopg

    with psycopg.connect(dsn, connect_timeout=2) as conn:
        row = conn.execute("SELECT 1").fetchone()
    return row == (1,)


def kafka_metadata(bootstrap: str) -> bool:
    """A metadata request answered by a broker that lists itself and a controller."""
    from aiokafka.admin import AIOKafkaAdminClient

    async def probe() -> bool:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
        try:
            await admin.start()
            cluster = await admin.describe_cluster()
        finally:
            await admin.close()
        return bool(cluster.get("brokers")) and cluster.get("controller_id", -1) >= 0

    with _quiet("aiokafka"):
        return run_async(probe)


def kafka_roundtrip(bootstrap: str, topic: str, timeout: float = 20.0) -> None:
    """An idempotent producer (acks=all) writes one message; a consumer reads it back."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.structs import TopicPartition

    async def roundtrip() -> None:
        payload = f"devstack readiness probe {uuid.uuid4()}".encode()
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True,
                                    acks="all", request_timeout_ms=10000)
        await producer.start()
        try:
            sent = await producer.send_and_wait(topic, payload, key=PROBE_KEY,
                                                headers=[("devstack-probe", b"1")])
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                    enable_auto_commit=False, request_timeout_ms=10000)
        await consumer.start()
        try:
            tp = TopicPartition(topic, sent.partition)
            consumer.assign([tp])
            consumer.seek(tp, sent.offset)
            msg = await asyncio.wait_for(consumer.getone(), timeout)
        finally:
            await consumer.stop()
        if msg.value != payload:
            raise RuntimeError(f"read back {msg.value!r} at {topic}/{sent.partition}@"
                               f"{sent.offset}, expected {payload!r}")

    with _quiet("aiokafka"):
        run_async(roundtrip)


def grpc_serving(port: int, proto_service: str) -> bool:
    """grpc.health.v1 says SERVING for the server ("") and for the proto service."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", proto_service):
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=2)
            except grpc.RpcError as exc:
                raise RuntimeError(f"health of {name or '(server)'!r}: {exc.code().name} "
                                   f"{exc.details()}") from None
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                raise RuntimeError(f"health of {name or '(server)'!r} is "
                                   f"{health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
    return True


def http_get(url: str, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as reply:  # noqa: S310 - loopback only
        return str(reply.read().decode())


def envoy_healthy_ports(admin_port: int) -> dict[int, bool]:
    """{upstream port: every host on it healthy} from Envoy's /clusters text output."""
    ports: dict[int, bool] = {}
    for line in http_get(f"http://127.0.0.1:{admin_port}/clusters").splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[2] == "health_flags":
            port = int(parts[1].rsplit(":", 1)[1])
            ports[port] = ports.get(port, True) and parts[3] == "healthy"
    return ports


def envoy_ready(admin_port: int, upstream_ports: list[int]) -> bool:
    state = http_get(f"http://127.0.0.1:{admin_port}/ready").strip()
    if state != "LIVE":
        raise RuntimeError(f"/ready says {state}")
    ports = envoy_healthy_ports(admin_port)
    unhealthy = [p for p in upstream_ports if not ports.get(p, False)]
    if unhealthy:
        raise RuntimeError(f"upstreams on ports {unhealthy} not healthy in /clusters")
    return True
