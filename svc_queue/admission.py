"""The admission loop: every replica runs one; any number may run at once.

Each tick (``TP_ADMISSION_TICK_SECONDS``, default 0.15 s, with jitter) runs one script per room
(``lua/tick.lua``): sweep expired sessions and unclaimed turns, then advance ``serving`` by what
the room's token bucket (kept in Redis) allows while active + reserved slots stay under
``max_active``. Because the bucket and the counters live in Redis and the step is atomic, three
replicas ticking together admit at the configured rate, not three times it, and never over-admit.

Which rooms exist is the registry set ``<prefix>:rooms`` (added by EventPublished), read at most
once a second. A room leaves it once its show has started. A room nobody waits in (or whose sale
has not opened) says so in its tick's answer and is ticked again at most a minute later, or when
its sale opens if that is sooner (IDLE_MS in lua/common.lua), so rooms published weeks ahead cost
almost nothing; a join or an admin change on this replica "pokes" its room back to every tick at
once.

A registered room whose keys are gone is rebuilt from catalog when the event is still published
(``recover``, svc_queue/recovery.py), and leaves the registry otherwise. While catalog cannot be
reached it stays registered and is looked at again a second later.

The other way round, a room whose keys are there but which is missing from the registry (the set
lost on its own: on Redis Cluster it lives on another master than the rooms, which can fail over
to an empty replica) would never be ticked again, its fans waiting for good. So a poke for a room
this replica's last read of the registry did not have puts it back (SADD) before the call that
poked answers: a join or a waiting fan's queue/me is enough to heal it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

from prometheus_client import Counter

from meshkit.redis import AnyRedis

from .adapters.rooms import RoomStore, TickResult

log = logging.getLogger(__name__)

ADMITTED = Counter("queue_admitted_total", "Fans admitted (turn served, slot reserved).")
TICKS = Counter("queue_admission_ticks_total", "Admission steps run (one room, one tick).")
TICK_ERRORS = Counter("queue_admission_tick_errors_total", "Admission steps that failed.")


class RoomRegistry:
    """The set of rooms the admission loops tick (one Redis set; not on a room's hash tag)."""

    def __init__(self, redis: AnyRedis, key: str) -> None:
        self.redis = redis
        self.key = key

    async def add(self, event_id: str) -> bool:
        """True if it was not there."""
        return bool(await self.redis.sadd(self.key, event_id))  # type: ignore[misc]

    async def remove(self, event_id: str) -> None:
        await self.redis.srem(self.key, event_id)  # type: ignore[misc]

    async def members(self) -> list[str]:
        raw = await self.redis.smembers(self.key)  # type: ignore[misc]
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in raw)


class AdmissionLoop:
    def __init__(
        self, rooms: RoomStore, registry: RoomRegistry, *, tick_seconds: float,
        refresh_seconds: float = 1.0, concurrency: int = 32,
        recover: Callable[[str], Awaitable[bool]] | None = None,
    ) -> None:
        self.rooms = rooms
        self.registry = registry
        self.tick_seconds = tick_seconds
        self.refresh_seconds = refresh_seconds
        self.recover = recover  # a missing room: rebuild it from catalog? (True: rebuilt)
        self._limit = asyncio.Semaphore(concurrency)
        self._events: list[str] = []
        self._events_at = float("-inf")
        self._due: dict[str, float] = {}  # room -> monotonic time of its next tick
        self._poked: dict[str, float] = {}  # room -> monotonic time of its last poke
        self._known: set[str] = set()  # set(self._events)
        self._closed: set[str] = set()  # rooms this loop retired because their show started
        self._last_error_log = float("-inf")
        self.ticks = 0

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.tick_all()
            except asyncio.CancelledError:
                raise
            except Exception:
                self._log_error("admission tick failed; retrying")
            elapsed = time.monotonic() - started
            # jitter keeps replicas from ticking in lock step (harmless, but wasteful)
            await asyncio.sleep(max(0.0, self.tick_seconds * random.uniform(0.8, 1.2) - elapsed))

    async def tick_all(self) -> list[TickResult]:
        now = time.monotonic()
        if now - self._events_at >= self.refresh_seconds:
            self._events = await self.registry.members()
            self._events_at = now
            self._known = known = set(self._events)
            self._due = {e: t for e, t in self._due.items() if e in known}
            self._poked = {e: t for e, t in self._poked.items() if e in known}
        due = [e for e in self._events if self._due.get(e, 0.0) <= now]
        results = await asyncio.gather(*(self._tick(e) for e in due))
        self.ticks += 1
        return [r for r in results if r is not None]

    async def poke(self, event_id: str) -> None:
        """Something happened in this room (a join, a waiting fan's read, a change): tick it on
        the next round. A room this replica's last read of the registry did not have is put
        back in it first (SADD; its answer tells a lost entry, logged, from a room published a
        moment ago), before the caller answers: so a room whose keys survived the registry's
        loss is ticked again as soon as anyone uses it."""
        self._due.pop(event_id, None)
        self._poked[event_id] = time.monotonic()
        if event_id in self._known or event_id in self._closed:
            return  # a closed room left the registry on purpose: a late reader does not revive it
        if await self.registry.add(event_id):
            log.warning("room missing from the registry; registered again", extra={"event_id": event_id})
        if event_id not in self._known:
            self._known.add(event_id)
            self._events = [*self._events, event_id]

    async def _tick(self, event_id: str) -> TickResult | None:
        started = time.monotonic()
        async with self._limit:
            try:
                result = await self.rooms.tick(event_id)
            except asyncio.CancelledError:
                raise
            except Exception:
                TICK_ERRORS.inc()
                self._log_error("admission step failed", event_id)
                return None
        TICKS.inc()
        # A poke while the script ran (a join into a room it found idle) outranks its answer.
        if result.wait_ms > 0 and self._poked.get(event_id, float("-inf")) < started:
            self._due[event_id] = time.monotonic() + result.wait_ms / 1000
        else:
            self._due.pop(event_id, None)
        if result.admitted:
            ADMITTED.inc(result.admitted)
        if result.missing and self.recover is not None:
            try:
                if await self.recover(event_id):
                    return result  # rebuilt: ticked again next round
            except asyncio.CancelledError:
                raise
            except Exception:  # catalog unreachable: keep the room, look again in a second
                self._due[event_id] = time.monotonic() + 1.0
                return result
        if result.missing or result.closed:
            if result.closed:
                self._closed.add(event_id)
            await self.registry.remove(event_id)
            log.info("room no longer ticked", extra={"event_id": event_id, "closed": result.closed,
                                                     "missing": result.missing})
        return result

    def _log_error(self, message: str, event_id: str | None = None) -> None:
        now = time.monotonic()
        if now - self._last_error_log >= 5.0:  # at most one stack trace every 5 s
            self._last_error_log = now
            log.exception(message, extra={"event_id": event_id})
