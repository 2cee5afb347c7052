"""The waiting room's rules and values, without I/O.

What a room and a ticket are, how names are read, which setting values are allowed, how an ETA
is estimated, and what an admission token says. The atomic steps themselves (join, admit, claim,
leave) run inside Redis (``adapters/lua``), because they must be one indivisible step whatever
replica runs them; their rules are described there and in ``svc_queue/README.md``.
"""

from __future__ import annotations

import enum
import math
import uuid
from dataclasses import dataclass

import grpc

from meshkit import access
from meshkit.errors import DomainError, InvalidArgument, NotFound

# --- admission tokens ------------------------------------------------------------------------

# The edge's admission provider expects these (meshkit/access.py: one definition for both sides).
ADMISSION_ISSUER = access.ADMISSION_TOKEN_ISSUER  # "ticketping-queue"
ADMISSION_AUDIENCE = access.ADMISSION_TOKEN_AUDIENCE  # "ticketping-booking"
# Claims of an admission token: iss, aud, sub (user id), event ("events/<id>"), jti, iat, exp.
EVENT_CLAIM = "event"

# --- limits ----------------------------------------------------------------------------------

MAX_ADMIT_RATE = 100_000.0  # per second; far above what booking can carry
# One fan a minute: anything slower is a room stopped by mistake (1e-300 was taken, and froze
# the room with no sign of it); `paused` says so on purpose.
MIN_ADMIT_RATE = 1 / 60
MAX_MAX_ACTIVE = 10_000_000
MIN_SESSION_TTL_MS = 1_000
ETA_CAP_SECONDS = 7 * 24 * 3600
MEASURE_WARMUP_MS = 2_000  # before this much measuring, the ETA uses the configured rate
TAU_MS = 10_000  # the measured rate's time constant (same as lua/common.lua)


class TicketState(enum.Enum):
    NOT_JOINED = "NOT_JOINED"
    WAITING = "WAITING"
    ACTIVE = "ACTIVE"
    EXPIRED = "EXPIRED"
    LEFT = "LEFT"
    SOLD_OUT = "SOLD_OUT"


# --- errors ----------------------------------------------------------------------------------


class EventNotFound(NotFound):
    def __init__(self, event_id: str) -> None:
        name = event_name(event_id)
        super().__init__("EVENT_NOT_FOUND", f"{name} does not exist or is not published",
                         metadata={"name": name})


class QueueNotOpen(DomainError):
    """FAILED_PRECONDITION (HTTP 412 at the edge), with the opening time."""

    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, event_id: str, queue_open_ms: int) -> None:
        name = event_name(event_id)
        opens = rfc3339(queue_open_ms)
        super().__init__("QUEUE_NOT_OPEN", f"the waiting room of {name} opens at {opens}",
                         metadata={"name": name, "queue_open_time": opens})
        self.queue_open_ms = queue_open_ms


class QueueClosed(DomainError):
    """FAILED_PRECONDITION (HTTP 412 at the edge): the sale is over (its close time, or the
    show's start), the room takes nobody in."""

    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, event_id: str, closed_ms: int) -> None:
        name = event_name(event_id)
        closed = rfc3339(closed_ms)
        super().__init__("QUEUE_CLOSED", f"the waiting room of {name} closed at {closed}: the sale "
                         "is over", metadata={"name": name, "close_time": closed})


