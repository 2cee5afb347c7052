"""Holds through the edge under contention, beside Redis running the hold script alone.

  booking_hold            POST /v1/events/{event}/holds through the edge: wrk rotates the admitted
                          fans' user token and admission token, each request two adjacent seats
                          at random in the front rows (section A, 200 seats) of one event. Every
                          answer counts: 200 won, 409 SEAT_UNAVAILABLE (contention, answered: not
                          an error), 429 over the fan's seat limit; anything else is an error
  booking_hold_won        the 200s per second, and
  booking_hold_contended  the 409s per second, reported apart
  redis_hold_script       redis-benchmark running booking's own hold script (EVALSHA of
                          svc_booking/adapters/lua/hold.lua) on an inventory of the same 200
                          seats, random fans and seats, two per hold: Redis's ceiling
  booking_hold vs Redis alone   the ratio, in the same run
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from devstack.layout import Layout
from svc_booking.adapters import inventory as inv

from . import queue as queue_bench
from . import wrk

ROWS, PER_ROW = 10, 20  # the demo event's section A: the front rows every fan wants

# Two adjacent seats at random in the front rows, and a fresh request id (a UUID) each time.
PICK_TWO_ADJACENT = f"""
math.randomseed(os.time() + math.floor(os.clock() * 1000000))
local function uuid4()
  return (string.gsub("xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx", "[xy]", function(c)
    return string.format("%x", c == "x" and math.random(0, 15) or math.random(8, 11))
  end))
end
function body()
  local row, n = math.random(1, {ROWS}), math.random(1, {PER_ROW - 1})
  return string.format('{{"seatIds":["A-%d-%d","A-%d-%d"],"requestId":"%s"}}',
                       row, n, row, n + 1, uuid4())
end
"""


async def _admitted(edge: str, event: str, tokens: list[str], within: float = 60.0) -> list[str]:
    """Each fan joins the room and reads queue/me until ACTIVE; their admission tokens."""
    sem = asyncio.Semaphore(32)

    async def one(client: httpx.AsyncClient, token: str) -> str:
        auth = {"authorization": f"Bearer {token}"}
        async with sem:
            (await client.post(f"/v1/{event}/queue:join", json={}, headers=auth)).raise_for_status()
        deadline = time.monotonic() + within
        while True:
            async with sem:
                me = await client.get(f"/v1/{event}/queue/me", headers=auth)
            me.raise_for_status()
            ticket = me.json()
            if ticket["state"].endswith("ACTIVE"):
                return str(ticket["admissionToken"])
            if time.monotonic() > deadline:
                raise RuntimeError(f"a bench fan was never admitted: {ticket}")
            await asyncio.sleep(0.2)

    async with httpx.AsyncClient(base_url=edge, timeout=30) as client:
        return list(await asyncio.gather(*(one(client, t) for t in tokens)))


def _open_the_room(edge: str, event: str, admin_auth: dict[str, str], fans: int) -> None:
    """Let every bench fan in at once (the room is not what this measures)."""
    room = {"maxActive": max(fans, 1000), "admitRatePerSecond": 1000}
    httpx.patch(f"{edge}/v1/{event}/queue", params={"updateMask": ",".join(room)}, json=room,
                headers=admin_auth, timeout=15).raise_for_status()


def _redis_hold_script(lay: Layout, seconds: int, connections: int) -> wrk.Result:
    """redis-benchmark on booking's hold script, on an inventory of its own ({inv:bench-<t>})
    as many seats as the edge run's front rows, dropped afterwards."""
    event = f"bench-{time.strftime('%H%M%S')}"
    seats = ROWS * PER_ROW
    r = redis.Redis.from_url(lay.redis_url)
    try:
        sha = r.script_load((inv.LUA / "hold.lua").read_text())
        r.hset(inv.meta_key(event), mapping={"limit": 4, "built": int(time.time() * 1000), "stamp": ""})
        r.hset(inv.seats_key(event), mapping={f"s{n:012d}": "A" for n in range(seats)})
        now_ms = int(time.time() * 1000)
        keys = (inv.meta_key(event), inv.seats_key(event), inv.deadlines_key(event),
                inv.fans_key(event), inv.request_key(event, "u__rand_int__", "__rand_int__"),
                inv.hold_key(event, "__rand_int__"), inv.runs_key(event))
        args = ("u__rand_int__", "__rand_int__", str(now_ms), str(now_ms + 300_000), "600000",
                "s__rand_int__", "s__rand_int__")
        return queue_bench.redis_benchmark(
            lay, seconds, connections, name=f"redis_hold_script ({seats} seats)",
            command=("EVALSHA", sha, str(len(keys)), *keys, *args), keyspace=seats, leaves=None)
    finally:
        r.close()
        queue_bench.drop_keys(lay, inv.meta_key(event).replace(":meta", "*"))


def _per_status(result: wrk.Result, name: str, status: int) -> wrk.Result:
    """The share of `result`'s answers with this status, as a figure of its own."""
    share = result.statuses.get(status, 0) / result.requests if result.requests else 0.0
    return wrk.Result(name, result.requests_per_second * share, result.p50_ms, result.p99_ms,
                      result.statuses.get(status, 0), 0, 0)


def measure(lay: Layout, admin_auth: dict[str, str], seconds: int, connections: int,
            fans: int = 200) -> list[tuple[wrk.Result, wrk.Result | None]]:
    run: dict[str, Any] = {"seconds": seconds, "connections": connections}
    edge = lay.edge_url
    event = queue_bench._event(edge, admin_auth)
    _open_the_room(edge, event, admin_auth, fans)
    tokens = asyncio.run(queue_bench._fans(edge, fans))
    admissions = asyncio.run(_admitted(edge, event, tokens))
    rows: list[tuple[wrk.Result, wrk.Result | None]] = []
    with tempfile.TemporaryDirectory() as tmp:
        pairs = Path(tmp) / "fans"
        pairs.write_text("".join(f"Bearer {t}\t{a}\n" for t, a in zip(tokens, admissions, strict=True)))
        holds = wrk.run(f"booking_hold ({fans} fans, {ROWS * PER_ROW} seats)", f"{edge}/v1/{event}/holds",
                        method="POST", headers={"content-type": "application/json"},
                        rotate=(("authorization", "x-admission-token"), pairs),
                        body_script=PICK_TWO_ADJACENT, count_statuses=True, **run)
    # 409 (seat taken) and 429 (fan's limit) are answers under contention, not failures.
    holds.non_2xx -= holds.statuses.get(409, 0) + holds.statuses.get(429, 0)
    rows.append((holds, None))
    rows.append((_per_status(holds, "booking_hold_won (200)", 200), holds))
    rows.append((_per_status(holds, "booking_hold_contended (409)", 409), holds))
    alone = _redis_hold_script(lay, seconds, connections)
    rows.append((alone, None))
    rows.append((wrk.Result("booking_hold vs Redis alone", holds.requests_per_second, holds.p50_ms,
                            holds.p99_ms, holds.requests, holds.non_2xx, holds.errors), alone))
    return rows
