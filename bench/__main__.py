"""`make bench`: start the mesh (test profile), measure, print figures and ratios, write a report.

Every figure stands beside a baseline measured in the same run on the same machine, because
machines here are noisy: the ratio is what to compare between runs, not the raw figure.
Scenarios so far (later issues add theirs):
  edge_direct       GET /healthz, answered by Envoy itself from its health-check state (baseline)
  edge_to_service   GET /v1/events, transcoded to gRPC and answered by svc_catalog
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict

from devstack import stack
from devstack.layout import ROOT, layout

from . import wrk

REPORTS = ROOT / "bench" / "reports"


def main() -> None:
    ap = argparse.ArgumentParser(description="Ticketping benchmarks (loopback only)")
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--keep", action="store_true", help="leave the test stack running")
    args = ap.parse_args()
    lay = layout("test")
    stack.ensure_infra(lay)
    stack.start_services(lay)
    stack.start_edge(lay)
    try:
        run = dict(seconds=args.seconds, connections=args.connections)
        base = wrk.run("edge_direct (Envoy answers)", f"{lay.edge_url}/healthz", **run)
        results = [base, wrk.run("edge_to_service (REST->gRPC)", f"{lay.edge_url}/v1/events", **run)]
    finally:
        if not args.keep:
            stack.down(lay)
    print(f"\n{'scenario':<34} {'throughput':>16}  latency                      vs baseline")
    for r in results:
        print(r.row(None if r is base else base))
    REPORTS.mkdir(parents=True, exist_ok=True)
    out = REPORTS / f"bench-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps({
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "settings": run, "baseline": base.name,
        "results": [{**asdict(r), "ratio_to_baseline": r.requests_per_second / base.requests_per_second}
                    for r in results],
    }, indent=2))
    print(f"\nreport: {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
