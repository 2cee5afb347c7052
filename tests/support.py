"""Small helpers shared by the test suites (fixtures stay in conftest.py)."""

from __future__ import annotations

import contextlib
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
