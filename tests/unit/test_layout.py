"""Where devstack listens: every port of both profiles, unique and outside the ephemeral range."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from devstack.layout import REDIS_CLUSTER_BUS_SHIFT, layout

# Linux's default first ephemeral port (net.ipv4.ip_local_port_range), and this machine's.
EPHEMERAL_DEFAULT = 32768


def _first_ephemeral() -> int:
    try:
        low = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]
        return min(EPHEMERAL_DEFAULT, int(low))
    except (OSError, ValueError, IndexError):
        return EPHEMERAL_DEFAULT


def _ports(profile: str) -> list[int]:
    lay = layout(profile)
    ports = [getattr(lay, f.name) for f in dataclasses.fields(lay) if f.name.endswith("_port")]
    ports += [p for s in lay.services for p in (s.grpc_port, s.metrics_port)]
    ports += [*lay.redis_cluster_ports, *(p + REDIS_CLUSTER_BUS_SHIFT for p in lay.redis_cluster_ports)]
    return ports


def test_no_port_is_in_the_ephemeral_range() -> None:
    """A listening port in the ephemeral range can be taken first by any outgoing connection on
    the machine (one of the stack's own, as it starts), and the server then fails to bind."""
    first = _first_ephemeral()
    for profile in ("dev", "test"):
        assert [p for p in _ports(profile) if p >= first] == [], profile


def test_the_two_profiles_share_no_port() -> None:
    dev, test = _ports("dev"), _ports("test")
    assert len(set(dev)) == len(dev) and len(set(test)) == len(test)
    assert not set(dev) & set(test)
