"""Booking's use cases: one place that says what each step writes where, and in which order.

PostgreSQL is the truth (events, seats, holds, orders, sold_seats); Redis holds the live seat state
that makes a hold one atomic step under contention. The order of writes:

* hold: Redis script first (decides, all or nothing), then the hold row + HoldCreated in one
  PostgreSQL transaction; if that fails the Redis hold is released again.
* every later transition of a hold (order, release, cancel, expiry, sale) is decided by a
  conditional update of its PostgreSQL row, then mirrored into Redis; a Redis step that is lost
  (crash, restart) is repaired by the sweeper (it finishes every hold past its deadline from
  PostgreSQL's state) or by the rebuild.
* sale: one PostgreSQL transaction (order CONFIRMED, sold_seats rows under the primary key
  (event_id, seat_id), OrderConfirmed in the outbox), then the seats become SOLD in Redis.

If Redis comes back empty, the first call that needs an event's state rebuilds it from PostgreSQL:
sold seats SOLD, live holds HELD with their deadlines, the fans' counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool
from ticketping.events.v1.events_pb2 import EventEnvelope, EventPublished

from meshkit.db import autocommit
from meshkit.errors import DomainError, InvalidArgument, NotFound, request_id_reused
from meshkit.events import event_type, payload_of
from meshkit.outbox import Outboxed, enqueue
from meshkit.written import Written

from .adapters import inventory as inv
from .adapters import messages
from .adapters import postgres as db
from .adapters.admission import QueueNotifier
from .adapters.settled import SettledOrders
from .domain import model
from .domain.model import Hold, HoldState, Layout, Order, OrderState

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
LIVE_HOLD = (HoldState.ACTIVE, HoldState.ORDERED)
# How often a WaitOrder call reads its order again without being woken: while listening (a
# notification was lost only if the connection was, which wakes everyone anyway), and while not.
SETTLED_RECHECK_SECONDS = 5.0
UNHEARD_RECHECK_SECONDS = 1.0


def utcnow() -> datetime:
    return datetime.now(UTC)


def ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


def from_ms(v: int | str) -> datetime:
    return datetime.fromtimestamp(int(v) / 1000, UTC)


class _StateRebuilt(Exception):
    """The live state a hold's script ran on is not the live state now (lost and rebuilt)."""

    def __init__(self, live: str | None, made_on: str) -> None:
        super().__init__(f"live state {live!r}, hold made on {made_on!r}")
        self.live = live
        self.made_on = made_on


def _same_request(hold: Hold, wanted: Sequence[str] | model.BestAvailable, request_id: uuid.UUID) -> None:
    """A hold request answered from an earlier one with this id must have asked for its seats
    (or, best available, for as many in the section it names)."""
    if isinstance(wanted, model.BestAvailable):
        same = wanted.asked_for(hold.seat_ids)
    else:
        same = sorted(hold.seat_ids) == sorted(wanted)
    if not same:
        raise request_id_reused(request_id, model.hold_name(hold.event_id, hold.hold_id))


DEADLOCK_ATTEMPTS = 3
@dataclass(frozen=True)
class PricedHold:
    hold: Hold
    amount: model.Money


