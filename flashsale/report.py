"""What a sale did, checked against the servers' own records, and how it reads to a person.

The checks do not trust the fans' view: after the sale every order and payment is read back
through the edge, and the seat map is read past the edge's cache.
  oversold                    seats in two CONFIRMED orders, plus SOLD seats that no confirmed
                              order holds (both must be 0)
  paid without confirmation   payments SUCCEEDED whose order is not CONFIRMED (must be 0)
  unsold but confirmed        seats of CONFIRMED orders the seat map does not show SOLD (must be 0)
Fairness: fans who joined before the opening are all served before those who joined after it; the
early ones in shuffled order, the later ones strictly in join order (a pair is only counted when
one join was answered before the other was sent, so concurrent joins do not blur it).
"""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .sale import Edge, Fan, Progress, SaleResult, call, in_order_share, order_violations, seat_map, state_of

STEPS = ("sign_up", "log_in", "refresh", "join", "wait", "hold", "hold_on_map", "hold_best", "order", "pay",
         "confirm", "purchase")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@dataclass
class Checked:
    orders: dict[str, str] = field(default_factory=dict)  # order -> state
    payments: dict[str, str] = field(default_factory=dict)  # payment -> state
    oversold: int = 0
    sold_without_order: int = 0
    confirmed_not_sold: int = 0
    paid_unconfirmed: int = 0
    seats_sold: int = 0
    tickets_confirmed: int = 0
    webhook_to_confirmed: list[float] = field(default_factory=list)
    last_confirmed_at: float | None = None
    unexpected_orders: int = 0


async def check(result: SaleResult, connections: int = 64) -> Checked:
    """Read every order and payment back, and the seat map past the cache."""
    out = Checked()
    confirmed_seats: Counter[str] = Counter()
    async with Edge(result.edge_url, connections) as http:

        async def one(fan: Fan) -> None:
            listed = await call(http, "GET", "/v1/orders", headers=fan.auth, params={"pageSize": 100})
            listed.raise_for_status()
            orders = [o for o in listed.json().get("orders", []) if o.get("event") == result.event]
            for o in orders:
                state = state_of(o["state"])
                out.orders[o["name"]] = state
                if o["name"] != fan.order:
                    out.unexpected_orders += 1
                if state == "CONFIRMED":
                    confirmed_seats.update(o["seatIds"])
                    confirmed = _ts(o["updateTime"])
                    out.last_confirmed_at = max(out.last_confirmed_at or 0.0, confirmed)
            if fan.payment:
                paid = await call(http, "GET", f"/v1/{fan.payment}", headers=fan.auth)
                paid.raise_for_status()
                p = paid.json()
                out.payments[fan.payment] = state_of(p["state"])
                order_state = out.orders.get(p["order"], "MISSING")
                if out.payments[fan.payment] == "SUCCEEDED":
                    if order_state != "CONFIRMED":
                        out.paid_unconfirmed += 1
                    else:
                        order = next(o for o in orders if o["name"] == p["order"])
                        out.webhook_to_confirmed.append(_ts(order["updateTime"]) - _ts(p["updateTime"]))

        await asyncio.gather(*(one(f) for f in result.fans if f.join_done))
        sold = set((await seat_map(http, result.event, fresh=True)).seats("S"))
    out.seats_sold = len(sold)
    out.tickets_confirmed = sum(confirmed_seats.values())
    out.oversold = sum(n - 1 for n in confirmed_seats.values() if n > 1)
    out.sold_without_order = len(sold - set(confirmed_seats))
    out.confirmed_not_sold = len(set(confirmed_seats) - sold)
    return out


def summary(result: SaleResult, checked: Checked) -> dict[str, Any]:
    fans = result.fans
    # A fan who joined once the house was sold out got no number (nor did a lottery entrant who
    # never read it): there is no place of theirs to check.
    joined = [f for f in fans if f.join_done and f.number]
    early = [f for f in joined if f.join_done < result.sale_open]
    late = [f for f in joined if f.join_sent > result.sale_open]
    violations, pairs = order_violations(late)
    rng = random.Random(7)
    steps = {s: [f.steps[s] for f in fans if s in f.steps] for s in STEPS}
    # The sale runs from its opening or, if no fan was there yet, from the first fan's arrival:
    # until then nobody could buy anything (the bench's fans arrive from 0.2 s after the opening,
    # which was a fiftieth of every window it measured). Both are reported.
    arrivals = [f.join_sent for f in fans if f.join_sent]
    first_sale = max(result.sale_open, min(arrivals)) if arrivals else result.sale_open
    last = checked.last_confirmed_at
    window = (last - first_sale) if last else float("nan")
    from_opening = (last - result.sale_open) if last else float("nan")
    return {
        "event": result.event,
        "fans": len(fans),
        "seats": result.seat_count,
        "outcomes": dict(Counter(f.outcome for f in fans).most_common()),
        "seats_sold": checked.seats_sold,
        "tickets_confirmed": checked.tickets_confirmed,
        "oversold": checked.oversold + checked.sold_without_order,
        "confirmed_but_not_sold": checked.confirmed_not_sold,
        "paid_without_confirmation": checked.paid_unconfirmed,
        "orders_the_fans_did_not_make": checked.unexpected_orders,
        "orders": dict(Counter(checked.orders.values())),
        "payments": dict(Counter(checked.payments.values())),
        "time_to_sell_out_seconds": (result.sold_out_at - result.sale_open) if result.sold_out_at else None,
        "tickets_per_minute": checked.tickets_confirmed / window * 60 if window and window > 0 else None,
        "tickets_per_minute_from_opening":
            checked.tickets_confirmed / from_opening * 60 if from_opening and from_opening > 0 else None,
        "fairness": {
            "early_joiners": len(early),
            "late_joiners": len(late),
            "early_all_before_late": (max(f.number for f in early) < min(f.number for f in late))
            if early and late else None,
            "early_pairs_in_join_order": in_order_share(early, rng),
            "late_pairs_checked": pairs,
            "late_out_of_join_order": violations,
        },
        "steps_ms": {s: {"n": len(v), "p50": percentile(v, 0.5) * 1000, "p99": percentile(v, 0.99) * 1000}
                     for s, v in steps.items() if v},
        "webhook_to_confirmed_ms": {
            "n": len(checked.webhook_to_confirmed),
            "p50": percentile(checked.webhook_to_confirmed, 0.5) * 1000,
            "p99": percentile(checked.webhook_to_confirmed, 0.99) * 1000},
        "hold_conflicts_409": sum(f.conflicts for f in fans),
        "best_available_fans": sum(f.best for f in fans),
        "transient_retries": sum(f.retries for f in fans),
        "errors": [f"{f.email}: {f.error}" for f in fans if f.error][:20],
    }


