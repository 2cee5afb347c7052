"""Where everything lives on one machine: ports, folders and the five services.

Two profiles share this one table. ``dev`` is what ``make up`` runs (the edge on :8080);
``test`` is what the test suite starts, on ports shifted by ``TEST_OFFSET`` and in its own
folder, so ``make test`` never touches (or is touched by) a running ``make up``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"  # downloads: Kafka jars, buf from npm
GEN = ROOT / "gen"  # build output of `make gen`
DESCRIPTOR_SET = GEN / "descriptor.binpb"
TEST_OFFSET = 1000  # TP_TEST_PORT_OFFSET overrides it: a second checkout can test beside the first
# The Redis Cluster (three masters, only started by devstack.stack.ensure_redis_cluster) listens
# on redis_port + 10, + 11, + 12; each node's cluster bus is its port + 10000 (Redis' rule).
REDIS_CLUSTER_SHIFT = 10
REDIS_CLUSTER_NODES = 3
REDIS_CLUSTER_BUS_SHIFT = 10000


@dataclass(frozen=True)
class Service:
    name: str  # identity, catalog, ...
    grpc_port: int
    metrics_port: int
    proto_service: str  # fully qualified gRPC service name
    needs_postgres: bool
    needs_redis: bool

    @property
    def module(self) -> str:
        return f"svc_{self.name}"

    @property
    def database(self) -> str:
        return f"tp_{self.name}"


SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes, the last a NUL


def _fits(socket: Path) -> bool:
    return len(str(socket).encode()) <= SOCKET_PATH_MAX


@dataclass(frozen=True)
class Layout:
    profile: str
    run_dir: Path
    edge_port: int
    edge_inner_port: int  # loopback: the transcoding, token-checking core behind the caching front
    edge_keys_port: int  # loopback: the JWKS routes Envoy's jwt_authn fetches
    edge_fill_port: int  # loopback: where the front cache's misses are collapsed (edge/config.py)
    envoy_admin_port: int
    redis_port: int
    postgres_port: int
    kafka_port: int
    kafka_controller_port: int
    services: tuple[Service, ...]

    @property
    def postgres_user(self) -> str:
        return "ticketping"

    def postgres_dsn(self, database: str) -> str:
        return f"postgresql://{self.postgres_user}@127.0.0.1:{self.postgres_port}/{database}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    # The services run on the same machine as PostgreSQL and Redis, so they talk to them over
    # Unix sockets: a round trip costs both sides fewer kernel cycles than loopback TCP, and a
    # purchase makes dozens. The TCP ports stay open for everything else (tests, psql, probes).
    # A socket's path is limited to 107 bytes: from a deeper checkout, TCP it is.

    @property
    def postgres_socket_dir(self) -> Path:
        return self.run_dir / "pgsock"

    @property
    def redis_socket(self) -> Path:
        return self.run_dir / "redis" / "redis.sock"

    def local_postgres_dsn(self, database: str) -> str:
        """What a service on this machine uses: the socket when its path fits, else TCP."""
        if not _fits(self.postgres_socket_dir / f".s.PGSQL.{self.postgres_port}"):
            return self.postgres_dsn(database)
        return (f"postgresql://{self.postgres_user}@/{database}"
                f"?host={quote(str(self.postgres_socket_dir))}&port={self.postgres_port}")

    @property
    def local_redis_url(self) -> str:
        """What a service on this machine uses: the socket when its path fits, else TCP."""
        if not _fits(self.redis_socket):
            return self.redis_url
        return f"unix://{quote(str(self.redis_socket))}?db=0"

    @property
    def redis_cluster_ports(self) -> tuple[int, ...]:
        """The client ports of the Redis Cluster's masters (dev 6400-6402, test 7400-7402)."""
        first = self.redis_port + REDIS_CLUSTER_SHIFT
        return tuple(range(first, first + REDIS_CLUSTER_NODES))

    @property
    def redis_cluster_url(self) -> str:
        """A seed node's URL for RedisCluster.from_url (the client discovers the other nodes)."""
        return f"redis://127.0.0.1:{self.redis_cluster_ports[0]}/0"

    @property
    def kafka_bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def edge_url(self) -> str:
        return f"http://127.0.0.1:{self.edge_port}"

    @property
    def logs_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def pids_dir(self) -> Path:
        return self.run_dir / "pids"

    @property
    def envoy_base_id(self) -> int:
        """Envoy's shared-memory id: unique per profile so dev and test Envoys coexist."""
        return self.edge_port  # 8080 (dev) or 9080 (test)

    @property
    def databases(self) -> tuple[str, ...]:
        """Every database devstack creates: one per service that needs PostgreSQL, plus tp_test."""
        return (*(s.database for s in self.services if s.needs_postgres), "tp_test")

    def ports(self) -> list[tuple[int, str]]:
        """Every port the stack listens on, with what listens there (Redis Cluster buses too)."""
        found = [(getattr(self, f.name), f.name) for f in fields(self) if f.name.endswith("_port")]
        for s in self.services:
            found += [(s.grpc_port, f"{s.name} gRPC"), (s.metrics_port, f"{s.name} metrics")]
        for p in self.redis_cluster_ports:
            found += [(p, "redis cluster node"), (p + REDIS_CLUSTER_BUS_SHIFT, "redis cluster bus")]
        return found

    def service(self, name: str) -> Service:
        for s in self.services:
            if s.name == name:
                return s
        raise KeyError(name)


# Every port stays below Linux's ephemeral range (32768-60999 by default): a listening port in it
# can be taken first by any process's outgoing connection, and then the service cannot bind it
# (`make up` met that once: booking on 50064, while the other services were connecting out).
_SERVICES = (
    # name, grpc, metrics, proto service, postgres, redis
    ("identity", 7061, 9161, "ticketping.identity.v1.IdentityService", True, True),
    ("catalog", 7062, 9162, "ticketping.catalog.v1.CatalogService", True, False),
    ("queue", 7063, 9163, "ticketping.queue.v1.QueueService", False, True),
    ("booking", 7064, 9164, "ticketping.booking.v1.BookingService", True, True),
    ("payment", 7065, 9165, "ticketping.payment.v1.PaymentService", True, False),
)


# Kafka topics: each main topic has 6 partitions and a one-partition dead-letter twin "<topic>.dlq".
KAFKA_TOPICS = tuple(
    f"ticketping.{t}.v1" for t in ("catalog", "queue", "booking", "payment", "test")
)
KAFKA_PARTITIONS = 6
KAFKA_DLQ_PARTITIONS = 1
# devstack's readiness probe writes here (key b"devstack-probe", header devstack-probe=1)
KAFKA_PROBE_TOPIC = "ticketping.test.v1"


def layout(profile: str | None = None) -> Layout:
    profile = profile or os.environ.get("TP_PROFILE", "dev")
    if profile not in ("dev", "test"):
        raise ValueError(f"unknown profile {profile!r}: use dev or test")
    off = int(os.environ.get("TP_TEST_PORT_OFFSET", TEST_OFFSET)) if profile == "test" else 0
    return Layout(
        profile=profile,
        run_dir=ROOT / ".run" / profile,
        edge_port=8080 + off,
        edge_inner_port=8081 + off,
        edge_keys_port=8082 + off,
        edge_fill_port=8083 + off,
        envoy_admin_port=9901 + off,
        redis_port=6390 + off,
        postgres_port=5440 + off,
        kafka_port=9192 + off,
        kafka_controller_port=9193 + off,
        services=tuple(
            Service(n, g + off, m + off, p, pg, rd) for n, g, m, p, pg, rd in _SERVICES
        ),
    )
