"""The rules an event must satisfy, and the errors (UPPER_SNAKE reasons) that say which one failed.

A draft is checked whole on every create and update, so a bad request changes nothing and the
admin learns at once what is wrong; publishing checks it again against the clock (the sale must
still be ahead) before the event becomes visible and sellable.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime

from meshkit.errors import InvalidArgument, NotFound

from .model import OUTPUT_ONLY, UPDATABLE, EventSpec, Money, SeatMap

MAX_SEATS = 50_000  # seats one event may have (booking's inventory is sized for this)
MAX_SECTIONS = 1_000  # keeps the seat map (and EventPublished) small whatever the seat count
MAX_SEAT_LIMIT_PER_FAN = 20
MAX_TITLE = 200
MAX_TEXT = 500  # artist, venue name and address
MAX_NAME = 32  # tier and section names
MAX_TIERS = 50
MAX_PRICE_UNITS = 10**12  # a seat's price in major units

_CURRENCY = re.compile(r"^[A-Z]{3}$")
# ISO 4217 minor-unit exponents that differ from the usual 2.
_ZERO_DECIMALS = frozenset(
    "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF".split()
)
_THREE_DECIMALS = frozenset("BHD IQD JOD KWD LYD OMR TND".split())
NANOS_PER_UNIT = 1_000_000_000


def invalid(reason: str, message: str, field: str) -> InvalidArgument:
    return InvalidArgument(reason, message, metadata={"field": field})


def currency_decimals(code: str) -> int:
    if code in _ZERO_DECIMALS:
        return 0
    if code in _THREE_DECIMALS:
        return 3
    return 2


def validate_money(price: Money, field: str) -> None:
    if not _CURRENCY.match(price.currency_code):
        raise invalid(
            "INVALID_CURRENCY",
            f"{field}.currency_code {price.currency_code!r} is not a 3-letter ISO 4217 code",
            f"{field}.currency_code",
        )
    if price.units < 0 or price.nanos < 0:
        raise invalid("NEGATIVE_PRICE", f"{field} must not be negative", field)
    if price.units > MAX_PRICE_UNITS:
        # A hold's total (up to MAX_SEAT_LIMIT_PER_FAN seats) must fit money's int64 units: a
        # price near 2**63 made every hold of two seats an overflow, after its seats were taken.
        raise invalid("PRICE_TOO_HIGH", f"{field} is above {MAX_PRICE_UNITS:,} units", f"{field}.units")
    if price.nanos >= NANOS_PER_UNIT:
        raise invalid("INVALID_PRICE", f"{field}.nanos must be below 1,000,000,000", f"{field}.nanos")
    step = NANOS_PER_UNIT // 10 ** currency_decimals(price.currency_code)
    if price.nanos % step:
        raise invalid(
            "INVALID_PRICE",
            f"{field} has a fraction below {price.currency_code}'s minor unit "
            f"({currency_decimals(price.currency_code)} decimals)",
            f"{field}.nanos",
        )


def _check_name(value: str, field: str) -> None:
    if not value:
        raise invalid("MISSING_FIELD", f"{field} is required", field)
    if len(value) > MAX_NAME:
        raise invalid("FIELD_TOO_LONG", f"{field} is longer than {MAX_NAME} characters", field)
    _check_characters(value, field)


def _check_text(value: str, field: str, limit: int, required: bool) -> None:
    if required and not value.strip():
        raise invalid("MISSING_FIELD", f"{field} is required", field)
    if len(value) > limit:
        raise invalid("FIELD_TOO_LONG", f"{field} is longer than {limit} characters", field)
    _check_characters(value, field)


# Control characters have no place on a ticket; NUL, which PostgreSQL's text refuses, made the
# write a 500. Tabs and line breaks (an address) are fine.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _check_characters(value: str, field: str) -> None:
    if _CONTROL.search(value):
        raise invalid("INVALID_CHARACTERS", f"{field} contains control characters", field)


def validate_times(spec: EventSpec) -> None:
    for name in ("start_time", "queue_open_time", "sale_open_time"):
        value = getattr(spec, name)
        if value is None:
            raise invalid("MISSING_FIELD", f"event.{name} is required", f"event.{name}")
        if value.tzinfo is None:
            raise invalid("INVALID_TIMES", f"event.{name} has no time zone", f"event.{name}")
    assert spec.start_time and spec.queue_open_time and spec.sale_open_time
    if not spec.queue_open_time <= spec.sale_open_time:
        raise invalid(
            "INVALID_TIMES", "the waiting room must open no later than the sale",
            "event.queue_open_time",
        )
    if not spec.sale_open_time < spec.start_time:
        raise invalid("INVALID_TIMES", "the sale must open before the show starts", "event.sale_open_time")
    close = spec.sale_close_time
    if close is not None and not spec.sale_open_time < close <= spec.start_time:
        raise invalid(
            "INVALID_TIMES", "the sale must close after it opens and no later than the show starts",
            "event.sale_close_time",
        )


def validate_seat_map(seat_map: SeatMap, tiers: set[str]) -> int:
    """Check the compact seat map; return its seat count. Never expands it."""
    sections = seat_map.sections
    if not sections:
        raise invalid("EMPTY_SEAT_MAP", "the seat map has no sections", "event.seat_map.sections")
    if len(sections) > MAX_SECTIONS:
        raise invalid(
            "SEAT_MAP_TOO_LARGE", f"the seat map has {len(sections)} sections; at most {MAX_SECTIONS}",
            "event.seat_map.sections",
        )
    seen: set[str] = set()
    total = 0
    for i, s in enumerate(sections):
        f = f"event.seat_map.sections[{i}]"
        _check_name(s.name, f"{f}.name")
        if "-" in s.name or "/" in s.name or not s.name.isprintable() or any(c.isspace() for c in s.name):
            raise invalid(
                "INVALID_SEAT_MAP",
                f"{f}.name {s.name!r} must not contain '-', '/', spaces or control characters "
                "(seat ids are <section>-<row>-<number>)",
                f"{f}.name",
            )
        if s.name in seen:
            raise invalid(
                "DUPLICATE_SEAT", f"section {s.name!r} appears twice: its seat ids would repeat", f"{f}.name"
            )
        seen.add(s.name)
        if s.rows < 1 or s.seats_per_row < 1:
            raise invalid(
                "INVALID_SEAT_MAP", f"{f} must have at least one row and one seat per row", f
            )
        if s.tier not in tiers:
            raise invalid("UNKNOWN_TIER", f"{f}.tier {s.tier!r} is not one of the price tiers", f"{f}.tier")
        total += s.rows * s.seats_per_row
        if total > MAX_SEATS:
            break
    if total > MAX_SEATS:
        raise invalid(
            "SEAT_MAP_TOO_LARGE", f"the seat map has more than {MAX_SEATS:,} seats", "event.seat_map"
        )
    return total


def validate_spec(spec: EventSpec) -> int:
    """Every rule a draft must satisfy; return its seat count. Raises InvalidArgument."""
    _check_text(spec.title, "event.title", MAX_TITLE, required=True)
    _check_text(spec.artist, "event.artist", MAX_TEXT, required=False)
    _check_text(spec.venue.name, "event.venue.name", MAX_TEXT, required=True)
    _check_text(spec.venue.address, "event.venue.address", MAX_TEXT, required=False)
    validate_times(spec)
    if not spec.price_tiers:
        raise invalid("MISSING_FIELD", "event.price_tiers is required", "event.price_tiers")
    if len(spec.price_tiers) > MAX_TIERS:
        raise invalid("INVALID_ARGUMENT", f"at most {MAX_TIERS} price tiers", "event.price_tiers")
    tiers: set[str] = set()
    currencies: set[str] = set()
    for i, tier in enumerate(spec.price_tiers):
        f = f"event.price_tiers[{i}]"
        _check_name(tier.name, f"{f}.name")
        if tier.name in tiers:
            raise invalid("DUPLICATE_TIER", f"price tier {tier.name!r} appears twice", f"{f}.name")
        tiers.add(tier.name)
        validate_money(tier.price, f"{f}.price")
        currencies.add(tier.price.currency_code)
    if len(currencies) > 1:
        raise invalid(
            "MIXED_CURRENCIES", f"every tier must use one currency, got {sorted(currencies)}",
            "event.price_tiers",
        )
    seat_count = validate_seat_map(spec.seat_map, tiers)
    limit = spec.seat_limit_per_fan
    if not 1 <= limit <= min(MAX_SEAT_LIMIT_PER_FAN, seat_count):
        raise invalid(
            "INVALID_SEAT_LIMIT",
            f"event.seat_limit_per_fan must be between 1 and {min(MAX_SEAT_LIMIT_PER_FAN, seat_count)}",
            "event.seat_limit_per_fan",
        )
    return seat_count


def validate_for_publish(spec: EventSpec, now: datetime) -> int:
    """The draft rules, plus the clock: the sale (and so the show) must still be ahead."""
    seat_count = validate_spec(spec)
    assert spec.sale_open_time is not None
    if spec.sale_open_time <= now:
        raise invalid(
            "INVALID_TIMES", "the sale opening time has passed: move the times before publishing",
            "event.sale_open_time",
        )
    return seat_count


def event_not_found(name: str) -> NotFound:
    return NotFound("EVENT_NOT_FOUND", f"{name} does not exist", metadata={"name": name})


def parse_event_name(name: str) -> uuid.UUID:
    """``events/<uuid>`` → the id. A name of another shape is INVALID_ARGUMENT; an id that is not
    a UUID cannot exist, so it is EVENT_NOT_FOUND."""
    prefix, _, raw = name.partition("/")
    if prefix != "events" or not raw or "/" in raw:
        raise InvalidArgument("INVALID_NAME", f"{name!r} is not an event name (events/{{event}})",
                              metadata={"name": name})
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise event_not_found(name) from None


def parse_event_id(raw: str) -> uuid.UUID:
    """A client-chosen CreateEventRequest.event_id: must be a UUID (the id's storage type)."""
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise invalid("INVALID_EVENT_ID", f"event_id {raw!r} is not a UUID", "event_id") from None


def parse_request_id(raw: str) -> uuid.UUID | None:
    if not raw:
        return None
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise invalid("INVALID_REQUEST_ID", f"request_id {raw!r} is not a UUID", "request_id") from None


def update_paths(mask: list[str], populated: set[str]) -> frozenset[str]:
    """The fields an UpdateEvent changes (AIP-134): the mask's paths; with no mask, the fields
    set in the request; "*" alone, every mutable field. Output-only paths are ignored."""
    if not mask:
        return frozenset(p for p in populated if p in UPDATABLE)
    if "*" in mask:
        if len(mask) != 1:
            raise invalid("INVALID_UPDATE_MASK", '"*" must be the only path of update_mask', "update_mask")
        return UPDATABLE - {"venue.name", "venue.address"}
    paths: set[str] = set()
    for p in mask:
        if p in OUTPUT_ONLY:
            continue
        if p not in UPDATABLE:
            raise invalid(
                "INVALID_UPDATE_MASK", f"update_mask path {p!r} is not a field an update may change",
                "update_mask",
            )
        paths.add(p)
    return frozenset(paths)
