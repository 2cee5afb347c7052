"""`make demo`: a flash sale against the running mesh (`make up`), through the REST edge.

    python -m flashsale [--fans 2000] [--seats 500] [--admit-rate 100] [--max-active 300] ...

Signs the fans in (the first run signs them up; later runs reuse them, see FanPool), opens a new
event, lets every fan join, wait, hold, order and pay, shows the progress live, and ends with the
report of flashsale.report. Exits 1 if a promise was broken (oversold, paid but not confirmed...).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict

import uvloop

from devstack.layout import layout
from meshkit.memory import tune_gc

from . import report
from .sale import FanPool, Progress, SaleConfig, SaleError, run


def parse(argv: list[str] | None) -> argparse.Namespace:
    d = SaleConfig()
    ap = argparse.ArgumentParser(prog="python -m flashsale", description=__doc__.split("\n")[0])
    ap.add_argument("--fans", type=int, default=d.fans, help=f"simulated fans (default {d.fans})")
    ap.add_argument("--seats", type=int, default=d.seats, help=f"seats on sale (default {d.seats})")
    ap.add_argument("--seat-limit", type=int, default=d.seat_limit, help="most seats per fan")
    ap.add_argument("--admit-rate", type=float, default=d.admit_rate, help="fans admitted per second")
    ap.add_argument("--max-active", type=int, default=d.max_active, help="fans shopping at once")
    ap.add_argument("--early-share", type=float, default=d.early_share,
                    help="share of fans in the room before the opening (shuffled by the lottery)")
    ap.add_argument("--lead", type=float, default=d.lead_seconds, help="seconds from room open to sale open")
    ap.add_argument("--arrival", type=float, default=d.arrival_seconds,
                    help="later fans arrive spread over this many seconds after the opening")
    ap.add_argument("--decline-share", type=float, default=d.decline_share,
                    help="share of payments the sandbox PSP declines (default 0.05)")
    ap.add_argument("--best-share", type=float, default=d.best_share,
                    help="share of fans who ask for the best seats together instead of picking on the "
                         f"map (default {d.best_share})")
    ap.add_argument("--connections", type=int, default=d.connections, help="HTTP connections to the edge")
    ap.add_argument("--max-seconds", type=float, default=d.max_seconds, help="time limit of the sale")
    ap.add_argument("--seed", type=int, default=None, help="random seed (picks, arrivals, declines)")
    ap.add_argument("--fresh-fans", action="store_true", help="sign up new fans instead of the saved ones")
    ap.add_argument("--profile", default="dev", choices=["dev", "test"], help="which local stack")
    ap.add_argument("--admin-email", default=None, help="an ADMIN account (default: make up's demo admin)")
    ap.add_argument("--admin-password", default=None)
    ap.add_argument("--quiet", action="store_true", help="no live progress")
    args = ap.parse_args(argv)
    shares = (args.decline_share, args.early_share, args.best_share)
    if args.fans < 1 or args.seats < 1 or not all(0 <= v <= 1 for v in shares):
        ap.error("--fans and --seats must be at least 1; the shares between 0 and 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from devstack.demo import accounts

    lay = layout(args.profile)
    demo_admin = next(a for a in accounts() if a.role == "ADMIN")
    admin = (args.admin_email or demo_admin.email, args.admin_password or demo_admin.password)
    cfg = SaleConfig(fans=args.fans, seats=args.seats, seat_limit=args.seat_limit, admit_rate=args.admit_rate,
                     max_active=args.max_active, early_share=args.early_share, lead_seconds=args.lead,
                     arrival_seconds=args.arrival, decline_share=args.decline_share,
                     best_share=args.best_share, connections=args.connections, max_seconds=args.max_seconds,
                     seed=args.seed)
    live = sys.stderr.isatty() and not args.quiet
    last_print = [0.0]

    def tick(p: Progress) -> None:
        if args.quiet:
            return
        now = time.time()
        line = report.progress_line(p, now, cfg.seats)
        if live:
            sys.stderr.write("\r\033[K" + line)
            sys.stderr.flush()
        elif now - last_print[0] >= 2.0:  # a log, not a terminal: a line every two seconds
            last_print[0] = now
            print(line, file=sys.stderr, flush=True)

    def phase(text: str) -> None:
        print(("\n" if live else "") + f"flashsale: {text}", file=sys.stderr, flush=True)

    pool = FanPool(lay.run_dir / "flashsale" / "fans.json")
    tune_gc()  # the simulator shares the machine's cores with the mesh: as in the services
    try:
        result = uvloop.run(run(lay.edge_url, admin, cfg, pool=pool, fresh_fans=args.fresh_fans,
                                 on_tick=tick, on_phase=phase))
    except (SaleError, OSError) as err:
        print(f"\nflashsale: {err}\n  is the mesh running? `make up` starts it; `make status` shows it",
              file=sys.stderr)
        return 2
    if live:
        sys.stderr.write("\n")
    phase("checking every order and payment against the servers")
    checked = asyncio.run(report.check(result))
    summary = report.summary(result, checked)
    print(report.render(summary))
    out = lay.run_dir / "flashsale" / f"report-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps({"config": asdict(cfg), "summary": summary}, indent=2))
    print(f"\n  report: {out}")
    return 0 if report.healthy(summary) else 1


if __name__ == "__main__":
    sys.exit(main())
