"""Slowing down password guessing. Plain rules, no I/O (the counters live in Redis).

Failed logins are counted per account (the normalised email, whether or not it exists, so the
answer reveals nothing) and per client address. Once a subject has ``threshold`` failures, each
further failure blocks it for ``base * 2^(failures - threshold)`` seconds, at most ``max``.
Attempts while blocked are refused (RESOURCE_EXHAUSTED, TOO_MANY_ATTEMPTS, ``retry_after_seconds``)
without checking the password and without counting. The count is forgotten ``window`` seconds
after the last failure (or after the block it caused ends), so there is never a permanent lockout;
a successful login clears the account's count.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass

import grpc

from meshkit.errors import DomainError


@dataclass(frozen=True)
class ThrottlePolicy:
    threshold: int
    window_seconds: int
    backoff_base_seconds: float
    backoff_max_seconds: float

    def block_seconds(self, failures: int) -> float:
        """How long a subject is blocked after its ``failures``-th failure (0: not blocked)."""
        if failures < self.threshold:
            return 0.0
        excess = min(failures - self.threshold, 62)
        return min(self.backoff_base_seconds * (2.0**excess), self.backoff_max_seconds)


class TooManyAttempts(DomainError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, retry_after_seconds: float) -> None:
        wait = max(1, math.ceil(retry_after_seconds))
        super().__init__(
            "TOO_MANY_ATTEMPTS",
            f"too many failed logins; try again in {wait} s",
            metadata={"retry_after_seconds": str(wait)},
        )
        self.retry_after_seconds = wait


def client_address(forwarded_for: str | None, peer: str | None) -> str:
    """The caller's address: the LAST entry of ``x-forwarded-for`` (the one the edge appended
    from the connection it accepted; earlier entries are whatever the client claimed), else the
    gRPC peer (``ipv4:1.2.3.4:5678``, ``ipv6:[::1]:5678``, ``unix:...``) without its port."""
    if forwarded_for:
        last = forwarded_for.split(",")[-1].strip()
        if last:
            return _canonical_ip(last)
    if not peer:
        return "unknown"
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return _canonical_ip(rest.rsplit(":", 1)[0])
    if kind == "ipv6":
        host = rest.rsplit(":", 1)[0] if rest.startswith("[") else rest
        return _canonical_ip(host.strip("[]"))
    return peer


def _canonical_ip(text: str) -> str:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # "[2001:db8::1]:443"
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # "1.2.3.4:5678"
        text = text.split(":")[0]
    try:
        return ipaddress.ip_address(text).compressed
    except ValueError:
        return text[:64]  # not an address (a hostname, garbage): still a bounded key
