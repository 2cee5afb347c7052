"""What a replica has just written to PostgreSQL, kept for the next step that needs it."""

from __future__ import annotations

from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

WRITTEN_KEPT = 4096  # rows one replica wrote and may be asked for next


class Written(Generic[K, V]):
    """Rows this replica has just written, kept for the next step of the same purchase (the fan
    orders the hold just made, the order just made is paid, the payment just opened is called
    back): that step uses its own write from here instead of reading it from PostgreSQL, one
    round trip less, and uses it once.

    Only what never changes after the write may be relied on; the statement that acts on it
    checks the rest in its WHERE (a hold still ACTIVE, an order still PENDING_PAYMENT, a payment
    still PENDING) and nothing is written if it changed meanwhile. The oldest are forgotten past
    ``kept``; another replica, or this one after a restart, reads PostgreSQL as before."""

    def __init__(self, kept: int = WRITTEN_KEPT) -> None:
        self.kept = kept
        self._items: dict[K, V] = {}

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        if len(self._items) > self.kept:
            del self._items[next(iter(self._items))]

    def take(self, key: K) -> V | None:
        return self._items.pop(key, None)

    def get(self, key: K) -> V | None:
        """Look without using it up (it may still change: put it again)."""
        return self._items.get(key)

    def clear(self) -> None:
        self._items.clear()
