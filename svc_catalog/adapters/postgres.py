"""Events in PostgreSQL: the repository (each write one transaction) and the change listener.

Every write notifies the channel ``catalog_changed`` (payload: the event id) in its own
transaction, so PostgreSQL delivers it on commit to every replica's :func:`change_listener`,
which drops that event (and the cached list pages) from the replica's read cache.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool
from ticketping.events.v1.events_pb2 import EventEnvelope

from meshkit.db import autocommit
from meshkit.errors import AlreadyExists, request_id_reused
from meshkit.listen import Listener, connect_to
from meshkit.outbox import enqueue

from ..domain.model import Event, EventSpec, EventState, Money, PriceTier, SeatMap, Section, Venue
from ..domain.paging import Cursor

log = logging.getLogger(__name__)

CHANNEL = "catalog_changed"
TOPIC = "ticketping.catalog.v1"

_COLUMNS = """id, state, title, artist, venue_name, venue_address, start_time, queue_open_time,
    sale_open_time, sale_close_time, seat_limit_per_fan, price_tiers, seat_map, seat_count,
    create_time, update_time, publish_time"""

_INSERT = f"""
INSERT INTO events (id, request_id, request_fingerprint, state, title, artist, venue_name,
    venue_address, start_time, queue_open_time, sale_open_time, sale_close_time, seat_limit_per_fan,
    price_tiers, seat_map, seat_count, create_time, update_time)
