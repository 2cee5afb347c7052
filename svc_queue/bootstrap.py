"""How svc_queue is put together: its resources, its use cases, its servicer, its server.

Redis (single node or cluster) holds everything: the rooms (one hash tag per event), the room
registry and the admission-token keys. A room lost from Redis is rebuilt from catalog
(svc_queue/recovery.py, when TP_CATALOG_ADDR is set). Two background tasks run in every replica: the admission
loop (svc_queue/admission.py) and the Kafka consumer (EventPublished from catalog; OrderConfirmed
and OrderCancelled from booking), plus the key maintenance (automatic rotation when configured).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ticketping.queue.v1 import queue_service_pb2_grpc as pb_grpc

from meshkit import resources
from meshkit.jwtkeys import KeyPolicy
from meshkit.server import App, Registration, build_server

from .adapters.catalog import CatalogClient
from .adapters.events import RedisEventConsumer
from .adapters.keystore import AdmissionKeyStore
from .adapters.rooms import RoomStore
from .admission import AdmissionLoop, RoomRegistry
from .config import Settings
from .domain.room import RoomDefaults
from .recovery import RoomRecovery
from .server import QueueServicer
from .service import Queue, TokenSettings

log = logging.getLogger(__name__)

HALT_TIMEOUT = 10.0  # seconds a cancelled background task gets to end at shutdown

SERVICE = "ticketping.queue.v1.QueueService"
KEY_MAINTENANCE_EVERY = 60.0


def key_policy(settings: Settings) -> KeyPolicy:
    return KeyPolicy(
        publish_ahead=timedelta(seconds=settings.key_publish_ahead_seconds),
        # the longest an admission token can live: the longest session an admin may set
        access_ttl=timedelta(seconds=settings.max_session_ttl_seconds),
        clock_skew=timedelta(seconds=settings.jwt_clock_skew_seconds),
        key_cache=timedelta(seconds=settings.key_cache_seconds),
    )


def room_defaults(settings: Settings) -> RoomDefaults:
    return RoomDefaults(
        max_active=settings.default_max_active,
        admit_rate_per_second=settings.default_admit_rate_per_second,
        session_ttl_ms=round(settings.session_ttl_seconds * 1000),
        claim_window_ms=round(settings.claim_window_seconds * 1000),
    )


@dataclass
class Wired:
    """The server and the parts a test may drive directly."""

    app: App
    queue: Queue
    loop: AdmissionLoop
    consumer: RedisEventConsumer | None


async def wire(settings: Settings) -> Wired:
    stack = contextlib.AsyncExitStack()
    try:
        redis = await resources.redis(stack, settings.redis_url, cluster=settings.redis_cluster)
        rooms = RoomStore(redis, max_in_flight=settings.redis_max_in_flight)
        await rooms.load_scripts()
        registry = RoomRegistry(redis, settings.registry_key)
        if settings.kek is None:
            log.warning("TP_KEY_ENCRYPTION_KEY is not set: admission-token keys are stored unencrypted")
        keys = AdmissionKeyStore(redis, settings.keys_key, kek=settings.kek, policy=key_policy(settings),
                                 cache_seconds=settings.key_cache_seconds)
        await keys.ensure()
        loop = AdmissionLoop(rooms, registry, tick_seconds=settings.admission_tick_seconds,
                             refresh_seconds=settings.admission_registry_refresh_seconds)
        queue = Queue(
            rooms, registry, keys,
            tokens=TokenSettings(settings.admission_issuer, settings.admission_audience),
            defaults=room_defaults(settings),
            max_session_ttl_ms=round(settings.max_session_ttl_seconds * 1000),
            poke=loop.poke,
        )
        if settings.catalog_addr:
            catalog = CatalogClient(settings.catalog_addr, timeout=settings.catalog_timeout_seconds)
            stack.push_async_callback(catalog.close)
            queue.recovery = RoomRecovery(
                catalog, queue.event_published,
                absent_seconds=settings.catalog_not_found_cache_seconds,
                max_remembered=settings.catalog_not_found_cache_size,
            )
            loop.recover = queue.recover_room
        if settings.admission_loop:
            _background(stack, loop.run, "queue-admission")
        _background(stack, lambda: _maintain_keys(keys, settings), "queue-key-maintenance")
        consumer = None
        if settings.consume_events:
            consumer = RedisEventConsumer(
                settings.kafka_bootstrap, settings.consumer_group,
                [settings.catalog_topic, settings.booking_topic], queue.on_event,
                event_types=Queue.EVENT_TYPES,
            )
            await consumer.start()  # fail at start, not later, if Kafka is unreachable
            _background(stack, consumer.run, "queue-events", stop=consumer.stop)
        servicer = QueueServicer(queue)
        reg = Registration(pb_grpc.add_QueueServiceServicer_to_server, servicer, SERVICE)
        app = await build_server(settings, [reg], stack)
        return Wired(app, queue, loop, consumer)
    except BaseException:
        await stack.aclose()
        raise


async def create_server(settings: Settings) -> App:
    return (await wire(settings)).app


async def _maintain_keys(keys: AdmissionKeyStore, settings: Settings) -> None:
    interval = settings.key_rotation_interval_seconds
    tick = min(KEY_MAINTENANCE_EVERY, interval / 4) if interval else KEY_MAINTENANCE_EVERY
    while True:
        await asyncio.sleep(tick)
        try:
            await keys.maintain(interval)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("admission key maintenance failed; retrying")


async def _run(run: Callable[[], Awaitable[Any]]) -> Any:
    return await run()


def _background(
    stack: contextlib.AsyncExitStack, run: Callable[[], Awaitable[Any]], name: str,
    stop: Callable[[], Awaitable[Any]] | None = None,
) -> None:
    task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(_run(run), name=name)

    async def halt() -> None:
        if stop is not None:
            with contextlib.suppress(Exception):
                await stop()
        task.cancel()
        # A task that does not end when cancelled must not hang the replica's shutdown (a
        # SIGTERM'd pod that never exits): wait a while, then say where it is stuck and go on.
        done, _ = await asyncio.wait({task}, timeout=HALT_TIMEOUT)
        if not done:
            stack = io.StringIO()
            task.print_stack(file=stack)
            log.error("background task did not stop when cancelled; shutting down without it",
                      extra={"task": name, "stack": stack.getvalue()[-4000:]})
            return
        with contextlib.suppress(asyncio.CancelledError):
            await task

    stack.push_async_callback(halt)
