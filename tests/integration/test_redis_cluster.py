"""The same Redis code on a single node and on a Redis Cluster (three masters, no replicas).

What matters to the services: ``meshkit.redis.connect(url, cluster=True)`` reaches every master,
and the queue's Lua script runs unchanged on both because all its keys share one hash tag
(``{q:<event>}``) that contains the event id: each event's keys live in one slot, and different
events spread over the masters. A script whose keys span two tags is refused by the cluster.

Where a key lives is checked against the servers themselves: ``CLUSTER KEYSLOT`` and
``CLUSTER SLOTS`` name the owning node, a plain (non-cluster) connection to that node reads the
key, and the other nodes answer MOVED.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import time
import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import redis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import (
    ClusterCrossSlotError,
    MovedError,
    RedisClusterException,
)

from devstack import redis_cluster, stack
from devstack.layout import REDIS_CLUSTER_BUS_SHIFT, ROOT, Layout, layout
from devstack.proc import port_owner, running_pid, strays
from meshkit.redis import AnyRedis, close, connect

pytestmark = pytest.mark.integration

# Take the next number in an event's queue: atomic, because a script runs alone on its node.
TAKE_TICKET = """
local n = redis.call('INCR', KEYS[1])
redis.call('ZADD', KEYS[2], n, ARGV[1])
return n
"""


def queue_keys(event: str) -> list[str]:
    return [f"{{q:{event}}}:seq", f"{{q:{event}}}:waiting"]


def new_event() -> str:
    return f"evt-{uuid.uuid4().hex[:12]}"


@pytest_asyncio.fixture(loop_scope="session")
async def cluster(redis_cluster_url: str) -> AsyncIterator[AnyRedis]:
    client = await connect(redis_cluster_url, cluster=True)
    assert isinstance(client, RedisCluster)
    yield client
    await close(client)


@pytest_asyncio.fixture(loop_scope="session")
async def single(redis_url: str) -> AsyncIterator[AnyRedis]:
    client = await connect(redis_url)
    assert isinstance(client, Redis)
    yield client
    await close(client)


class Topology:
    """The servers' own view: which node owns a slot (CLUSTER SLOTS), a key's slot (CLUSTER
    KEYSLOT), and plain one-node connections that do not follow redirections."""

    def __init__(self, ports: tuple[int, ...]) -> None:
        self.ports = ports
        self.plain = {p: Redis(host="127.0.0.1", port=p) for p in ports}
        self.ranges: list[tuple[int, int, int]] = []

    async def load(self) -> Topology:
        raw = await self.plain[self.ports[0]].execute_command("CLUSTER", "SLOTS")
        self.ranges = sorted((int(r[0]), int(r[1]), int(r[2][1])) for r in raw)
        return self

    async def slot(self, key: str) -> int:
        return int(await self.plain[self.ports[0]].execute_command("CLUSTER", "KEYSLOT", key))

    def owner(self, slot: int) -> int:
        (port,) = [p for lo, hi, p in self.ranges if lo <= slot <= hi]
        return port

    async def owner_of(self, key: str) -> int:
        return self.owner(await self.slot(key))

    async def aclose(self) -> None:
        for client in self.plain.values():
            await client.aclose()


@pytest_asyncio.fixture(loop_scope="session")
async def topo(redis_cluster_url: str, lay: Layout) -> AsyncIterator[Topology]:
    t = await Topology(lay.redis_cluster_ports).load()
    yield t
    await t.aclose()


# --- the devstack side -----------------------------------------------------------------------

def test_the_cluster_is_formed_and_a_second_ensure_keeps_it(redis_cluster_url: str,
                                                             lay: Layout) -> None:
    assert redis_cluster_url == f"redis://127.0.0.1:{lay.redis_cluster_ports[0]}/0"
    pids = {p: running_pid(lay.run_dir, redis_cluster.node_name(p)) for p in lay.redis_cluster_ports}
    assert all(pids.values()), pids
    ids = {p: redis_cluster.node_command(p, "CLUSTER", "MYID") for p in lay.redis_cluster_ports}
    for port in lay.redis_cluster_ports:
        info = redis_cluster.cluster_info(port)
        assert (info["cluster_state"], info["cluster_known_nodes"], info["cluster_size"],
                info["cluster_slots_assigned"]) == ("ok", "3", "3", "16384"), (port, info)
        node = redis.Redis(host="127.0.0.1", port=port)
        try:
            assert node.config_get("appendonly") == {"appendonly": "yes"}
            assert node.config_get("bind") == {"bind": "127.0.0.1"}
            assert node.config_get("dir")["dir"] == str(lay.run_dir / "redis-cluster" / str(port))
        finally:
            node.close()

    started = time.monotonic()
    assert stack.ensure_redis_cluster(lay) == redis_cluster_url
    assert time.monotonic() - started < 5
    assert {p: running_pid(lay.run_dir, redis_cluster.node_name(p))
            for p in lay.redis_cluster_ports} == pids
    assert {p: redis_cluster.node_command(p, "CLUSTER", "MYID")
            for p in lay.redis_cluster_ports} == ids  # not created again


def test_restart_keeps_data_and_down_leaves_nothing() -> None:
    """On a scratch copy (own folder, cluster on test ports + 3000): a cold start creates the
    cluster; after `down` the nodes come back from nodes.conf and the AOF without a new create;
    `down` leaves no process, pid file or port behind."""
    base = layout("test")
    lay = dataclasses.replace(base, run_dir=ROOT / ".run" / "test-redis-cluster",
                              redis_port=base.redis_port + 3000)
    stack.down(lay)  # whatever a crashed earlier run left
    shutil.rmtree(lay.run_dir, ignore_errors=True)  # a cold start: redis-cli --cluster create
    url = stack.ensure_redis_cluster(lay)
    ids = {p: redis_cluster.node_command(p, "CLUSTER", "MYID") for p in lay.redis_cluster_ports}
    client = redis.RedisCluster.from_url(url)
    key = f"devstack:survives:{uuid.uuid4().hex}"
    client.set(key, "yes")
    client.close()
    ours = strays(lay.run_dir)
    assert len(ours) == 3, ours

    stopped = stack.down(lay)
    assert sorted(stopped) == sorted(redis_cluster.node_name(p) for p in lay.redis_cluster_ports)
    assert not strays(lay.run_dir)

    assert stack.ensure_redis_cluster(lay) == url
    assert {p: redis_cluster.node_command(p, "CLUSTER", "MYID") for p in lay.redis_cluster_ports} == ids
    client = redis.RedisCluster.from_url(url)
    assert client.get(key) == b"yes"
    client.close()

    stack.down(lay)
    assert not strays(lay.run_dir)
    assert not list(lay.pids_dir.glob("*.pid"))
    ports = [*lay.redis_cluster_ports, *(p + REDIS_CLUSTER_BUS_SHIFT for p in lay.redis_cluster_ports)]
    assert [port_owner(p) for p in ports] == [None] * 6
    shutil.rmtree(lay.run_dir, ignore_errors=True)


# --- (a) one client, three masters -----------------------------------------------------------

async def test_connect_reaches_all_three_masters(cluster: RedisCluster, topo: Topology) -> None:
    assert sorted(n.port for n in cluster.get_primaries()) == sorted(topo.ports)
    assert sorted(p for _, _, p in topo.ranges) == sorted(topo.ports)  # one slot range each

    run = uuid.uuid4().hex[:8]
    by_node: dict[int, list[str]] = {p: [] for p in topo.ports}
    i = 0
    while min(len(keys) for keys in by_node.values()) < 2:  # two keys on every master
        key = f"tp:rc:{run}:{i}"
        by_node[await topo.owner_of(key)].append(key)
        i += 1
        assert i < 500
    keys = {k: owner for owner, ks in by_node.items() for k in ks}

    for k in keys:
        assert await cluster.set(k, f"v-{k}", ex=300)
    for k, owner in keys.items():
        assert await cluster.get(k) == f"v-{k}".encode()
        # The value really is on the owning master, and only there.
        assert await topo.plain[owner].get(k) == f"v-{k}".encode()
        other = next(p for p in topo.ports if p != owner)
        with pytest.raises(MovedError) as moved:  # the server's "MOVED <slot> <host:port>"
            await topo.plain[other].get(k)
        assert (moved.value.slot_id, moved.value.port) == (await topo.slot(k), owner)
    assert set(keys.values()) == set(topo.ports)
    await cluster.delete(*keys)  # one DEL per slot: the client splits multi-slot DEL


# --- (b) one script, single node and cluster -------------------------------------------------

async def test_the_same_script_runs_on_a_single_node_and_on_the_cluster(
        single: Redis, cluster: RedisCluster, topo: Topology) -> None:
    event = new_event()
    keys = queue_keys(event)
    assert await topo.slot(keys[0]) == await topo.slot(keys[1])  # one hash tag, one slot

    replies = {}
    for name, client in (("single", single), ("cluster", cluster)):
        take = client.register_script(TAKE_TICKET)
        numbers = [await take(keys=keys, args=[f"user-{i}"]) for i in range(3)]
        waiting = await client.zrange(keys[1], 0, -1, withscores=True)
        replies[name] = (take.sha, numbers, waiting)
        await client.delete(*keys)
    assert replies["single"] == replies["cluster"]
    assert replies["cluster"][1:] == ([1, 2, 3], [(b"user-0", 1.0), (b"user-1", 2.0),
                                                  (b"user-2", 3.0)])


# --- (c) events spread over the masters ------------------------------------------------------

async def test_fifty_events_spread_over_the_masters(cluster: RedisCluster,
                                                    topo: Topology) -> None:
    take = cluster.register_script(TAKE_TICKET)
    events = [new_event() for _ in range(50)]
    owners: dict[str, int] = {}
    for event in events:
        seq, waiting = queue_keys(event)
        assert await take(keys=[seq, waiting], args=["first"]) == 1
        slot = await topo.slot(seq)
        assert await topo.slot(waiting) == slot
        owners[event] = topo.owner(slot)
        assert await topo.plain[owners[event]].get(seq) == b"1"  # written where CLUSTER SLOTS says
    per_node = {p: sum(1 for o in owners.values() if o == p) for p in topo.ports}
    assert sum(1 for n in per_node.values() if n) >= 2, per_node
    assert len({await topo.slot(queue_keys(e)[0]) for e in events}) > 40  # no hot slot

    # The counter-example: a tag without the event id puts every event in one slot.
    assert len({await topo.slot(f"{{q}}:{e}:seq") for e in events}) == 1
    for event in events:
        await cluster.delete(*queue_keys(event))


# --- (d) two hash tags in one script ---------------------------------------------------------

async def test_a_script_across_two_hash_tags_is_refused(
        single: Redis, cluster: RedisCluster, topo: Topology) -> None:
    a, b = new_event(), new_event()
    while await topo.slot(queue_keys(b)[1]) == await topo.slot(queue_keys(a)[0]):
        b = new_event()
    keys = [queue_keys(a)[0], queue_keys(b)[1]]  # {q:a}:seq with {q:b}:waiting

    # A single node runs it: the mistake would only show in production, on the cluster.
    assert await single.register_script(TAKE_TICKET)(keys=keys, args=["x"]) == 1
    await single.delete(*keys)

    # The cluster client refuses before sending ...
    with pytest.raises(RedisClusterException, match="same key slot"):
        await cluster.register_script(TAKE_TICKET)(keys=keys, args=["x"])
    # ... and so does the server itself, on whichever node receives it.
    for port in (await topo.owner_of(keys[0]), await topo.owner_of(keys[1])):
        with pytest.raises(ClusterCrossSlotError):  # the server's "CROSSSLOT Keys in request ..."
            await topo.plain[port].eval(TAKE_TICKET, 2, *keys, "x")
    assert [await cluster.exists(k) for k in keys] == [0, 0]  # nothing was written


# --- (e) atomic under concurrency ------------------------------------------------------------

async def test_a_thousand_concurrent_takes_give_one_to_a_thousand(
        redis_cluster_url: str, topo: Topology) -> None:
    # meshkit raises redis-py's default of 100 connections per node (which raises
    # MaxConnectionsError past it): all 1000 calls may be in flight at once.
    client = await connect(redis_cluster_url, cluster=True)
    try:
        event = new_event()
        seq, waiting = queue_keys(event)
        take = client.register_script(TAKE_TICKET)
        await client.script_load(TAKE_TICKET)  # warm the cache so no call races a NOSCRIPT
        users = [f"user-{i:04d}" for i in range(1000)]
        numbers = await asyncio.gather(*(take(keys=[seq, waiting], args=[u]) for u in users))

        assert sorted(numbers) == list(range(1, 1001))  # no duplicate, no gap
        assert await client.get(seq) == b"1000"
        ranked = await client.zrange(waiting, 0, -1, withscores=True)
        assert [int(score) for _, score in ranked] == list(range(1, 1001))
        assert {m.decode(): int(s) for m, s in ranked} == dict(zip(users, numbers, strict=True))
        owner = await topo.owner_of(seq)
        assert await topo.plain[owner].zcard(waiting) == 1000  # all in the one slot's master
        await client.delete(seq, waiting)
    finally:
        await close(client)


async def test_the_default_cluster_client_takes_a_thousand_calls_in_flight(
        cluster: RedisCluster) -> None:
    event = new_event()
    take = cluster.register_script(TAKE_TICKET)
    try:
        replies = await asyncio.gather(*(take(keys=queue_keys(event), args=[f"u{i}"])
                                         for i in range(1000)), return_exceptions=True)
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
        assert sorted(replies) == list(range(1, 1001))
    finally:
        await cluster.delete(*queue_keys(event))


async def test_a_burst_past_the_single_node_pool_waits_for_a_connection(single: Redis) -> None:
    # redis-py's default asyncio pool raises MaxConnectionsError past its 100 connections: under a
    # burst (booking's 1,000-fan race) a hold now and then failed with INTERNAL. meshkit's pool
    # makes the calls past its size wait for a connection instead.
    burst = single.connection_pool.max_connections + 100
    empty = f"empty-{uuid.uuid4().hex}"
    replies = await asyncio.gather(*(single.blpop([empty], timeout=0.2) for _ in range(burst)))
    assert replies == [None] * burst  # each held a connection for 0.2 s, none was refused
