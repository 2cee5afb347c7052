"""PostgreSQL: one async connection pool per service, and its schema migrations applied at start.

Each service owns its database (the DSN names it), so tables carry no schema prefix.

Migrations are plain ``.sql`` files applied in filename order, each in its own transaction, and
recorded in ``schema_migrations``: first meshkit's own (``meshkit/migrations``: the outbox and the
consumer's de-duplication table, recorded as ``meshkit/<file>``), then the service's folder
(recorded as ``<file>``). Replicas starting together serialize on a transaction-scoped advisory
lock, so each file runs once. A file must not contain its own ``BEGIN``/``COMMIT`` or statements
that cannot run in a transaction (``CREATE INDEX CONCURRENTLY``). An applied file is never
re-run: change the schema with a new file.
"""

from __future__ import annotations

import contextlib
import logging
import select
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool, PoolTimeout

log = logging.getLogger(__name__)

MESHKIT_MIGRATIONS = Path(__file__).resolve().with_name("migrations")
MESHKIT_PREFIX = "meshkit/"

# pg_advisory_xact_lock key serializing migrations (advisory locks are per database).
# The bytes of "tpmigrat" as a signed 64-bit integer.
MIGRATION_LOCK_KEY = int.from_bytes(b"tpmigrat", "big", signed=True)

_CREATE_SCHEMA_MIGRATIONS = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    name       text        PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


class DatabaseUnavailable(RuntimeError):
    """PostgreSQL could not be reached (or refused us) within the start-up timeout."""


class MigrationError(RuntimeError):
    """A migration file is missing, unreadable or failed; nothing of that file was applied."""


def redact(dsn: str) -> str:
    """``dsn`` without its password, for logs and error messages."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "<unparseable dsn>"
    params.pop("password", None)
    return make_conninfo("", **params)


@contextlib.asynccontextmanager
async def autocommit(pool: AsyncConnectionPool, wait: float | None = None
                     ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A pooled connection in autocommit: each statement is its own transaction and one round
    trip to PostgreSQL instead of three (BEGIN, the statement, COMMIT). For reads that need no
    transaction of their own (one statement, or statements that may each see a different moment),
    and for a change made by ONE statement (data-modifying CTEs, see meshkit.outbox.Outboxed). A
    round trip costs this service and the server about 0.1 ms of CPU each (a socket write, a
    wake-up on either side), which on a GetOrder was a third of PostgreSQL's work. The connection
    goes back to the pool in the pool's default mode (a transaction per ``pool.connection()``
    block). ``wait``: how long to wait for a connection (the pool's default if None)."""
    async with pool.connection(timeout=wait) as conn:
        await conn.set_autocommit(True)
        try:
            yield conn
        finally:
            if not conn.closed:
                await conn.set_autocommit(False)


async def delete_in_chunks(pool: AsyncConnectionPool, sql: str, params: tuple[Any, ...], chunk: int) -> int:
    """Run a DELETE whose last parameter is its LIMIT (``chunk``), each run its own short
    transaction, until a run deletes fewer than ``chunk`` rows; return how many in all. For
    retention purges: no long transaction, no lock held on a large table."""
    total = 0
    while True:
        async with pool.connection() as conn:
            cur = await conn.execute(sql, (*params, chunk))
            n = cur.rowcount
        total += n
        if n < chunk:
            return total


async def check_idle_connection(conn: psycopg.AsyncConnection[Any]) -> None:
    """The pool's check before it lends a connection: raise if the server dropped it meanwhile.

    psycopg_pool's own ``check_connection`` sends an empty query: a round trip to PostgreSQL (and
    two autocommit switches) before every ``pool.connection()``, which under a flash sale's load
    was about a twentieth of booking's CPU. A connection the server closed while it sat in the
    pool (a restart, ``pg_terminate_backend``, an idle timeout) has something to read on its
    socket (the end of the stream, after a FATAL message); a live idle one has nothing. So: look
    at the socket without waiting (one ``poll``, no round trip), and only when it has something
    to say do the full check, which fails on a dead connection and drains a harmless notice.
    """
    if conn.closed or conn.broken:
        raise psycopg.OperationalError("the connection is closed")
    poller = select.poll()
    poller.register(conn.pgconn.socket, select.POLLIN)
    if poller.poll(0):
        await AsyncConnectionPool.check_connection(conn)


