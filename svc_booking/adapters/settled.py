"""Who is waiting for which order to settle (WaitOrder), woken by PostgreSQL's order_settled.

Migration 0003 notifies ``order_settled`` with the order's id when an order leaves
PENDING_PAYMENT, on commit, on every replica's listening connection: whichever replica's consumer
sold the order, the replica holding the fan's call hears of it. A waiter re-reads the order when
woken (the notification only says "look now"), and on its own every few seconds, as a missed
notification (the listening connection lost) must not leave a fan waiting for the timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Iterator

CHANNEL = "order_settled"


class SettledOrders:
    """The events of the calls waiting per order; ``on_note`` is the listener's callback."""

    def __init__(self) -> None:
        self._waiting: dict[uuid.UUID, set[asyncio.Event]] = {}
        # Whether notifications arrive now (the listener's connection is up).
        self.listening: Callable[[], bool] = lambda: False
        # The server drains: every waiting call answers with the order as it is now (the app
        # asks again, of another replica), and no new one waits.
        self.draining = False

    def drain(self) -> None:
        self.draining = True
        self.on_note(None)

    def __len__(self) -> int:
        return sum(len(w) for w in self._waiting.values())

    @contextlib.contextmanager
    def watch(self, order_id: uuid.UUID) -> Iterator[asyncio.Event]:
        """An event set whenever ``order_id`` may have settled, for the duration."""
        woken = asyncio.Event()
        self._waiting.setdefault(order_id, set()).add(woken)
        try:
            yield woken
        finally:
            waiting = self._waiting.get(order_id)
            if waiting is not None:
                waiting.discard(woken)
                if not waiting:
                    del self._waiting[order_id]

    def on_note(self, payload: str | None) -> None:
        """One order settled (its id), or None: any may have, wake everyone."""
        if payload is None:
            for waiting in self._waiting.values():
                for woken in waiting:
                    woken.set()
            return
        try:
            order_id = uuid.UUID(payload)
        except ValueError:
            return
        for woken in self._waiting.get(order_id, ()):
            woken.set()
