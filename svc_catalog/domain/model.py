"""Catalog's model: an event, its price tiers and its compact seat map. Plain values, no I/O.

Every value here is immutable (frozen dataclasses holding tuples), so one instance can be shared
by the read cache and every request that reads it.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime

# The seat map lives in meshkit (booking expands the same ranges); re-exported here.
from meshkit.seats import Seat as Seat
from meshkit.seats import SeatMap as SeatMap
from meshkit.seats import Section as Section
from meshkit.seats import seat_id as seat_id


class EventState(enum.Enum):
    """Stored by name (text), never by ordinal."""

    DRAFT = "DRAFT"
    PUBLISHED = "PUBLISHED"


@dataclass(frozen=True)
class Money:
    """``google.type.Money``: ``units`` whole units plus ``nanos`` (10^-9) of a unit."""

    currency_code: str
    units: int
    nanos: int = 0


@dataclass(frozen=True)
class PriceTier:
    name: str
    price: Money


@dataclass(frozen=True)
class Venue:
    name: str
    address: str = ""


@dataclass(frozen=True)
class EventSpec:
    """What an admin describes: every field a client may set. Unset times are None."""

    title: str = ""
    artist: str = ""
    venue: Venue = Venue("")
    start_time: datetime | None = None
    queue_open_time: datetime | None = None
    sale_open_time: datetime | None = None
    sale_close_time: datetime | None = None
    seat_limit_per_fan: int = 0
    price_tiers: tuple[PriceTier, ...] = ()
    seat_map: SeatMap = SeatMap()

    def merged(self, other: EventSpec, paths: frozenset[str]) -> EventSpec:
        """This spec with the fields named in ``paths`` (see UPDATABLE) taken from ``other``."""
        changes: dict[str, object] = {}
        venue = self.venue
        for path in paths:
            if path == "venue.name":
                venue = replace(venue, name=other.venue.name)
            elif path == "venue.address":
                venue = replace(venue, address=other.venue.address)
            elif path == "venue":
                venue = other.venue
            else:
                changes[path] = getattr(other, path)
        return replace(self, venue=venue, **changes)  # type: ignore[arg-type]


# Field paths UpdateEvent accepts (proto field names, AIP-161 style).
UPDATABLE: frozenset[str] = frozenset(
    {
        "title",
        "artist",
        "venue",
        "venue.name",
        "venue.address",
        "start_time",
        "queue_open_time",
        "sale_open_time",
        "sale_close_time",
        "seat_limit_per_fan",
        "price_tiers",
        "seat_map",
    }
)
# Output-only fields: accepted in an update mask and ignored (AIP-203).
OUTPUT_ONLY: frozenset[str] = frozenset(
    {"name", "state", "seat_count", "create_time", "update_time", "publish_time"}
)


@dataclass(frozen=True)
class Event:
    id: uuid.UUID
    state: EventState
    spec: EventSpec
    create_time: datetime
    update_time: datetime
    publish_time: datetime | None = None
    seat_count: int = field(default=0)

    @property
    def name(self) -> str:
        return event_name(self.id)

    @property
    def is_published(self) -> bool:
        return self.state is EventState.PUBLISHED


def event_name(event_id: uuid.UUID) -> str:
    return f"events/{event_id}"
