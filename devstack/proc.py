"""Processes devstack starts: spawn (own session, pid file, log), wait until ready, stop.

Every process devstack spawns carries two environment variables, ``TP_DEVSTACK_RUN_DIR`` and
``TP_DEVSTACK_PROC``. They are inherited by its children (PostgreSQL backends, ...), so devstack
can tell its own processes from a recycled pid and find strays whose pid file was lost.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RUN_DIR_VAR = "TP_DEVSTACK_RUN_DIR"
PROC_VAR = "TP_DEVSTACK_PROC"
# Executables that may be ours without the environment marker (PostgreSQL's children clobber
# theirs): they count when their cwd or command line points into run_dir. Debian's redis-server
# is a link to redis-check-rdb.
_OUR_EXES = frozenset({"java", "redis-server", "redis-check-rdb", "postgres", "envoy"})


class DevstackError(RuntimeError):
    """Something devstack manages did not start, answer or stop; the message says where to look."""


@dataclass(frozen=True)
class ProcSpec:
    name: str  # pid file run_dir/pids/<name>.pid, log run_dir/logs/<name>.log
    argv: Sequence[str]
    cwd: Path
    env: Mapping[str, str] = field(default_factory=dict)  # added to os.environ
    user: str | None = None  # run as this user (only when we are root)
    stop_signal: signal.Signals = signal.SIGTERM
    signal_group: bool = True  # stop_signal to the whole process group, else to the leader only
    stop_timeout: float = 20.0  # seconds before SIGKILL


# Keep Popen objects alive (no ResourceWarning) and reap them when they exit.
_children: dict[int, subprocess.Popen[bytes]] = {}


def pid_path(run_dir: Path, name: str) -> Path:
    return run_dir / "pids" / f"{name}.pid"


def log_path(run_dir: Path, name: str) -> Path:
    return run_dir / "logs" / f"{name}.log"


# Logs are appended to across restarts; past this size a log is set aside when its process starts
# again (one older copy kept as <name>.1). Without it the edge's access logs grew by hundreds of
# MB a `make bench` (every wrk request is a line) and never shrank.
LOG_KEEP_BYTES = 64 * 1024 * 1024


def rotate_if_large(log: Path, limit: int | None = None) -> bool:
    """Move ``log`` to ``<log>.1`` (replacing the older copy) if it holds more than ``limit``
    bytes (LOG_KEEP_BYTES); True if it did. Only for a log no running process writes to."""
    try:
        if log.stat().st_size <= (LOG_KEEP_BYTES if limit is None else limit):
            return False
    except FileNotFoundError:
        return False
    log.replace(log.with_name(log.name + ".1"))
    return True


def _reap(pid: int) -> None:
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        del _children[pid]


def _proc_state(pid: int) -> str | None:
    """The state letter of /proc/<pid>/stat (R, S, Z, ...), None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def is_alive(pid: int) -> bool:
    _reap(pid)
    return _proc_state(pid) not in (None, "Z", "X")


def _is_ours(pid: int, run_dir: Path, name: str) -> bool:
    env = _environ(pid)
    return env.get(RUN_DIR_VAR) == str(run_dir) and env.get(PROC_VAR) == name


def running_pid(run_dir: Path, name: str) -> int | None:
    """The pid of <name> if its pid file names a live process that devstack started, else None."""
    try:
        pid = int(pid_path(run_dir, name).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    if is_alive(pid) and _is_ours(pid, run_dir, name):
        return pid
    return None


def spawn(spec: ProcSpec, run_dir: Path) -> int:
    """Start spec in its own session, stdout+stderr appended to its log; write its pid file."""
    log = log_path(run_dir, spec.name)
    pidfile = pid_path(run_dir, spec.name)
    log.parent.mkdir(parents=True, exist_ok=True)
    rotate_if_large(log)
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **spec.env, RUN_DIR_VAR: str(run_dir), PROC_VAR: spec.name}
    as_user = spec.user if spec.user and os.geteuid() == 0 else None
    with open(log, "ab") as out:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        out.write(f"==== devstack {stamp}: {' '.join(spec.argv)}\n".encode())
        out.flush()
        child = subprocess.Popen(
            list(spec.argv), cwd=spec.cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
            user=as_user, group=as_user, extra_groups=[] if as_user else None,
        )
    _children[child.pid] = child
    tmp = pidfile.with_suffix(".tmp")
    tmp.write_text(f"{child.pid}\n")
    tmp.replace(pidfile)
    return child.pid


def log_tail(log: Path, lines: int = 15) -> str:
    try:
        text = log.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log yet)"
    return "\n".join("    " + line for line in text[-lines:])