class Booking:
    # The catalog events booking acts on; its consumer passes over the others.
    CATALOG_EVENT_TYPES = frozenset({"event_published"})

    def __init__(
        self,
        pool: AsyncConnectionPool,
        inventory: inv.Inventory,
        *,
        hold_ttl: timedelta = timedelta(minutes=5),
        default_seat_limit: int = 4,
        topic: str = messages.TOPIC,
        clock: Clock = utcnow,
        sweep_lease: timedelta = timedelta(seconds=30),
        queue: QueueNotifier | None = None,
        seats_cache_seconds: float = 0.0,
        payment_grace: timedelta = timedelta(seconds=60),
    ) -> None:
        self.queue = queue
        # How long past its deadline the sweeper leaves a PENDING_PAYMENT order (and its seats)
        # for a payment that succeeded in time but whose PaymentSucceeded is still on its way.
        self.payment_grace = payment_grace
        # ListSeats is polled by every fan; the edge caches it for a second anyway, so a replica
        # may answer from a copy that young (one HGETALL per event per period, single-flight).
        self.seats_cache_seconds = seats_cache_seconds
        self._seat_cache: dict[str, tuple[float, dict[str, str]]] = {}
        self._seat_locks: dict[str, asyncio.Lock] = {}
        self.pool = pool
        self.inventory = inventory
        self.hold_ttl = hold_ttl
        self.default_seat_limit = default_seat_limit
        self.topic = topic
        self.clock = clock
        self.sweep_lease = sweep_lease
        self._layouts: dict[str, Layout] = {}
        self._rebuilding: dict[str, asyncio.Lock] = {}
        self._event_ids: tuple[float, list[str]] = (0.0, [])
        # WaitOrder's waiters; the bootstrap points their listener at order_settled.
        self.settled = SettledOrders()
        self.written_holds: Written[uuid.UUID, Hold] = Written()
        self.written_orders: Written[uuid.UUID, Order] = Written()

    # --- inventory -----------------------------------------------------------------------------

    async def on_event(self, env: EventEnvelope, conn: psycopg.AsyncConnection[Any]) -> None:
        """The catalog consumer's handler (runs in the de-duplication transaction)."""
        if event_type(env) not in self.CATALOG_EVENT_TYPES:
            return
        msg = payload_of(env)
        assert isinstance(msg, EventPublished)
        layout = messages.layout_of(msg)
        if not layout.event_id or not layout.seat_map.sections or not layout.tiers:
            raise ValueError(f"EventPublished {msg.event!r} has no seats or no price tiers")
        created = await db.store_layout(conn, layout)
        log.info("inventory stored" if created else "inventory exists; EventPublished ignored",
                 extra={"event": msg.event, "seat_count": layout.seat_count})

    async def after_event(self, _record: object, env: EventEnvelope) -> None:
        """After an EventPublished committed: build the live state now, not on the first call.

        Never raises (a failure leaves the build to the first call that needs it)."""
        if event_type(env) != "event_published":
            return
        try:
            event_id = payload_of(env).event.removeprefix("events/")  # type: ignore[attr-defined]
            await self.ensure_live(await self.layout(event_id))
        except Exception:
            log.warning("live state not built after EventPublished; built on first use",
                        exc_info=True)

    @property
    def _keep_ms(self) -> int:
        """How long a hold's record and request key stay in Redis: its TTL and a day."""
        return int((self.hold_ttl + timedelta(days=1)).total_seconds() * 1000)

    def limit_of(self, layout: Layout) -> int:
        return layout.seat_limit_per_fan if layout.seat_limit_per_fan > 0 else self.default_seat_limit

    async def layout(self, event_id: str) -> Layout:
        """The event's layout (cached: a published inventory never changes); NOT_FOUND if none."""
        found = self._layouts.get(event_id)
        if found is None:
            found = await db.load_layout(self.pool, event_id)
            if found is None:
                raise model.event_not_found(event_id)
            self._layouts[event_id] = found
        return found

    async def ensure_live(self, layout: Layout) -> None:
        """Build the event's live state in Redis from PostgreSQL unless it is there."""
        event_id = layout.event_id
        if await self.inventory.is_built(event_id):
            return
        lock = self._rebuilding.setdefault(event_id, asyncio.Lock())
        async with lock:
            if await self.inventory.is_built(event_id):
                return
            await self.rebuild(layout)

    async def rebuild(self, layout: Layout) -> bool:
        """Build the event's live state in Redis from PostgreSQL unless it is there; True if this
        call built it.

        One transaction holds the event's row FOR UPDATE from before the snapshot until the state
        and its new stamp are written (db.lock_for_build): whatever changes holds or sales takes
        the row FOR KEY SHARE, so it is in the snapshot or comes after the state is built. A hold
        made on a state that was lost before its row was written sees another stamp and is made
        again on this one (create_hold)."""
        t0 = time.perf_counter()
        event_id = layout.event_id
        stamp = uuid.uuid4().hex
        built = False
        try:
            async with self.pool.connection() as conn, conn.transaction():
                if await db.lock_for_build(conn, event_id) is None:
                    raise model.event_not_found(event_id)
                if await self.inventory.is_built(event_id):  # another replica built it meanwhile
                    return False
                # Swept from now on: before the build, so no hold can exist unseen by a sweeper.
                await self.inventory.sweep_at([event_id], ms(self.clock()))
                sold, holds, bought = await db.live_state(conn, event_id)
                snap = self._snapshot(layout, sold, holds, bought)
                built = await self.inventory.rebuild(event_id, snap, ms(self.clock()),
                                                     self._keep_ms, stamp)
                if built:
                    await db.set_live_stamp(conn, event_id, stamp)
        except BaseException:
            # Written to Redis (or maybe: the call was cancelled, or its connection dropped, after
            # Redis ran the script), but PostgreSQL does not vouch for it: it must be built again.
            # forget_build only drops a build with this attempt's own stamp, so it is harmless if
            # the script never ran; without it, a build PostgreSQL never recorded would stay live
            # and every hold on it would fail the stamp check, for good.
            with contextlib.suppress(Exception):
                await self.inventory.forget_build(event_id, stamp)
            raise
        log.info("live state rebuilt" if built else "live state was rebuilt by another replica",
                 extra={"event": model.event_name(event_id), "sold": len(sold),
                        "live_holds": len(holds), "stamp": stamp,
                        "elapsed_ms": round((time.perf_counter() - t0) * 1000)})
        all_sold = not set(layout.seat_map.seat_ids()) - {seat for seat, _ in sold}
        if built and all_sold:
            # Whatever lost this state may have lost the room's sold-out mark too (one Redis): say
            # it again, or a room rebuilt from catalog would admit fans to an empty house.
            await self._announce_sold_out(event_id)
        return built

    def _snapshot(
        self, layout: Layout, sold: list[tuple[str, str]],
        holds: list[tuple[uuid.UUID, str, list[str], datetime, uuid.UUID]], bought: dict[str, int],
    ) -> inv.Snapshot:
        values = dict.fromkeys(layout.seat_map.seat_ids(), "A")
        deadlines: dict[str, int] = {}
        for seat, _ in sold:  # first: a sold seat is SOLD whatever hold still names it
            values[seat] = "S"
        fans = dict(bought)
        requests: dict[tuple[str, str], str] = {}
        for hold_id, user, seats, expire, request_id in holds:
            deadlines[str(hold_id)] = ms(expire)
            requests[(user, str(request_id))] = str(hold_id)
            counted = 0
            for s in seats:
                if values.get(s) == "A":
                    values[s] = f"H{hold_id}"
                    counted += 1
            fans[user] = fans.get(user, 0) + counted
        return inv.Snapshot(self.limit_of(layout), values, deadlines, fans, requests)

    async def seat_statuses(self, event_id: str) -> tuple[Layout, dict[str, str]]:
        layout = await self.layout(event_id)
        if self.seats_cache_seconds <= 0:
            return layout, await self._read_statuses(layout)
        cached = self._seat_cache.get(event_id)
        if cached is not None and time.monotonic() - cached[0] < self.seats_cache_seconds:
            return layout, cached[1]
        async with self._seat_locks.setdefault(event_id, asyncio.Lock()):
            cached = self._seat_cache.get(event_id)
            if cached is not None and time.monotonic() - cached[0] < self.seats_cache_seconds:
                return layout, cached[1]
            t0 = time.monotonic()
            values = await self._read_statuses(layout)
            self._seat_cache[event_id] = (t0, values)
            return layout, values

    async def _read_statuses(self, layout: Layout) -> dict[str, str]:
        event_id = layout.event_id
        for _ in range(3):
            values = await self.inventory.statuses(event_id)
            if values is not None and await self.inventory.is_built(event_id):
                return values
            await self.ensure_live(layout)
        raise DomainError("INVENTORY_UNAVAILABLE", "the seat state could not be built; retry")

    # --- holds ---------------------------------------------------------------------------------

    async def create_hold(
        self, user_id: str, event_id: str, seat_ids: Sequence[str], request_id: uuid.UUID,
        *, quantity: int = 0, section: str = "",
    ) -> PricedHold:
        """Hold the named seats, or (``quantity``, ``section``) the best free ones."""
        layout = await self.layout(event_id)
        layout.check_on_sale(self.clock())
        wanted: tuple[str, ...] | model.BestAvailable
        if quantity or section:
            if seat_ids:
                raise InvalidArgument("SEATS_OR_QUANTITY", "name seat_ids or a quantity (best available), "
                                      "not both", metadata={"field": "quantity"})
            wanted = layout.best_available(quantity, section)
        else:
            wanted = model.check_seat_ids(seat_ids)
            unknown = layout.unknown(wanted)
            if unknown:
                raise model.unknown_seats(unknown)
        for _ in range(3):
            placed = await self._place_hold(layout, user_id, wanted, request_id)
            if placed is not None:
                return placed
        raise DomainError("INVENTORY_UNAVAILABLE", "the seat state kept being rebuilt; retry")

    async def _place_hold(self, layout: Layout, user_id: str, wanted: tuple[str, ...] | model.BestAvailable,
                          request_id: uuid.UUID) -> PricedHold | None:
        """One attempt: the Redis script decides, then PostgreSQL writes the hold down. None if
        the state the script ran on was lost and rebuilt before the row was written: the seats
        were not held in the state that is live now, so the attempt is taken back."""
        event_id = layout.event_id
        now = self.clock()
        expire = now + self.hold_ttl
        hold_id = uuid.uuid4()
        for _ in range(3):
            res = await self.inventory.hold(event_id, user_id, str(hold_id), str(request_id), wanted,
                                            ms(now), ms(expire), self._keep_ms)
            if res.outcome != "NOINV":
                break
            await self.ensure_live(layout)
        if res.outcome == "DUP":
            replayed = await self._replay_hold(layout, user_id, uuid.UUID(res.values[0]), request_id)
            if replayed is not None:
                _same_request(replayed.hold, wanted, request_id)
            return replayed
        if res.outcome == "TAKEN":
            raise model.SeatUnavailable(res.values)
        if res.outcome == "LIMIT":
            asked = wanted.quantity if isinstance(wanted, model.BestAvailable) else len(wanted)
            raise model.SeatLimitExceeded(int(res.values[0]), asked, int(res.values[1]))
        if res.outcome == "UNKNOWN":
            raise model.unknown_seats(res.values)
        if res.outcome == "NONE" and isinstance(wanted, model.BestAvailable):
            raise model.no_seats_for(wanted, int(res.values[0]))
        if res.outcome != "OK":
            raise DomainError("INVENTORY_UNAVAILABLE", "the seat state could not be built; retry")
        stamp, seats = res.values[0], (wanted if isinstance(wanted, tuple) else res.values[1:])
        hold = Hold(hold_id, event_id, user_id, seats, expire, now)
        first = None
        try:
            async with autocommit(self.pool) as conn:  # one statement: no rebuild meanwhile
                live, written = await db.write_hold(
                    conn, hold, request_id, stamp, Outboxed(self.topic, messages.hold_created(hold)))
                if live != stamp:
                    raise _StateRebuilt(live, stamp)
                if not written:  # a retry wrote this hold down first (_adopt), or a retry whose
                    # Redis request key was lost (restart) made another: the first hold wins
                    first = await db.hold_by_request(conn, event_id, user_id, request_id)
        except _StateRebuilt as lost:
            kept = await self._take_back(hold, request_id)
            if kept is not None:  # a retry wrote it down, on the state it was made on, before that was lost
                return PricedHold(kept, layout.amount(kept.seat_ids))
            log.warning("hold made on a live state that was lost and rebuilt; made again",
                        extra={"event": model.event_name(event_id), "stamp": lost.made_on,
                               "live_stamp": lost.live})
            return None
        except BaseException:
            # The promise could not be written down: take it back (unless a retry wrote it down).
            # If even that fails, the hold stays in Redis alone, as after a crash: a retry of the
            # request writes it down (_adopt), or the sweeper releases it at its deadline.
            with contextlib.suppress(Exception):
                await self._take_back(hold, request_id)
            raise
        if first is not None:
            if first.hold_id != hold_id:
                await self._take_back(hold, request_id)
            _same_request(first, wanted, request_id)
            return PricedHold(first, layout.amount(first.seat_ids))
        self.written_holds.put(hold_id, hold)
        return PricedHold(hold, layout.amount(seats))

    async def _take_back(self, hold: Hold, request_id: uuid.UUID | None) -> Hold | None:
        """Undo a hold's Redis step that PostgreSQL never recorded, request key included (a retry
        of the request is then a new attempt, not a replay of a hold that does not exist).

        Unless it was recorded after all, by a retry of the request (_adopt): then nothing is
        undone and its row is returned. The check and the undo hold the hold's lock, as _adopt
        does, so a hold is never both written down by a retry and taken back."""
        async with self.pool.connection() as conn, conn.transaction():
            await db.lock_hold_id(conn, hold.hold_id)
            written = await db.get_hold(conn, hold.hold_id)
            if written is None:
                await self.inventory.release(hold.event_id, str(hold.hold_id), hold.user_id, hold.seat_ids,
                                             request_id=None if request_id is None else str(request_id))
        return written

    async def _replay_hold(self, layout: Layout, user_id: str, hold_id: uuid.UUID,
                           request_id: uuid.UUID) -> PricedHold | None:
        """A retry: the hold the request made, as written down; None if it is gone and the
        request is to be made again."""
        async with autocommit(self.pool) as conn:
            hold = await db.get_hold(conn, hold_id)
        if hold is None:
            hold = await self._adopt(layout, user_id, hold_id, request_id)
        return None if hold is None else PricedHold(hold, layout.amount(hold.seat_ids))

    async def _adopt(self, layout: Layout, user_id: str, hold_id: uuid.UUID,
                     request_id: uuid.UUID) -> Hold | None:
        """A retry found the hold its request made in Redis but not in PostgreSQL: the first
        attempt is still writing it down, or died between the two (a kill -9, a lost connection),
        and answering from Redis would promise a hold that may never exist. So the retry writes it
        down itself, as the first attempt would have (the row and HoldCreated). A first attempt
        still alive writes the same row: whichever inserts second finds it there (the primary key)
        and answers that hold; and a first attempt that gives up takes its hold back only under
        the hold's lock, which this holds, and only if no row was written.

        Only a hold that is live in the state PostgreSQL vouches for is written down: every seat
        held by it in the build whose stamp is events.live_stamp (the event's row is shared, so
        no rebuild meanwhile). Otherwise it is gone (taken back, released at its deadline, lost
        with Redis): what is left of it goes, request key included, and None says to make the
        request again."""
        event_id = layout.event_id
        async with self.pool.connection() as conn, conn.transaction():
            live = await db.share_event(conn, event_id)
            await db.lock_hold_id(conn, hold_id)
            written = await db.get_hold(conn, hold_id)
            if written is not None:  # the first attempt wrote it meanwhile
                return written
            rec = await self.inventory.hold_record(event_id, str(hold_id))
            seats = tuple(filter(None, rec.get("seats", "").split(",")))
            if rec.get("user") == user_id and live is not None \
                    and await self.inventory.held_stamp(event_id, str(hold_id), seats) == live:
                hold = Hold(hold_id, event_id, user_id, seats, from_ms(rec["exp"]), from_ms(rec["created"]))
                if await db.insert_hold(conn, hold, request_id):
                    await enqueue(conn, self.topic, messages.hold_created(hold))
                    log.warning("a retry found its hold in Redis alone and wrote it down",
                                extra={"hold": hold.name})
                    return hold
                # Written down meanwhile by the first attempt, or another hold of this request is
                # (its request key was lost): that one, and this one goes unless it is that one.
                first = await db.hold_by_request(conn, event_id, user_id, request_id)
                if first is not None and first.hold_id == hold_id:
                    return first
            else:
                first = None
            await self.inventory.release(event_id, str(hold_id), user_id, seats, request_id=str(request_id))
        return first

    async def delete_hold(self, user_id: str, event_id: str, hold_id: uuid.UUID) -> None:
        name = model.hold_name(event_id, hold_id)
        async with self.pool.connection() as conn, conn.transaction():
            hold = await db.get_hold(conn, hold_id, lock=True)
            if hold is None or hold.user_id != user_id or hold.event_id != event_id:
                raise model.hold_not_found(name)
            await db.share_event(conn, event_id)  # released before or after a rebuild, not during
            if hold.state is HoldState.ORDERED:
                order = await db.order_by_hold(conn, hold_id)
                raise DomainError("HOLD_ORDERED", f"{name} was ordered: cancel the order instead",
                                  metadata={"order": order.name if order else ""})
            if hold.state is HoldState.SOLD:
                raise DomainError("HOLD_SOLD", f"{name} was ordered and paid")
            if hold.state is HoldState.ACTIVE:
                await db.set_hold_state(conn, hold_id, HoldState.RELEASED)
        if hold.state in (HoldState.ACTIVE, HoldState.RELEASED):
            await self.inventory.release(event_id, str(hold_id), user_id, hold.seat_ids)

    # --- orders --------------------------------------------------------------------------------

    async def hold_event(self, hold_id: uuid.UUID) -> str | None:
        async with autocommit(self.pool) as conn:
            hold = await db.get_hold(conn, hold_id)
        return hold.event_id if hold else None

    async def create_order(
        self, user_id: str, event_id: str, hold_id: uuid.UUID, request_id: uuid.UUID
    ) -> Order:
        name = model.hold_name(event_id, hold_id)
        layout = await self.layout(event_id)
        now = self.clock()
        # The common case in two round trips: the hold read, then ordered by one statement if it
        # is still as read (live, the fan's). Anything else (a retry, another fan's hold, an
        # expired one, a race) is sorted out by the transaction below, which says why.
        async with autocommit(self.pool) as conn:
            # (The hold as this replica wrote it, if it did: order_live_hold checks that it is.)
            hold = self.written_holds.take(hold_id) or await db.get_hold(conn, hold_id)
            if hold is not None and hold.user_id == user_id and hold.event_id == event_id \
                    and hold.state is HoldState.ACTIVE and hold.expire_time > now \
                    and (layout.sales_end is None or now < layout.sales_end):
                order = self._new_order(layout, hold, now)
                try:
                    if await db.order_live_hold(conn, order, request_id,
                                                Outboxed(self.topic, messages.order_created(order))):
                        self.written_orders.put(order.order_id, order)
                        self.settled.made(order)
                        return order
                except psycopg.errors.UniqueViolation:
                    pass  # the request id was used before: the transaction finds that order
        async with self.pool.connection() as conn, conn.transaction():
            prior = await db.order_by_request(conn, user_id, request_id)
            if prior is not None:
                if prior.hold_id != hold_id:
                    raise request_id_reused(request_id, model.hold_name(prior.event_id, prior.hold_id))
                return prior
            hold = await db.get_hold(conn, hold_id, lock=True)
            if hold is None or hold.user_id != user_id or hold.event_id != event_id:
                raise model.hold_not_found(name)  # another fan's hold is not there for you
            if hold.state is HoldState.ORDERED:
                existing = await db.order_by_hold(conn, hold_id)
                if existing is not None:
                    return existing
            if hold.state is not HoldState.ACTIVE or hold.expire_time <= now:
                raise DomainError("HOLD_EXPIRED", f"{name} is no longer live ({hold.state.value})",
                                  metadata={"name": name, "state": hold.state.value})
            layout.check_on_sale(now)
            order = self._new_order(layout, hold, now)
            await db.insert_order(conn, order, request_id)
            await db.set_hold_state(conn, hold_id, HoldState.ORDERED)
            await enqueue(conn, self.topic, messages.order_created(order))
        return order

    @staticmethod
    def _new_order(layout: Layout, hold: Hold, now: datetime) -> Order:
        return Order(
            order_id=uuid.uuid4(), event_id=hold.event_id, hold_id=hold.hold_id,
            user_id=hold.user_id, seat_ids=hold.seat_ids, amount=layout.amount(hold.seat_ids),
            state=OrderState.PENDING_PAYMENT, expire_time=hold.expire_time, payment="",
            create_time=now, update_time=now)

    async def get_order(self, user_id: str | None, order_id: uuid.UUID) -> Order:
        async with autocommit(self.pool) as conn:
            order = await db.get_order(conn, order_id)
        if order is None or (user_id is not None and order.user_id != user_id):
            raise model.order_not_found(f"orders/{order_id}")
        return order

    async def current_order(self, order_id: uuid.UUID) -> Order:
        """The order as it is now (payment asks, to open a payment for it): known without a read
        if this replica made it while listening and has heard every change since (settled.known;
        a change commits before its note arrives, as it could commit right after a read)."""
        return self.settled.known(order_id) or await self.get_order(None, order_id)

    async def wait_order(self, user_id: str, order_id: uuid.UUID, within: float) -> Order:
        """The caller's order once it has left PENDING_PAYMENT, or as it is after ``within``
        seconds: an app learns its payment's outcome with one call, not a poll every few
        hundred milliseconds (each a trip through the edge into this service and PostgreSQL).

        Woken by order_settled, which any replica's commit sends and which says what the order
        became: the answer is the order read before, so changed (not a second read of it). It is
        read again on a wake-up that does not say, and every few seconds regardless, so a lost
        notification delays the answer (by at most SETTLED_RECHECK_SECONDS) and never loses it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        order: Order | None = None
        with self.settled.watch(order_id) as woken:
            while True:
                settled = woken.take()  # before the read: a commit after it sets this again
                if settled is not None and order is not None:
                    return settled.of(order)
                # Made here and every change since heard (a note before this take is in it):
                # the first look needs no read.
                known = self.settled.known(order_id) if order is None else None
                if known is not None and known.user_id == user_id:
                    order = known
                else:
                    order = await self.get_order(user_id, order_id)
                left = deadline - loop.time()
                if order.state is not OrderState.PENDING_PAYMENT or left <= 0 or self.settled.draining:
                    return order
                recheck = SETTLED_RECHECK_SECONDS if self.settled.listening() else UNHEARD_RECHECK_SECONDS
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), min(left, recheck))

    async def list_orders(
        self, user_id: str, after: tuple[datetime, uuid.UUID] | None, limit: int
    ) -> list[Order]:
        return await db.list_orders(self.pool, user_id, after, limit)

    async def cancel_order(self, user_id: str, order_id: uuid.UUID,
                           reason: str = "USER_CANCELLED") -> Order:
        """Cancel an unpaid order: one transaction (CANCELLED, its hold too, OrderCancelled), then
        its seats released in Redis. Cancelling it again (the fan's retry, PaymentFailed
        redelivered after a crash between that commit and the release) changes nothing in
        PostgreSQL but releases again (idempotent: only seats still held by its hold), or the seats
        would stay held until the hold's deadline. OrderCancelled ends the fan's session.

        It locks the order, then its hold; the sweeper, expiring the hold at its deadline, locks
        them the other way round. At the deadline PostgreSQL may break that deadlock by aborting
        the cancel: it is run again (then answers from the state the sweeper left), not a 500."""
        for attempt in range(DEADLOCK_ATTEMPTS):
            try:
                return await self._cancel_order(user_id, order_id, reason)
            except psycopg.errors.DeadlockDetected:
                if attempt == DEADLOCK_ATTEMPTS - 1:
                    raise
                log.info("cancel lost a deadlock to the sweeper; again",
                         extra={"order": f"orders/{order_id}"})
        raise AssertionError("unreachable")

    async def _cancel_order(self, user_id: str, order_id: uuid.UUID, reason: str) -> Order:
        replay = False
        async with self.pool.connection() as conn, conn.transaction():
            order = await db.get_order(conn, order_id, lock=True)
            if order is None or order.user_id != user_id:
                raise model.order_not_found(f"orders/{order_id}")
            if order.state is OrderState.CANCELLED:
                replay = True
            elif order.state is not OrderState.PENDING_PAYMENT:
                raise DomainError("ORDER_NOT_CANCELLABLE", f"{order.name} is {order.state.value}",
                                  metadata={"state": order.state.value})
            else:
                await db.share_event(conn, order.event_id)
                order = await db.set_order_state(conn, order_id, OrderState.CANCELLED)
                await db.set_hold_state(conn, order.hold_id, HoldState.CANCELLED)
                await enqueue(conn, self.topic, messages.order_cancelled(order, reason))
        await self.inventory.release(order.event_id, str(order.hold_id), user_id, order.seat_ids)
        if self.queue is not None and not replay:
            await self.queue.end_session(order.event_id, user_id, confirmed=False)
        return order

    async def confirm_order(self, order_id: uuid.UUID, payment: str, known: Order | None = None,
                            paid_at: datetime | None = None) -> Order:
        """Sell the order to its payment: one transaction (sold_seats, CONFIRMED, OrderConfirmed),
        then its seats SOLD in Redis, and the waiting room told if the house sold out (the fan's
        session is ended by OrderConfirmed). ``known`` is the order as the caller read it, if it
        did (not read again).

        A pending order is sold by one statement (db.sell_pending), which checks that it still is
        pending and in time; anything else (a replay, an order gone, a race) by the transaction
        below, which says why.

        Confirming again with the same payment (PaymentSucceeded redelivered: its consumer's mark
        commits after this returns, so a crash between this commit and the steps after it brings
        it back) changes nothing in PostgreSQL but redoes the Redis step and the sold-out signal,
        both idempotent, which the crash may have cut off: otherwise the seat map would show sold
        seats HELD until the hold's deadline.

        ``paid_at`` is when payment recorded the success (PaymentSucceeded's succeed_time): the
        deadline is judged by it, not by when the event got here, so a fan who paid in time keeps
        the seats however late the event is delivered, as long as the order is still pending
        (the sweeper waits ``payment_grace`` past the deadline for that)."""
        name = f"orders/{order_id}"
        now = self.clock()
        paid = now if paid_at is None else min(paid_at, now)
        try:
            order = await self._sell_pending(order_id, payment, now, paid, known) \
                or await self._confirm(order_id, payment, now, paid)
        except psycopg.errors.UniqueViolation:
            # sold_seats' primary key: one of these seats is sold already. No double sale.
            raise DomainError("ORDER_NOT_PAYABLE", f"{name}: a seat was sold to another order; "
                              "refund the payment", metadata={"cause": "SEAT_ALREADY_SOLD"}) from None
        await self._mark_sold(order.event_id, order.hold_id, order.seat_ids)
        # The fan's session is ended by OrderConfirmed (the waiting room's consumer), not by a
        # call from here as well: that was a second gRPC call and Redis script per purchase (a
        # thirtieth of a sale's CPU) to free the slot a few hundred milliseconds sooner.
        return order

    async def _mark_sold(self, event_id: str, hold_id: uuid.UUID, seat_ids: Sequence[str]) -> None:
        """A sale's seats SOLD in the live state; the waiting room told if that was the last."""
        unsold = await self.inventory.sell(event_id, str(hold_id), seat_ids)
        # The live state counts the unsold seats down, so a sale is not a count of every sold
        # seat (which grows with the house: O(seats) per sale). It only says when to ask
        # PostgreSQL, the truth; so does a count it does not know (-1).
        if unsold <= 0:
            await self._announce_sold_out(event_id)

    async def _sell_pending(self, order_id: uuid.UUID, payment: str, now: datetime, paid: datetime,
                            known: Order | None) -> Order | None:
        """The order sold by one statement if it is pending and was paid in time, as read and
        still; None (nothing written) if not."""
        async with autocommit(self.pool) as conn:
            order = known or await db.get_order(conn, order_id)
            if order is None or order.state is not OrderState.PENDING_PAYMENT or order.expire_time <= paid:
                return None
            sold = dataclasses.replace(order, state=OrderState.CONFIRMED, payment=payment, update_time=now)
            if await db.sell_pending(conn, sold, paid, Outboxed(self.topic, messages.order_confirmed(sold))):
                return sold
        return None

    async def _confirm(self, order_id: uuid.UUID, payment: str, now: datetime, paid: datetime) -> Order:
        """What one statement could not sell, in a transaction that says why (or the order, if
        this payment confirmed it before: a replay)."""
        name = f"orders/{order_id}"
        async with self.pool.connection() as conn, conn.transaction():
            order = await db.get_order(conn, order_id, lock=True)
            if order is None:
                raise model.order_not_found(name)
            if order.state is OrderState.CONFIRMED:
                if order.payment != payment:
                    raise DomainError("ORDER_ALREADY_PAID", f"{name} was paid by {order.payment}",
                                      metadata={"payment": order.payment})
                return order
            if order.state is not OrderState.PENDING_PAYMENT or order.expire_time <= paid:
                raise DomainError("ORDER_NOT_PAYABLE", f"{name} is {order.state.value}: refund the payment",
                                  metadata={"state": order.state.value})
            await db.insert_sold(conn, order.event_id, order.seat_ids, order_id)
            order = await db.set_order_state(conn, order_id, OrderState.CONFIRMED, payment)
            await db.set_hold_state(conn, order.hold_id, HoldState.SOLD)
            await enqueue(conn, self.topic, messages.order_confirmed(order))
        return order

    async def _announce_sold_out(self, event_id: str) -> bool:
        """EventSoldOut through the outbox if PostgreSQL has every seat of the event sold; whether
        it had. Durable once this returns: the waiting room hears of it however long it or Kafka
        is away, and a crash before it returns redoes it (the payment event is delivered again,
        the sweeper or a rebuild passes here again). Said once per caller that sees the house
        full: more than once is a no-op for the room."""
        async with autocommit(self.pool) as conn:
            said = await db.announce_sold_out(conn, event_id,
                                              Outboxed(self.topic, messages.event_sold_out(event_id)))
        if said:
            log.info("sold out: the waiting room is told", extra={"event": model.event_name(event_id)})
        return said

    async def expire_order(self, order_id: uuid.UUID) -> Order:
        async with autocommit(self.pool) as conn:
            order = await db.get_order(conn, order_id)
        if order is None:
            raise model.order_not_found(f"orders/{order_id}")
        if order.state is OrderState.PENDING_PAYMENT:
            await self.expire_hold(order.event_id, order.hold_id)
            return await self.get_order(None, order_id)
        if order.state is OrderState.EXPIRED:
            return order
        raise DomainError("ORDER_NOT_EXPIRABLE", f"{order.name} is {order.state.value}")

    # --- expiry ----------------------------------------------------------------------------------

    async def expire_hold(self, event_id: str, hold_id: uuid.UUID, *, wait_for_payment: bool = False) -> str:
        """Finish a hold whose deadline passed, from PostgreSQL's state; returns what happened.

        ``wait_for_payment`` (the sweeper): an order still pending is left, seats held, until
        ``payment_grace`` past its deadline ("deferred"), for a payment made in time whose event
        is late; a payment that cannot buy it (booking's own refusal) expires it at once."""
        outcome = "released"
        defer_to: datetime | None = None
        async with self.pool.connection() as conn, conn.transaction():
            hold = await db.get_hold(conn, hold_id, lock=True)
            if hold is not None:
                await db.share_event(conn, event_id)
            if hold is not None and hold.state is HoldState.ACTIVE:
                await db.set_hold_state(conn, hold_id, HoldState.EXPIRED)
                await enqueue(conn, self.topic, messages.hold_expired(hold))
                outcome = "hold_expired"
            elif hold is not None and hold.state is HoldState.ORDERED:
                order = await db.order_by_hold(conn, hold_id, lock=True)
                pending = order if order is not None and order.state is OrderState.PENDING_PAYMENT else None
                grace_ends = pending.expire_time + self.payment_grace if pending is not None else None
                if grace_ends is not None and wait_for_payment and self.clock() < grace_ends:
                    defer_to = grace_ends
                else:
                    if pending is not None:
                        order = await db.set_order_state(conn, pending.order_id, OrderState.EXPIRED)
                        await enqueue(conn, self.topic, messages.order_expired(order))
                    await db.set_hold_state(conn, hold_id, HoldState.EXPIRED)
                    await enqueue(conn, self.topic, messages.hold_expired(hold))
                    outcome = "order_expired"
        if defer_to is not None:
            await self.inventory.defer(event_id, str(hold_id), ms(defer_to))
            return "deferred"
        if hold is None:  # never written to PostgreSQL (a crash right after the script)
            rec = await self.inventory.hold_record(event_id, str(hold_id))
            user, seats = rec.get("user", ""), tuple(filter(None, rec.get("seats", "").split(",")))
            orphan = Hold(hold_id, event_id, user, seats, self.clock(), self.clock())
            if await self._take_back(orphan, None) is not None:  # a retry just wrote it down
                return await self.expire_hold(event_id, hold_id, wait_for_payment=wait_for_payment)
            return "orphan_released"
        if hold.state is HoldState.SOLD:
            # Its sale's own Redis step never ran (Redis was down then): the seats become SOLD
            # here, and if they were the last, the room must hear it from here too.
            await self._mark_sold(event_id, hold_id, hold.seat_ids)
            return "sold"
        await self.inventory.release(event_id, str(hold_id), hold.user_id, hold.seat_ids)
        return outcome

    async def sweep_once(self, batch: int = 200) -> int:
        """Expire every hold past its deadline, in every event due for a sweep; returns how many
        were finished.

        The events due are read from Redis (inventory.SWEEP_KEY): an event enters it before its
        live state is built, and each sweep moves it to its earliest deadline left. So an idle
        replica costs a Redis call per interval, not two per event it ever served (the old
        scan of every known event cost 15 % of a core at 270 events)."""
        now_ms = ms(self.clock())
        stamp, _ = self._event_ids
        if time.monotonic() - stamp > 5.0:
            # Events with live holds in PostgreSQL are due now: their state is (re)built here if
            # Redis lost it (index and all), so deadlines are met even if nobody calls after a
            # Redis restart.
            ids = await db.events_with_live_holds(self.pool)
            self._event_ids = (time.monotonic(), ids)
            await self.inventory.sweep_at(ids, now_ms)
        done = 0
        lease_ms = int(self.sweep_lease.total_seconds() * 1000)
        # An event with no deadline left is looked at again after half a hold's life: a hold made
        # meanwhile has a deadline a whole hold's life away, so it is never missed.
        revisit_ms = max(1, int(self.hold_ttl.total_seconds() * 500))
        for event_id in await self.inventory.due_for_sweep(now_ms, limit=1000):
            next_ms = now_ms + revisit_ms
            try:
                await self.ensure_live(await self.layout(event_id))
                while True:
                    due, first = await self.inventory.claim_due(event_id, now_ms, lease_ms, batch)
                    for hid in due:
                        try:
                            if await self.expire_hold(event_id, uuid.UUID(hid),
                                                      wait_for_payment=True) != "deferred":
                                done += 1
                        except Exception:
                            log.warning("hold expiry failed; retried after the lease",
                                        exc_info=True, extra={"hold": hid})
                    if len(due) < batch:
                        break
                if first is not None:
                    next_ms = min(next_ms, first)
            except NotFound:
                # No such event here (booking's database lost it, or it was never published
                # here): nothing of it can be held. It leaves the index, instead of failing with
                # a stack trace every half a hold's life, forever.
                await self.inventory.sweep_forget(event_id)
                log.info("sweep index named an unknown event; dropped", extra={"event_id": event_id})
                continue
            except Exception:  # this event only: the others are swept all the same
                log.warning("sweep of an event failed; looked at again later",
                            exc_info=True, extra={"event_id": event_id})
            await self.inventory.sweep_next(event_id, next_ms)
        return done

    async def run_sweeper(self, interval: float) -> None:
        while True:
            try:
                n = await self.sweep_once()
                if n:
                    log.info("holds expired", extra={"count": n})
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("sweep failed", exc_info=True)
            await asyncio.sleep(interval)

    def forget_event_ids(self) -> None:
        self._event_ids = (0.0, [])


