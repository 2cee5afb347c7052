"""`make bench`: start the mesh (test profile), measure, print figures and ratios, write a report.

Every figure stands beside a baseline measured in the same run on the same machine, because
machines here are noisy: the ratio is what to compare between runs, not the raw figure.

  edge_health          GET /healthz, answered by Envoy itself (its health filter, in the front)
  events_no_token      GET /v1/events past the edge cache (cache-control: no-cache), no token
  events_with_token    the same with a user token: the cost of the JWT check at the edge
                       (ratio with_token / no_token)
  events_cached        GET /v1/events as a fan's app sends it: the edge's cache answers
  event_get            GET /v1/events/{event} through the edge (cached at the edge)
  event_direct         the same body answered by a second Envoy's direct_response
                       (ratio event_get / event_direct)
  queue_*              the waiting room (bench/queue.py): public status polls of an open room
                       (answered by Envoy from the route table edge/feed.py keeps) and of one
                       the feed leaves out (edge cache), joins and queue/me of 200 fans, beside
                       Envoy's direct answer of the same body and redis-benchmark running a
                       join-shaped script
  booking_hold*        holds under contention (bench/booking.py): 200 admitted fans hold two
                       random adjacent seats of one event's front rows; answers per status
                       (409 = contention, an answer), beside redis-benchmark running booking's
                       own hold script (ratio booking_hold / Redis alone)
  purchases            one event's sale through the edge (bench/purchases.py, the `make demo`
                       simulator): tickets and purchases per minute, webhook -> CONFIRMED
                       p50/p99, beside the goal (10,000 tickets/min) and pretix's 300-400,
                       after an unmeasured warm-up sale of 200 fans (--purchase-warmup-fans);
                       three sales (--purchase-sales), the median's figures and every one's;
                       then one sale with the room letting at most 200 shop at once, printed
                       beside them (--no-capped-room-sale), and one with every fan asking
                       for the best available instead of picking on the map
                       (--no-best-available-sale)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

from devstack import stack
from devstack.layout import ROOT, Layout, layout
from meshkit.memory import tune_gc

from . import booking as booking_bench
from . import purchases as purchases_bench
from . import queue as queue_bench
from . import wrk
from .baseline import direct_envoy

REPORTS = ROOT / "bench" / "reports"
BENCH_ADMIN = ("bench-admin@example.com", "bench admin password")


def _fixtures(lay: Layout) -> tuple[str, str]:  # (admin token, event name)
    """An admin's token and a published event, made through the edge as the apps would."""
    from datetime import UTC, datetime

    from google.protobuf import json_format

    from devstack.demo import DemoAccount, ensure_account
    from svc_catalog.demo import demo_event

    admin = DemoAccount("ADMIN", *BENCH_ADMIN)
    ensure_account(lay, admin)
    with httpx.Client(base_url=lay.edge_url, timeout=15) as http:
        session = http.post("/v1/sessions", json={"email": admin.email, "password": admin.password})
        session.raise_for_status()
        token = session.json()["accessToken"]
        auth = {"authorization": f"Bearer {token}"}
        body = json_format.MessageToDict(demo_event(datetime.now(UTC)))
        body["title"] = f"Bench Night {time.strftime('%H%M%S')}"
        created = http.post("/v1/events", json=body, headers=auth)
        created.raise_for_status()
        name = created.json()["name"]
        http.post(f"/v1/{name}:publish", json={}, headers=auth).raise_for_status()
    return token, name


