"""The lifecycle of the keys that sign user tokens: the rules are meshkit's (``meshkit/jwtkeys.py``),
shared with the queue's admission-token keys. Plain rules, no I/O.

    next ──(published >= publish_ahead)──▶ current ──(rotation)──▶ retired ──(retention)──▶ gone

Identity's database enforces "at most one current, at most one next" with unique partial indexes.
"""

from __future__ import annotations

from meshkit.jwtkeys import (
    KeyInfo,
    KeyPolicy,
    KeyState,
    Plan,
    RotationTooEarly,
    current_of,
    next_of,
    plan_ensure,
    plan_maintenance,
    plan_rotation,
    published,
)

__all__ = [
    "KeyInfo",
    "KeyPolicy",
    "KeyState",
    "Plan",
    "RotationTooEarly",
    "current_of",
    "next_of",
    "plan_ensure",
    "plan_maintenance",
    "plan_rotation",
    "published",
]
