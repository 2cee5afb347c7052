"""A three-master Redis Cluster (no replicas) for the tests that need one.

Not part of ``up`` or ``ensure_infra``: ``devstack.stack.ensure_redis_cluster(layout)`` starts it
on demand and ``down`` stops it with the infrastructure. Each node is an ordinary devstack
process named ``redis-cluster-<port>`` (pid file, log), its config, AOF and nodes.conf in
``run_dir/redis-cluster/<port>/``. Ports: ``layout.redis_cluster_ports``, and each port + 10000
for the cluster bus.
"""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path

from devstack import probes
from devstack.components import Component, _write
from devstack.layout import REDIS_CLUSTER_BUS_SHIFT, Layout
from devstack.proc import DevstackError, ProcSpec, log_path, run_checked

ALL_SLOTS = 16384
PREFIX = "redis-cluster"  # process names redis-cluster-<port>; log of the create: redis-cluster.log


def node_name(port: int) -> str:
    return f"{PREFIX}-{port}"


def node_dir(layout: Layout, port: int) -> Path:
    return layout.run_dir / PREFIX / str(port)


def create_log(layout: Layout) -> Path:
    return log_path(layout.run_dir, PREFIX)


def _node_conf(layout: Layout, port: int) -> str:
    return "\n".join([
        f"port {port}",
        "bind 127.0.0.1",
        "protected-mode yes",
        "daemonize no",
        'logfile ""',  # stdout, i.e. logs/redis-cluster-<port>.log
        "set-proc-title no",  # keep /proc/<pid>/environ readable (devstack's ownership marker)
        f"dir {node_dir(layout, port)}",
        "cluster-enabled yes",
        "cluster-config-file nodes.conf",  # in dir: the node's id and what it knows of the others
        "cluster-node-timeout 5000",
        "appendonly yes",  # same durability as the single Redis: AOF, fsync every second
        "appendfsync everysec",
        'save ""',
        "",
    ])


def node(layout: Layout, port: int) -> Component:
    conf = node_dir(layout, port) / "redis.conf"
    return Component(
        spec=ProcSpec(node_name(port), ("redis-server", str(conf)), cwd=node_dir(layout, port)),
        ports=(port, port + REDIS_CLUSTER_BUS_SHIFT),
        probe=partial(probes.redis_ping, port),
        timeout=20,
        prepare=lambda: _write(conf, _node_conf(layout, port)),
    )


def components(layout: Layout) -> list[Component]:
    return [node(layout, port) for port in layout.redis_cluster_ports]


# --- cluster state ---------------------------------------------------------------------------

def node_command(port: int, *args: str) -> str:
    """One command to one node (no cluster redirection); the reply as text."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=1)
    try:
        # Sent as separate words the command name is just CLUSTER, which no redis-py response
        # callback parses: the raw text comes back.
        reply = client.execute_command(*args)
    finally:
        client.close()
    return reply.decode() if isinstance(reply, bytes) else str(reply)


def cluster_info(port: int) -> dict[str, str]:
    """CLUSTER INFO of one node as {field: value}."""
    text = node_command(port, "CLUSTER", "INFO")
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def known_ports(port: int) -> set[int]:
    """The client ports of every node this node knows (CLUSTER NODES, itself included)."""
    ports = set()
    for line in node_command(port, "CLUSTER", "NODES").splitlines():
        parts = line.split()
        if len(parts) > 1 and ":" in parts[1]:
            addr = parts[1].split("@", 1)[0]  # 127.0.0.1:7400@17400[,hostname]
            ports.add(int(addr.rsplit(":", 1)[1]))
    return ports


def formation(layout: Layout) -> str:
    """'formed' (every node knows exactly our nodes and all slots are assigned), 'fresh' (no node
    knows another or holds a slot: `redis-cli --cluster create` can run) or 'broken'."""
    ports = layout.redis_cluster_ports
    infos = {p: cluster_info(p) for p in ports}
    if all(int(i.get("cluster_known_nodes", 0)) == 1
           and int(i.get("cluster_slots_assigned", 0)) == 0 for i in infos.values()):
        return "fresh"
    if all(int(i.get("cluster_slots_assigned", 0)) == ALL_SLOTS for i in infos.values()) \
            and all(known_ports(p) == set(ports) for p in ports):
        return "formed"
    return "broken"


def is_ok(layout: Layout) -> bool:
    """Every node says cluster_state:ok, knows all nodes and sees all slots assigned."""
    n = len(layout.redis_cluster_ports)
    for port in layout.redis_cluster_ports:
        info = cluster_info(port)
        if info.get("cluster_state") != "ok":
            raise RuntimeError(f"node {port}: cluster_state:{info.get('cluster_state')}")
        if int(info.get("cluster_known_nodes", 0)) != n \
                or int(info.get("cluster_slots_assigned", 0)) != ALL_SLOTS:
            raise RuntimeError(f"node {port}: knows {info.get('cluster_known_nodes')} nodes, "
                               f"{info.get('cluster_slots_assigned')} slots assigned")
    return True


def reset(layout: Layout) -> None:
    """Forget a half-made cluster (an interrupted create, a node whose folder was removed):
    FLUSHALL and CLUSTER RESET HARD on every node. Scratch data only: this is a local stack."""
    for port in layout.redis_cluster_ports:
        node_command(port, "FLUSHALL")
        node_command(port, "CLUSTER", "RESET", "HARD")


def create(layout: Layout) -> None:
    """redis-cli --cluster create: one master per node, the 16384 slots split in three."""
    cli = shutil.which("redis-cli")
    if cli is None:
        raise DevstackError("redis-cli is not installed (Debian: apt-get install redis-tools)")
    run_checked([cli, "--cluster", "create",
                 *(f"127.0.0.1:{p}" for p in layout.redis_cluster_ports),
                 "--cluster-replicas", "0", "--cluster-yes"],
                "creating the Redis Cluster", log=create_log(layout), timeout=120)
