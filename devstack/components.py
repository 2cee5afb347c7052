"""What runs, per layout: Redis, PostgreSQL, Kafka, the five services and Envoy.

Building a Component has no side effect. ``prepare`` runs before a (re)start (configs, initdb,
Kafka storage format), ``probe`` answers "ready?" once, ``setup`` runs after every successful
ensure (databases, topics, the Kafka round trip) and must be idempotent.
"""

from __future__ import annotations

import base64
import contextlib
import os
import pwd
import shutil
import signal
import stat
import sys
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from devstack import probes
from devstack.install import KAFKA_LIBS, ensure_installed, kafka_installed, postgres_bin_dir
from devstack.layout import (
    KAFKA_DLQ_PARTITIONS,
    KAFKA_PARTITIONS,
    KAFKA_PROBE_TOPIC,
    KAFKA_TOPICS,
    ROOT,
    Layout,
    Service,
)
from devstack.proc import (
    DevstackError,
    ProcSpec,
    log_path,
    rotate_if_large,
    run_checked,
    running_pid,
    spawn,
    stop_all,
    wait_until,
)

VENV = ROOT / ".venv"
_VENV_PY = VENV / "bin" / "python"
VENV_PYTHON = _VENV_PY if _VENV_PY.exists() else Path(sys.executable)
ENVOY = VENV / "bin" / "envoy"
KAFKA_HEAP = ("-Xms256m", "-Xmx512m")
INFRA = ("redis", "postgres", "kafka")


def _nothing() -> None:
    return None


@dataclass(frozen=True)
class Component:
    spec: ProcSpec
    ports: tuple[int, ...]  # must be free before it starts
    probe: Callable[[], object]
    timeout: float  # seconds to become ready
    prepare: Callable[[], None] = _nothing
    setup: Callable[[], None] = _nothing

    @property
    def name(self) -> str:
        return self.spec.name


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# --- Redis -----------------------------------------------------------------------------------

def _redis_conf(layout: Layout) -> str:
    return "\n".join([
        f"port {layout.redis_port}",
        "bind 127.0.0.1",
        # The services' way in (Layout.local_redis_url); only this user may connect.
        *([f"unixsocket {layout.redis_socket}", "unixsocketperm 700"]
          if layout.local_redis_url.startswith("unix:") else []),
        "protected-mode yes",
        "daemonize no",
        'logfile ""',  # stdout, i.e. logs/redis.log
        "set-proc-title no",  # keep /proc/<pid>/environ readable (devstack's ownership marker)
        f"dir {layout.run_dir / 'redis'}",
        "appendonly yes",  # acknowledged writes survive a restart (AOF, fsync every second)
        "appendfsync everysec",
        'save ""',  # the AOF is the persistence; no RDB snapshots on top
        "",
    ])


def redis(layout: Layout) -> Component:
    conf = layout.run_dir / "redis" / "redis.conf"
    return Component(
        spec=ProcSpec("redis", ("redis-server", str(conf)), cwd=layout.run_dir / "redis"),
        ports=(layout.redis_port,),
        probe=partial(probes.redis_ping, layout.redis_port),
        timeout=20,
        prepare=lambda: _write(conf, _redis_conf(layout)),
    )


# --- PostgreSQL ------------------------------------------------------------------------------

