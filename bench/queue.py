"""The waiting room under load: status polls, joins and queue/me through the edge.

The status of an open room is answered by Envoy from its route table (edge/feed.py), that of a
room the feed leaves out from the edge's cache (queue_status_unfed).

Beside each figure: Envoy answering the same body itself (the edge's ceiling) and
redis-benchmark running a script of the same shape as a join (Redis's ceiling), in the same run.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import redis
from google.protobuf import json_format

from devstack.layout import Layout
from edge.config import FRONT_ROUTES, ROUTES_DIR

from . import wrk
from .baseline import direct_envoy

# The shape of a join: read the fan's ticket, take a number, write the ticket, count it; one
# hash tag. (The real script also checks the room's config and state: more reads, same slot.)
JOIN_SHAPE = (
    "local s = redis.call('HGET', KEYS[2], 's') "
    "if s then return s end "
    "local n = redis.call('HINCRBY', KEYS[1], 'seq', 1) "
    "redis.call('HSET', KEYS[2], 's', 'W', 'n', n) "
    "redis.call('HINCRBY', KEYS[1], 'joined', 1) return n"
)


async def _fans(edge: str, n: int) -> list[str]:
    """n new fans signed up and logged in through the edge; their access tokens."""
    sem = asyncio.Semaphore(16)
    stamp = time.strftime("%H%M%S")

    async def one(client: httpx.AsyncClient, i: int) -> str:
        email, password = f"bench-{stamp}-{i}@example.com", "bench fan password"
        async with sem:
            created = await client.post("/v1/users", json={"email": email, "password": password,
                                                           "displayName": f"Fan {i}"})
            created.raise_for_status()
            session = await client.post("/v1/sessions", json={"email": email, "password": password})
            session.raise_for_status()
            return str(session.json()["accessToken"])

    async with httpx.AsyncClient(base_url=edge, timeout=30) as client:
        return list(await asyncio.gather(*(one(client, i) for i in range(n))))


def _event(edge: str, admin_auth: dict[str, str], opens_in: timedelta = timedelta(0)) -> str:
    """A published event whose room is open and whose sale opened: joins queue FIFO. With
    ``opens_in``, a room that opens that much later (the edge's feed leaves it out)."""
    from svc_catalog.demo import demo_event

    now = datetime.now(UTC)
    body = json_format.MessageToDict(demo_event(now))
    body.update(title=f"Bench Queue {time.strftime('%H%M%S')}",
                queueOpenTime=(now + opens_in).strftime("%Y-%m-%dT%H:%M:%SZ"),
                saleOpenTime=(now + opens_in + timedelta(seconds=2)).strftime("%Y-%m-%dT%H:%M:%SZ"))
    with httpx.Client(base_url=edge, timeout=15) as http:
        created = http.post("/v1/events", json=body, headers=admin_auth)
        created.raise_for_status()
        name = str(created.json()["name"])
        http.post(f"/v1/{name}:publish", json={}, headers=admin_auth).raise_for_status()
        deadline = time.monotonic() + 20
        while http.get(f"/v1/{name}/queue").status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("the waiting room never learned of the bench event")
            time.sleep(0.2)
    if not opens_in:
        time.sleep(2.5)  # past the sale's opening
    return name


def redis_benchmark(lay: Layout, seconds: int, connections: int, *,
                    name: str = "redis-benchmark, join-shaped script",
                    command: tuple[str, ...] = ("EVAL", JOIN_SHAPE, "2", "{q:bench}:st",
                                                "{q:bench}:u:__rand_int__"),
                    keyspace: int = 1_000_000, leaves: str | None = "{q:bench}:*") -> wrk.Result:
    """redis-benchmark sending `command` (a script: EVAL or EVALSHA) to the stack's Redis; every
    __rand_int__ in it is a random number below `keyspace`, drawn anew for each request.

    `leaves`: the pattern of the keys the command writes, deleted afterwards (None: the caller
    does). The join-shaped run left up to a million keys behind, without a TTL, in the stack's
    Redis on every `make bench`: the dataset grew with every run, and so did every AOF rewrite (a
    fork copying the whole dataset, which the run's own writes set off)."""
    tool = shutil.which("redis-benchmark")
    if tool is None:
        raise RuntimeError("redis-benchmark is missing (Debian package redis-tools)")
    requests = 40_000 * seconds
    try:
        out = subprocess.run(
            [tool, "-p", str(lay.redis_port), "-c", str(connections), "-n", str(requests),
             "-r", str(keyspace), "-q", *command],
            capture_output=True, text=True, timeout=seconds * 20 + 60, check=True,
        ).stdout
    finally:
        if leaves is not None:
            drop_keys(lay, leaves)
    rps = float(re.findall(r"([\d.]+) requests per second", out)[-1])
    p50 = re.findall(r"p50=([\d.]+) msec", out)
    return wrk.Result(name, rps, float(p50[-1]) if p50 else float("nan"), float("nan"), requests, 0, 0)


def drop_keys(lay: Layout, pattern: str) -> int:
    """Delete the stack's Redis keys matching `pattern` (a scan, a thousand at a time)."""
    r = redis.Redis.from_url(lay.redis_url)
    dropped = 0
    try:
        batch: list[bytes] = []
        for key in r.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) == 1000:
                dropped += r.unlink(*batch)
                batch.clear()
        if batch:
            dropped += r.unlink(*batch)
    finally:
        r.close()
    return dropped


