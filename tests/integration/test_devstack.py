"""devstack against the real servers.

The test profile's infrastructure (the session's `infra` fixture) answers, and a second start
keeps it as it is. Stopping is checked on a scratch copy of the test profile (own folder, ports
+2000) so the infrastructure the rest of the session uses is never stopped under it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
import redis

from devstack import probes, stack
from devstack.components import INFRA
from devstack.layout import (
    KAFKA_DLQ_PARTITIONS,
    KAFKA_PARTITIONS,
    KAFKA_PROBE_TOPIC,
    KAFKA_TOPICS,
    ROOT,
    Layout,
    layout,
)
from devstack.proc import (
    DevstackError,
    ProcSpec,
    is_alive,
    port_owner,
    running_pid,
    signal_proc,
    spawn,
    strays,
    wait_until,
)

pytestmark = pytest.mark.integration


def scratch_layout(shift: int = 2000) -> Layout:
    base = layout("test")
    ports = {f.name: getattr(base, f.name) + shift for f in dataclasses.fields(base)
             if f.name.endswith("_port")}
    services = tuple(dataclasses.replace(s, grpc_port=s.grpc_port + shift,
                                         metrics_port=s.metrics_port + shift)
                     for s in base.services)
    return dataclasses.replace(base, run_dir=ROOT / ".run" / "test-devstack", services=services,
                               **ports)


def infra_pids(lay: Layout) -> dict[str, int | None]:
    return {name: running_pid(lay.run_dir, name) for name in INFRA}


def infra_ports(lay: Layout) -> list[int]:
    return [lay.redis_port, lay.postgres_port, lay.kafka_port, lay.kafka_controller_port]


def kafka_partitions(lay: Layout) -> dict[str, int]:
    from aiokafka.admin import AIOKafkaAdminClient

    async def describe() -> dict[str, int]:
        admin = AIOKafkaAdminClient(bootstrap_servers=lay.kafka_bootstrap)
        await admin.start()
        try:
            return {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics()}
        finally:
            await admin.close()

    return probes.run_async(describe)


def test_redis_answers_and_is_persistent(infra: Layout) -> None:
    client = redis.Redis.from_url(infra.redis_url)
    try:
        assert client.ping()
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("bind") == {"bind": "127.0.0.1"}
    finally:
        client.close()


def test_postgres_answers_every_database(infra: Layout) -> None:
    for db in infra.databases:
        with psycopg.connect(infra.postgres_dsn(db), connect_timeout=5) as conn:
            assert conn.execute("SELECT current_database(), current_setting('fsync')").fetchone() \
                == (db, "on")


def test_kafka_topics_and_idempotent_roundtrip(infra: Layout) -> None:
    partitions = kafka_partitions(infra)
    for topic in KAFKA_TOPICS:
        assert partitions.get(topic) == KAFKA_PARTITIONS, topic
        assert partitions.get(f"{topic}.dlq") == KAFKA_DLQ_PARTITIONS, topic
    probes.kafka_roundtrip(infra.kafka_bootstrap, KAFKA_PROBE_TOPIC)  # raises if it fails


def test_second_start_keeps_what_runs(infra: Layout) -> None:
    before = infra_pids(infra)
    assert all(before.values()), before
    started = time.monotonic()
    stack.ensure_infra(infra)
    assert time.monotonic() - started < 5
    assert infra_pids(infra) == before


def test_status_cli(infra: Layout) -> None:
    out = subprocess.run([sys.executable, "-m", "devstack", "status", "--profile", "test"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    for name in INFRA:
        assert any(line.split()[:1] == [name] and "healthy" in line
                   for line in out.splitlines()), out


def test_a_process_that_dies_names_its_log(tmp_path: Path) -> None:
    spec = ProcSpec("doomed", ("sh", "-c", "echo boom-from-doomed; exit 3"), cwd=tmp_path)
    pid = spawn(spec, tmp_path)
    with pytest.raises(DevstackError) as err:
        wait_until("doomed", lambda: False, timeout=10, log=tmp_path / "logs" / "doomed.log",
                   pid=pid)
    assert "exited before it was ready" in str(err.value)
    assert str(tmp_path / "logs" / "doomed.log") in str(err.value)
    assert "boom-from-doomed" in str(err.value)


def test_a_taken_port_is_reported() -> None:
    lay = scratch_layout(shift=2500)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", lay.redis_port))
        squatter.listen()
        with pytest.raises(DevstackError, match=f"port {lay.redis_port} is taken by pid"):
            stack.ensure_infra(lay)
    assert not strays(lay.run_dir)
    shutil.rmtree(lay.run_dir, ignore_errors=True)


def test_restart_and_down_leave_nothing(infra: Layout) -> None:
    lay = scratch_layout()
    stack.down(lay)  # whatever a crashed earlier run left
    shutil.rmtree(lay.run_dir, ignore_errors=True)  # first start from nothing: initdb, format

    stack.ensure_infra(lay)
    first = infra_pids(lay)
    assert all(first.values()), first

    # An acknowledged write survives a crash of Redis; only Redis is restarted.
    client = redis.Redis.from_url(lay.redis_url)
    client.set("devstack:survives", "yes")
    client.close()
    assert signal_proc(lay.run_dir, "redis", signal.SIGKILL) == first["redis"]
    # SIGKILL is asynchronous: let the dead Redis let go of its port (a crash long before the
    # next `up` is what this stands for), or the start would find the port held.
    deadline = time.monotonic() + 10
    while port_owner(lay.redis_port) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    stack.ensure_infra(lay)
    second = infra_pids(lay)
    assert second["redis"] != first["redis"]
    assert (second["postgres"], second["kafka"]) == (first["postgres"], first["kafka"])
    client = redis.Redis.from_url(lay.redis_url)
    assert client.get("devstack:survives") == b"yes"
    client.close()

    ours = strays(lay.run_dir)  # every process of the scratch stack, postgres' children too
    assert set(second.values()) <= set(ours)
    stack.down(lay)
    assert not list(lay.pids_dir.glob("*.pid"))
    assert not strays(lay.run_dir)
    assert not [pid for pid in ours if is_alive(pid)]
    assert [port_owner(p) for p in infra_ports(lay)] == [None] * 4

    # The session's own infrastructure was not touched.
    assert all(infra_pids(infra).values())
    assert probes.redis_ping(infra.redis_port)


def _envoy_child(keeper: int) -> int | None:
    """The Envoy the keeper shell runs now (its child), if any."""
    out = subprocess.run(["pgrep", "-P", str(keeper)], capture_output=True, text=True).stdout.split()
    return int(out[0]) if out else None


def test_a_crashed_envoy_is_started_again_and_a_stopped_one_is_not(tmp_path: Path) -> None:
    """The edge is one process: when Envoy crashes (here: SIGSEGV) its keeper starts it again,
    as Kubernetes restarts a crashed pod; devstack's stop ends both for good."""
    import urllib.request

    from bench.baseline import direct_envoy

    lay = dataclasses.replace(scratch_layout(), run_dir=tmp_path)

    def answers(url: str) -> bool:
        try:
            return urllib.request.urlopen(url, timeout=1).read() == b"ok"
        except OSError:
            return False

    with direct_envoy(lay, {"/ok": ("text/plain", "ok")}) as base:
        keeper = running_pid(lay.run_dir, "envoy-baseline")
        assert keeper is not None and answers(f"{base}/ok")
        first = _envoy_child(keeper)
        assert first is not None
        os.kill(first, signal.SIGSEGV)
        log = lay.run_dir / "logs" / "envoy-baseline.log"
        wait_until("envoy started again", lambda: _envoy_child(keeper) not in (None, first)
                   and answers(f"{base}/ok"), timeout=30, log=log)
        again = _envoy_child(keeper)
        assert again is not None and again != first
        assert "envoy crashed (exit status 139), starting it again" in log.read_text()
    time.sleep(1.5)  # past the keeper's pause: nothing was started after the stop
    assert not is_alive(keeper) and not is_alive(again)
    assert not answers(f"{base}/ok")
