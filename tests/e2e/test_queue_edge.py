"""The waiting room through the edge, as a sale's first minute hits it: 5,000 signed-up fans join at
once, each with their own token, and every one gets a different number, with none missing; a crowd
polling the room's status costs the queue one call per second, however many poll."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from devstack.layout import Layout
from edge.config import CORE_CLUSTER, FRONT_ROUTES, ROUTES_DIR

from .conftest import Fan, crowd_client, sign_up, sign_up_many
from .test_catalog_edge import _iso, create_and_publish, event_json
from .test_sale_edge import _sale

pytestmark = pytest.mark.e2e

FANS = 5_000
# 64 joins in flight at the edge at once, a real race at the room's counter, over four pools of
# 16 connections: httpx's CPU per request grows with its pool (it matches every waiting request
# against every connection), about 3 ms at 16 connections and 8 ms at 64 on this machine, which
# would make the test's own client the slowest part of the mesh.
POOLS, POOL_CONNECTIONS = 4, 16
REJOINS = 500


async def _join_all(pools: list[httpx.AsyncClient], event: str, fans: list[Fan]) -> list[dict]:
    """Every fan POSTs queue:join at once (spread over the pools); their tickets, in order."""
    answers = await asyncio.gather(*(pools[i % len(pools)].post(
        f"/v1/{event}/queue:join", json={}, headers=f.auth) for i, f in enumerate(fans)))
    refused = [r for r in answers if r.status_code != 200]
    assert not refused, f"{len(refused)} joins refused, e.g. {refused[0].status_code} {refused[0].text}"
    return [r.json() for r in answers]


def _status_counting(http: httpx.Client, event: str, waiting: int, within: float = 5.0) -> dict:
    """The public room status (the edge's cached answer) once it counts `waiting` fans."""
    deadline = time.monotonic() + within
    while (status := http.get(f"/v1/{event}/queue").json())["waitingCount"] != str(waiting):
        assert time.monotonic() < deadline, f"the status never counted {waiting} waiting: {status}"
        time.sleep(0.3)
    return status


# About a minute on a quiet machine, mostly identity hashing 10,000 passwords; several on a busy one.
@pytest.mark.timeout(900)
async def test_5000_fans_join_at_once_through_the_edge(http: httpx.Client, admin: Fan, mesh: Layout):
    # The sale opens before anyone joins (numbers in join order, no lottery), and the paused room
    # admits nobody while the test looks.
    opens_at = time.time() + 3
    event = _sale(http, admin, opens_in=3, room={"paused": True})
    t0 = time.monotonic()
    fans = await sign_up_many(mesh, FANS)
    signed_up = time.monotonic() - t0
    assert len({f.id for f in fans}) == FANS
    await asyncio.sleep(max(0.0, opens_at - time.time()))

    async with contextlib.AsyncExitStack() as stack:
        pools = [await stack.enter_async_context(crowd_client(mesh.edge_url, POOL_CONNECTIONS))
                 for _ in range(POOLS)]
        t1 = time.monotonic()
        tickets = await _join_all(pools, event, fans)
        joined = time.monotonic() - t1
        numbers = [int(t["number"]) for t in tickets]
        assert sorted(numbers) == list(range(1, FANS + 1)), "a duplicate or a gap"
        assert all(t["state"] == "QUEUE_TICKET_STATE_WAITING" and int(t["position"]) == n
                   for t, n in zip(tickets, numbers, strict=True))

        # Fans who join again (at once, too) keep their place; so their own tickets say.
        picked = random.sample(range(FANS), REJOINS)
        again = await _join_all(pools, event, [fans[i] for i in picked])
        assert [int(t["number"]) for t in again] == [numbers[i] for i in picked]
        mine = await asyncio.gather(*(pools[0].get(f"/v1/{event}/queue/me", headers=fans[i].auth)
                                      for i in picked[:100]))
        assert [int(m.json()["number"]) for m in mine] == [numbers[i] for i in picked[:100]]

    status = _status_counting(http, event, FANS)
    assert (status["servingNumber"], status["activeCount"], status["paused"]) == ("0", "0", True)
    print(f"\n{FANS} fans signed up in {signed_up:.1f}s; {FANS} joins at once through the edge in "
          f"{joined:.1f}s ({FANS / joined:.0f}/s)")


async def _core_log_mark(client: httpx.AsyncClient, lay: Layout, path: str) -> int:
    """Send `path` with a marker past both caches; once the edge's core has logged it, the
    size of that log: every call that reached the core before it is logged before it."""
    mark = f"{path}?mark={uuid.uuid4().hex}"
    assert (await client.get(mark, headers={"cache-control": "no-cache"})).status_code == 200
    log = lay.logs_dir / f"{CORE_CLUSTER}-access.log"
    deadline = time.monotonic() + 15  # Envoy writes its access log out about every second
    while (at := (data := log.read_bytes()).find(f'"{mark}"'.encode())) < 0:
        assert time.monotonic() < deadline, "the core never logged the marker"
        await asyncio.sleep(0.2)
    return data.index(b"\n", at) + 1


def _core_calls(lay: Layout, path: str, start: int, end: int) -> int:
    """Calls for exactly `path` that reached the edge's core, logged between two marks."""
    with (lay.logs_dir / f"{CORE_CLUSTER}-access.log").open("rb") as log:
        log.seek(start)
        lines = log.read(end - start).splitlines()
    return sum(json.loads(line)["path"] == path for line in lines if line.strip())


async def _burst(conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]], request: bytes) -> set[int]:
    """The same GET on every connection within a millisecond (httpx would spread them over
    tens); the status codes answered."""
    for _, writer in conns:
        writer.write(request)

    async def answer(reader: asyncio.StreamReader) -> int:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
        length = int(head.split("content-length:")[1].split("\r\n")[0])
        await reader.readexactly(length)
        return int(head.split()[1])

    return set(await asyncio.gather(*(answer(r) for r, _ in conns)))