def rewrite_aof(lay: Layout, timeout: float = 120.0) -> float:
    """Have the stack's Redis rewrite its append-only file now, and wait for it; the seconds it
    took.

    Redis rewrites the file by itself once it has doubled since the last rewrite: a fork of the
    whole dataset, whose copy is written out and synced. The scenarios before the purchases
    (redis-benchmark's 200,000 scripts above all) grow it by tens of megabytes, so on a stack
    that has run a few benches that rewrite came due at about the same point of every
    `make bench`: in the warm-up or the first measured sale (6 of 12 runs in a row on a test
    stack whose Redis held 250 MB; 1-2 s of a forked process writing the file out), which then
    paid for the scenarios before it. Done here, the sales start from a file just rewritten,
    which they grow by about 4 MB each, far from the next rewrite."""
    r = redis.Redis.from_url(lay.redis_url)
    t0 = time.monotonic()
    try:
        done = int(r.info("persistence").get("aof_rewrites", 0))
        try:
            r.bgrewriteaof()
        except redis.ResponseError:  # one in progress already: it is the one waited for
            done -= 1
        while time.monotonic() - t0 < timeout:
            info = r.info("persistence")
            if (int(info.get("aof_rewrites", 0)) > done and not info.get("aof_rewrite_in_progress")
                    and not info.get("aof_rewrite_scheduled")):
                if info.get("aof_last_bgrewrite_status") != "ok":
                    raise RuntimeError("Redis's AOF rewrite failed (see its log)")
                return time.monotonic() - t0
            time.sleep(0.1)
        raise RuntimeError(f"Redis's AOF rewrite did not finish within {timeout:g}s")
    finally:
        r.close()


def status_rounds(lay: Layout, event: str, base: str, body: str, rounds: int,
                  run: dict[str, Any], unopened: str) -> list[tuple[wrk.Result, wrk.Result | None]]:
    """Envoy's direct answer, then the open room's status (edge/feed.py: Envoy answers it from
    its route table), back to back, `rounds` times: on a shared 2-core machine one pair's ratio
    swings by a tenth either way, so every pair is kept and the spread is there to read. Last,
    a room the feed leaves out (not open yet), answered by the edge's cache."""
    rows: list[tuple[wrk.Result, wrk.Result | None]] = []
    for i in range(1, rounds + 1):
        ceiling = wrk.run(f"queue_direct #{i} ({len(body)} B, Envoy)", f"{base}/status", **run)
        rows.append((ceiling, None))
        rows.append((wrk.run(f"queue_status #{i} (edge, fed)", f"{lay.edge_url}/v1/{event}/queue",
                             **run), ceiling))
    rows.append((wrk.run("queue_status_unfed (edge cache)", f"{lay.edge_url}/v1/{unopened}/queue",
                         **run), rows[-1][1]))
    return rows


def _wait_fed(lay: Layout, path: str, within: float = 10.0) -> None:
    """Until the edge's feed answers ``path`` itself (its route table names it)."""
    front = lay.run_dir / ROUTES_DIR / FRONT_ROUTES
    deadline = time.monotonic() + within
    while f'"{path}"' not in front.read_text():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the edge's feed never took {path} (is edge-feed running?)")
        time.sleep(0.2)


async def _join(edge: str, event: str, tokens: list[str]) -> None:
    """Every fan joins once: a sale's room has its fans waiting while they poll."""
    async with httpx.AsyncClient(base_url=edge, timeout=30) as client:
        for chunk in range(0, len(tokens), 50):
            replies = await asyncio.gather(*(
                client.post(f"/v1/{event}/queue:join", json={}, headers={"authorization": f"Bearer {t}"})
                for t in tokens[chunk:chunk + 50]))
            for r in replies:
                r.raise_for_status()


def measure(lay: Layout, admin_auth: dict[str, str], seconds: int, connections: int,
            fans: int = 200, rounds: int = 3) -> list[tuple[wrk.Result, wrk.Result | None]]:
    run: dict[str, Any] = {"seconds": seconds, "connections": connections}
    edge = lay.edge_url
    event = _event(edge, admin_auth)
    unopened = _event(edge, admin_auth, opens_in=timedelta(hours=1))
    tokens = asyncio.run(_fans(edge, fans))
    # The room admits nobody while the bench looks: its fans wait, as a sale's crowd does while
    # it polls the status (and the feed ranks rooms by the fans waiting or active in them).
    httpx.patch(f"{edge}/v1/{event}/queue", params={"updateMask": "paused"}, json={"paused": True},
                headers=admin_auth, timeout=10).raise_for_status()
    asyncio.run(_join(edge, event, tokens))
    _wait_fed(lay, f"/v1/{event}/queue")
    status_body = httpx.get(f"{edge}/v1/{event}/queue", timeout=10).text
    rows: list[tuple[wrk.Result, wrk.Result | None]] = []
    with tempfile.TemporaryDirectory() as tmp:
        token_file = Path(tmp) / "tokens"
        token_file.write_text("".join(f"Bearer {t}\n" for t in tokens))
        rotate = ("authorization", token_file)
        with direct_envoy(lay, {"/status": ("application/json", status_body)}) as base:
            rows += status_rounds(lay, event, base, status_body, rounds, run, unopened)
            ceiling = rows[-1][1]
            joins = wrk.run(f"queue_join ({fans} fans, POST)", f"{edge}/v1/{event}/queue:join",
                            method="POST", body="{}", rotate=rotate, **run)
            rows.append((joins, ceiling))
            rows.append((wrk.run(f"queue_me ({fans} fans)", f"{edge}/v1/{event}/queue/me",
                                 rotate=rotate, **run), ceiling))
    rows.append((redis_benchmark(lay, seconds, connections), None))
    rows.append((wrk.Result("queue_join vs Redis alone", joins.requests_per_second, joins.p50_ms,
                            joins.p99_ms, joins.requests, joins.non_2xx, joins.errors), rows[-1][0]))
    return rows
