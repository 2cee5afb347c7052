"""meshkit.db against a real PostgreSQL: the pool opens, migrations run once, replicas agree."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from meshkit.db import (
    MESHKIT_PREFIX,
    DatabaseUnavailable,
    MigrationError,
    apply_migrations,
    autocommit,
    close_pool,
    migration_files,
    open_pool,
)

pytestmark = pytest.mark.integration

MESHKIT_NAMES = [MESHKIT_PREFIX + "0001_outbox.sql", MESHKIT_PREFIX + "0002_processed_events.sql"]


@pytest.fixture
def fresh_db(pg_dsn: str) -> Iterator[str]:
    """An empty database of its own on pg_dsn's server (the module's database is shared)."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    params = conninfo_to_dict(pg_dsn)
    params["dbname"] = name
    yield make_conninfo("", **params)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def service_migrations(tmp_path: Path) -> Path:
    folder = tmp_path / "migrations"
    folder.mkdir()
    (folder / "0001_things.sql").write_text(
        "CREATE TABLE things (id int PRIMARY KEY, label text NOT NULL);\n"
        "CREATE TABLE migration_runs (name text NOT NULL);\n"
        "INSERT INTO migration_runs VALUES ('0001');\n"
    )
    # Runs long enough that replicas starting together really overlap; a literal % is fine.
    (folder / "0002_seed.sql").write_text(
        "SELECT pg_sleep(0.3);\n"
        "INSERT INTO things VALUES (1, '100% sold');\n"
        "INSERT INTO migration_runs VALUES ('0002');\n"
    )
    return folder


async def _scalar(dsn: str, sql: str) -> object:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(sql)
        row = await cur.fetchone()
        assert row is not None
        return row[0]


async def _applied(dsn: str) -> list[str]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT name FROM schema_migrations ORDER BY applied_at, name")
        return [r[0] for r in await cur.fetchall()]


def test_meshkit_migrations_come_first_then_the_service_folder(service_migrations: Path) -> None:
    names = [name for name, _ in migration_files(service_migrations)]
    assert names == [*MESHKIT_NAMES, "0001_things.sql", "0002_seed.sql"]


async def test_migrations_apply_once_and_are_skipped_the_second_time(
    fresh_db: str, service_migrations: Path
) -> None:
    pool = await open_pool(fresh_db, migrations=service_migrations)
    try:
        assert await _applied(fresh_db) == [*MESHKIT_NAMES, "0001_things.sql", "0002_seed.sql"]
        # meshkit's tables exist and are usable.
        async with pool.connection() as conn:
            await conn.execute("SELECT id, event_id, published_at FROM outbox LIMIT 0")
            await conn.execute("SELECT consumer_group, event_id FROM processed_events LIMIT 0")
        # Second run on the same database: nothing to do.
        assert await apply_migrations(pool, service_migrations) == []
    finally:
        await close_pool(pool)

    pool = await open_pool(fresh_db, migrations=service_migrations)  # a restart
    await close_pool(pool)
    assert await _scalar(fresh_db, "SELECT count(*) FROM migration_runs") == 2
    assert await _scalar(fresh_db, "SELECT label FROM things WHERE id = 1") == "100% sold"

    # A new file added later is applied alone.
    (service_migrations / "0003_more.sql").write_text("ALTER TABLE things ADD COLUMN note text;")
    pool = await open_pool(fresh_db, migrations=None)  # meshkit's only: all done already
    try:
        assert await apply_migrations(pool, service_migrations) == ["0003_more.sql"]
        assert (await _applied(fresh_db))[-1] == "0003_more.sql"
    finally:
        await close_pool(pool)


async def test_three_replicas_starting_together_apply_each_migration_once(
    fresh_db: str, service_migrations: Path
) -> None:
    async def replica() -> object:
        pool = await open_pool(fresh_db, migrations=service_migrations, max_size=2)
        await close_pool(pool)
        return pool

    t0 = time.monotonic()
    results = await asyncio.gather(replica(), replica(), replica(), return_exceptions=True)
    elapsed = time.monotonic() - t0
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors
    assert await _applied(fresh_db) == [*MESHKIT_NAMES, "0001_things.sql", "0002_seed.sql"]
    assert await _scalar(fresh_db, "SELECT count(*) FROM migration_runs") == 2
    assert await _scalar(fresh_db, "SELECT count(*) FROM things") == 1
    assert elapsed < 10, elapsed


