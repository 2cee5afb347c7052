"""Rooms lost with Redis' data come back from catalog.

A room exists only in Redis, made when the queue consumes catalog's EventPublished. If Redis loses
its data (FLUSHALL, failover to an empty replica, a lost volume), nothing republishes the event
and the consumer's offsets are past it. So when a room operation finds no room, the queue asks
catalog (CatalogService.GetEvent) whether the event is published; if it is, the room's config is
rebuilt by the EventPublished handler itself (``Queue.event_published``: one code path) and the
operation is tried once more. Tickets and sessions that were lost stay lost: fans join again.

Catalog is not hammered:

* an id catalog does not know (or not published) is remembered as absent for a few seconds
  (``TP_CATALOG_NOT_FOUND_CACHE_SECONDS``), in a bounded table;
* concurrent misses for one event share one lookup (single flight);
* a catalog that cannot be reached is remembered for a second, and the operation answers
  UNAVAILABLE (``CATALOG_UNAVAILABLE``, retryable) rather than 404: the queue does not know
  whether the event exists, and a 404 would tell a fan's app that a real sale does not exist.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Protocol

import grpc
from prometheus_client import Counter
from ticketping.events.v1 import events_pb2 as ev

from meshkit.errors import DomainError

from .adapters.catalog import CatalogUnreachable
from .domain.room import event_name

log = logging.getLogger(__name__)

LOOKUPS = Counter("queue_room_recovery_lookups_total",
                  "Catalog lookups for a room missing from Redis, by outcome.", ["outcome"])
# configure.lua: a room's keys expire this long after the show starts; rebuilding one past that
# would make keys that are gone at once.
ROOM_KEPT_AFTER_START_MS = 2 * 86_400_000


class CatalogUnavailable(DomainError):
    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, event_id: str) -> None:
        name = event_name(event_id)
        super().__init__("CATALOG_UNAVAILABLE",
                         f"the waiting room of {name} is being restored and catalog cannot be "
                         "reached; try again shortly", metadata={"name": name})


class EventSource(Protocol):
    async def published(self, event_id: str) -> ev.EventPublished | None: ...


class Outcome(enum.Enum):
    REBUILT = "rebuilt"
    ABSENT = "absent"
    UNREACHABLE = "unreachable"


class RoomRecovery:
    def __init__(
        self, catalog: EventSource, rebuild: Callable[[ev.EventPublished], Awaitable[None]], *,
        absent_seconds: float = 5.0, unreachable_seconds: float = 1.0, max_remembered: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.catalog = catalog
        self.rebuild = rebuild
        self.absent_seconds = absent_seconds
        self.unreachable_seconds = unreachable_seconds
        self.max_remembered = max_remembered
        self.clock = clock
        # event -> (remembered until, outcome); oldest first, at most max_remembered entries
        self._remembered: OrderedDict[str, tuple[float, Outcome]] = OrderedDict()
        self._flights: dict[str, asyncio.Task[Outcome]] = {}
        self._last_warning = float("-inf")
        self.lookups = 0  # calls made to catalog

    async def recover(self, event_id: str) -> bool:
        """True: the room was rebuilt (try the operation once more). False: no such published
        event (the 404 stands). Raises CatalogUnavailable when catalog cannot be reached."""
        hit = self._remembered.get(event_id)
        if hit is not None and hit[0] > self.clock():
            outcome = hit[1]
        else:
            flight = self._flights.get(event_id)
            if flight is None:
                flight = asyncio.get_running_loop().create_task(self._lookup(event_id))
                self._flights[event_id] = flight
                flight.add_done_callback(lambda t: self._landed(event_id, t))
            outcome = await asyncio.shield(flight)  # a caller giving up does not stop the others'
        if outcome is Outcome.UNREACHABLE:
            raise CatalogUnavailable(event_id)
        return outcome is Outcome.REBUILT

    def _landed(self, event_id: str, task: asyncio.Task[Outcome]) -> None:
        if self._flights.get(event_id) is task:
            del self._flights[event_id]
        if not task.cancelled():
            task.exception()  # retrieved here too, so a lookup nobody awaits any more logs nothing

    def _remember(self, event_id: str, outcome: Outcome, seconds: float) -> None:
        self._remembered.pop(event_id, None)
        self._remembered[event_id] = (self.clock() + seconds, outcome)
        while len(self._remembered) > self.max_remembered:
            self._remembered.popitem(last=False)

    async def _lookup(self, event_id: str) -> Outcome:
        self.lookups += 1
        try:
            msg = await self.catalog.published(event_id)
        except CatalogUnreachable as exc:
            LOOKUPS.labels(Outcome.UNREACHABLE.value).inc()
            self._remember(event_id, Outcome.UNREACHABLE, self.unreachable_seconds)
            now = self.clock()
            if now - self._last_warning >= 5.0:  # at most one warning every 5 s
                self._last_warning = now
                log.warning("a room is missing from Redis and catalog cannot be reached",
                            extra={"event_id": event_id, "code": str(exc)})
            return Outcome.UNREACHABLE
        if msg is None or (
            msg.start_time.ToMilliseconds() + ROOM_KEPT_AFTER_START_MS <= int(time.time() * 1000)
        ):
            LOOKUPS.labels(Outcome.ABSENT.value).inc()
            self._remember(event_id, Outcome.ABSENT, self.absent_seconds)
            return Outcome.ABSENT
        await self.rebuild(msg)  # the EventPublished handler, as if catalog had sent it again
        LOOKUPS.labels(Outcome.REBUILT.value).inc()
        # Its keys were lost (any tickets and sessions with them), or catalog's EventPublished
        # has not been consumed yet (then Kafka's copy changes nothing).
        log.warning("waiting room missing from Redis: rebuilt from catalog",
                    extra={"event_id": event_id})
        return Outcome.REBUILT
