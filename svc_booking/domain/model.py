"""Booking's rules and values, without I/O: an event's inventory layout, prices, names, errors."""

from __future__ import annotations

import enum
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

import grpc

from meshkit.errors import DomainError, InvalidArgument, NotFound, PermissionDenied
from meshkit.seats import Seat, SeatMap, Section, parse_seat_id

NANOS = 1_000_000_000
MAX_SEATS_PER_HOLD = 50  # a sanity cap; the event's per-fan limit is normally far lower


class SeatStatus(enum.Enum):
    AVAILABLE = "A"
    HELD = "H"
    SOLD = "S"


class HoldState(enum.Enum):
    ACTIVE = "ACTIVE"
    ORDERED = "ORDERED"
    SOLD = "SOLD"
    RELEASED = "RELEASED"
    EXPIRED = "EXPIRED"
    CANCELLED = "CANCELLED"


class OrderState(enum.Enum):
    PENDING_PAYMENT = "PENDING_PAYMENT"
    CONFIRMED = "CONFIRMED"
    CANCELLED = "CANCELLED"
    EXPIRED = "EXPIRED"


@dataclass(frozen=True)
class Money:
    currency_code: str
    units: int
    nanos: int = 0

    @staticmethod
    def total(currency_code: str, prices: Iterable[Money]) -> Money:
        n = sum(p.units * NANOS + p.nanos for p in prices)
        return Money(currency_code, n // NANOS, n % NANOS)


@dataclass(frozen=True)
class PriceTier:
    name: str
    price: Money


@dataclass(frozen=True)
class Layout:
    """One event's inventory as booking keeps it: the compact seat map, tiers and the fan limit."""

    event_id: str
    title: str
    seat_limit_per_fan: int
    seat_map: SeatMap
    tiers: tuple[PriceTier, ...]
    # When selling ends (the event's sale close time, or its show's start); None for events
    # booking learnt of before it kept this, which it does not close.
    sales_end: datetime | None = None

    def check_on_sale(self, now: datetime) -> None:
        """New holds and orders only while the event sells (orders made before may be paid)."""
        if self.sales_end is not None and now >= self.sales_end:
            closed = self.sales_end.isoformat(timespec="milliseconds").replace("+00:00", "Z")
            raise DomainError("SALE_CLOSED", f"{event_name(self.event_id)} stopped selling at {closed}",
                              metadata={"event": event_name(self.event_id), "close_time": closed})

    @property
    def currency_code(self) -> str:
        return self.tiers[0].price.currency_code if self.tiers else ""

    @property
    def seat_count(self) -> int:
        return self.seat_map.seat_count

    def section(self, name: str) -> Section | None:
        for s in self.seat_map.sections:
            if s.name == name:
                return s
        return None

    def seat(self, raw: str) -> Seat | None:
        """The seat with id ``raw``, or None if this event has no such seat."""
        parsed = parse_seat_id(raw)
        if parsed is None:
            return None
        section, row, number = parsed
        s = self.section(section)
        if s is None or row > s.rows or number > s.seats_per_row:
            return None
        return Seat(raw, section, row, number, s.tier)

    def price_of_tier(self, tier: str) -> Money:
        for t in self.tiers:
            if t.name == tier:
                return t.price
        raise ValueError(f"tier {tier!r} has no price")

    def amount(self, seat_ids: Sequence[str]) -> Money:
        """What the seats cost: the sum of their tiers' prices (never what a client says)."""
        prices = []
        for sid in seat_ids:
            seat = self.seat(sid)
            if seat is None:
                raise unknown_seats([sid])
            prices.append(self.price_of_tier(seat.tier))
        return Money.total(self.currency_code, prices)

    def unknown(self, seat_ids: Iterable[str]) -> list[str]:
        return [s for s in seat_ids if self.seat(s) is None]

    def best_available(self, quantity: int, section: str) -> BestAvailable:
        """A best-available request checked against this event: ``quantity`` seats (1 up to the
        hold's cap) in ``section`` if named (one of the event's), else in any section."""
        if quantity < 1:
            raise InvalidArgument("BAD_QUANTITY", "quantity must be at least 1 (or name seat_ids)",
                                  metadata={"field": "quantity"})
        if quantity > MAX_SEATS_PER_HOLD:
            raise InvalidArgument("TOO_MANY_SEATS", f"at most {MAX_SEATS_PER_HOLD} seats per hold",
                                  metadata={"field": "quantity"})
        if not section:
            return BestAvailable(quantity, "", self.seat_map.sections)
        found = self.section(section)
        if found is None:
            raise InvalidArgument("UNKNOWN_SECTION",
                                  f"{event_name(self.event_id)} has no section {section!r}",
                                  metadata={"field": "section", "section": section})
        return BestAvailable(quantity, section, (found,))


@dataclass(frozen=True)
class BestAvailable:
    """A hold of the best ``quantity`` free seats side by side in one row, looked for in
    ``sections`` in their order (only the one ``section`` a fan named, else all)."""

    quantity: int
    section: str
    sections: tuple[Section, ...]

    def asked_for(self, seat_ids: Sequence[str]) -> bool:
        """Whether a hold of these seats answers this request (a retry's check)."""
        names = {s.name for s in self.sections}
        return len(seat_ids) == self.quantity and all(
            (p := parse_seat_id(sid)) is not None and p[0] in names for sid in seat_ids)


def no_seats_for(best: BestAvailable, longest: int) -> DomainError:
    """ABORTED (409): SOLD_OUT when no seat is free where the fan looked, else NO_SEATS_TOGETHER
    (``longest``: the most free seats side by side there)."""
    where = f"section {best.section}" if best.section else "the event"
    meta = {"quantity": str(best.quantity)} | ({"section": best.section} if best.section else {})
    if longest == 0:
        return DomainError("SOLD_OUT", f"no seat is free in {where}", code=grpc.StatusCode.ABORTED,
                           metadata=meta)
    return DomainError("NO_SEATS_TOGETHER",
                       f"no {best.quantity} free seats side by side in one row in {where}: at most "
                       f"{longest}", code=grpc.StatusCode.ABORTED,
                       metadata=meta | {"longest_run": str(longest)})


@dataclass(frozen=True)
class Hold:
    hold_id: uuid.UUID
    event_id: str
    user_id: str
    seat_ids: tuple[str, ...]
    expire_time: datetime
    create_time: datetime
    state: HoldState = HoldState.ACTIVE

    @property
    def name(self) -> str:
        return hold_name(self.event_id, self.hold_id)


@dataclass(frozen=True)
class Order:
    order_id: uuid.UUID
    event_id: str
    hold_id: uuid.UUID
    user_id: str
    seat_ids: tuple[str, ...]
    amount: Money
    state: OrderState
    expire_time: datetime
    payment: str
    create_time: datetime
    update_time: datetime

    @property
    def name(self) -> str:
        return f"orders/{self.order_id}"


# --- names -----------------------------------------------------------------------------------


def event_name(event_id: str) -> str:
    return f"events/{event_id}"


def hold_name(event_id: str, hold_id: uuid.UUID) -> str:
    return f"events/{event_id}/holds/{hold_id}"


def _uuid(raw: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(raw)
    except ValueError:
        return None


def parse_event_name(name: str, field: str = "parent") -> str:
    """The event id of ``events/{event}``; INVALID_ARGUMENT otherwise."""
    prefix, _, event_id = name.partition("/")
    if prefix != "events" or not event_id or _uuid(event_id) is None:
        raise InvalidArgument("INVALID_NAME", f"{field} must be events/{{event}}, got {name!r}",
                              metadata={"field": field})
    return event_id


def normalize_event(claim: str) -> str:
    """The event id an admission claim names ("events/<id>", or a bare id)."""
    return claim.removeprefix("events/")


def parse_hold_name(name: str, field: str = "name") -> tuple[str, uuid.UUID]:
    parts = name.split("/")
    hold_id = _uuid(parts[3]) if len(parts) == 4 else None
    if (len(parts) != 4 or parts[0] != "events" or parts[2] != "holds" or hold_id is None
            or _uuid(parts[1]) is None):
        raise InvalidArgument("INVALID_NAME", f"{field} must be events/{{event}}/holds/{{hold}}, "
                              f"got {name!r}", metadata={"field": field})
    return parts[1], hold_id


def parse_order_name(name: str, field: str = "name") -> uuid.UUID:
    prefix, _, raw = name.partition("/")
    order_id = _uuid(raw) if prefix == "orders" else None
    if order_id is None:
        raise InvalidArgument("INVALID_NAME", f"{field} must be orders/{{order}}, got {name!r}",
                              metadata={"field": field})
    return order_id


def parse_request_id(raw: str) -> uuid.UUID:
    rid = _uuid(raw)
    if rid is None:
        raise InvalidArgument("INVALID_REQUEST_ID", "request_id must be a UUID",
                              metadata={"field": "request_id"})
    return rid


def check_seat_ids(seat_ids: Sequence[str]) -> tuple[str, ...]:
    if not seat_ids:
        raise InvalidArgument("NO_SEATS", "name at least one seat, or a quantity for the best available",
                              metadata={"field": "seat_ids"})
    if len(set(seat_ids)) != len(seat_ids):
        raise InvalidArgument("DUPLICATE_SEAT", "a seat is named twice", metadata={"field": "seat_ids"})
    if len(seat_ids) > MAX_SEATS_PER_HOLD:
        raise InvalidArgument("TOO_MANY_SEATS", f"at most {MAX_SEATS_PER_HOLD} seats per hold",
                              metadata={"field": "seat_ids"})
    return tuple(seat_ids)


# --- errors ----------------------------------------------------------------------------------


def event_not_found(event_id: str) -> NotFound:
    name = event_name(event_id)
    return NotFound("EVENT_NOT_FOUND", f"{name} does not exist or is not on sale",
                    metadata={"name": name})


def unknown_seats(seat_ids: Sequence[str]) -> InvalidArgument:
    return InvalidArgument("UNKNOWN_SEAT", f"no such seat: {', '.join(seat_ids)}",
                           metadata={"seat_ids": ",".join(seat_ids)})


class SeatUnavailable(DomainError):
    """ABORTED (409 at the edge): another fan holds or bought one of the seats."""

    code = grpc.StatusCode.ABORTED

    def __init__(self, seat_ids: Sequence[str]) -> None:
        super().__init__("SEAT_UNAVAILABLE", f"seats taken: {', '.join(seat_ids)}",
                         metadata={"seat_ids": ",".join(seat_ids)})
        self.seat_ids = tuple(seat_ids)


class SeatLimitExceeded(DomainError):
    """RESOURCE_EXHAUSTED (429 at the edge): the fan's holds and orders would pass the limit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, used: int, asked: int, limit: int) -> None:
        super().__init__("SEAT_LIMIT_EXCEEDED",
                         f"{used} seats already held or bought; {asked} more would pass the limit "
                         f"of {limit} per fan",
                         metadata={"seats_used": str(used), "seats_requested": str(asked),
                                   "seat_limit_per_fan": str(limit)})


def hold_not_found(name: str) -> NotFound:
    return NotFound("HOLD_NOT_FOUND", f"{name} does not exist", metadata={"name": name})


def order_not_found(name: str) -> NotFound:
    return NotFound("ORDER_NOT_FOUND", f"{name} does not exist", metadata={"name": name})


def not_admitted(reason: str, message: str) -> PermissionDenied:
    return PermissionDenied(reason, message)