def _postgres_user() -> str | None:
    """PostgreSQL refuses to run as root: as root, run it as 'postgres' (or 'nobody')."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise DevstackError("running as root with no 'postgres' or 'nobody' user for PostgreSQL")


def _pg_bin(tool: str) -> str:
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        raise DevstackError("PostgreSQL is not installed: run `python -m devstack install`")
    return str(bin_dir / tool)


def _chown(path: Path, user: str | None) -> None:
    if user is not None:
        shutil.chown(path, user, user)


def _let_others_traverse(path: Path) -> None:
    """PostgreSQL runs as its own user, who must be able to pass through every folder above its
    data (a checkout under `mktemp -d`, mode 0700, is not passable). Add only the others' search
    bit (no read: nothing is listed) where it is missing, and say so."""
    for folder in [path, *path.parents]:
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            folder.chmod(mode | stat.S_IXOTH)
            print(f"devstack: let PostgreSQL's user pass through {folder} (o+x)")


def _prepare_postgres(layout: Layout) -> None:
    data, sock, user = layout.run_dir / "postgres", layout.postgres_socket_dir, _postgres_user()
    layout.run_dir.chmod(0o755)  # PostgreSQL's own user must reach its folders
    if user is not None:
        _let_others_traverse(layout.run_dir)
    sock.mkdir(parents=True, exist_ok=True)
    _chown(sock, user)
    if not (data / "PG_VERSION").exists():
        _initdb(layout, data, user)
    (data / "pg_hba.conf").write_text(
        "# devstack: local stack only, loopback with trust\n"
        "local all all trust\n"
        "host  all all 127.0.0.1/32 trust\n")
    _chown(data / "pg_hba.conf", user)


def _initdb(layout: Layout, data: Path, user: str | None) -> None:
    """initdb into a scratch folder, renamed into place only when complete."""
    tmp = data.with_name("postgres.initdb")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(data, ignore_errors=True)
    tmp.mkdir(mode=0o700, parents=True)
    _chown(tmp, user)
    run_checked([_pg_bin("initdb"), "-D", str(tmp), "-U", layout.postgres_user, "--auth=trust",
                 "-E", "UTF8", "--no-locale"], "initdb", log=log_path(layout.run_dir, "postgres"),
                cwd=tmp, user=user, group=user, extra_groups=[] if user else None)
    tmp.replace(data)


def _create_databases(layout: Layout) -> None:
    import psycopg
    from psycopg import errors, sql

    with psycopg.connect(layout.postgres_dsn("postgres"), autocommit=True, connect_timeout=5) as c:
        have = {row[0] for row in c.execute("SELECT datname FROM pg_database")}
        for name in layout.databases:
            if name not in have:
                try:
                    c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                except errors.DuplicateDatabase:
                    pass


def postgres(layout: Layout) -> Component:
    argv = (
        _pg_bin("postgres") if postgres_bin_dir() else "postgres",
        "-D", str(layout.run_dir / "postgres"),
        "-p", str(layout.postgres_port),
        "-h", "127.0.0.1",
        "-k", str(layout.postgres_socket_dir),
        "-c", "fsync=on",
        "-c", "max_connections=200",
        "-c", "logging_collector=off",
    )
    return Component(
        # SIGINT = fast shutdown, to the postmaster only (SIGTERM would wait for clients).
        spec=ProcSpec("postgres", argv, cwd=layout.run_dir / "postgres", user=_postgres_user(),
                      stop_signal=signal.SIGINT, signal_group=False, stop_timeout=30),
        ports=(layout.postgres_port,),
        probe=partial(probes.postgres_select1, layout.postgres_dsn("postgres")),
        timeout=60,
        prepare=partial(_prepare_postgres, layout),
        setup=partial(_create_databases, layout),
    )


# --- Kafka (KRaft, one combined broker+controller node) ---------------------------------------

def _kafka_properties(layout: Layout) -> str:
    ctrl = f"127.0.0.1:{layout.kafka_controller_port}"
    eight_mib = 8 * 1024 * 1024
    return "\n".join([
        "process.roles=broker,controller",
        "node.id=1",
        f"controller.quorum.voters=1@{ctrl}",
        f"listeners=PLAINTEXT://{layout.kafka_bootstrap},CONTROLLER://{ctrl}",
        f"advertised.listeners=PLAINTEXT://{layout.kafka_bootstrap}",
        "controller.listener.names=CONTROLLER",
        "inter.broker.listener.name=PLAINTEXT",
        "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        f"log.dirs={layout.run_dir / 'kafka' / 'data'}",
        "num.partitions=1",
        "default.replication.factor=1",
        "min.insync.replicas=1",
        "offsets.topic.replication.factor=1",
        "offsets.topic.num.partitions=10",
        "transaction.state.log.replication.factor=1",
        "transaction.state.log.min.isr=1",
        "transaction.state.log.num.partitions=10",
        "auto.create.topics.enable=false",
        f"message.max.bytes={eight_mib}",
        f"replica.fetch.max.bytes={eight_mib}",
        "group.initial.rebalance.delay.ms=0",
        # One machine, a handful of clients: Kafka's defaults (8 request handlers, 3 network
        # threads) only add hand-offs between threads on 2 cores.
        "num.io.threads=2",
        "num.network.threads=1",
        "",
    ])


def _kafka_log4j(layout: Layout) -> str:
    return "\n".join([
        "log4j.rootLogger=INFO, file",
        "log4j.appender.file=org.apache.log4j.FileAppender",
        f"log4j.appender.file.File={log_path(layout.run_dir, 'kafka')}",
        "log4j.appender.file.Append=true",
        "log4j.appender.file.layout=org.apache.log4j.PatternLayout",
        "log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n",
        "log4j.logger.kafka.request.logger=WARN",
        "log4j.logger.state.change.logger=WARN",
        "log4j.logger.kafka.authorizer.logger=WARN",
        "log4j.logger.org.apache.kafka.clients=WARN",
        "",
    ])


def _java(layout: Layout, main: str, *args: str) -> tuple[str, ...]:
    """The broker's JVM. TieredStopAtLevel=1: the quick (C1) compiler only. A fresh broker spent
    4.2 s of CPU in the first purchases bench (800 purchases) against 0.8-1.3 s once warm, most
    of it in the optimizing compiler; with C1 alone the first run costs it 2.1 s and later ones
    the same as before (1.3-1.9 s). A development broker never runs long enough to repay C2."""
    log4j = layout.run_dir / "kafka" / "log4j.properties"
    return ("java", *KAFKA_HEAP, "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-XX:TieredStopAtLevel=1",
            "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{log4j}", "-cp", f"{KAFKA_LIBS}/*", main, *args)


def _prepare_kafka(layout: Layout) -> None:
    if not kafka_installed():
        ensure_installed()
    home = layout.run_dir / "kafka"
    props, data = home / "server.properties", home / "data"
    _write(props, _kafka_properties(layout))
    _write(home / "log4j.properties", _kafka_log4j(layout))
    (home / "probe-ok").unlink(missing_ok=True)
    if not (data / "meta.properties").exists():
        shutil.rmtree(data, ignore_errors=True)  # never formatted, or a format cut short
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        # `--cluster-id=<id>` in one word: a base64url id may begin with "-" (1 in 32), which
        # the tool's argument parser would take for an option.
        run_checked(_java(layout, "kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}",
                          f"--config={props}"), "Kafka storage format",
                    log=log_path(layout.run_dir, "kafka"), cwd=home)


def _kafka_topics(layout: Layout) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError, for_code

    wanted = {t: KAFKA_PARTITIONS for t in KAFKA_TOPICS}
    wanted |= {f"{t}.dlq": KAFKA_DLQ_PARTITIONS for t in KAFKA_TOPICS}

    async def create() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=layout.kafka_bootstrap,
                                    request_timeout_ms=30000)
        await admin.start()
        try:
            missing = sorted(set(wanted) - set(await admin.list_topics()))
            if not missing:
                return
            reply = await admin.create_topics([NewTopic(t, wanted[t], 1) for t in missing])
            for topic, code, *rest in reply.topic_errors:
                if code and for_code(code) is not TopicAlreadyExistsError:
                    raise DevstackError(f"creating Kafka topic {topic}: "
                                        f"{for_code(code).__name__} {rest}")
        finally:
            await admin.close()

    probes.run_async(create)


def _setup_kafka(layout: Layout, pid: Callable[[], int | None]) -> None:
    """Topics, then (once per broker process) an idempotent produce + consume round trip."""
    _kafka_topics(layout)
    marker, current = layout.run_dir / "kafka" / "probe-ok", str(pid())
    if marker.exists() and marker.read_text().strip() == current:
        return
    try:
        probes.kafka_roundtrip(layout.kafka_bootstrap, KAFKA_PROBE_TOPIC)
    except Exception as exc:
        raise DevstackError(
            f"Kafka answers metadata but the idempotent produce/consume round trip on "
            f"{KAFKA_PROBE_TOPIC} failed: {type(exc).__name__}: {exc}; read "
            f"{log_path(layout.run_dir, 'kafka')}") from exc
    marker.write_text(current + "\n")


def kafka(layout: Layout) -> Component:
    props = layout.run_dir / "kafka" / "server.properties"
    return Component(
        spec=ProcSpec("kafka", _java(layout, "kafka.Kafka", str(props)),
                      cwd=layout.run_dir / "kafka", stop_timeout=30),
        ports=(layout.kafka_port, layout.kafka_controller_port),
        probe=partial(probes.kafka_metadata, layout.kafka_bootstrap),
        timeout=120,
        prepare=partial(_prepare_kafka, layout),
        setup=partial(_setup_kafka, layout, partial(running_pid, layout.run_dir, "kafka")),
    )


def infra(layout: Layout) -> list[Component]:
    return [redis(layout), postgres(layout), kafka(layout)]


# --- the five services -----------------------------------------------------------------------

def service_env(layout: Layout, svc: Service) -> dict[str, str]:
    env = {
        "TP_SERVICE_NAME": svc.name,
        "TP_GRPC_PORT": str(svc.grpc_port),
        "TP_METRICS_PORT": str(svc.metrics_port),
        "TP_KAFKA_BOOTSTRAP": layout.kafka_bootstrap,
        "TP_LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    }
    if svc.needs_postgres:
        env["TP_POSTGRES_DSN"] = layout.local_postgres_dsn(svc.database)
    if svc.needs_redis:
        env["TP_REDIS_URL"] = layout.local_redis_url
    if svc.name == "identity":
        env["TP_KEY_ENCRYPTION_KEY"] = local_key(layout, "identity-key-encryption-key")
        env["TP_QUEUE_ADDR"] = f"127.0.0.1:{layout.service('queue').grpc_port}"
        if layout.profile == "test":  # cheap hashing so tests that sign up many fans stay quick
            env.update(TP_ARGON2_TIME_COST="1", TP_ARGON2_MEMORY_COST_KIB="8192",
                       TP_ARGON2_PARALLELISM="1",
                       # longer than the edge's JWKS cache (30 s), short enough for a rotation test
                       TP_KEY_PUBLISH_AHEAD_SECONDS="35")
    if svc.name == "queue":
        # Encrypts the admission-token private keys stored in Redis (svc_queue/README.md).
        env["TP_KEY_ENCRYPTION_KEY"] = local_key(layout, "queue-key-encryption-key")
        # A room lost from Redis is rebuilt from catalog's GetEvent (svc_queue/recovery.py).
        env["TP_CATALOG_ADDR"] = f"127.0.0.1:{layout.service('catalog').grpc_port}"
        if layout.profile == "test":
            # longer than the edge's JWKS cache (30 s), short enough for a rotation test
            env["TP_KEY_PUBLISH_AHEAD_SECONDS"] = "35"
    if svc.name == "booking":
        env["TP_QUEUE_ADDR"] = f"127.0.0.1:{layout.service('queue').grpc_port}"
        if layout.profile == "test":  # expiry within a test's patience
            env.update(TP_SWEEP_INTERVAL_SECONDS="0.2")
    if svc.name == "payment":
        # Orders are read from booking; the sandbox provider calls back through the edge, signing
        # with the secret the webhook checks (svc_payment/README.md).
        env["TP_BOOKING_ADDR"] = f"127.0.0.1:{layout.service('booking').grpc_port}"
        env["TP_PAYMENT_WEBHOOK_SECRET"] = local_key(layout, "payment-webhook-secret")
        env["TP_WEBHOOK_URL"] = f"{layout.edge_url}/v1/payments/webhook"
        # Local stacks only: a caller may pick the sandbox's outcome (tests, `make demo`'s declines).
        env["TP_SANDBOX_OUTCOME_HEADER"] = "true"
        if layout.profile == "test":  # quick callbacks
            env["TP_SANDBOX_DELAY_SECONDS"] = "0.2"
    return env


def local_key(layout: Layout, name: str) -> str:
    """A secret for this machine's local stack only, generated once into run_dir/secrets/.

    Never committed (.run/ is ignored); a real deployment passes its own from a secret store.
    """
    import secrets

    path = layout.run_dir / "secrets" / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(secrets.token_urlsafe(32))
        tmp.chmod(0o600)
        tmp.rename(path)
    return path.read_text().strip()


def service(layout: Layout, svc: Service) -> Component:
    return Component(
        spec=ProcSpec(svc.module, (str(VENV_PYTHON), "-m", svc.module), cwd=ROOT,
                      env=service_env(layout, svc), stop_timeout=15),
        ports=(svc.grpc_port, svc.metrics_port),
        probe=partial(probes.grpc_serving, svc.grpc_port, svc.proto_service),
        timeout=60,
    )


def services(layout: Layout, names: list[str] | None = None) -> list[Component]:
    chosen = [layout.service(n) for n in names] if names else list(layout.services)
    return [service(layout, s) for s in chosen]


# --- Envoy -----------------------------------------------------------------------------------

def envoy_config_path(layout: Layout) -> Path:
    return layout.run_dir / "envoy.yaml"


def render_envoy_config(layout: Layout, path: Path) -> None:
    """edge.config.write_config(layout, path), imported lazily: the lead writes edge/config.py."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        from edge.config import write_config  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        raise DevstackError(
            f"cannot start the edge: edge.config.write_config is not importable ({exc}); "
            f"edge/config.py (write_config(layout, path)) must exist first") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    write_config(layout, path)
    if not path.is_file():
        raise DevstackError(f"edge.config.write_config(layout, {path}) wrote no file")


