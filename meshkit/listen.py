"""PostgreSQL LISTEN on a connection of its own, kept up across lost connections.

NOTIFY is delivered on commit to every session listening at that moment, so it tells the other
replicas of a service that something changed: the outbox relays (a row to publish), the catalog's
read caches (an event changed), booking's WaitOrder calls (an order left PENDING_PAYMENT).

What was sent while nobody listened is lost. So ``on_note(None)`` means "anything may have
changed": it is called when the connection is (re)made and when it is lost, and whoever relies on
the notifications also looks for themselves now and then (a poll, a TTL, a re-read).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

log = logging.getLogger(__name__)

Connect = Callable[[], Awaitable[psycopg.AsyncConnection[Any]]]


def connect_like(pool: AsyncConnectionPool) -> Connect:
    """Connect as the pool does, but to a connection of one's own, in autocommit."""
    async def connect() -> psycopg.AsyncConnection[Any]:
        conninfo, kwargs = await connection_params(pool)
        return await psycopg.AsyncConnection.connect(conninfo, **{**kwargs, "autocommit": True})
    return connect


def connect_to(dsn: str) -> Connect:
    async def connect() -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    return connect


async def connection_params(pool: AsyncConnectionPool) -> tuple[str, dict[str, Any]]:
    """The pool's conninfo and connect kwargs (psycopg_pool allows callables for both)."""
    conninfo: Any = pool.conninfo
    kwargs: Any = pool.kwargs
    if callable(conninfo):
        conninfo = conninfo()
        if inspect.isawaitable(conninfo):
            conninfo = await conninfo
    if callable(kwargs):
        kwargs = kwargs()
        if inspect.isawaitable(kwargs):
            kwargs = await kwargs
    return str(conninfo), dict(kwargs or {})


class Listener:
    """LISTEN ``channel``; ``on_note(payload)`` per notification, ``on_note(None)`` whenever
    notifications may have been missed (connected, reconnected, connection lost).

    ``connected`` is set while listening; ``notifications`` counts what arrived."""

    def __init__(self, connect: Connect, channel: str, on_note: Callable[[str | None], None], *,
                 meanwhile: str) -> None:
        """``meanwhile`` says, for the warning when the connection is lost, what stands in for
        the notifications until it is back (e.g. "polling meanwhile")."""
        if not channel.isidentifier():
            raise ValueError(f"channel {channel!r} is not a plain identifier")
        self._connect, self.channel, self._on_note = connect, channel, on_note
        self._meanwhile = meanwhile
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        self.notifications = 0

    async def start(self, ready_within: float = 10.0) -> None:
        """Start listening; wait up to ``ready_within`` seconds for it (so that a change made
        right after start is not missed), then go on regardless: it keeps trying."""
        self._task = asyncio.create_task(self._run(), name=f"listen-{self.channel}")
        if ready_within > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.connected.wait(), ready_within)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.connected.clear()

    async def _run(self) -> None:
        backoff = 0.5
        while True:
            try:
                async with await self._connect() as conn:
                    await conn.execute(f"LISTEN {self.channel}")
                    backoff = 0.5
                    self.connected.set()
                    self._on_note(None)  # whatever happened while not listening
                    async for note in conn.notifies():
                        self.notifications += 1
                        self._on_note(note.payload)
                raise ConnectionError("notification stream ended")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.connected.clear()
                self._on_note(None)
                log.warning(f"{self.channel} LISTEN connection lost; {self._meanwhile}",
                            extra={"error": str(exc), "retry_in_s": backoff})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