def rfc3339(ms: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- names -----------------------------------------------------------------------------------


def event_name(event_id: str) -> str:
    return f"events/{event_id}"


def _event_id(raw: str, name: str) -> str:
    """The canonical (lower-case, hyphenated) UUID: one event has one hash tag, whatever the
    spelling. An id that is not a UUID cannot exist: EVENT_NOT_FOUND."""
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise NotFound("EVENT_NOT_FOUND", f"{name} does not exist", metadata={"name": name}) from None


def _parse(name: str, suffix: tuple[str, ...], shape: str) -> str:
    parts = name.split("/")
    if len(parts) != 2 + len(suffix) or parts[0] != "events" or not parts[1] or tuple(parts[2:]) != suffix:
        raise InvalidArgument("INVALID_NAME", f"{name!r} is not a name of the form {shape}",
                              metadata={"name": name})
    return _event_id(parts[1], name)


def parse_queue_name(name: str) -> str:
    """``events/{event}/queue`` → the event id."""
    return _parse(name, ("queue",), "events/{event}/queue")


def parse_ticket_name(name: str) -> str:
    """``events/{event}/queue/me`` → the event id."""
    return _parse(name, ("queue", "me"), "events/{event}/queue/me")


def parse_event_name(name: str) -> str:
    """``events/{event}`` → the event id."""
    return _parse(name, (), "events/{event}")


def require(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument("MISSING_FIELD", f"{field} is required", metadata={"field": field})
    return value


# --- values ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoomDefaults:
    """A new room's settings (from the service's settings), until an admin changes them."""

    max_active: int
    admit_rate_per_second: float
    session_ttl_ms: int
    claim_window_ms: int


@dataclass(frozen=True)
class RoomStatus:
    event_id: str
    serving_number: int
    waiting_count: int
    active_count: int
    pending_count: int  # admitted, slot reserved, not claimed yet
    admit_rate_per_second: float
    max_active: int
    paused: bool
    session_ttl_ms: int
    sold_out: bool
    measured_rate: float | None = None  # admissions per second lately (rate_now); None: not yet


@dataclass(frozen=True)
class Ticket:
    event_id: str
    state: TicketState
    number: int
    position: int
    eta_seconds: int
    jti: str = ""
    expire_ms: int = 0
    token: str = ""
    claimed_at_ms: int = 0


@dataclass(frozen=True)
class RoomChange:
    """Validated UpdateQueue values (None: unchanged)."""

    max_active: int | None = None
    admit_rate_per_second: float | None = None
    paused: bool | None = None
    session_ttl_ms: int | None = None

    def fields(self) -> dict[str, str]:
        """The room config hash fields to write."""
        out: dict[str, str] = {}
        if self.max_active is not None:
            out["max"] = str(self.max_active)
        if self.admit_rate_per_second is not None:
            out["rate"] = repr(float(self.admit_rate_per_second))
        if self.paused is not None:
            out["paused"] = "1" if self.paused else "0"
        if self.session_ttl_ms is not None:
            out["ttl"] = str(self.session_ttl_ms)
        return out


UPDATABLE = frozenset({"max_active", "admit_rate_per_second", "paused", "session_ttl"})
_JSON_NAMES = {"maxActive": "max_active", "admitRatePerSecond": "admit_rate_per_second",
               "sessionTtl": "session_ttl"}


def update_paths(mask: list[str], present: set[str]) -> set[str]:
    """The settings an UpdateQueue changes: the mask's paths (snake or camel case), or, with no
    mask, every settable field present in the request. Output-only paths are refused."""
    if not mask:
        return {p for p in present if p in UPDATABLE}
    paths: set[str] = set()
    for raw in mask:
        p = _JSON_NAMES.get(raw, raw)
        if p not in UPDATABLE:
            raise InvalidArgument(
                "INVALID_UPDATE_MASK",
                f"update_mask path {raw!r} is not a setting (max_active, admit_rate_per_second, "
                "paused, session_ttl)",
                metadata={"field": "update_mask", "path": raw},
            )
        paths.add(p)
    return paths


def validate_change(
    paths: set[str], *, max_active: int, rate: float, paused: bool, session_ttl_ms: int,
    max_session_ttl_ms: int,
) -> RoomChange:
    def bad(field: str, why: str) -> InvalidArgument:
        return InvalidArgument("INVALID_QUEUE_SETTING", f"queue.{field} {why}",
                               metadata={"field": f"queue.{field}"})

    change = RoomChange()
    if "max_active" in paths:
        if not 0 <= max_active <= MAX_MAX_ACTIVE:
            raise bad("max_active", f"must be between 0 and {MAX_MAX_ACTIVE}")
        change = RoomChange(max_active=max_active)
    if "admit_rate_per_second" in paths:
        if not (math.isfinite(rate) and MIN_ADMIT_RATE <= rate <= MAX_ADMIT_RATE):
            raise bad("admit_rate_per_second", f"must be between {MIN_ADMIT_RATE:.4g} (one a minute) and "
                      f"{MAX_ADMIT_RATE:g}; to stop admitting, pause the room")
        change = RoomChange(change.max_active, rate)
    if "paused" in paths:
        change = RoomChange(change.max_active, change.admit_rate_per_second, paused)
    if "session_ttl" in paths:
        if not MIN_SESSION_TTL_MS <= session_ttl_ms <= max_session_ttl_ms:
            raise bad("session_ttl", f"must be between {MIN_SESSION_TTL_MS // 1000}s and "
                                     f"{max_session_ttl_ms / 1000:g}s")
        change = RoomChange(change.max_active, change.admit_rate_per_second, change.paused,
                            session_ttl_ms)
    return change


# --- the ETA ---------------------------------------------------------------------------------


def rate_now(measured: float, measured_at_ms: int, since_ms: int, now_ms: int) -> float | None:
    """Admissions per second, measured: the room's EWMA (time constant TAU_MS), decayed to now and
    corrected for its start-up bias; None until it has measured MEASURE_WARMUP_MS."""
    if since_ms <= 0 or now_ms - since_ms < MEASURE_WARMUP_MS:
        return None
    decayed = measured * math.exp(-max(0, now_ms - measured_at_ms) / TAU_MS)
    warmth = 1.0 - math.exp(-(now_ms - since_ms) / TAU_MS)
    return decayed / warmth


def eta_seconds(
    state: TicketState, position: int, *, now_ms: int, sale_open_ms: int, configured_rate: float,
    paused: bool, measured_rate: float, measured_at_ms: int, measuring_since_ms: int,
) -> int:
    """Seconds until the fan's turn while WAITING: position / the measured admission rate (the
    configured rate until a rate has been measured). Before the lottery, the time until the sale
    opens (a lower bound: the fan's place is not drawn yet). 0 otherwise."""
    if state is not TicketState.WAITING:
        return 0
    if position == 0:
        return max(0, math.ceil((sale_open_ms - now_ms) / 1000))
    rate = rate_now(measured_rate, measured_at_ms, measuring_since_ms, now_ms)
    if rate is None:
        rate = 0.0 if paused else configured_rate
    if rate <= 1e-6:
        return ETA_CAP_SECONDS
    return min(ETA_CAP_SECONDS, math.ceil(position / rate))



# --- the admission token ---------------------------------------------------------------------


def admission_claims(
    *, issuer: str, audience: str, user_id: str, event_id: str, jti: str, issued_ms: int,
    expire_ms: int,
) -> dict[str, object]:
    """The admission token's claims. ``exp`` is the session's end (rounded down to the second, so
    the token never outlives the session)."""
    return {
        "iss": issuer,
        "aud": audience,
        "sub": user_id,
        EVENT_CLAIM: event_name(event_id),
        "jti": jti,
        "iat": issued_ms // 1000,
        "exp": expire_ms // 1000,
    }
