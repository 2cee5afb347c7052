"""How svc_identity is put together: its resources, its use cases, its servicer, its server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from psycopg_pool import AsyncConnectionPool
from ticketping.identity.v1 import identity_service_pb2_grpc as pb_grpc

from meshkit import resources
from meshkit.server import App, Registration, build_server, mark_unimplemented

from .adapters.keystore import KeyStore
from .adapters.passwords import Passwords
from .adapters.postgres import SessionRepository, UserRepository
from .adapters.queue_keys import QueueKeys
from .adapters.throttle import LoginThrottle
from .config import Settings
from .domain.keys import KeyPolicy
from .domain.throttle import ThrottlePolicy
from .server import IdentityServicer
from .service import IdentityService, TokenSettings

log = logging.getLogger(__name__)

SERVICE = "ticketping.identity.v1.IdentityService"
MIGRATIONS = Path(__file__).parent / "adapters" / "migrations"
ENVOY_JWKS_CACHE = timedelta(seconds=60)
PURGE_EVERY = 3600.0
PURGE_AFTER = timedelta(days=1)  # expired refresh tokens are kept a day (reuse still answers 401)


def key_policy(settings: Settings) -> KeyPolicy:
    return KeyPolicy(
        publish_ahead=timedelta(seconds=settings.key_publish_ahead_seconds),
        access_ttl=timedelta(seconds=settings.access_token_ttl_seconds),
        clock_skew=timedelta(seconds=settings.jwt_clock_skew_seconds),
        key_cache=timedelta(seconds=settings.key_cache_seconds),
    )


def key_store(pool: AsyncConnectionPool, settings: Settings) -> KeyStore:
    return KeyStore(
        pool, kek=settings.kek, policy=key_policy(settings), cache_seconds=settings.key_cache_seconds
    )


async def open_identity(
    stack: contextlib.AsyncExitStack, settings: Settings, *, serving: bool = True
) -> IdentityService:
    """Open every resource of identity onto ``stack`` and return its use cases. The commands
    (``serving=False``) need neither Redis nor the queue, and only touch keys when rotating."""
    if settings.kek is None:
        log.warning("TP_KEY_ENCRYPTION_KEY is not set: new signing keys are stored unencrypted")
    ahead = timedelta(seconds=settings.key_publish_ahead_seconds)
    if ahead < ENVOY_JWKS_CACHE + timedelta(seconds=settings.key_cache_seconds):
        log.warning(
            "TP_KEY_PUBLISH_AHEAD_SECONDS is shorter than a verifier's JWKS cache plus "
            "TP_KEY_CACHE_SECONDS: a rotation may sign with a key the edge has not fetched yet",
            extra={"publish_ahead_seconds": settings.key_publish_ahead_seconds},
        )
    pool = await resources.postgres(stack, settings.postgres_dsn, MIGRATIONS,
                                          size=settings.postgres_pool_size)
    keys = key_store(pool, settings)
    if serving:
        await keys.ensure()
    passwords = Passwords(
        time_cost=settings.argon2_time_cost,
        memory_cost_kib=settings.argon2_memory_cost_kib,
        parallelism=settings.argon2_parallelism,
        workers=settings.password_hash_workers,
    )
    stack.callback(passwords.close)
    await passwords.start()
    throttle = None
    queue_keys = None
    if serving:
        redis = await resources.redis(stack, settings.redis_url, cluster=settings.redis_cluster)
        common = {
            "window_seconds": settings.login_failure_window_seconds,
            "backoff_base_seconds": settings.login_backoff_base_seconds,
            "backoff_max_seconds": settings.login_backoff_max_seconds,
        }
        throttle = LoginThrottle(
            redis,
            prefix=settings.redis_key_prefix,
            account=ThrottlePolicy(threshold=settings.login_max_failures_per_account, **common),  # type: ignore[arg-type]
            client=ThrottlePolicy(threshold=settings.login_max_failures_per_client, **common),  # type: ignore[arg-type]
            timeout=settings.throttle_timeout_seconds,
        )
        queue_keys = QueueKeys(
            settings.queue_addr,
            timeout=settings.queue_timeout_seconds,
            cache_seconds=settings.queue_keys_cache_seconds,
        )
        stack.push_async_callback(queue_keys.close)
    return IdentityService(
        users=UserRepository(pool),
        sessions=SessionRepository(pool),
        keys=keys,
        passwords=passwords,
        throttle=throttle,
        queue_keys=queue_keys,
        settings=TokenSettings(
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            access_ttl_seconds=settings.access_token_ttl_seconds,
            refresh_ttl_seconds=settings.refresh_token_ttl_seconds,
            password_max_length=settings.password_max_length,
        ),
    )


async def create_server(settings: Settings) -> App:
    stack = contextlib.AsyncExitStack()
    try:
        identity = await open_identity(stack, settings)
        servicer = IdentityServicer(identity)
        # Every RPC of the contract is served; any added later and not built yet says so.
        mark_unimplemented(servicer, pb_grpc.IdentityServiceServicer, "the identity issue (#3)")
        _start_maintenance(stack, identity, settings)
        reg = Registration(pb_grpc.add_IdentityServiceServicer_to_server, servicer, SERVICE)
        return await build_server(settings, [reg], stack)
    except BaseException:
        await stack.aclose()
        raise


@dataclass
class _Maintenance:
    identity: IdentityService
    settings: Settings

    async def run(self) -> None:
        """Automatic key rotation (when configured) and purging old refresh tokens. Every replica
        runs it; the key lock and the re-check under it make one rotation happen once."""
        interval = self.settings.key_rotation_interval_seconds
        tick = min(60.0, interval / 4) if interval else 60.0
        since_purge = PURGE_EVERY  # purge soon after start
        while True:
            try:
                await self.identity.keys.maintain(interval)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("key maintenance failed; retrying")
            since_purge += tick
            if since_purge >= PURGE_EVERY:
                since_purge = 0.0
                try:
                    n = await self.identity.sessions.purge_expired(PURGE_AFTER)
                    if n:
                        log.info("expired refresh tokens purged", extra={"count": n})
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("refresh token purge failed; retrying")
            await asyncio.sleep(tick)


def _start_maintenance(
    stack: contextlib.AsyncExitStack, identity: IdentityService, settings: Settings
) -> None:
    task = asyncio.get_running_loop().create_task(
        _Maintenance(identity, settings).run(), name="identity-maintenance"
    )

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    stack.push_async_callback(stop)
