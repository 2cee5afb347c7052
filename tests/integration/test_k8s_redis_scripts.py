"""The Redis Cluster scripts of k8s/base/data/redis.yaml, run for real on this machine.

No Kubernetes here: what the manifest holds is taken from it and run as the pods would run it.

* Six ``redis-server`` processes start from the ConfigMap's ``redis.conf`` and the StatefulSet
  container's ``args`` (``$(POD_IP)``... substituted from the container's ``env`` the way the
  kubelet does). Pod ``i`` is the address 127.0.1.(i+1) (all of 127.0.0.0/8 is loopback), port
  6379 and bus 16379 as in the pod. Paths inside the pod (the volume mounts: /data,
  /etc/redis, ...) map to a folder per pod: in the pod's copy of redis.conf only the absolute paths
  (``dir``, ``cluster-config-file``) are rewritten, and ``--bind <its address>`` is added on the
  command line after the container's args; everything else is the manifest's.
* The init Job's container command and the ``rejoin.sh`` postStart hook run in a mount namespace
  of their own (``unshare --mount``) where a private hosts file is bound over /etc/hosts: it plays
  the headless Service's DNS (``redis-<i>.redis`` and ``redis-<i>.redis.<ns>.svc``).
* ``rejoin.sh`` talks to its own server as ``redis-cli -p 6379``, i.e. 127.0.0.1, the pod's own
  loopback. Here 127.0.0.1:6379 forwards to the pod's address while that pod's hook runs (one
  hook at a time).

The readinessProbe's command (``ready.sh``) runs the same way, in pod i's place.

Checked: fresh pods, PONG and all, are not Ready; in a rolling restart a master's replica is not
Ready while its master is down, and the master is Ready again only as a synced replica of its
promoted replica. On fresh pods the hooks do nothing and the Job forms 3 masters + 3 replicas covering the
16384 slots; a second run of the Job changes nothing. After every pod moved to a new address at
once (rescheduled pods: 127.0.2.x, then 127.0.3.x), their nodes.conf naming the old ones, the
postStart hooks bring the same cluster back (same node ids, roles, slots, and a key written
before the move), whether they run after all six servers are up or each as its pod starts.
"""

from __future__ import annotations

import dataclasses
import os
import re
import select
import shutil
import signal
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from devstack.layout import ROOT

pytestmark = pytest.mark.integration

MANIFEST = ROOT / "k8s" / "base" / "data" / "redis.yaml"
NAMESPACE = "ticketping-test"
PORT = 6379
BUS_PORT = PORT + 10000
SLOTS = 16384
INIT_TIMEOUT = 120.0  # the first run of the Job's script
RERUN_TIMEOUT = 15.0  # a second run has nothing to do
HOOK_TIMEOUT = 30.0  # one postStart hook, its server started
CONVERGE_TIMEOUT = 45.0  # hooks done -> every node sees every other at its new address
SUBNETS = (1, 2, 3)  # 127.0.<subnet>.x: the first addresses, then one move per rejoin test
BAD_FLAGS = {"fail", "fail?", "handshake", "noaddr"}
# In the namespace: bind the private hosts file over /etc/hosts, then exec the command unchanged.
IN_NAMESPACE = 'mount --bind "$1" /etc/hosts && shift && exec "$@"'

T = TypeVar("T")


# --- the manifest ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Manifest:
    replicas: int
    config: dict[str, str]  # the ConfigMap's files
    mounts: dict[str, str]  # container mountPath -> volume name
    config_volume: str  # the volume that holds the ConfigMap
    args: list[str]  # the StatefulSet container's args
    env: list[dict[str, Any]]  # ... and its env
    post_start: list[str]  # ... and its postStart exec command
    readiness: list[str]  # ... and its readinessProbe exec command
    init_command: list[str]  # the init Job container's command (+ args)
    init_env: list[dict[str, Any]]


