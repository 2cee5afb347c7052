"""Seat maps: compact ranges (sections of rows x seats) and their expansion into seat ids.

Shared by catalog (which validates and publishes the compact map) and booking (which expands the
``EventPublished`` ranges into its inventory), so both sides agree on every seat id
``<section>-<row>-<number>`` by construction. Plain values, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Section:
    """A rectangle of ``rows`` x ``seats_per_row`` seats, all in tier ``tier``."""

    name: str
    rows: int
    seats_per_row: int
    tier: str

    @property
    def seat_count(self) -> int:
        return max(self.rows, 0) * max(self.seats_per_row, 0)


@dataclass(frozen=True)
class Seat:
    seat_id: str
    section: str
    row: int
    number: int
    tier: str


def seat_id(section: str, row: int, number: int) -> str:
    """``<section>-<row>-<number>``, rows and numbers counting from 1."""
    return f"{section}-{row}-{number}"


MAX_SEAT_ID = 64  # far beyond any real one ("<section>-<row>-<number>")


def parse_seat_id(raw: str) -> tuple[str, int, int] | None:
    """``(section, row, number)`` of a well-formed seat id, else None (section names hold no '-';
    rows and numbers are ASCII digits: str.isdigit() also takes "²" or "١", which int() refuses
    or reads as another number)."""
    if len(raw) > MAX_SEAT_ID:
        return None
    parts = raw.split("-")
    if len(parts) != 3 or not parts[0]:
        return None
    section, row, number = parts
    if not (_digits(row) and _digits(number)) or row[0] == "0" or number[0] == "0":
        return None
    return section, int(row), int(number)


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


@dataclass(frozen=True)
class SeatMap:
    sections: tuple[Section, ...] = ()

    @property
    def seat_count(self) -> int:
        return sum(s.seat_count for s in self.sections)

    def seats(self) -> Iterator[Seat]:
        """Every seat, section by section, row by row (lazy: 50,000 seats cost no big list)."""
        for s in self.sections:
            for row in range(1, s.rows + 1):
                for number in range(1, s.seats_per_row + 1):
                    yield Seat(seat_id(s.name, row, number), s.name, row, number, s.tier)

    def seat_ids(self) -> Iterator[str]:
        for s in self.sections:
            for row in range(1, s.rows + 1):
                prefix = f"{s.name}-{row}-"
                for number in range(1, s.seats_per_row + 1):
                    yield prefix + str(number)