async def open_pool(
    dsn: str,
    *,
    migrations: Path | None,
    min_size: int = 1,
    max_size: int = 10,
    open_timeout: float = 30.0,
    name: str | None = None,
) -> AsyncConnectionPool:
    """Open a pool on ``dsn``, wait until it is ready, and apply the migrations.

    ``migrations`` is the service's own folder of ``.sql`` files (None: only meshkit's).
    Raises :class:`DatabaseUnavailable` (with the server's reason) if no connection can be made
    within ``open_timeout`` seconds, :class:`MigrationError` if a migration fails.

    Connections are in the default (non-autocommit) mode: a ``pool.connection()`` block is one
    transaction, committed at its end (rolled back on an exception).
    """
    pool = AsyncConnectionPool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        open=False,
        name=name or "meshkit",
        check=check_idle_connection,  # drop dead connections (e.g. after a restart)
        # Prepare each statement on its first use on a connection, not its fifth (psycopg's
        # default): a pool of 56 connections and twenty-odd statements ran thousands of
        # executions parsed and planned afresh before that, in the first minute of a sale.
        kwargs={"prepare_threshold": 0},
    )
    t0 = time.monotonic()
    try:
        await pool.open(wait=True, timeout=open_timeout)
    except PoolTimeout:
        reason = await _connect_error(dsn)
        await pool.close()
        raise DatabaseUnavailable(
            f"PostgreSQL at {redact(dsn)} not ready after {open_timeout:g}s: {reason}"
        ) from None
    try:
        applied = await apply_migrations(pool, migrations)
    except BaseException:
        await pool.close()
        raise
    log.info(
        "postgres pool open",
        extra={
            "dsn": redact(dsn),
            "pool_min": min_size,
            "pool_max": max_size,
            "migrations_applied": applied,
            "elapsed_ms": round((time.monotonic() - t0) * 1000),
        },
    )
    return pool


async def close_pool(pool: AsyncConnectionPool, grace: float = 5.0) -> None:
    """Close the pool, giving connections in use up to ``grace`` seconds to come back."""
    await pool.close(timeout=grace)


async def _connect_error(dsn: str) -> str:
    try:
        conn = await psycopg.AsyncConnection.connect(dsn, connect_timeout=5)
    except Exception as exc:
        return str(exc).strip() or type(exc).__name__
    await conn.close()
    return "connections succeed now but the pool could not fill in time"


def migration_files(service_folder: Path | None) -> list[tuple[str, Path]]:
    """(recorded name, path) of every migration, in the order they are applied."""
    files = [(MESHKIT_PREFIX + p.name, p) for p in sorted(MESHKIT_MIGRATIONS.glob("*.sql"))]
    if service_folder is not None:
        if not service_folder.is_dir():
            raise MigrationError(f"migrations folder {service_folder} does not exist")
        files += [(p.name, p) for p in sorted(service_folder.glob("*.sql"))]
    return files


async def apply_migrations(pool: AsyncConnectionPool, service_folder: Path | None) -> list[str]:
    """Apply the migrations not yet recorded; return the names applied by this call."""
    files = migration_files(service_folder)
    applied: list[str] = []
    async with pool.connection() as conn:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
            await conn.execute(_CREATE_SCHEMA_MIGRATIONS)
            cur = await conn.execute("SELECT name FROM schema_migrations")
            done = {row[0] for row in await cur.fetchall()}
        for name, path in files:
            if name in done:
                continue
            try:
                sql = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise MigrationError(f"cannot read migration {path}: {exc}") from exc
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
                cur = await conn.execute("SELECT 1 FROM schema_migrations WHERE name = %s", (name,))
                if await cur.fetchone() is not None:
                    continue  # another replica applied it while we waited for the lock
                t0 = time.monotonic()
                try:
                    # No parameters, never prepared: sent as a simple query, so a file may hold
                    # many statements and a literal % needs no escaping.
                    await conn.execute(cast(Any, sql), prepare=False)
                except psycopg.Error as exc:
                    raise MigrationError(f"migration {name} ({path}) failed: {exc}") from exc
                await conn.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (name,))
            applied.append(name)
            log.info(
                "migration applied",
                extra={"migration": name, "elapsed_ms": round((time.monotonic() - t0) * 1000)},
            )
    return applied