def wait_until(
    what: str, check: Callable[[], object], *, timeout: float, log: Path,
    pid: int | None = None, interval: float = 0.2,
) -> None:
    """Poll check() until it returns a true value. Raise DevstackError naming the log if the
    process (pid) exits first or timeout seconds pass; the last exception of check() is quoted."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while True:
        try:
            if check():
                return
        except Exception as exc:  # noqa: BLE001 - any failure of a probe means "not ready yet"
            last = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        if pid is not None and not is_alive(pid):
            raise DevstackError(
                f"{what} exited before it was ready; read {log}\n  last probe: {last}\n"
                f"{log_tail(log)}")
        if time.monotonic() >= deadline:
            raise DevstackError(
                f"{what} not ready after {timeout:.0f}s; read {log}\n  last probe: {last}\n"
                f"{log_tail(log)}")
        time.sleep(interval)


def _signal(pid: int, sig: int, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(pid, sig)  # the leader's pid is the group id (start_new_session)
        else:
            os.kill(pid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # killpg(0) also succeeds for zombies; look for a live member.
    return any(is_alive(pid) for pid in _group_members(pgid))


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[2]) == pgid:
                members.append(int(entry.name))
    return members


def signal_proc(run_dir: Path, name: str, sig: int) -> int | None:
    """Send sig to <name>'s whole process group; return its pid (None if it was not running)."""
    pid = running_pid(run_dir, name)
    if pid is not None:
        _signal(pid, sig, group=True)
    return pid


def stop_all(specs: Sequence[ProcSpec], run_dir: Path) -> list[str]:
    """Stop these together: each one's stop signal, wait up to its stop_timeout, then SIGKILL
    its group. Pid files are removed. Return the names that were running."""
    live = [(s, pid) for s in specs if (pid := running_pid(run_dir, s.name)) is not None]
    for spec, pid in live:
        _signal(pid, spec.stop_signal, spec.signal_group)
    started, killed = time.monotonic(), set()
    pending = live
    while pending:
        pending = [(s, p) for s, p in pending if _group_alive(p)]
        for spec, pid in pending:
            if pid not in killed and time.monotonic() - started > spec.stop_timeout:
                _signal(pid, signal.SIGKILL, group=True)
                killed.add(pid)
        time.sleep(0.05)
    for spec in specs:
        pid_path(run_dir, spec.name).unlink(missing_ok=True)
    return [spec.name for spec, _ in live]


def run_checked(cmd: Sequence[str], what: str, *, log: Path | None = None,
                **kwargs: Any) -> str:
    """Run cmd to completion; return its output (also appended to log); raise DevstackError
    with the output's tail if it fails."""
    proc = subprocess.run(list(cmd), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          **kwargs)
    out = proc.stdout + proc.stderr
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(f"==== devstack: {' '.join(cmd)}\n{out}")
    if proc.returncode != 0:
        raise DevstackError(
            f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{out.strip()[-3000:]}")
    return out


def _points_into(run_dir: Path, pid: int) -> bool:
    """One of our executables with its cwd inside run_dir or run_dir on its command line
    (a developer's shell sitting in run_dir/logs is left alone)."""
    root = str(run_dir)
    try:
        if os.path.basename(os.readlink(f"/proc/{pid}/exe")) not in _OUR_EXES:
            return False
        cwd = os.readlink(f"/proc/{pid}/cwd")
        argv = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return cwd == root or cwd.startswith(root + "/") or root.encode() in argv


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            break
    return pids


def strays(run_dir: Path) -> list[int]:
    """Live processes that belong to run_dir: carrying its marker, or pointing into it."""
    mine = _ancestors()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        pid = int(entry.name)
        if not is_alive(pid):
            continue
        if _environ(pid).get(RUN_DIR_VAR) == str(run_dir) or _points_into(run_dir, pid):
            found.append(pid)
    return sorted(found)


def kill_strays(run_dir: Path, grace: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL, every stray of run_dir; return the pids that were found."""
    found = strays(run_dir)
    for pid in found:
        _signal(pid, signal.SIGTERM, group=False)
    deadline = time.monotonic() + grace
    while any(is_alive(p) for p in found) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in found:
        if is_alive(pid):
            _signal(pid, signal.SIGKILL, group=False)
    return found


def port_owner(port: int) -> str | None:
    """'pid N (cmdline)' of whoever listens on TCP port (any address), None if nobody does."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(cols[9])
    if not inodes:
        return None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                    return f"pid {entry.name} ({cmd.strip()[:120]})"
    return "an unknown process"


_lock_state = threading.local()


@contextlib.contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Serialise devstack operations on one run_dir across processes (re-entrant per thread)."""
    held: dict[str, int] = getattr(_lock_state, "held", None) or {}
    _lock_state.held = held
    key = str(run_dir)
    if key in held:
        held[key] += 1
        try:
            yield
        finally:
            held[key] -= 1
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / "devstack.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        held[key] = 1
        try:
            yield
        finally:
            del held[key]
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
