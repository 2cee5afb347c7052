"""bench.cpu: a component's CPU is its leader's and its descendants', from /proc."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from bench import cpu


def test_a_component_counts_the_cpu_of_its_descendants(tmp_path: Path) -> None:
    (tmp_path / "pids").mkdir()
    # A leader whose child burns CPU: the child's time is the component's.
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\ntime.sleep(30)"
    leader = subprocess.Popen([sys.executable, "-c",
                               f"import subprocess, sys; subprocess.run([sys.executable, '-c', {burn!r}])"])
    try:
        (tmp_path / "pids" / "worker.pid").write_text(f"{leader.pid}\n")
        (tmp_path / "pids" / "gone.pid").write_text("999999999\n")  # not running: left out
        before = {"worker": 0.0}
        deadline = time.monotonic() + 20
        while (after := cpu.snapshot(tmp_path)).get("worker", 0.0) < 0.3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert set(after) == {"worker"}
        assert after["worker"] >= 0.3
        assert cpu.spent(before, after) == {"worker": after["worker"]}
        assert cpu.spent(after, after) == {}
    finally:
        found = subprocess.run(["pgrep", "-P", str(leader.pid)], capture_output=True, text=True)
        for child in found.stdout.split():  # before the leader: orphans would leave its tree
            os.kill(int(child), 9)
        leader.kill()
        leader.wait()
