"""Keyset pagination of the public event list: opaque page tokens holding the last key seen.

The list is ordered by (start_time, id), both immutable once an event is published, and a page
is "the next N keys after the cursor". An event published (or inserted) between two pages lands
either before the cursor (not shown, as if it had come later) or after it (shown once, in its
place): no page repeats or skips an event that was listed when the previous page was read.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from meshkit.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
_VERSION = "1"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, order=True)
class Cursor:
    """The list key of the last event of a page."""

    start_time: datetime
    id: uuid.UUID


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument(
            "INVALID_PAGE_SIZE", "page_size must not be negative", metadata={"field": "page_size"}
        )
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _micros(t: datetime) -> int:
    delta = t - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def encode(cursor: Cursor) -> str:
    raw = f"{_VERSION}.{_micros(cursor.start_time)}.{cursor.id.hex}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode(token: str) -> Cursor | None:
    """The cursor of a ``next_page_token``; None for the first page. INVALID_PAGE_TOKEN if bad."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("ascii")
        version, micros, hex_id = raw.split(".")
        if version != _VERSION:
            raise ValueError(version)
        start = _EPOCH + timedelta(microseconds=int(micros))
        return Cursor(start, uuid.UUID(hex=hex_id))
    except (ValueError, binascii.Error, UnicodeDecodeError, OverflowError):
        raise InvalidArgument(
            "INVALID_PAGE_TOKEN", "page_token is not a token this service issued",
            metadata={"field": "page_token"},
        ) from None
