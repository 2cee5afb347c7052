"""One Redis client factory for a single node and a Redis Cluster.

Scripts touch one hash tag per call (``{q:<event>}``, ``{inv:<event>}``), so the same Lua works
on both; the cluster client routes each call to the slot of its keys.
"""

from __future__ import annotations

from typing import TypeAlias

from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster

AnyRedis: TypeAlias = Redis | RedisCluster


# redis-py's cluster client keeps at most 100 connections per node and raises
# MaxConnectionsError past that instead of waiting: a burst of requests would fail. A service
# bounds its own concurrency (gRPC), so the pool may grow to what that burst needs.
CLUSTER_MAX_CONNECTIONS_PER_NODE = 4096
SINGLE_MAX_CONNECTIONS = 512


async def connect(url: str, *, cluster: bool = False) -> AnyRedis:
    """Connect and PING once, so a wrong URL fails at start, not on the first request."""
    client: AnyRedis
    if cluster:
        client = RedisCluster.from_url(
            url, decode_responses=False, max_connections=CLUSTER_MAX_CONNECTIONS_PER_NODE)
    else:
        # A burst waits for a connection (up to 5 s) instead of failing with MaxConnectionsError,
        # which redis-py's default pool raises past its limit.
        pool = BlockingConnectionPool.from_url(url, max_connections=SINGLE_MAX_CONNECTIONS, timeout=5)
        client = Redis(connection_pool=pool, decode_responses=False)
    await client.ping()  # type: ignore[misc]
    return client


async def close(client: AnyRedis) -> None:
    await client.aclose()


# Redis unreachable, failing over or still loading: the next try may pass. (A script error or a
# wrong type is the caller's, and is not here.)
_UNAVAILABLE = (redis_errors.ConnectionError, redis_errors.TimeoutError, redis_errors.BusyLoadingError,
                redis_errors.ClusterDownError, redis_errors.TryAgainError, redis_errors.MasterDownError,
                redis_errors.ReadOnlyError)


def is_redis_unavailable(exc: BaseException) -> bool:
    """True if ``exc`` says Redis cannot answer now (not the command's fault)."""
    return isinstance(exc, _UNAVAILABLE)