def _unopened_room(http: httpx.Client, admin: Fan) -> str:
    """A published event whose waiting room opens in an hour: its status is there (200), and the
    edge's feed leaves it out (the cache answers it)."""
    now = datetime.now(UTC)
    body = event_json(queueOpenTime=_iso(now + timedelta(hours=1)),
                      saleOpenTime=_iso(now + timedelta(hours=2)))
    name = create_and_publish(http, admin, body)["name"]
    deadline = time.monotonic() + 15
    while http.get(f"/v1/{name}/queue").status_code != 200:
        assert time.monotonic() < deadline, "the waiting room never learned of the event"
        time.sleep(0.2)
    return str(name)


async def test_a_crowd_polling_the_status_costs_the_queue_one_call_per_answer(
        http: httpx.Client, admin: Fan, mesh: Layout):
    """A cached answer expires for every poller at the same moment. The pollers' next requests
    all miss at once, and the edge still sends the queue one call for them, not one each. (An
    open room's status is Envoy's own answer, edge/feed.py: the cache serves the others.)"""
    event = _unopened_room(http, admin)
    path = f"/v1/{event}/queue"
    request = f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n".encode()
    pollers, bursts = 50, 3
    conns = [await asyncio.open_connection("127.0.0.1", mesh.edge_port) for _ in range(pollers)]
    marker = httpx.AsyncClient(base_url=mesh.edge_url, timeout=15)
    try:
        assert await _burst(conns, request) == {200}  # the answer is cached now
        start = await _core_log_mark(marker, mesh, path)
        for _ in range(bursts):
            # max-age=1, counted in whole seconds from the answer's Date: stale within 2 s.
            await asyncio.sleep(2.1)
            assert await _burst(conns, request) == {200}
        end = await _core_log_mark(marker, mesh, path)
    finally:
        await marker.aclose()
        for _, writer in conns:
            writer.close()
    calls = _core_calls(mesh, path, start, end)
    assert 1 <= calls <= bursts, f"{pollers} pollers missing at once made {calls} calls in {bursts} bursts"


def _direct_answers(lay: Layout) -> int:
    stats = httpx.get(f"http://127.0.0.1:{lay.envoy_admin_port}/stats?filter=^http.edge.rq_direct_response$",
                      timeout=5).text
    return int(stats.split(":")[1])


def _fed(lay: Layout, path: str) -> bool:
    return f'"{path}"' in (lay.run_dir / ROUTES_DIR / FRONT_ROUTES).read_text()


def test_an_open_room_s_status_is_envoy_s_own_answer_and_follows_the_room(
        http: httpx.Client, admin: Fan, mesh: Layout):
    event = _sale(http, admin, opens_in=2, room={"paused": True})
    path = f"/v1/{event}/queue"
    fan = sign_up(http)
    assert http.post(f"{path}:join", json={}, headers=fan.auth).status_code == 200
    deadline = time.monotonic() + 5  # the feed asks the queue once a second
    while not _fed(mesh, path):
        assert time.monotonic() < deadline, "the feed never took the open room"
        time.sleep(0.1)
    _status_counting(http, event, 1)

    before = _direct_answers(mesh)
    polls = [http.get(path) for _ in range(20)]
    assert _direct_answers(mesh) - before >= 20, "the polls were not answered by Envoy itself"
    assert {(r.status_code, r.headers["content-type"], r.headers["cache-control"]) for r in polls} == {
        (200, "application/json", "public, max-age=1")}
    # Byte for byte what the queue's answer is once transcoded (a fresh read goes to the queue),
    # and a fan with a token still reaches the queue too.
    fresh = http.get(path, headers={"cache-control": "no-cache"})
    assert fresh.status_code == 200 and polls[-1].content == fresh.content
    mine = http.get(path, headers=fan.auth)
    assert mine.status_code == 200 and mine.json() == fresh.json()

    # An admin's change shows in the fed answer within a second or so.
    changed = http.patch(path, params={"updateMask": "admitRatePerSecond"},
                         json={"admitRatePerSecond": 7.5}, headers=admin.auth)
    assert changed.status_code == 200, changed.text
    t0 = time.monotonic()
    while http.get(path).json()["admitRatePerSecond"] != 7.5:
        assert time.monotonic() - t0 < 2.5, "the fed status never showed the admin's change"
        time.sleep(0.05)