def measure(lay: Layout, seconds: int, connections: int) -> list[tuple[wrk.Result, wrk.Result | None]]:
    run: dict[str, Any] = {"seconds": seconds, "connections": connections}
    token, event = _fixtures(lay)
    edge = lay.edge_url
    body = httpx.get(f"{edge}/v1/{event}", timeout=10)
    body.raise_for_status()
    rows: list[tuple[wrk.Result, wrk.Result | None]] = []
    direct = wrk.run("edge_health (Envoy, no service)", f"{edge}/healthz", **run)
    rows.append((direct, None))
    # The JWT's cost on one route, both calls past the edge's cache (which would answer the
    # token-less one itself): the ratio is what the check costs the whole round trip.
    uncached = {"cache-control": "no-cache"}
    no_token = wrk.run("events_no_token (uncached)", f"{edge}/v1/events", headers=uncached, **run)
    rows.append((no_token, direct))
    with_token = wrk.run("events_with_token (JWT checked)", f"{edge}/v1/events",
                         headers={**uncached, "authorization": f"Bearer {token}"}, **run)
    rows.append((with_token, no_token))
    cached = wrk.run("events_cached (edge cache)", f"{edge}/v1/events", **run)
    rows.append((cached, direct))
    with direct_envoy(lay, {"/event": ("application/json", body.text)}) as base:
        same_size = wrk.run(f"event_direct ({len(body.content)} B)", f"{base}/event", **run)
        rows.append((same_size, None))
        rows.append((wrk.run("event_get (through the edge)", f"{edge}/v1/{event}", **run), same_size))
    rows += queue_bench.measure(lay, {"authorization": f"Bearer {token}"}, seconds, connections)
    rows += booking_bench.measure(lay, {"authorization": f"Bearer {token}"}, seconds, connections)
    return rows


def machine_speed(lay: Layout, connections: int, seconds: int = 3, settle: float = 2.0) -> float:
    """How fast the machine is now: a bare Envoy's direct answers per second (bench/baseline.py),
    after ``settle`` seconds for what a sale leaves running (consumers, relays) to finish."""
    time.sleep(settle)
    with direct_envoy(lay, {"/speed": ("text/plain", "ok")}) as base:
        return wrk.run("machine speed", f"{base}/speed", seconds=seconds,
                       connections=connections).requests_per_second


def main() -> None:
    ap = argparse.ArgumentParser(description="Ticketping benchmarks (loopback only)")
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--keep", action="store_true", help="leave the test stack running")
    ap.add_argument("--purchase-fans", type=int, default=800, help="fans of the purchases scenario (0: skip)")
    ap.add_argument("--purchase-seats", type=int, default=2000,
                    help="seats of the purchases scenario (more than its fans want)")
    ap.add_argument("--purchase-warmup-fans", type=int, default=200,
                    help="fans of an unmeasured sale before the purchases scenario (0: none)")
    ap.add_argument("--purchase-sales", type=int, default=3,
                    help="measured sales, one after another (the median sale's figures are printed)")
    ap.add_argument("--no-best-available-sale", action="store_true",
                    help="skip the extra sale with every fan asking for the best available")
    ap.add_argument("--no-capped-room-sale", action="store_true",
                    help="skip the extra sale with at most 200 fans shopping at once")
    args = ap.parse_args()
    tune_gc()  # the purchases scenario's simulator runs in this process (meshkit.memory)
    lay = layout("test")
    stack.ensure_infra(lay)
    stack.start_services(lay)
    stack.start_edge(lay)
    sale: dict[str, Any] | None = None
    try:
        rows = measure(lay, args.seconds, args.connections)
        if args.purchase_fans:
            took = queue_bench.rewrite_aof(lay)  # not in the sales: see rewrite_aof
            print(f"redis: append-only file rewritten before the purchases ({took:.1f} s)", flush=True)
            sale = purchases_bench.measure(lay, BENCH_ADMIN, args.purchase_fans, args.purchase_seats,
                                           args.purchase_warmup_fans,
                                           machine=lambda: machine_speed(lay, args.connections),
                                           sales=args.purchase_sales,
                                           capped_room_sale=not args.no_capped_room_sale,
                                           best_available_sale=not args.no_best_available_sale)
    finally:
        if not args.keep:
            stack.down(lay)
    print(f"\n{'scenario':<34} {'throughput':>16}  latency                      vs baseline")
    for result, baseline in rows:
        print(result.row(baseline))
    if sale is not None:
        print("\n" + purchases_bench.render(sale))
    REPORTS.mkdir(parents=True, exist_ok=True)
    out: Path = REPORTS / f"bench-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps({
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "settings": {"seconds": args.seconds, "connections": args.connections},
        "results": [{**asdict(r), "baseline": b.name if b else None,
                     "ratio_to_baseline": r.requests_per_second / b.requests_per_second if b else None}
                    for r, b in rows],
        "purchases": sale,
    }, indent=2))
    print(f"\nreport: {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
