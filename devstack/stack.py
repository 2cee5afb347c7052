"""Start, check and stop the local platform of one profile (see devstack.layout).

Public API (used by `python -m devstack` and the test suite's fixtures):
  ensure_infra(layout)                 Redis, PostgreSQL (+ databases), Kafka (+ topics), ready
  start_services(layout, names=None)   the services, each SERVING on grpc.health.v1
  stop_service(layout, name)           SIGTERM its process group, then SIGKILL
  kill_service(layout, name, sig)      just send sig to its process group (chaos tests)
  start_edge(layout)                   Envoy, LIVE with every service cluster healthy
  ensure_redis_cluster(layout)         three-master Redis Cluster, cluster_state:ok; its URL
                                       (on demand only: not part of up; down stops it)
  up(layout) / down(layout) / status(layout)
Every call is idempotent: what already runs and answers is kept.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Sequence
from pathlib import Path

from devstack import components as comp
from devstack import redis_cluster
from devstack.components import Component
from devstack.install import ensure_installed
from devstack.layout import Layout
from devstack.proc import (
    DevstackError,
    ProcSpec,
    kill_strays,
    log_path,
    pid_path,
    port_owner,
    run_dir_lock,
    running_pid,
    signal_proc,
    spawn,
    stop_all,
    strays,
    wait_until,
)

HEALTHY_GRACE = 5.0  # seconds a running process gets to answer before it is restarted


def _say(layout: Layout, msg: str) -> None:
    print(f"devstack[{layout.profile}]: {msg}", flush=True)


def _check_ports_free(layout: Layout, c: Component) -> None:
    for port in c.ports:
        owner = port_owner(port)
        if owner is not None:
            raise DevstackError(
                f"cannot start {c.name}: port {port} is taken by {owner}, which devstack "
                f"[{layout.profile}] did not start (no live {pid_path(layout.run_dir, c.name)}). "
                f"Stop it, or run `python -m devstack down --profile {layout.profile}` "
                f"if it is a stray of ours.")


def _keep_if_healthy(layout: Layout, c: Component) -> bool:
    """True if c runs and answers; a running one that does not answer is stopped."""
    pid = running_pid(layout.run_dir, c.name)
    if pid is None:
        return False
    try:
        wait_until(c.name, c.probe, timeout=HEALTHY_GRACE, log=log_path(layout.run_dir, c.name),
                   pid=pid)
        return True
    except DevstackError as exc:
        _say(layout, f"{c.name} (pid {pid}) runs but does not answer, restarting it: "
                     f"{str(exc).splitlines()[0]}")
        stop_all([c.spec], layout.run_dir)
        return False


def _ensure(layout: Layout, wanted: Sequence[Component]) -> None:
    """Keep what answers; start the rest together, then wait for each and run its setup."""
    with run_dir_lock(layout.run_dir):
        started: dict[str, tuple[int, float]] = {}
        for c in wanted:
            if not _keep_if_healthy(layout, c):
                _check_ports_free(layout, c)
                c.prepare()
                started[c.name] = (spawn(c.spec, layout.run_dir), time.monotonic())
        for c in wanted:
            if c.name in started:
                pid, t0 = started[c.name]
                try:
                    wait_until(c.name, c.probe, timeout=c.timeout, pid=pid,
                               log=log_path(layout.run_dir, c.name))
                except DevstackError:
                    stop_all([c.spec], layout.run_dir)
                    raise
                _say(layout, f"{c.name} started (pid {pid}) in {time.monotonic() - t0:.1f}s")
            c.setup()


def ensure_infra(layout: Layout) -> None:
    """Redis, PostgreSQL and Kafka running and ready; databases and topics exist."""
    _ensure(layout, comp.infra(layout))


def start_services(layout: Layout, names: list[str] | None = None) -> None:
    """Start (or keep) the named services (default: all five), each SERVING on its health."""
    _ensure(layout, comp.services(layout, names))


def stop_service(layout: Layout, name: str) -> bool:
    """SIGTERM the service's process group, wait, then SIGKILL; True if it was running."""
    with run_dir_lock(layout.run_dir):
        return bool(stop_all([comp.service(layout, layout.service(name)).spec], layout.run_dir))


def kill_service(layout: Layout, name: str, sig: int = signal.SIGKILL) -> int | None:
    """Send sig to the service's process group (no wait); return its pid, None if not running."""
    return signal_proc(layout.run_dir, layout.service(name).module, sig)


def start_edge(layout: Layout) -> None:
    """Envoy with the config from edge.config.write_config, LIVE and all 5 clusters healthy.
    A running Envoy whose config would now come out different is restarted."""
    with run_dir_lock(layout.run_dir):
        c, current = comp.envoy(layout), comp.envoy_config_path(layout)
        fresh = current.with_suffix(".next.yaml")
        comp.render_envoy_config(layout, fresh)
        if running_pid(layout.run_dir, c.name) and _differs(fresh, current):
            _say(layout, "edge config changed, restarting Envoy")
            stop_all([c.spec], layout.run_dir)
        fresh.replace(current)
        _ensure(layout, [c, comp.edge_feed(layout)])


