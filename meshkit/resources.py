"""Open a service's resources onto its exit stack, so shutdown closes them in reverse order."""

from __future__ import annotations

import contextlib
from pathlib import Path

from . import metrics
from . import redis as redis_
from .db import close_pool, open_pool
from .outbox import OutboxRelay


async def postgres(stack: contextlib.AsyncExitStack, dsn: str, migrations: Path,  # type: ignore[no-untyped-def]
                   *, size: int = 10):
    """A pool of at most ``size`` connections with meshkit's and the service's migrations applied;
    its use is exported as Prometheus gauges (meshkit_db_pool_*)."""
    pool = await open_pool(dsn, migrations=migrations, max_size=size)
    stack.push_async_callback(close_pool, pool)
    metrics.watch_pool(pool)
    return pool


async def outbox_relay(stack: contextlib.AsyncExitStack, pool, bootstrap: str,  # type: ignore[no-untyped-def]
                       *, compression: str = "none") -> OutboxRelay:
    """Publish this service's outbox to Kafka for as long as the service runs."""
    relay = OutboxRelay(pool, bootstrap, compression=compression)
    await relay.start()
    stack.push_async_callback(relay.stop)
    return relay


async def redis(stack: contextlib.AsyncExitStack, url: str, *, cluster: bool = False) -> redis_.AnyRedis:
    client = await redis_.connect(url, cluster=cluster)
    stack.push_async_callback(redis_.close, client)
    return client
