"""Catalog's use cases: create, update, publish, get, list. Rules from domain/, I/O from adapters/.

Reads go through an in-process cache (events by id, list pages by cursor), so the browse load
before a sale is answered from memory; every write invalidates this process's cache after its
commit and notifies the other replicas (PostgreSQL NOTIFY catalog_changed, see change_listener).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from weakref import WeakValueDictionary

from meshkit.errors import DomainError

from .adapters.messages import envelope_for
from .adapters.postgres import EventRepository
from .cache import ReadCache
from .domain import rules
from .domain.model import Event, EventSpec, event_name
from .domain.paging import Cursor


class EventNotDraft(DomainError):
    """FAILED_PRECONDITION (HTTP 412 at the edge)."""


@dataclass(frozen=True)
class Page:
    events: tuple[Event, ...]
    next_cursor: Cursor | None


def utcnow() -> datetime:
    return datetime.now(UTC)


class Catalog:
    def __init__(
        self,
        repo: EventRepository,
        *,
        cache_ttl: float = 5.0,
        cache_max_entries: int = 10_000,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.repo = repo
        self._clock = clock
        self.events: ReadCache[uuid.UUID, Event | None] = ReadCache(cache_ttl, cache_max_entries)
        self.pages: ReadCache[tuple[Cursor | None, int], Page] = ReadCache(cache_ttl, 1_000)
        # One object per version of an event, however many pages and lookups read it: a cached
        # page costs references, not copies. Page tokens are plain keyset cursors, so anyone can
        # make up thousands of distinct ones; their pages then hold the same few real events.
        self._shared: WeakValueDictionary[uuid.UUID, Event] = WeakValueDictionary()

    # -- cache ------------------------------------------------------------------------------

    def changed(self, event_id: uuid.UUID | None) -> None:
        """An event changed (None: anything may have): forget it and every cached list page."""
        self.events.invalidate(event_id)
        self.pages.invalidate()

    # -- writes -----------------------------------------------------------------------------

    async def create(
        self, spec: EventSpec, event_id: uuid.UUID | None, request_id: uuid.UUID | None,
        fingerprint: bytes | None = None,
    ) -> Event:
        """``fingerprint``: a digest of what the request asked for (its event and event id); a
        retry with the same ``request_id`` must bring the same one."""
        seat_count = rules.validate_spec(spec)
        event, _created = await self.repo.create(
            event_id or uuid.uuid4(), request_id, spec, seat_count, self._clock(), fingerprint
        )
        self.changed(event.id)
        return event

    async def update(self, event_id: uuid.UUID, patch: EventSpec, paths: frozenset[str]) -> Event:
        def change(current: Event) -> tuple[EventSpec, int]:
            if current.is_published:
                raise EventNotDraft(
                    "EVENT_NOT_DRAFT", f"{current.name} is published; only a draft can change",
                    metadata={"name": current.name, "state": current.state.value},
                )
            spec = current.spec.merged(patch, paths)
            return spec, rules.validate_spec(spec)

        event = await self.repo.update(event_id, change, self._clock())
        if event is None:
            raise rules.event_not_found(event_name(event_id))
        self.changed(event_id)
        return event

    async def publish(self, event_id: uuid.UUID) -> Event:
        now = self._clock()
        result = await self.repo.publish(
            event_id, lambda e: rules.validate_for_publish(e.spec, now), envelope_for, now
        )
        if result is None:
            raise rules.event_not_found(event_name(event_id))
        event, published = result
        if published:
            self.changed(event_id)
        return event

    # -- reads ------------------------------------------------------------------------------

    def _share(self, event: Event) -> Event:
        kept = self._shared.get(event.id)
        if kept is not None and kept == event:
            return kept
        self._shared[event.id] = event
        return event

    async def _load(self, event_id: uuid.UUID) -> Event | None:
        event = await self.repo.get(event_id)
        return None if event is None else self._share(event)

    async def get(self, event_id: uuid.UUID, *, include_drafts: bool) -> Event:
        event = await self.events.get(event_id, lambda: self._load(event_id))
        if event is None or (not event.is_published and not include_drafts):
            raise rules.event_not_found(event_name(event_id))
        return event

    async def list_page(self, cursor: Cursor | None, size: int) -> Page:
        return await self.pages.get((cursor, size), lambda: self._load_page(cursor, size))

    async def _load_page(self, cursor: Cursor | None, size: int) -> Page:
        rows = await self.repo.list_published(cursor, self._clock(), size + 1)
        events = tuple(self._share(e) for e in rows[:size])
        more = len(rows) > size
        last = events[-1] if events else None
        next_cursor = (
            Cursor(last.spec.start_time, last.id) if more and last and last.spec.start_time else None
        )
        return Page(events, next_cursor)

