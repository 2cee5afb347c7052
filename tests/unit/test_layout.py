"""Where devstack listens: every port of both profiles, unique and outside the ephemeral range;
the sockets its services use for PostgreSQL and Redis."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import psycopg.conninfo
from redis.asyncio.connection import ConnectionPool, UnixDomainSocketConnection

from devstack.layout import layout

# Linux's default first ephemeral port (net.ipv4.ip_local_port_range), and this machine's.
EPHEMERAL_DEFAULT = 32768


def _first_ephemeral() -> int:
    try:
        low = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]
        return min(EPHEMERAL_DEFAULT, int(low))
    except (OSError, ValueError, IndexError):
        return EPHEMERAL_DEFAULT


def _ports(profile: str) -> list[int]:
    return [port for port, _ in layout(profile).ports()]


def test_no_port_is_in_the_ephemeral_range() -> None:
    """A listening port in the ephemeral range can be taken first by any outgoing connection on
    the machine (one of the stack's own, as it starts), and the server then fails to bind."""
    first = _first_ephemeral()
    for profile in ("dev", "test"):
        assert [p for p in _ports(profile) if p >= first] == [], profile


def test_no_two_listeners_share_a_port_in_either_profile_or_across_them() -> None:
    """The Redis Cluster's nodes and buses (port + 10000) included: dev and test run together."""
    dev, test = _ports("dev"), _ports("test")
    assert len(set(dev)) == len(dev) and len(set(test)) == len(test)
    assert not set(dev) & set(test)


def test_services_reach_postgres_and_redis_by_socket_and_by_tcp_from_a_deep_checkout() -> None:
    """The services use Unix sockets (cheaper round trips than loopback TCP); a socket path
    longer than sun_path allows would fail at connect, so from a deep checkout they use TCP."""
    near = replace(layout("test"), run_dir=Path("/srv/ticketping/.run/test"))
    assert near.local_postgres_dsn("tp_booking") == (
        f"postgresql://ticketping@/tp_booking?host=/srv/ticketping/.run/test/pgsock&port={near.postgres_port}")
    assert near.local_redis_url == "unix:///srv/ticketping/.run/test/redis/redis.sock?db=0"

    deep = replace(near, run_dir=Path("/", *["nested-folder"] * 9, ".run", "test"))
    assert deep.local_postgres_dsn("tp_booking") == deep.postgres_dsn("tp_booking")
    assert deep.local_redis_url == deep.redis_url == f"redis://127.0.0.1:{deep.redis_port}/0"


def test_a_checkout_path_with_a_space_still_gives_the_services_working_urls() -> None:
    """Both URLs carry the socket's path: percent-encoded, as libpq and redis-py decode it."""
    spaced = replace(layout("test"), run_dir=Path("/srv/my tickets/.run/test"))
    dsn = spaced.local_postgres_dsn("tp_booking")
    assert psycopg.conninfo.conninfo_to_dict(dsn)["host"] == "/srv/my tickets/.run/test/pgsock"
    pool = ConnectionPool.from_url(spaced.local_redis_url)
    assert pool.connection_class is UnixDomainSocketConnection
    assert pool.connection_kwargs["path"] == "/srv/my tickets/.run/test/redis/redis.sock"