def load_manifest() -> Manifest:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]

    def one(kind: str, name: str) -> dict[str, Any]:
        found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
        assert len(found) == 1, f"{MANIFEST}: expected one {kind} {name}, found {len(found)}"
        return found[0]

    sts = one("StatefulSet", "redis")
    pod = sts["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "redis"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    volumes.update({t["metadata"]["name"]: {} for t in sts["spec"].get("volumeClaimTemplates", [])})
    mounts = {m["mountPath"].rstrip("/"): m["name"] for m in container["volumeMounts"]}
    (config_volume,) = [n for n in mounts.values() if "configMap" in volumes[n]]
    config_map = one("ConfigMap", volumes[config_volume]["configMap"]["name"])

    job = one("Job", "redis-cluster-init")
    (init,) = job["spec"]["template"]["spec"]["containers"]
    assert init.get("command"), "the init Job's container has no command"
    return Manifest(
        replicas=sts["spec"]["replicas"],
        config=config_map["data"],
        mounts=mounts,
        config_volume=config_volume,
        args=container["args"],
        env=container.get("env", []),
        post_start=container["lifecycle"]["postStart"]["exec"]["command"],
        readiness=container["readinessProbe"]["exec"]["command"],
        init_command=[*init["command"], *init.get("args", [])],
        init_env=init.get("env", []),
    )


def resolve_env(env: list[dict[str, Any]], fields: dict[str, str]) -> dict[str, str]:
    """A container's env as the kubelet sets it: plain values, downward-API fields, $(VAR)."""
    out: dict[str, str] = {}
    for e in env:
        if "value" in e:
            out[e["name"]] = expand(str(e["value"]), out)
        else:
            path = e["valueFrom"]["fieldRef"]["fieldPath"]
            assert path in fields, f"env {e['name']}: fieldRef {path} is not emulated here"
            out[e["name"]] = fields[path]
    return out


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command/args/env (``$$`` escapes a ``$``)."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        assert m.group(1) in env, f"$({m.group(1)}) in {text!r} names no env var of the container"
        return env[m.group(1)]

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, text)


# --- pods on loopback addresses -----------------------------------------------------------------------


def pod_ip(subnet: int, i: int) -> str:
    return f"127.0.{subnet}.{i + 1}"