VALUES (%s, %s, %s, 'DRAFT', %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT DO NOTHING
RETURNING {_COLUMNS}
"""

_UPDATE_SPEC = f"""
UPDATE events SET title = %s, artist = %s, venue_name = %s, venue_address = %s, start_time = %s,
    queue_open_time = %s, sale_open_time = %s, sale_close_time = %s, seat_limit_per_fan = %s,
    price_tiers = %s, seat_map = %s, seat_count = %s, update_time = %s
WHERE id = %s
RETURNING {_COLUMNS}
"""

_PUBLISH = f"""
UPDATE events SET state = 'PUBLISHED', publish_time = %s, update_time = %s, seat_count = %s
WHERE id = %s AND state = 'DRAFT'
RETURNING {_COLUMNS}
"""

_LIST = f"""
SELECT {_COLUMNS} FROM events
WHERE state = 'PUBLISHED' AND start_time >= %s AND (start_time, id) > (%s, %s)
ORDER BY start_time, id
LIMIT %s
"""

_LIST_FIRST = f"""
SELECT {_COLUMNS} FROM events
WHERE state = 'PUBLISHED' AND start_time >= %s
ORDER BY start_time, id
LIMIT %s
"""

_NOTIFY = "SELECT pg_notify('catalog_changed', %s)"


# -- rows ⇄ domain ------------------------------------------------------------------------------


def _tiers_json(tiers: tuple[PriceTier, ...]) -> Jsonb:
    return Jsonb(
        [
            {"name": t.name, "currency_code": t.price.currency_code, "units": t.price.units,
             "nanos": t.price.nanos}
            for t in tiers
        ]
    )


def _seat_map_json(seat_map: SeatMap) -> Jsonb:
    return Jsonb(
        {
            "sections": [
                {"name": s.name, "rows": s.rows, "seats_per_row": s.seats_per_row, "tier": s.tier}
                for s in seat_map.sections
            ]
        }
    )


def _spec_params(spec: EventSpec) -> tuple[Any, ...]:
    return (
        spec.title, spec.artist, spec.venue.name, spec.venue.address, spec.start_time,
        spec.queue_open_time, spec.sale_open_time, spec.sale_close_time, spec.seat_limit_per_fan,
        _tiers_json(spec.price_tiers), _seat_map_json(spec.seat_map),
    )


def _event(row: TupleRow) -> Event:
    (id_, state, title, artist, venue_name, venue_address, start, queue_open, sale_open, sale_close,
     limit, tiers, seat_map, seat_count, created, updated, published) = row
    spec = EventSpec(
        title=title,
        artist=artist,
        venue=Venue(venue_name, venue_address),
        start_time=start,
        queue_open_time=queue_open,
        sale_open_time=sale_open,
        sale_close_time=sale_close,
        seat_limit_per_fan=limit,
        price_tiers=tuple(
            PriceTier(t["name"], Money(t["currency_code"], int(t["units"]), int(t["nanos"])))
            for t in tiers
        ),
        seat_map=SeatMap(
            tuple(
                Section(s["name"], int(s["rows"]), int(s["seats_per_row"]), s["tier"])
                for s in seat_map["sections"]
            )
        ),
    )
    return Event(
        id=id_,
        state=EventState(state),
        spec=spec,
        create_time=created,
        update_time=updated,
        publish_time=published,
        seat_count=seat_count,
    )


# -- the repository -----------------------------------------------------------------------------


class EventRepository:
    """Catalog's PostgreSQL storage. Counts its reads (``reads``), so tests can see the cache work."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool
        self.reads = 0  # SELECT round trips of get() and list_published()
        self.writes = 0  # write transactions

    async def create(
        self,
        event_id: uuid.UUID,
        request_id: uuid.UUID | None,
        spec: EventSpec,
        seat_count: int,
        now: datetime,
        fingerprint: bytes | None = None,
    ) -> tuple[Event, bool]:
        """Insert a DRAFT; (event, True). A known ``request_id`` returns (the first event, False)
        if ``fingerprint`` (what the request asked for) is the first request's, and raises
        REQUEST_ID_REUSED if it is not."""
        self.writes += 1
        async with self._pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                _INSERT, (event_id, request_id, fingerprint, *_spec_params(spec), seat_count, now, now)
            )
            row = await cur.fetchone()
            if row is not None:
                await conn.execute(_NOTIFY, (str(event_id),))
                return _event(row), True
            # A conflict: the request id (a retry: answer with the first event) or the event id.
            if request_id is not None:
                cur = await conn.execute(
                    f"SELECT {_COLUMNS}, request_fingerprint FROM events WHERE request_id = %s",
                    (request_id,),
                )
                row = await cur.fetchone()
                if row is not None:
                    first = _event(row[:-1])
                    if row[-1] is not None and fingerprint is not None and bytes(row[-1]) != fingerprint:
                        raise request_id_reused(request_id, first.name)
                    return first, False
            raise AlreadyExists(
                "EVENT_EXISTS", f"events/{event_id} already exists",
                metadata={"name": f"events/{event_id}"},
            )

    async def get(self, event_id: uuid.UUID) -> Event | None:
        self.reads += 1
        async with autocommit(self._pool) as conn:
            cur = await conn.execute(f"SELECT {_COLUMNS} FROM events WHERE id = %s", (event_id,))
            row = await cur.fetchone()
        return None if row is None else _event(row)

    async def list_published(self, after: Cursor | None, not_before: datetime, limit: int) -> list[Event]:
        """Published events starting at or after ``not_before``, by (start_time, id), after ``after``."""
        self.reads += 1
        async with autocommit(self._pool) as conn:
            if after is None:
                cur = await conn.execute(_LIST_FIRST, (not_before, limit))
            else:
                cur = await conn.execute(_LIST, (not_before, after.start_time, after.id, limit))
            rows = await cur.fetchall()
        return [_event(r) for r in rows]

    async def update(
        self, event_id: uuid.UUID, change: Callable[[Event], tuple[EventSpec, int]], now: datetime
    ) -> Event | None:
        """Lock the event, let ``change`` (which may raise) give its new spec, write it.

        None if there is no such event.
        """
        self.writes += 1
        async with self._pool.connection() as conn, conn.transaction():
            current = await self._lock(conn, event_id)
            if current is None:
                return None
            spec, seat_count = change(current)
            cur = await conn.execute(_UPDATE_SPEC, (*_spec_params(spec), seat_count, now, event_id))
            row = await cur.fetchone()
            assert row is not None
            await conn.execute(_NOTIFY, (str(event_id),))
            return _event(row)

    async def publish(
        self,
        event_id: uuid.UUID,
        check: Callable[[Event], int],
        envelope_for: Callable[[Event], EventEnvelope],
        now: datetime,
    ) -> tuple[Event, bool] | None:
        """In one transaction: lock the event; if still a DRAFT, ``check`` it (may raise), make it
        PUBLISHED and put ``envelope_for(event)`` in the outbox. (event, True) if this call
        published it, (event, False) if it was already published, None if there is no such event.
        """
        self.writes += 1
        async with self._pool.connection() as conn, conn.transaction():
            current = await self._lock(conn, event_id)
            if current is None:
                return None
            if current.is_published:
                return current, False
            seat_count = check(current)
            cur = await conn.execute(_PUBLISH, (now, now, seat_count, event_id))
            row = await cur.fetchone()
            assert row is not None  # the row is locked and was a DRAFT
            published = _event(row)
            await enqueue(conn, TOPIC, envelope_for(published))
            await conn.execute(_NOTIFY, (str(event_id),))
            return published, True

    async def _lock(self, conn: psycopg.AsyncConnection[Any], event_id: uuid.UUID) -> Event | None:
        cur = await conn.execute(
            f"SELECT {_COLUMNS} FROM events WHERE id = %s FOR UPDATE", (event_id,)
        )
        row = await cur.fetchone()
        return None if row is None else _event(row)


# -- cross-replica invalidation -----------------------------------------------------------------


def change_listener(dsn: str, on_change: Callable[[uuid.UUID | None], None]) -> Listener:
    """LISTEN on ``catalog_changed`` on its own connection: ``on_change(event_id)`` per change,
    ``on_change(None)`` (drop everything) whenever notifications may have been missed; the
    cache's TTL bounds staleness meanwhile."""
    def on_note(payload: str | None) -> None:
        try:
            changed = uuid.UUID(payload) if payload else None
        except ValueError:
            changed = None
        on_change(changed)
    return Listener(connect_to(dsn), CHANNEL, on_note, meanwhile="cache on TTL meanwhile")
