"""The lifecycle of the keys that sign user tokens. Plain rules, no I/O.

A verifier (Envoy) caches the JWKS for a while and does not refetch it when it meets an unknown
``kid``, so a key must be published before it signs anything and stay published until every
token it signed has expired:

    next ──(published >= publish_ahead)──▶ current ──(rotation)──▶ retired ──(retention)──▶ gone

* There is always exactly one ``current`` key (it signs) and one ``next`` key (published, not
  signing yet). The database enforces "at most one" of each with unique partial indexes.
* Rotation promotes ``next`` to ``current`` only once it has been published for at least
  ``publish_ahead``, retires the old ``current`` and creates a new ``next``.
* A retired key stays published until ``retired_at + access TTL + clock skew + key cache``: the
  last token it signed expires by then, even if a replica that had not yet reloaded the key table
  signed with it a little after the rotation (at most ``key cache`` later).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta


class KeyState(enum.Enum):
    NEXT = "next"
    CURRENT = "current"
    RETIRED = "retired"


@dataclass(frozen=True)
class KeyInfo:
    kid: str
    state: KeyState
    created_at: datetime  # = published: it is in the JWKS from the moment it is stored
    activated_at: datetime | None = None
    retired_at: datetime | None = None


@dataclass(frozen=True)
class KeyPolicy:
    publish_ahead: timedelta
    access_ttl: timedelta
    clock_skew: timedelta
    key_cache: timedelta

    def retained_until(self, key: KeyInfo) -> datetime | None:
        """When a retired key may leave the JWKS (None: it is not retired)."""
        if key.state is not KeyState.RETIRED or key.retired_at is None:
            return None
        return key.retired_at + self.access_ttl + self.clock_skew + self.key_cache


@dataclass(frozen=True)
class Plan:
    """What to change in the key table, in this order: delete, retire, promote, create."""

    delete: tuple[str, ...] = ()
    retire: str | None = None
    promote: str | None = None
    create_current: bool = False
    create_next: bool = False
    notes: tuple[str, ...] = field(default=())

    @property
    def empty(self) -> bool:
        return not (self.delete or self.retire or self.promote or self.create_current or self.create_next)


class RotationTooEarly(Exception):
    """The next key has not been published long enough to start signing."""

    def __init__(self, kid: str, wait: timedelta) -> None:
        super().__init__(
            f"next key {kid} must stay published {wait.total_seconds():.0f}s more before it signs"
        )
        self.kid = kid
        self.wait = wait


def current_of(keys: list[KeyInfo]) -> KeyInfo | None:
    return next((k for k in keys if k.state is KeyState.CURRENT), None)


def next_of(keys: list[KeyInfo]) -> KeyInfo | None:
    return next((k for k in keys if k.state is KeyState.NEXT), None)


def published(keys: list[KeyInfo], now: datetime, policy: KeyPolicy) -> list[KeyInfo]:
    """The keys of the JWKS: next, current, and retired keys still within their retention.

    Ordered current, next, then retired (newest first), so a reader sees the signing key first.
    """
    order = {KeyState.CURRENT: 0, KeyState.NEXT: 1, KeyState.RETIRED: 2}
    out = [k for k in keys if not _expired(k, now, policy)]
    return sorted(out, key=lambda k: (order[k.state], -(k.retired_at or k.created_at).timestamp()))


def _expired(key: KeyInfo, now: datetime, policy: KeyPolicy) -> bool:
    until = policy.retained_until(key)
    return until is not None and until <= now


def plan_ensure(keys: list[KeyInfo], now: datetime, policy: KeyPolicy) -> Plan:
    """At start (under the key lock): make sure a current and a next key exist.

    A fresh install gets both at once (nothing can have cached an older JWKS). A table with a
    next key but no current one (should not happen) promotes it at once, since something must
    sign; that is logged.
    """
    current, nxt = current_of(keys), next_of(keys)
    delete = tuple(k.kid for k in keys if _expired(k, now, policy))
    if current is None and nxt is None:
        return Plan(delete=delete, create_current=True, create_next=True, notes=("fresh key set",))
    if current is None:
        assert nxt is not None
        return Plan(
            delete=delete,
            promote=nxt.kid,
            create_next=True,
            notes=(f"no current key: promoted next key {nxt.kid} without waiting",),
        )
    return Plan(delete=delete, create_next=nxt is None)


def plan_rotation(keys: list[KeyInfo], now: datetime, policy: KeyPolicy) -> Plan:
    """Manual rotation: promote next → current, retire current, create a new next.

    Raises RotationTooEarly if the next key has been published for less than ``publish_ahead``.
    """
    current, nxt = current_of(keys), next_of(keys)
    if current is None or nxt is None:
        return plan_ensure(keys, now, policy)
    delete = tuple(k.kid for k in keys if _expired(k, now, policy))
    age = now - nxt.created_at
    if age < policy.publish_ahead:
        raise RotationTooEarly(nxt.kid, policy.publish_ahead - age)
    return Plan(delete=delete, retire=current.kid, promote=nxt.kid, create_next=True)


def plan_maintenance(
    keys: list[KeyInfo], now: datetime, policy: KeyPolicy, rotate_after: timedelta | None
) -> Plan:
    """The periodic check: drop retired keys past their retention, and (automatic rotation,
    ``rotate_after`` set) rotate once the current key has signed that long and the next key has
    been published long enough. An empty plan when nothing is due."""
    current, nxt = current_of(keys), next_of(keys)
    if current is None or nxt is None:
        return plan_ensure(keys, now, policy)
    delete = tuple(k.kid for k in keys if _expired(k, now, policy))
    if rotate_after is None or now - (current.activated_at or current.created_at) < rotate_after:
        return Plan(delete=delete)
    if now - nxt.created_at < policy.publish_ahead:
        return Plan(delete=delete)
    return Plan(delete=delete, retire=current.kid, promote=nxt.kid, create_next=True)
