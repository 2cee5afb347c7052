"""Completed purchases through the edge: one event's sale, as many fans as the room admits at once.

flashsale drives it (the same simulator as `make demo`): every fan signs in, joins, is admitted,
holds 1-4 seats, orders and pays; the sandbox PSP approves after its delay (0.2 s in the test
profile) and the fan waits for CONFIRMED. Fans pick seats anywhere on the map, so what is
measured is the purchase path, not the race for the front rows (booking_hold measures that).

The measured sales let every fan in at once (the room's maxActive = the fans), as sessions 1-21
measured: the figure is what booking, payment, Kafka and the edge carry with the whole crowd
inside. One more sale runs the room as an operator would for a sale (``capped_room_sale``): it
lets fans in quickly (300 a second) but at most ROOM_MAX_ACTIVE shop at once, about what this
machine's booking path keeps busy (70-100 purchases a second, about 2 s from one fan's admission
to the next one's in the same slot). Its figures are printed beside the median's, with the time
a purchase takes from admission to CONFIRMED. With the crowd inside, fans wait in the booking
path rather than in the room: 9-10 s at p50 against 2.1-3.2 s, holds seconds after the admission
(1.2-1.6 CheckAdmission calls per purchase against 0.1-0.5) and from seat maps seconds old (0.7
failed holds per purchase against 0.35-0.45). Tickets per minute were the same within this
machine's noise over six alternated pairs (session 22), so neither is the faster figure.

  tickets per minute         seats in CONFIRMED orders / (last confirmation - sale opening)
  purchases per minute       the same, in orders
  webhook -> CONFIRMED       the payment's webhook time to the order's confirmation, from the
                             servers' own timestamps (p50, p99)
Beside them: pretix's documented 300-400 tickets per minute per event, and the goal of 10,000.

The seats outnumber what the fans want (800 fans want about 1,800 of 2,000 seats): the figure
is the purchase path's capacity, not the scramble for the last seats, which ends in 409s and
fans leaving empty-handed (booking_hold measures contention).

A smaller sale runs first, unmeasured (``warmup_fans``): the first sale after the stack starts
also pays for the Kafka broker's JIT compilation and every pooled connection's first statements
(each prepares its statements on first use), which a platform that has been up for a day has
behind it. The figure is the steady state's.

The machine itself is not steady: on the 2-core VM this was written on, the same code gave 10,143
and 5,898 tickets per minute ten minutes apart, every component 60-90 % slower in the second
run. So the machine's speed is measured right before and right after the sale, as the rate at
which a bare Envoy answers by itself (``machine``): a figure is comparable with another only at
a similar speed, and a speed that changed during the sale says the figure is not the code's. It
does not catch every slowdown (the third run of that day ran at 32 ms per purchase where the
first ran at 22, both at 62-64k direct answers per second): compare CPU per purchase too.

The run is CPU-bound: every process shares the machine's cores with the load generator. So the
CPU each component spent from the sale's opening to its end is printed too (from /proc, per
devstack session; the load generator's own from os.times()), per purchase, and what the platform
alone would carry if it had the cores to itself: a projection, labelled as one. The sandbox PSP
runs inside svc_payment and is counted as the platform's.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

import uvloop

from devstack.layout import Layout
from flashsale import report
from flashsale.sale import FanPool, SaleConfig, run

from . import cpu

PRETIX_TICKETS_PER_MINUTE = 400  # pretix's documentation: 300-400 per minute per event
GOAL_TICKETS_PER_MINUTE = 10_000


# The room's settings in the capped-room sale (see above).
ROOM_MAX_ACTIVE = 200
ROOM_ADMIT_RATE = 300.0


def _config(fans: int, seats: int, seed: int, max_active: int | None = None,
            best_available: bool = False) -> SaleConfig:
    """The sale's settings: every fan let in at once, or at most ``max_active`` shopping at once
    (then let in at ROOM_ADMIT_RATE); every fan picking on the seat map, or (``best_available``)
    every fan asking booking for the best seats together."""
    return SaleConfig(fans=fans, seats=seats, admit_rate=1000 if max_active is None else ROOM_ADMIT_RATE,
                      max_active=fans if max_active is None else min(fans, max_active), early_share=0.0,
                      lead_seconds=3, arrival_seconds=1, decline_share=0.0, connections=256,
                      give_up_seconds=3, max_seconds=300, seed=seed, pick_spread=1e9,
                      best_share=1.0 if best_available else 0.0)


def warm_up(lay: Layout, admin: tuple[str, str], fans: int) -> None:
    """A sale of ``fans`` (seats beyond their demand), not measured; raises if it went wrong."""
    result = uvloop.run(run(lay.edge_url, admin, _config(fans, 3 * fans, seed=4), pool=FanPool(None),
                            fresh_fans=True))
    s = report.summary(result, asyncio.run(report.check(result)))
    if s["oversold"] or s["paid_without_confirmation"] or s["errors"]:
        raise RuntimeError(f"the warm-up sale went wrong: {s['errors'][:3]}")


def measure(lay: Layout, admin: tuple[str, str], fans: int = 800, seats: int = 2000,
            warmup_fans: int = 200, machine: Callable[[], float] | None = None,
            sales: int = 3, capped_room_sale: bool = True,
            best_available_sale: bool = True) -> dict[str, Any]:
    """``sales`` measured sales one after another (each a new event of ``seats`` for ``fans``
    new fans); the figures are the median sale's (by tickets per minute), with every sale's
    beside them. ``capped_room_sale``: then one more, at most ROOM_MAX_ACTIVE fans shopping at
    once, reported apart. ``best_available_sale``: and one more with every fan asking for the
    best available instead of picking on the map, reported apart.
    ``machine``: the machine's speed now (a bare Envoy's answers per second), asked right
    before the first sale and right after the last."""
    if sales < 1:
        raise ValueError("at least one sale is measured")
    if warmup_fans:
        warm_up(lay, admin, warmup_fans)
    speed_before = machine() if machine else None
    runs = [_sale(lay, admin, fans, seats, seed=5 + i) for i in range(sales)]
    capped = _sale(lay, admin, fans, seats, seed=5, max_active=ROOM_MAX_ACTIVE) if capped_room_sale else None
    best = _sale(lay, admin, fans, seats, seed=5, best_available=True) if best_available_sale else None
    speed_after = machine() if machine else None
    median = sorted(runs, key=lambda r: r["tickets_per_minute"])[(len(runs) - 1) // 2]
    every = runs + [r for r in (capped, best) if r]
    return {
        **median,
        "warmup_fans": warmup_fans,
        "sales": [{k: r[k] for k in SALE_KEYS} for r in runs],
        "capped_room": {**{k: capped[k] for k in SALE_KEYS}, "max_active": min(fans, ROOM_MAX_ACTIVE),
                        "admit_rate_per_second": ROOM_ADMIT_RATE} if capped else None,
        "best_available": {k: best[k] for k in SALE_KEYS} if best else None,
        "machine_direct_answers_per_second": {"before": speed_before, "after": speed_after},
        # Every sale's, not the median's alone: each must be 0.
        "oversold": sum(r["oversold"] for r in every),
        "paid_without_confirmation": sum(r["paid_without_confirmation"] for r in every),
        "errors": [e for r in every for e in r["errors"]][:5],
    }


# What the report keeps of every sale (the median's full figures are the report's own).
SALE_KEYS = ("tickets_per_minute", "tickets_per_minute_from_opening",
             "platform_cpu_ms_per_purchase", "load_generator_cpu_ms_per_purchase",
             "webhook_to_confirmed_ms", "purchase_ms", "oversold", "paid_without_confirmation")


def _sale(lay: Layout, admin: tuple[str, str], fans: int, seats: int, seed: int,
          max_active: int | None = None, best_available: bool = False) -> dict[str, Any]:
    cfg = _config(fans, seats, seed=seed, max_active=max_active, best_available=best_available)
    marks: dict[str, Any] = {}

    def phase(what: str) -> None:
        if what.startswith("opening"):  # the fans are signed in: the sale's CPU starts here
            marks["cpu"], marks["self"] = cpu.snapshot(lay.run_dir), os.times()

    result = uvloop.run(run(lay.edge_url, admin, cfg, pool=FanPool(None), fresh_fans=True, on_phase=phase))
    spent = cpu.spent(marks["cpu"], cpu.snapshot(lay.run_dir))
    now = os.times()
    load_generator = now.user + now.system - marks["self"].user - marks["self"].system
    s = report.summary(result, asyncio.run(report.check(result)))
    purchases = s["orders"].get("CONFIRMED", 0)
    tpm = s["tickets_per_minute"] or 0.0
    minutes = s["tickets_confirmed"] / tpm if tpm else float("nan")
    platform = sum(spent.values())

    def per_purchase(seconds: float) -> float:
        return 1000 * seconds / purchases if purchases else float("nan")

    cores = os.cpu_count() or 1
    return {
        "fans": fans, "seats": seats,
        "cpu_seconds": {**{k: round(v, 2) for k, v in spent.items()},
                        "load generator": round(load_generator, 2)},
        "platform_cpu_ms_per_purchase": per_purchase(platform),
        "load_generator_cpu_ms_per_purchase": per_purchase(load_generator),
        "cores": cores,
        # If the platform had the cores to itself: tickets per CPU-second of the platform, times
        # the cores, per minute. A projection from this run's costs, not a measurement.
        "projected_platform_only_tickets_per_minute":
            60 * cores * s["tickets_confirmed"] / platform if platform else 0.0,
        "tickets_confirmed": s["tickets_confirmed"],
        "tickets_per_minute": tpm,
        "tickets_per_minute_from_opening": s["tickets_per_minute_from_opening"] or 0.0,
        "purchases_per_minute": purchases / minutes if tpm else 0.0,
        "ratio_to_goal": tpm / GOAL_TICKETS_PER_MINUTE,
        "ratio_to_pretix": tpm / PRETIX_TICKETS_PER_MINUTE,
        "webhook_to_confirmed_ms": s["webhook_to_confirmed_ms"],
        "steps_ms": s["steps_ms"],
        # A purchase from the fan's admission to CONFIRMED (p50, p99).
        "purchase_ms": s["steps_ms"].get("purchase", {"n": 0, "p50": float("nan"), "p99": float("nan")}),
        "oversold": s["oversold"],
        "paid_without_confirmation": s["paid_without_confirmation"],
        "errors": s["errors"][:5],
    }


def render(m: dict[str, Any]) -> str:
    w = m["webhook_to_confirmed_ms"]
    sales = m.get("sales") or [m]
    capped = m.get("capped_room")
    best = m.get("best_available")
    return "\n".join([
        f"purchases ({len(sales)} sales of {m['fans']} fans for {m['seats']} seats each, through the edge;"
        f" after a warm-up sale of {m['warmup_fans']} fans, not measured; the median sale's figures)",
        f"  tickets per minute      {m['tickets_per_minute']:8.0f}   goal {GOAL_TICKETS_PER_MINUTE}"
        f" (ratio {m['ratio_to_goal']:.2f});"
        f" pretix ~{PRETIX_TICKETS_PER_MINUTE} (ratio {m['ratio_to_pretix']:.0f})",
        "  every sale              " + ", ".join(
            f"{r['tickets_per_minute']:.0f} tickets/min at {r['platform_cpu_ms_per_purchase']:.0f} ms"
            for r in sales),
        "  counted from the opening " + ", ".join(
            f"{r.get('tickets_per_minute_from_opening', 0):.0f}" for r in sales)
        + " (the window also holds the time before the first fan arrived)",
        *([f"  room capped             {capped['tickets_per_minute']:.0f} tickets/min at"
           f" {capped['platform_cpu_ms_per_purchase']:.0f} ms, a purchase {_seconds(capped['purchase_ms'])}"
           f" from admission to CONFIRMED, against {_seconds(m['purchase_ms'])} in the median sale"
           f" (one more sale, the room letting {capped['admit_rate_per_second']:.0f} fans in a second,"
           f" at most {capped['max_active']} shopping at once)"] if capped else []),
        *([f"  best available          {best['tickets_per_minute']:.0f} tickets/min at"
           f" {best['platform_cpu_ms_per_purchase']:.0f} ms (one more sale, every fan asking booking for"
           f" the best seats together instead of picking on the seat map)"] if best else []),
        f"  purchases per minute    {m['purchases_per_minute']:8.0f}",
        f"  webhook -> CONFIRMED    p50 {w['p50']:.0f} ms  p99 {w['p99']:.0f} ms  (n {w['n']})",
        f"  oversold {m['oversold']}, paid without confirmation {m['paid_without_confirmation']}"
        f" (all sales)",
        f"  CPU per purchase        platform {m['platform_cpu_ms_per_purchase']:.0f} ms,"
        f" load generator {m['load_generator_cpu_ms_per_purchase']:.0f} ms"
        f" ({', '.join(f'{k} {v:.1f} s' for k, v in m['cpu_seconds'].items())})",
        f"  platform alone          ~{m['projected_platform_only_tickets_per_minute']:.0f} tickets per minute"
        f" on {m['cores']} cores without the load generator (projection from these costs)",
    ] + _machine_lines(m["machine_direct_answers_per_second"]) + [f"  error: {e}" for e in m["errors"]])


def _seconds(p: dict[str, float]) -> str:
    return f"p50 {p['p50'] / 1000:.1f} s (p99 {p['p99'] / 1000:.1f} s)"


def _machine_lines(speed: dict[str, float | None]) -> list[str]:
    before, after = speed["before"], speed["after"]
    if before is None or after is None:
        return []
    lines = [f"  machine                 a bare Envoy's direct answer {before:.0f} req/s before the sales,"
             f" {after:.0f} after (compare figures at similar speeds)"]
    if abs(after - before) > 0.1 * max(before, after):
        lines.append("  machine                 its speed changed by more than a tenth during the sales:"
                     " these figures are the machine's as much as the code's")
    return lines