def _prepare_envoy(layout: Layout) -> None:
    """Its config, and its access logs (one per listener, written by Envoy itself, not through
    spawn) set aside if large, as spawn does with every process's own log."""
    for access_log in layout.logs_dir.glob("*-access.log"):
        rotate_if_large(access_log)
    render_envoy_config(layout, envoy_config_path(layout))


# Envoy 1.40 calls prctl(PR_SET_PDEATHSIG, SIGTERM): it dies with its parent, so a plain spawn
# would die when `python -m devstack up` (or pytest) exits. A shell that waits for it stays its
# parent for as long as it runs; the shell leads the process group we signal. The shell also
# starts Envoy again when it crashes (killed by SIGABRT, SIGBUS, SIGFPE or SIGSEGV: exit status
# 128 + the signal), a second later, as Kubernetes restarts a crashed pod: the whole REST
# surface is this one process (session 22 saw it segfault once under the bench's load, in the
# cache_v2 filter). A stop signals the whole group, shell included: a stopped Envoy stays
# stopped, and an Envoy that exits by itself (a bad config) is not started again.
ENVOY_KEEPER = ('while :; do "$@"; rc=$?; case $rc in 134|135|136|139) '
                'echo "envoy-keeper: envoy crashed (exit status $rc), starting it again" >&2; sleep 1;; '
                '*) exit $rc;; esac; done')


