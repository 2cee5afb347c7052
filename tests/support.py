"""Small helpers shared by the test suites (fixtures stay in conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import Iterator

import psycopg

from devstack.layout import Layout


@contextlib.contextmanager
def fresh_database(lay: Layout) -> Iterator[str]:
    """An empty PostgreSQL database on the test server, dropped afterwards; yields its DSN."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = lay.postgres_dsn("postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield lay.postgres_dsn(name)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def overlapping_picks(fans: int, rows: int = 10, seats_per_row: int = 10, *, seed: int = 6,
                      section: str = "A") -> list[list[str]]:
    """What a crowd picks in a race for one section: most fans go for the first rows, two or
    three adjacent seats each, so picks overlap heavily (seeded: the same crowd every run)."""
    rnd = random.Random(seed)
    picks: list[list[str]] = []
    for _ in range(fans):
        row = min(int(rnd.expovariate(0.5)) + 1, rows)
        n = rnd.choice((2, 3))
        first = rnd.randint(1, seats_per_row - n + 1)
        picks.append([f"{section}-{row}-{first + k}" for k in range(n)])
    return picks


async def read_http_request(reader: asyncio.StreamReader) -> tuple[dict[str, str], bytes]:
    """One HTTP/1.1 request from a test's little webhook receiver: (lower-cased headers, body)."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip()
               for k, _, v in (line.partition(":") for line in head[1:] if line)}
    return headers, await reader.readexactly(int(headers.get("content-length", "0")))