async def test_a_failing_migration_applies_nothing_of_itself_and_stops_the_start(
    fresh_db: str, service_migrations: Path
) -> None:
    (service_migrations / "0003_broken.sql").write_text(
        "CREATE TABLE half (id int);\nINSERT INTO no_such_table VALUES (1);\n"
    )
    with pytest.raises(MigrationError, match="0003_broken.sql"):
        await open_pool(fresh_db, migrations=service_migrations)
    assert (await _applied(fresh_db))[-1] == "0002_seed.sql"
    # The failed file's first statement was rolled back with it.
    assert await _scalar(fresh_db, "SELECT to_regclass('half') IS NULL") is True

    (service_migrations / "0003_broken.sql").write_text("CREATE TABLE half (id int);")
    pool = await open_pool(fresh_db, migrations=service_migrations)
    await close_pool(pool)
    assert (await _applied(fresh_db))[-1] == "0003_broken.sql"


async def test_a_missing_migrations_folder_is_an_error(fresh_db: str, tmp_path: Path) -> None:
    with pytest.raises(MigrationError, match="does not exist"):
        await open_pool(fresh_db, migrations=tmp_path / "nope")


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_an_unreachable_server_fails_fast_with_the_reason(closed_port: int) -> None:
    dsn = f"postgresql://ticketping:s3cret@127.0.0.1:{closed_port}/nothing"
    t0 = time.monotonic()
    with pytest.raises(DatabaseUnavailable) as info:
        await open_pool(dsn, migrations=None, open_timeout=1.0)
    assert time.monotonic() - t0 < 10
    message = str(info.value)
    assert f"port={closed_port}" in message and "refused" in message.lower()
    assert "s3cret" not in message


async def test_pool_blocks_are_transactions(pg_dsn: str) -> None:
    pool = await open_pool(pg_dsn, migrations=None)
    try:
        async with pool.connection() as conn:
            await conn.execute("CREATE TABLE IF NOT EXISTS tx_probe (n int)")
        with pytest.raises(RuntimeError):
            async with pool.connection() as conn:
                await conn.execute("INSERT INTO tx_probe VALUES (1)")
                raise RuntimeError("rolled back")
        async with pool.connection() as conn:
            await conn.execute("INSERT INTO tx_probe VALUES (2)")
        assert await _scalar(pg_dsn, "SELECT array_agg(n) FROM tx_probe") == [2]
    finally:
        await close_pool(pool)


async def test_reads_run_without_a_transaction_and_the_connection_comes_back_transactional(
        pg_dsn: str) -> None:
    pool = await open_pool(pg_dsn, migrations=None, max_size=1)  # the same connection each time
    try:
        async with autocommit(pool) as conn:
            await conn.execute("SELECT 1")
            # No transaction left open by the read: nothing for a BEGIN/COMMIT to wrap.
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            backend = conn.info.backend_pid
        with pytest.raises(RuntimeError):
            async with autocommit(pool) as conn:
                raise RuntimeError("a failed read")
        async with pool.connection() as conn:  # lent again: a block is a transaction again
            assert conn.info.backend_pid == backend and not conn.autocommit
            await conn.execute("CREATE TABLE IF NOT EXISTS tx_probe2 (n int)")
        with pytest.raises(RuntimeError):
            async with pool.connection() as conn:
                await conn.execute("INSERT INTO tx_probe2 VALUES (1)")
                raise RuntimeError("rolled back")
        assert await _scalar(pg_dsn, "SELECT count(*) FROM tx_probe2") == 0
    finally:
        await close_pool(pool)


async def test_a_connection_the_server_dropped_while_idle_is_never_lent(fresh_db: str) -> None:
    """The pool's check costs no round trip, yet a connection PostgreSQL closed while it sat in
    the pool (as after a restart) is replaced, not handed to a caller to fail on."""
    pool = await open_pool(fresh_db, migrations=None, min_size=2, max_size=2)
    try:
        async with pool.connection() as conn:
            victim = conn.info.backend_pid
        with psycopg.connect(fresh_db, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        await asyncio.sleep(0.2)
        for _ in range(4):  # every connection the pool had is dead: each is replaced, not lent
            async with pool.connection() as conn:
                cur = await conn.execute("SELECT pg_backend_pid()")
                row = await cur.fetchone()
                assert row is not None and row[0] != victim
    finally:
        await close_pool(pool)
