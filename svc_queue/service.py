"""The queue's use cases: join, read (and claim) a ticket, leave, room status and settings, the
internal calls booking makes, and the Kafka events the queue reacts to. Rules from domain/, I/O
from adapters/."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

from prometheus_client import Counter
from ticketping.events.v1 import events_pb2 as ev

from meshkit.events import EventEnvelope, event_type, sales_end_ms

from .adapters.keystore import AdmissionKeyStore
from .adapters.rooms import RoomStore
from .admission import RoomRegistry
from .domain.room import (
    EventNotFound,
    RoomChange,
    RoomDefaults,
    RoomStatus,
    Ticket,
    TicketState,
    admission_claims,
    parse_event_name,
)
from .recovery import CatalogUnavailable, RoomRecovery

log = logging.getLogger(__name__)

CLAIMED = Counter("queue_claimed_total", "Turns claimed (fans who became ACTIVE).")
# ListOpenQueues: one answer serves every caller for this long (each edge pod's feed asks about
# once a second), and a room's opening and closing times, which only a republished event
# changes, are read again after WINDOW_SECONDS. A room found quiet (nobody waiting or active) is
# read again after QUIET_SECONDS, or at once when this replica sees it used (a join, a waiting
# fan's read, an admin's change): a platform has hundreds of rooms open, nearly all quiet, and
# reading every one of them every time cost the waiting room about a tenth of a core.
OPEN_ROOMS_FRESH_SECONDS = 0.2
WINDOW_SECONDS = 10.0
QUIET_SECONDS = 5.0
T = TypeVar("T")


@dataclass(frozen=True)
class TokenSettings:
    issuer: str
    audience: str


class Queue:
    # The events the waiting room acts on (catalog's and booking's topics); the rest are passed over.
    EVENT_TYPES = frozenset({"event_published", "order_confirmed", "order_cancelled", "event_sold_out"})

    def __init__(
        self, rooms: RoomStore, registry: RoomRegistry, keys: AdmissionKeyStore, *,
        tokens: TokenSettings, defaults: RoomDefaults, max_session_ttl_ms: int,
        poke: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.rooms = rooms
        self.registry = registry
        self.keys = keys
        self.tokens = tokens
        self.defaults = defaults
        self.max_session_ttl_ms = max_session_ttl_ms
        self._poke = poke  # tells this replica's admission loop that a room needs a tick now
        # Rebuilds a room lost from Redis from catalog (None: no catalog configured, a missing
        # room stays 404). Set after construction: it calls back into event_published.
        self.recovery: RoomRecovery | None = None
        self._open: tuple[float, list[RoomStatus]] | None = None
        self._open_lock = asyncio.Lock()
        self._windows: dict[str, tuple[float, tuple[int, int] | None]] = {}
        self._quiet: dict[str, tuple[float, RoomStatus]] = {}  # room -> (read at, its quiet status)
        self._used: dict[str, float] = {}  # room -> when this replica last saw it used

    async def recover_room(self, event_id: str) -> bool:
        """The room is missing: rebuild it if catalog says the event is published (True)."""
        return self.recovery is not None and await self.recovery.recover(event_id)

    async def _in_room(self, event_id: str, op: Callable[[], Awaitable[T]]) -> T:
        """Run a room operation; if the room is missing and catalog rebuilds it, once more."""
        try:
            return await op()
        except EventNotFound:
            if not await self.recover_room(event_id):
                raise
        return await op()

    # -- fans -------------------------------------------------------------------------------

    async def join(self, event_id: str, user_id: str) -> Ticket:
        ticket = await self._in_room(event_id, lambda: self.rooms.join(event_id, user_id))
        await self.poke(event_id)
        return ticket

    async def ticket(self, event_id: str, user_id: str) -> Ticket:
        """The fan's ticket; if their turn has come (within the claim window), this read claims
        it: ACTIVE, with an admission token (the same token on every later read). A fan still
        waiting pokes the room: if the replica their join poked died, this one ticks it now."""
        ticket = await self._in_room(event_id, lambda: self._ticket(event_id, user_id))
        if ticket.state is TicketState.WAITING:
            await self.poke(event_id)
        return ticket

    async def _ticket(self, event_id: str, user_id: str) -> Ticket:
        for _ in range(3):
            reply = await self.rooms.ticket(event_id, user_id, str(uuid.uuid4()))
            ticket = reply.ticket
            if reply.fresh_claim:
                CLAIMED.inc()
            if ticket.state is not TicketState.ACTIVE or ticket.token:
                return ticket
            # Claimed just now (or signed by nobody yet): sign; the first token stored is kept.
            token = await self.keys.sign(admission_claims(
                issuer=self.tokens.issuer, audience=self.tokens.audience, user_id=user_id,
                event_id=event_id, jti=ticket.jti, issued_ms=ticket.claimed_at_ms,
                expire_ms=ticket.expire_ms,
            ))
            kept = await self.rooms.store_token(event_id, user_id, ticket.jti, token)
            if kept is not None:
                return replace(ticket, token=kept)
            # the session ended between the two calls: read again to say what it is now
        raise RuntimeError("the fan's session kept changing while its token was being stored")

    async def leave(self, event_id: str, user_id: str) -> Ticket:
        return await self._in_room(event_id, lambda: self.rooms.leave(event_id, user_id))

    # -- the room ---------------------------------------------------------------------------

    async def poke(self, event_id: str) -> None:
        self._used[event_id] = time.monotonic()  # used: ListOpenQueues reads it afresh
        self._quiet.pop(event_id, None)
        if self._poke is not None:
            await self._poke(event_id)

    async def status(self, event_id: str) -> RoomStatus:
        return await self._in_room(event_id, lambda: self.rooms.status(event_id))

    async def open_rooms(self) -> list[RoomStatus]:
        """The status of every registered room open now: its queue has opened and it has not
        closed. Callers within OPEN_ROOMS_FRESH_SECONDS of one another share one reading. A room
        with fans waiting or active is read for each reading; a quiet one at most QUIET_SECONDS
        ago (sooner if this replica saw it used), so a room that fills through another replica
        is listed as busy within QUIET_SECONDS."""
        async with self._open_lock:
            if self._open is None or time.monotonic() - self._open[0] >= OPEN_ROOMS_FRESH_SECONDS:
                self._open = (time.monotonic(), await self._read_open_rooms())
            return self._open[1]

    async def _read_open_rooms(self) -> list[RoomStatus]:
        members = await self.registry.members()
        keep = set(members)
        self._windows = {m: w for m, w in self._windows.items() if m in keep}
        windows = await asyncio.gather(*(self._window(m) for m in members))
        now_ms = int(time.time() * 1000)
        live = [m for m, w in zip(members, windows, strict=True)
                if w is not None and w[0] <= now_ms and (w[1] == 0 or now_ms < w[1])]
        now = time.monotonic()
        self._quiet = {m: q for m, q in self._quiet.items() if m in keep and now - q[0] < QUIET_SECONDS}
        self._used = {m: t for m, t in self._used.items() if now - t < QUIET_SECONDS}
        due = [m for m in live if m not in self._quiet]
        statuses = await asyncio.gather(*(self.rooms.status(m) for m in due), return_exceptions=True)
        for m, s in zip(due, statuses, strict=True):
            if isinstance(s, BaseException) and not isinstance(s, EventNotFound):
                raise s  # Redis failing: the caller gets an error, not a partial list
            if isinstance(s, EventNotFound):
                self._windows.pop(m, None)
            elif (isinstance(s, RoomStatus) and not (s.waiting_count or s.active_count or s.pending_count)
                  and self._used.get(m, float("-inf")) < now):  # not used while it was being read
                self._quiet[m] = (now, s)
        fresh = {m: s for m, s in zip(due, statuses, strict=True) if isinstance(s, RoomStatus)}
        return [fresh[m] if m in fresh else self._quiet[m][1] for m in live
                if m in fresh or m in self._quiet]

    async def _window(self, event_id: str) -> tuple[int, int] | None:
        now = time.monotonic()
        known = self._windows.get(event_id)
        if known is None or now - known[0] >= WINDOW_SECONDS:
            known = (now, await self.rooms.window(event_id))
            self._windows[event_id] = known
        return known[1]

    async def update(self, event_id: str, change: RoomChange) -> RoomStatus:
        fields = change.fields()
        status = await self._in_room(event_id, lambda: self.rooms.update(event_id, fields))
        await self.poke(event_id)
        return status

    async def mark_sold_out(self, event_id: str) -> RoomStatus:
        self._used[event_id] = time.monotonic()
        self._quiet.pop(event_id, None)
        return await self._in_room(event_id, lambda: self.rooms.mark_sold_out(event_id))

    # -- booking ----------------------------------------------------------------------------

    async def end_session(self, event_id: str, user_id: str, *, expired: bool = False) -> bool:
        ended, _ = await self.rooms.end_session(event_id, user_id, to="E" if expired else "D")
        return ended

    async def check(self, event_id: str, sessions: Sequence[tuple[str, str]]) -> list[int | None]:
        """For each (user, jti): the session's deadline (ms) if active, else None (also for a
        room that does not exist: booking only needs "not admitted"). A missing room is rebuilt
        on the way; the answer is "not active" whatever catalog says, since a lost session stays
        lost."""
        try:
            return await self._in_room(event_id, lambda: self.rooms.check(event_id, sessions))
        except (EventNotFound, CatalogUnavailable):
            return [None] * len(sessions)

    async def jwks(self) -> list[dict[str, str]]:
        return await self.keys.jwks()

    # -- events (Kafka) ---------------------------------------------------------------------

    async def on_event(self, envelope: EventEnvelope) -> bool:
        """Apply one event; True if it had been applied before (a redelivery)."""
        kind = event_type(envelope)
        if kind == "event_published":
            await self.event_published(envelope.event_published)
            return False
        if kind in ("order_confirmed", "order_cancelled"):
            msg = getattr(envelope, kind)
            event_id = parse_event_name(msg.event)
            # The path that ends a confirmed order's session (booking calls EndSession itself only
            # on a cancel). A session claimed after the order event happened (the fan queued
            # again) is not the order's session.
            ended, duplicate = await self.rooms.end_session(
                event_id, msg.user_id, to="D", marker=envelope.event_id,
                happened_ms=envelope.occurred_at.ToMilliseconds())
            log.info("order event ends the session", extra={
                "event_type": kind, "event_id": event_id, "user_id": msg.user_id, "order": msg.order,
                "ended": ended, "duplicate": duplicate})
            return duplicate
        if kind == "event_sold_out":
            # Booking sold the last seat: admit nobody more, and tell the fans still waiting.
            # Marking a room sold out again changes nothing, so a redelivery needs no marker.
            event_id = parse_event_name(envelope.event_sold_out.event)
            try:
                status = await self.mark_sold_out(event_id)
            except EventNotFound:  # no room for it (never published here): nobody to tell
                log.warning("sold-out event for an event with no room", extra={"event_id": event_id})
                return False
            log.info("the room is sold out", extra={"event_id": event_id, "waiting": status.waiting_count})
            return False
        return False  # not the queue's business

    async def event_published(self, msg: ev.EventPublished) -> None:
        event_id = parse_event_name(msg.event)
        await self.rooms.configure(
            event_id,
            queue_open_ms=msg.queue_open_time.ToMilliseconds(),
            sale_open_ms=msg.sale_open_time.ToMilliseconds(),
            closes_ms=sales_end_ms(msg),
            seats=msg.seat_count,
            defaults=self.defaults,
        )
        await self.registry.add(event_id)
        log.info("waiting room ready", extra={"event_id": event_id})