def busy(addr: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no conflict
        try:
            s.bind((addr, port))
        except OSError:
            return True
    return False


def wait_until(probe: Callable[[], tuple[bool, T]], timeout: float, interval: float = 0.25) -> tuple[bool, T]:
    deadline = time.monotonic() + timeout
    while True:
        ok, last = probe()
        if ok or time.monotonic() > deadline:
            return ok, last
        time.sleep(interval)


def cli(ip: str, *args: str) -> str:
    proc = subprocess.run(["redis-cli", "-h", ip, "-p", str(PORT), *args], capture_output=True,
                          text=True, timeout=10)
    return proc.stdout.replace("\r", "") if proc.returncode == 0 else ""


@dataclasses.dataclass(frozen=True)
class Node:
    id: str
    ip: str
    hostname: str
    flags: frozenset[str]
    master_id: str  # "-" for a master
    link: str
    slots: frozenset[int]

    @property
    def role(self) -> str:
        return "master" if "master" in self.flags else "replica" if "slave" in self.flags else "?"


def cluster_nodes(ip: str) -> dict[str, Node]:
    nodes: dict[str, Node] = {}
    for line in cli(ip, "cluster", "nodes").splitlines():
        f = line.split()
        if len(f) < 8:
            continue
        addr, _, hostname = f[1].partition(",")
        slots: set[int] = set()
        for r in f[8:]:
            if r.startswith("["):  # a slot being migrated
                continue
            lo, _, hi = r.partition("-")
            slots.update(range(int(lo), int(hi or lo) + 1))
        nodes[f[0]] = Node(f[0], addr.rsplit(":", 1)[0], hostname, frozenset(f[2].split(",")), f[3], f[7],
                           frozenset(slots))
    return nodes


def cluster_info(ip: str) -> dict[str, str]:
    return dict(line.split(":", 1) for line in cli(ip, "cluster", "info").splitlines() if ":" in line)


class LocalhostForward(socketserver.ThreadingTCPServer):
    """127.0.0.1:6379 -> one pod's address: that pod's loopback, for its postStart hook."""

    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, target: str) -> None:
        self.target = (target, PORT)
        super().__init__(("127.0.0.1", PORT), _Pipe)
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _Pipe(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        assert isinstance(self.server, LocalhostForward)
        try:
            up = socket.create_connection(self.server.target, timeout=5)
        except OSError:
            return  # refused, as the pod's own server would be before it listens
        with up:
            ends = {self.request: up, up: self.request}
            while True:
                ready, _, _ = select.select(list(ends), [], [], 30)
                if not ready:
                    return
                for s in ready:
                    try:
                        data = s.recv(65536)
                        if not data:
                            return
                        ends[s].sendall(data)
                    except OSError:
                        return


@dataclasses.dataclass(frozen=True)
class Run:
    what: str
    code: int | None  # None: killed at the timeout
    output: str
    seconds: float

    def __str__(self) -> str:
        return f"{self.what!r}: exit {self.code} after {self.seconds:.1f}s\n{self.output}"


class Pods:
    """The StatefulSet's pods as redis-server processes, plus the namespace the scripts run in."""

    def __init__(self, manifest: Manifest, root: Path) -> None:
        self.m = manifest
        self.root = root
        self.hosts = root / "hosts"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.subnet = 0
        self.first_hooks: list[Run] = []
        self.known_before_init: list[str | None] = []

    def name(self, i: int) -> str:
        return f"redis-{i}"

    def hostname(self, i: int) -> str:
        return f"{self.name(i)}.redis.{NAMESPACE}.svc"

    def ips(self) -> list[str]:
        return [pod_ip(self.subnet, i) for i in range(self.m.replicas)]

    def host_path(self, i: int, path: str) -> str:
        """A path inside pod i -> its place on this machine (under the volume it is mounted from)."""
        for mount in sorted(self.m.mounts, key=len, reverse=True):
            if path == mount or path.startswith(mount + "/"):
                return str(self.root / self.name(i) / self.m.mounts[mount]) + path[len(mount):]
        raise AssertionError(f"{path} is on no volume of the redis container (read-only root fs)")

    def pod_env(self, i: int) -> dict[str, str]:
        return resolve_env(self.m.env, {"status.podIP": pod_ip(self.subnet, i), "metadata.name": self.name(i),
                                        "metadata.namespace": NAMESPACE})

    def command(self, i: int, argv: list[str]) -> list[str]:
        env = self.pod_env(i)
        out = [expand(a, env) for a in argv]
        return [self.host_path(i, a) if a.startswith("/") else a for a in out]

    def server_argv(self, i: int) -> list[str]:
        argv = self.command(i, self.m.args)
        assert Path(argv[0]).name == "redis-server", f"the container's args do not start redis-server: {argv}"
        # Overridden after the conf: the one address this pod has here, and no daemon.
        return ["redis-server", *argv[1:], "--bind", pod_ip(self.subnet, i), "--daemonize", "no"]

    def config_file(self, i: int, name: str, text: str) -> str:
        """The ConfigMap's file as pod i sees it; in redis.conf, the paths inside the pod (dir,
        cluster-config-file, ...) become their places here (``dir`` is entered while parsing, so
        this cannot wait for the command line). Nothing else changes."""
        if name != "redis.conf":
            return text
        out = []
        for line in text.splitlines():
            words = line.split()
            if words and not words[0].startswith("#") and any(w.startswith("/") for w in words[1:]):
                line = " ".join(self.host_path(i, w) if w.startswith("/") else w for w in words)
            out.append(line)
        return "\n".join(out) + "\n"

    def write_hosts(self) -> None:
        lines = ["127.0.0.1 localhost"]
        for i, ip in enumerate(self.ips()):
            lines.append(f"{ip} {self.name(i)}.redis {self.hostname(i)} {self.hostname(i)}.cluster.local")
        self.hosts.write_text("\n".join(lines) + "\n")

    def start(self, subnet: int, hooks: bool = False) -> list[Run]:
        """Start the six on 127.0.<subnet>.x; with ``hooks``, each one's postStart hook runs as soon as
        its server is started (the kubelet's order), before the next pod starts."""
        assert not self.procs
        self.subnet = subnet
        self.write_hosts()
        runs = []
        for i in range(self.m.replicas):
            for volume in set(self.m.mounts.values()):
                (self.root / self.name(i) / volume).mkdir(parents=True, exist_ok=True)
            for fname, text in self.m.config.items():
                path = self.root / self.name(i) / self.m.config_volume / fname
                path.write_text(self.config_file(i, fname, text))
            log = (self.root / f"{self.name(i)}.log").open("ab")
            self.procs.append(subprocess.Popen(self.server_argv(i), stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, start_new_session=True))
            log.close()
            if hooks:
                runs.append(self.run_hook(i))
        return runs

    def in_pod(self, i: int, argv: list[str]) -> Run:
        """A command of pod i's container, with its env, its loopback and the Service's DNS."""
        forward = LocalhostForward(pod_ip(self.subnet, i))
        try:
            return self.run(self.command(i, argv), self.pod_env(i), HOOK_TIMEOUT)
        finally:
            forward.close()

    def run_hook(self, i: int) -> Run:
        """Pod i's postStart command."""
        return self.in_pod(i, self.m.post_start)

    def ready(self, i: int) -> Run:
        """Pod i's readinessProbe command, as the kubelet runs it in the pod (exit 0: Ready)."""
        return self.in_pod(i, self.m.readiness)

    def stop_pod(self, i: int) -> None:
        """Pod i deleted (a rolling restart's step): SIGTERM, as the kubelet sends."""
        proc = self.procs[i]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)

    def start_pod(self, i: int) -> Run:
        """Pod i back on the same address and volumes, then its postStart hook."""
        assert self.procs[i].poll() is not None, f"{self.name(i)} is still running"
        log = (self.root / f"{self.name(i)}.log").open("ab")
        self.procs[i] = subprocess.Popen(self.server_argv(i), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        return self.run_hook(i)

    def wait_up(self, timeout: float = 15.0) -> None:
        def probe() -> tuple[bool, list[str]]:
            exited = [ip for ip, p in zip(self.ips(), self.procs, strict=True) if p.poll() is not None]
            down = [ip for ip in self.ips() if ip in exited or cli(ip, "ping").strip() != "PONG"]
            assert not exited, f"exited: {exited}\n{self.logs()}"
            return not down, down

        ok, down = wait_until(probe, timeout)
        assert ok, f"not answering: {down}\n{self.logs()}"

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)  # as the kubelet does: AOF flushed, nodes.conf saved
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []

    def logs(self, lines: int = 15) -> str:
        out = []
        for i in range(self.m.replicas):
            path = self.root / f"{self.name(i)}.log"
            tail = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
            out.append(f"--- {self.name(i)} ---\n" + "\n".join(tail))
        return "\n".join(out)

    def run(self, argv: list[str], env: dict[str, str], timeout: float) -> Run:
        """argv in a mount namespace whose /etc/hosts is ours: (exit code or None on timeout, output, s)."""
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), **env}
        started = time.monotonic()
        namespaced = ["unshare", "--mount", "sh", "-c", IN_NAMESPACE, "sh", str(self.hosts), *argv]
        proc = subprocess.Popen(namespaced, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
            code: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            code = None
        return Run(argv[-1][:60], code, out.decode(errors="replace"), time.monotonic() - started)


# --- what a healthy cluster looks like -----------------------------------------------------------------


def topology(nodes: dict[str, Node]) -> dict[str, tuple[str, str, frozenset[int]]]:
    return {n.id: (n.role, n.master_id, n.slots) for n in nodes.values()}


def problems(pods: Pods) -> list[str]:
    """Everything that keeps the six from being one healthy 3 + 3 cluster at their current addresses."""
    found: list[str] = []
    expected = {ip: pods.hostname(i) for i, ip in enumerate(pods.ips())}
    views = {}
    for ip in pods.ips():
        info = cluster_info(ip)
        for key, want in (("cluster_state", "ok"), ("cluster_known_nodes", str(pods.m.replicas)),
                          ("cluster_slots_ok", str(SLOTS))):
            if info.get(key) != want:
                found.append(f"{ip}: {key}={info.get(key)}")
        nodes = views[ip] = cluster_nodes(ip)
        for n in nodes.values():
            if expected.get(n.ip) != n.hostname:
                found.append(f"{ip} sees {n.id[:8]} at {n.ip},{n.hostname}")
            if n.flags & BAD_FLAGS or ("myself" not in n.flags and n.link != "connected"):
                found.append(f"{ip} sees {n.id[:8]} ({n.ip}) {','.join(sorted(n.flags))} {n.link}")
    first = views[pods.ips()[0]]
    masters = [n for n in first.values() if n.role == "master"]
    replicas = [n for n in first.values() if n.role == "replica"]
    if (len(masters), len(replicas)) != (3, 3):
        found.append(f"{len(masters)} masters, {len(replicas)} replicas")
    if sorted(r.master_id for r in replicas) != sorted(m.id for m in masters):
        found.append("not one replica per master")
    covered = [s for m in masters for s in m.slots]
    if len(covered) != SLOTS or set(covered) != set(range(SLOTS)):
        found.append(f"masters own {len(set(covered))} distinct slots ({len(covered)} in all)")
    if {n.ip for n in first.values()} != set(pods.ips()):
        found.append(f"nodes at {sorted(n.ip for n in first.values())}")
    for ip, view in views.items():
        if topology(view) != topology(first):
            found.append(f"{ip} does not agree with {pods.ips()[0]} on the roles")
    return found


def healthy(pods: Pods, timeout: float) -> list[str]:
    ok, found = wait_until(lambda: (not (p := problems(pods)), p), timeout)
    return [] if ok else found


def all_ready(pods: Pods, timeout: float) -> list[str]:
    """Wait until every pod's readiness command passes; what still fails after ``timeout``."""
    def probe() -> tuple[bool, list[str]]:
        failing = [f"{pods.name(i)}: {run.output.strip()}" for i in range(pods.m.replicas)
                   if (run := pods.ready(i)).code != 0]
        return not failing, failing

    ok, failing = wait_until(probe, timeout, interval=0.5)
    return [] if ok else failing


# --- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return load_manifest()


@pytest.fixture(scope="module")
def pods(manifest: Manifest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pods]:
    for tool in ("redis-server", "redis-cli", "unshare", "mount", "getent"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    taken = [f"{pod_ip(s, i)}:{p}" for s in SUBNETS for i in range(manifest.replicas)
             for p in (PORT, BUS_PORT) if busy(pod_ip(s, i), p)]
    taken += ["127.0.0.1:6379"] if busy("127.0.0.1", PORT) else []
    if taken:
        pytest.skip(f"already in use: {', '.join(taken)}")
    root = tmp_path_factory.mktemp("k8s-redis")
    probe = root / "probe-hosts"
    probe.write_text("127.0.1.1 namespace-probe.redis\n")
    proc = subprocess.run(["unshare", "--mount", "sh", "-c", IN_NAMESPACE, "sh", str(probe),
                           "getent", "hosts", "namespace-probe.redis"],
                          capture_output=True, text=True, timeout=10)
    if proc.returncode != 0 or "127.0.1.1" not in proc.stdout:
        pytest.skip(f"cannot bind a hosts file in a mount namespace (unshare --mount; mount --bind): "
                    f"exit {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    pods = Pods(manifest, root)
    try:
        pods.first_hooks = pods.start(subnet=1, hooks=True)
        pods.wait_up()
        yield pods
    finally:
        pods.stop()


@pytest.fixture(scope="module")
def formed(pods: Pods) -> Run:
    """The init Job's first run on the six fresh pods (their postStart hooks have run)."""
    pods.known_before_init = [cluster_info(ip).get("cluster_known_nodes") for ip in pods.ips()]
    env = resolve_env(pods.m.init_env, {"metadata.namespace": NAMESPACE})
    return pods.run(pods.m.init_command, env, INIT_TIMEOUT)


# --- tests ---------------------------------------------------------------------------------------------


def test_fresh_pods_are_not_ready_until_the_cluster_is_formed(pods: Pods) -> None:
    """Six servers that answer PING but form no cluster yet serve nothing: not Ready. (The init Job
    and the headless Service do not wait for readiness: publishNotReadyAddresses.)"""
    for i, ip in enumerate(pods.ips()):
        assert cli(ip, "ping").strip() == "PONG"
        run = pods.ready(i)
        assert run.code == 1 and "cluster_state:fail" in run.output, f"{pods.name(i)}: {run}"


def test_init_job_forms_the_cluster_once(pods: Pods, formed: Run) -> None:
    # First deployment: each pod's postStart hook found a node that never joined and left it alone.
    for run in pods.first_hooks:
        assert run.code == 0, f"postStart on a fresh pod: {run}"
    assert pods.known_before_init == ["1"] * pods.m.replicas, pods.known_before_init
    assert formed.code == 0, f"init Job script (timeout {INIT_TIMEOUT}s): {formed}\n{pods.logs()}"
    assert "creating the cluster" in formed.output, formed.output
    assert not (found := healthy(pods, 15)), f"{found}\n{formed.output}"
    before = topology(cluster_nodes(pods.ips()[0]))

    # The Job runs again (a retry, a re-applied manifest): nothing to do, nothing changes.
    env = resolve_env(pods.m.init_env, {"metadata.namespace": NAMESPACE})
    again = pods.run(pods.m.init_command, env, RERUN_TIMEOUT)
    assert again.code == 0, f"second run: {again}"
    assert "creating the cluster" not in again.output, again.output
    assert not problems(pods)
    for ip in pods.ips():
        assert topology(cluster_nodes(ip)) == before, ip


def test_a_pod_of_a_rolling_restart_is_ready_only_once_it_serves_again(pods: Pods, formed: Run) -> None:
    """A rolling restart stops the next pod only once the last one is Ready again. Readiness must
    therefore say more than PING: while a master is down its replica (PONG) is not Ready, nor is
    any node while the cluster is failing over; the master comes back as its old replica's replica
    and is Ready once linked and synced, the cluster whole again, a key written before kept."""
    if formed.code != 0:
        pytest.fail(f"no cluster: the init Job's script failed: {formed}")
    assert not (found := healthy(pods, 15)), found
    assert not (unready := all_ready(pods, 15)), f"in a healthy cluster: {unready}"
    nodes = cluster_nodes(pods.ips()[0])
    index = {n.id: pods.ips().index(n.ip) for n in nodes.values()}
    master = next(n for n in nodes.values() if n.role == "master")
    (replica,) = [n for n in nodes.values() if n.master_id == master.id]
    m, r = index[master.id], index[replica.id]
    key = next(k for k in (f"rolling-{j}" for j in range(1000))
               if int(cli(master.ip, "cluster", "keyslot", k).strip()) in master.slots)
    assert cli(master.ip, "set", key, "kept").strip() == "OK"
    assert cli(master.ip, "wait", "1", "2000").strip() == "1"  # on the replica too

    pods.stop_pod(m)
    assert cli(replica.ip, "ping").strip() == "PONG"
    run = pods.ready(r)
    assert run.code == 1 and "link to its master down" in run.output, f"{pods.name(r)}, master down: {run}"

    def promoted() -> tuple[bool, Run]:
        run = pods.ready(r)
        return run.code == 0, run

    ok, run = wait_until(promoted, 30, interval=0.5)
    assert ok, f"{pods.name(r)} not Ready after the failover: {run}\n{pods.logs()}"
    assert "master" in cluster_nodes(replica.ip)[replica.id].flags

    hook = pods.start_pod(m)
    assert hook.code == 0, f"postStart of the restarted {pods.name(m)}: {hook}"

    def back() -> tuple[bool, Run]:
        run = pods.ready(m)
        return run.code == 0, run

    ok, run = wait_until(back, CONVERGE_TIMEOUT, interval=0.5)
    assert ok, f"the restarted {pods.name(m)} never Ready: {run}\n{pods.logs()}"
    assert not (found := healthy(pods, 15)), found
    assert cluster_nodes(master.ip)[master.id].master_id == replica.id  # its old replica's replica now
    assert cli(replica.ip, "get", key).strip() == "kept"
    assert not (unready := all_ready(pods, 15)), f"after the restart: {unready}"


@pytest.mark.parametrize("hooks", ["after-all-started", "as-each-starts"])
def test_rejoin_after_every_pod_moved(pods: Pods, formed: Run, hooks: str) -> None:
    """Every pod rescheduled at once: same volumes (nodes.conf, AOF), new IPs, the DNS follows.
    The hooks run once all six servers are up, or each right after its own server started (the
    others not started yet: their MEETs from this pod fail, theirs to it succeed later)."""
    if formed.code != 0:
        pytest.fail(f"no cluster to move: the init Job's script failed: {formed}")
    assert not (found := healthy(pods, 15)), found
    old_ips = set(pods.ips())
    before = topology(cluster_nodes(pods.ips()[0]))
    ids = {n.id: pods.ips().index(n.ip) for n in cluster_nodes(pods.ips()[0]).values()}
    # One key, written to the master that owns its slot, must survive the move (AOF on /data).
    key = f"rejoin-probe-{hooks}"
    slot = int(cli(pods.ips()[0], "cluster", "keyslot", key).strip())
    (owner,) = [n for n in cluster_nodes(pods.ips()[0]).values() if slot in n.slots and n.role == "master"]
    assert cli(owner.ip, "set", key, "kept").strip() == "OK"

    pods.stop()
    runs = pods.start(subnet=pods.subnet + 1, hooks=hooks == "as-each-starts")
    pods.wait_up()
    if not runs:
        stale = cluster_nodes(pods.ips()[0])
        assert set(stale) == set(before), "the restarted node forgot its peers (nodes.conf not kept?)"
        assert {n.ip for n in stale.values() if "myself" not in n.flags} <= old_ips, \
            "expected nodes.conf to name the peers at their old addresses"
        runs = [pods.run_hook(i) for i in range(pods.m.replicas)]
    for i, run in enumerate(runs):
        assert run.code == 0, f"postStart on {pods.name(i)}: {run}"

    found = healthy(pods, CONVERGE_TIMEOUT)
    assert not found, f"not back within {CONVERGE_TIMEOUT}s: {found}\n{pods.logs()}"
    after = cluster_nodes(pods.ips()[0])
    assert topology(after) == before
    assert {n.id: pods.ips().index(n.ip) for n in after.values()} == ids  # each pod kept its identity
    assert cli(after[owner.id].ip, "get", key).strip() == "kept"