def envoy(layout: Layout) -> Component:
    argv = ("/bin/sh", "-c", ENVOY_KEEPER, "envoy-keeper",
            str(ENVOY), "-c", str(envoy_config_path(layout)),
            "--base-id", str(layout.envoy_base_id),
            "--log-path", str(log_path(layout.run_dir, "envoy")))
    return Component(
        spec=ProcSpec("envoy", argv, cwd=layout.run_dir, stop_timeout=10),
        ports=(layout.edge_port, layout.edge_inner_port, layout.edge_keys_port,
               layout.edge_fill_port, layout.envoy_admin_port),
        probe=partial(probes.envoy_ready, layout.envoy_admin_port,
                      [s.grpc_port for s in layout.services]),
        timeout=60,
        prepare=partial(_prepare_envoy, layout),
    )


def edge_feed(layout: Layout) -> Component:
    """edge/feed.py: the open rooms' status, answered by Envoy itself (after envoy)."""
    config = envoy_config_path(layout)

    def fed() -> bool:
        from edge.config import routes_dir  # type: ignore[import-not-found,unused-ignore]
        from edge.feed import alive  # type: ignore[import-not-found,unused-ignore]
        return bool(alive(routes_dir(config)))

    return Component(
        spec=ProcSpec("edge-feed", (str(VENV_PYTHON), "-m", "edge.feed", "--profile", layout.profile,
                                    "-c", str(config)), cwd=ROOT, stop_timeout=10),
        ports=(),
        probe=fed,
        timeout=30,
    )


