"""Who is waiting for which order to settle (WaitOrder), woken by PostgreSQL's order_settled.

Migration 0003 notifies ``order_settled`` when an order leaves PENDING_PAYMENT, on commit, on
every replica's listening connection: whichever replica's consumer sold the order, the replica
holding the fan's call hears of it. Since migration 0005 the note says what the order became
(state, update time, payment: the only columns that change), and a woken waiter answers with the
order it read before, so changed, without reading it again. A note it cannot use (the bare id of
an older trigger, a wake-up of everyone) makes it read the order, as it does on its own every
few seconds: a missed notification (the listening connection lost) must not leave a fan waiting
for the timeout.

An order this replica made while it was listening is known without a read, too (``made``,
``known``): it was pending as made, and every change since then has been heard (the note is
kept), as long as the listener has not lost its connection meanwhile (``on_note(None)``
forgets them all). So the fan's first look, right after paying, costs no round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from meshkit.written import Written

from ..domain.model import Order, OrderState

CHANNEL = "order_settled"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Settlement:
    """What an order became when it left PENDING_PAYMENT, as its notification says."""

    state: OrderState
    update_time: datetime
    payment: str

    def of(self, order: Order) -> Order:
        """``order`` as read before it settled, as it is now."""
        return dataclasses.replace(order, state=self.state, update_time=self.update_time,
                                   payment=self.payment)


def parse_note(payload: str) -> tuple[uuid.UUID, Settlement | None]:
    """The order of a note and what it became: "<id> <state> <update_time us> <payment>"; the
    bare id (a trigger older than migration 0005) has no settlement. ValueError if no order id."""
    order_id, _, rest = payload.partition(" ")
    oid = uuid.UUID(order_id)
    if not rest:
        return oid, None
    try:
        state, micros, payment = rest.split(" ", 2)
        settled = Settlement(OrderState(state), _EPOCH + timedelta(microseconds=int(micros)), payment)
    except ValueError:
        return oid, None  # a form this replica does not know: it reads the order
    if settled.state is OrderState.PENDING_PAYMENT:
        return oid, None
    return oid, settled


class Woken(asyncio.Event):
    """Set when the watched order may have settled; ``settled`` if the note said how."""

    settled: Settlement | None = None

    def take(self) -> Settlement | None:
        """Clear it (before a read: a commit after that read sets it again); what a note said
        since the last take, if anything."""
        settled, self.settled = self.settled, None
        self.clear()
        return settled


class SettledOrders:
    """The events of the calls waiting per order; ``on_note`` is the listener's callback."""

    def __init__(self, kept: int = 4096) -> None:
        self._waiting: dict[uuid.UUID, set[Woken]] = {}
        # Orders made here while listening: as made, and what a note since said they became.
        self._made: Written[uuid.UUID, tuple[Order, Settlement | None]] = Written(kept)
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
    def watch(self, order_id: uuid.UUID) -> Iterator[Woken]:
        """An event set whenever ``order_id`` may have settled, for the duration."""
        woken = Woken()
        self._waiting.setdefault(order_id, set()).add(woken)
        try:
            yield woken
        finally:
            waiting = self._waiting.get(order_id)
            if waiting is not None:
                waiting.discard(woken)
                if not waiting:
                    del self._waiting[order_id]

    def made(self, order: Order) -> None:
        """This replica just committed ``order`` (pending): its changes from now on are heard."""
        if self.listening():
            self._made.put(order.order_id, (order, None))

    def known(self, order_id: uuid.UUID) -> Order | None:
        """The order as it is now, if this replica made it and has heard every note since; else
        None (read it)."""
        entry = self._made.get(order_id)
        if entry is None or not self.listening():
            return None
        order, settled = entry
        return order if settled is None else settled.of(order)

    def on_note(self, payload: str | None) -> None:
        """One order settled (its note), or None: any may have, wake everyone (they read)."""
        if payload is None:
            self._made.clear()  # notes may have been missed: what was known must be read
            for waiting in self._waiting.values():
                for woken in waiting:
                    woken.settled = None
                    woken.set()
            return
        try:
            order_id, settled = parse_note(payload)
        except ValueError:
            return
        entry = self._made.get(order_id)
        if entry is not None:
            if settled is None:  # changed, to what it does not say
                self._made.take(order_id)
            else:
                self._made.put(order_id, (entry[0], settled))
        for woken in self._waiting.get(order_id, ()):
            woken.settled = settled
            woken.set()
