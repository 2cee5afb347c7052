"""CPU seconds per devstack component, read from /proc: where a CPU-bound scenario's time went.

devstack writes each component's pid file (the leader), so a component's CPU is the sum over the
leader and its descendants: PostgreSQL's backends, the services' threads, Envoy's workers.
Processes that ended during the interval are not counted, which is fine for long-lived servers
and is why the load generator measures itself with os.times().
"""

from __future__ import annotations

import os
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def _processes() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds user + system) of every live process."""
    out: dict[int, tuple[int, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state is fields[0]
        out[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICKS)
    return out


def snapshot(run_dir: Path) -> dict[str, float]:
    """Component name (its pid file's stem: svc_booking, postgres, envoy...) -> CPU seconds of
    its leader and every descendant (PostgreSQL's backends leave its session, not its tree)."""
    procs = _processes()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    found: dict[str, float] = {}
    for pidfile in sorted((run_dir / "pids").glob("*.pid")):
        try:
            leader = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            continue
        if leader not in procs:
            continue
        total, todo = 0.0, [leader]
        while todo:
            pid = todo.pop()
            total += procs[pid][1]
            todo += children.get(pid, [])
        found[pidfile.stem] = total
    return found


def spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds each component spent between two snapshots, largest first."""
    diff = {k: after[k] - before.get(k, 0.0) for k in after}
    return dict(sorted(((k, v) for k, v in diff.items() if v > 0), key=lambda kv: -kv[1]))