def healthy(s: dict[str, Any]) -> bool:
    """The sale's promises: nothing oversold, every paid order confirmed, no seat lost."""
    return (s["oversold"] == 0 and s["paid_without_confirmation"] == 0
            and s["confirmed_but_not_sold"] == 0 and s["fairness"]["late_out_of_join_order"] == 0
            and s["fairness"]["early_all_before_late"] is not False)


def render(s: dict[str, Any]) -> str:
    f = s["fairness"]
    ok = lambda good: "ok" if good else "FAIL"  # noqa: E731
    sellout = s["time_to_sell_out_seconds"]
    lines = [
        "",
        f"Flash sale {s['event']}: {s['fans']} fans for {s['seats']} seats",
        f"  seats sold                  {s['seats_sold']} / {s['seats']}"
        f"   ({s['tickets_confirmed']} tickets in confirmed orders)",
        f"  oversold                    {s['oversold']}   {ok(s['oversold'] == 0)}",
        f"  paid orders not confirmed   {s['paid_without_confirmation']}"
        f"   {ok(s['paid_without_confirmation'] == 0)}",
        f"  confirmed seats not SOLD    {s['confirmed_but_not_sold']}"
        f"   {ok(s['confirmed_but_not_sold'] == 0)}",
        "  time to sell out            " + (f"{sellout:.1f} s after the opening" if sellout is not None
                                             else "not sold out"),
        "  tickets per minute          " + (f"{s['tickets_per_minute']:.0f}" if s["tickets_per_minute"]
                                             else "-")
        + " (from the opening or the first fan's arrival, whichever came later, to the last"
          " confirmation)",
        "  fans                        " + ", ".join(f"{k} {v}" for k, v in s["outcomes"].items()),
        "  orders                      " + ", ".join(f"{k} {v}" for k, v in s["orders"].items()),
        "  payments                    " + ", ".join(f"{k} {v}" for k, v in s["payments"].items()),
        "",
        "  admission order against join order (the room serves by ticket number)",
        f"    joined before the opening {f['early_joiners']}: pairs in join order"
        f" {f['early_pairs_in_join_order']:.0%} (shuffled by the lottery: ~50%)",
        f"    joined after the opening  {f['late_joiners']}: out of join order"
        f" {f['late_out_of_join_order']} of {f['late_pairs_checked']} checked   "
        f"{ok(f['late_out_of_join_order'] == 0)}",
        "    every early joiner served before every late one: "
        + ("-" if f["early_all_before_late"] is None else ok(f["early_all_before_late"])),
        "",
        f"  {'step':<22}{'n':>6}{'p50 ms':>10}{'p99 ms':>10}",
    ]
    for step, v in s["steps_ms"].items():
        lines.append(f"  {step:<22}{v['n']:>6}{v['p50']:>10.0f}{v['p99']:>10.0f}")
    w = s["webhook_to_confirmed_ms"]
    if w["n"]:
        lines.append(f"  {'webhook -> CONFIRMED':<22}{w['n']:>6}{w['p50']:>10.0f}{w['p99']:>10.0f}")
    lines.append(f"  hold conflicts (409) {s['hold_conflicts_409']} (fans picking on the map), transient"
                 f" retries {s['transient_retries']}; fans asking for the best available"
                 f" {s['best_available_fans']}")
    for e in s["errors"]:
        lines.append(f"  error: {e}")
    return "\n".join(lines)


def progress_line(p: Progress, now: float, seat_count: int) -> str:
    if p.phase != "sale":
        return f"signing in fans: {p.signed_in}"
    t = now - p.opened
    room = p.room
    seats = p.seats or {}
    return (f"t{t:+6.1f}s  room: serving {room.get('servingNumber', '-'):>5} waiting "
            f"{room.get('waitingCount', '-'):>5} active {room.get('activeCount', '-'):>4}"
            f" | fans: joined {p.joined} admitted {p.admitted} held {p.held} paid {p.paid}"
            f" confirmed {p.confirmed} declined {p.declined} done {p.done}"
            f" | seats: sold {seats.get('S', 0)} held {seats.get('H', 0)} free {seats.get('A', seat_count)}"
            f" / {seat_count}")