def ensure_redis_cluster(layout: Layout) -> str:
    """The Redis Cluster of this profile (three masters on layout.redis_cluster_ports, no
    replicas) running, formed and cluster_state:ok on every node; return a seed URL for
    RedisCluster.from_url. Nodes that run and answer are kept; the cluster is created only when
    it is not formed yet (a half-formed one is reset first). Not started by `up`."""
    with run_dir_lock(layout.run_dir):
        nodes = redis_cluster.components(layout)
        _ensure(layout, nodes)
        state = redis_cluster.formation(layout)
        if state != "formed":
            t0 = time.monotonic()
            if state == "broken":
                _say(layout, "redis-cluster is half formed, resetting it (its data is dropped)")
                redis_cluster.reset(layout)
            redis_cluster.create(layout)
            _say(layout, f"redis-cluster created on ports "
                         f"{', '.join(map(str, layout.redis_cluster_ports))} in "
                         f"{time.monotonic() - t0:.1f}s")
        wait_until("redis-cluster (cluster_state:ok on every node)",
                   lambda: redis_cluster.is_ok(layout), timeout=60,
                   log=redis_cluster.create_log(layout))
        return layout.redis_cluster_url


def _differs(a: Path, b: Path) -> bool:
    return not b.exists() or a.read_bytes() != b.read_bytes()


def up(layout: Layout, *, infra_only: bool = False) -> None:
    """Install what is missing (dev profile), then infra, services and edge; print the table."""
    t0 = time.monotonic()
    if layout.profile == "dev":
        ensure_installed()
    with run_dir_lock(layout.run_dir):
        ensure_infra(layout)
        if not infra_only:
            start_services(layout)
            start_edge(layout)
    print(table(layout, infra_only=infra_only))
    if not infra_only and layout.profile == "dev":
        from .demo import seed

        print(seed(layout))
    _say(layout, f"up in {time.monotonic() - t0:.1f}s")


def down(layout: Layout) -> list[str]:
    """Stop everything this profile started (edge and services first, then the infra), then
    any stray process still pointing into run_dir. Return what was stopped."""
    if not layout.run_dir.exists():  # never started, or removed while running: strays only
        _say(layout, f"down: killed strays {kill_strays(layout.run_dir) or 'none'}")
        return []
    with run_dir_lock(layout.run_dir):
        known = comp.everything(layout)
        cluster = redis_cluster.components(layout)  # only there if a test asked for it
        stopped = stop_all([c.spec for c in known if c.name not in comp.INFRA], layout.run_dir)
        stopped += stop_all([*(c.spec for c in known if c.name in comp.INFRA),
                             *(c.spec for c in cluster)], layout.run_dir)
        stopped += _stop_orphan_pidfiles(layout, {c.name for c in [*known, *cluster]})
        leftovers = kill_strays(layout.run_dir)
        if leftovers:
            _say(layout, f"killed {len(leftovers)} stray process(es): {leftovers}")
        remaining = strays(layout.run_dir)
        if remaining:
            raise DevstackError(f"processes still running in {layout.run_dir}: {remaining}")
        _say(layout, f"down: stopped {', '.join(stopped) or 'nothing (nothing was running)'}")
        return stopped


def _stop_orphan_pidfiles(layout: Layout, known: set[str]) -> list[str]:
    """Pid files of names no component has (a service removed from the layout, ...)."""
    others = [p.stem for p in layout.pids_dir.glob("*.pid") if p.stem not in known]
    return stop_all([ProcSpec(n, (), cwd=layout.run_dir) for n in others], layout.run_dir)


def component_state(layout: Layout, c: Component) -> str:
    pid = running_pid(layout.run_dir, c.name)
    if pid is None:
        owner = next((o for p in c.ports if (o := port_owner(p))), None)
        return f"stopped (port taken by {owner})" if owner else "stopped"
    try:
        ok = c.probe()
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return f"running (pid {pid}), NOT answering: {type(exc).__name__}: {exc}"[:160]
    return f"running (pid {pid}), healthy" if ok else f"running (pid {pid}), NOT answering"


def status(layout: Layout) -> dict[str, str]:
    """Print and return each component's state."""
    states = {c.name: component_state(layout, c) for c in comp.everything(layout)}
    width = max(map(len, states))
    print(f"devstack[{layout.profile}] ({layout.run_dir})")
    for name, state in states.items():
        print(f"  {name:<{width}}  {state}")
    return states


def table(layout: Layout, *, infra_only: bool = False) -> str:
    rows = [] if infra_only else [
        ("edge", layout.edge_url),
        ("envoy admin", f"http://127.0.0.1:{layout.envoy_admin_port}"),
        *((s.name, f"gRPC 127.0.0.1:{s.grpc_port}   metrics "
                   f"http://127.0.0.1:{s.metrics_port}/metrics") for s in layout.services),
    ]
    rows += [
        ("redis", layout.redis_url),
        ("postgres", f"{layout.postgres_dsn('<db>')}   dbs: {' '.join(layout.databases)}"),
        ("kafka", layout.kafka_bootstrap),
        ("logs", str(layout.logs_dir)),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"Ticketping [{layout.profile}]"]
    lines += [f"  {name:<{width}}  {where}" for name, where in rows]
    return "\n".join(lines)