@contextlib.contextmanager
def another_envoy(layout: Layout, name: str, config: Path, admin_port: int) -> Iterator[int]:
    """Run a second Envoy from `config` beside the stack's (a benchmark's baseline, a test of
    another placement) until the block ends; yield its pid once its admin says LIVE."""
    # Envoy dies with its parent (PR_SET_PDEATHSIG): a waiting shell stays its parent.
    spec = ProcSpec(name, ("/bin/sh", "-c", ENVOY_KEEPER, "keeper", str(ENVOY), "-c", str(config),
                           "--base-id", str(admin_port), "--log-path", str(log_path(layout.run_dir, name))),
                    cwd=layout.run_dir, stop_timeout=10)
    pid = spawn(spec, layout.run_dir)
    try:
        def ready() -> bool:
            url = f"http://127.0.0.1:{admin_port}/ready"
            return urllib.request.urlopen(url, timeout=1).read().strip() == b"LIVE"

        wait_until(name, ready, timeout=30, pid=pid, log=log_path(layout.run_dir, name))
        yield pid
    finally:
        stop_all([spec], layout.run_dir)


def everything(layout: Layout) -> list[Component]:
    """All components in start order (stop in reverse)."""
    return [*infra(layout), *services(layout), envoy(layout), edge_feed(layout)]
