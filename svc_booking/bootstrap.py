"""How svc_booking is put together: its resources, its servicer, its server."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from ticketping.booking.v1 import booking_service_pb2_grpc as pb_grpc

from meshkit import resources
from meshkit.consumer import EventConsumer, is_database_unavailable
from meshkit.listen import Listener, connect_like
from meshkit.redis import is_redis_unavailable
from meshkit.server import App, Registration, build_server

from .adapters.admission import AdmissionChecker, QueueAdmission, QueueNotifier, StaticAdmission
from .adapters.inventory import Inventory
from .adapters.payment_events import PaymentEvents
from .adapters.settled import CHANNEL as SETTLED_CHANNEL
from .config import CATALOG_CONSUMER_CONCURRENCY, Settings
from .server import BookingServicer
from .service import Booking

SERVICE = "ticketping.booking.v1.BookingService"
MIGRATIONS = Path(__file__).parent / "adapters" / "migrations"


@dataclass
class Wired:
    app: App
    booking: Booking
    consumer: EventConsumer | None
    payment_consumer: EventConsumer | None = None
    payment_events: PaymentEvents | None = None


def _transient(exc: BaseException) -> bool:
    """Not the event's fault, retried until it passes, never parked: booking's handlers write
    PostgreSQL and then Redis (a sale's seats SOLD in the live state). A Redis failover takes
    seconds; a PaymentSucceeded parked meanwhile left its seats HELD until the hold's deadline."""
    return is_database_unavailable(exc) or is_redis_unavailable(exc)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def wire(settings: Settings, *, admission: AdmissionChecker | None = None) -> Wired:
    """Everything booking needs, started; ``admission`` replaces the queue client (tests)."""
    stack = contextlib.AsyncExitStack()
    try:
        pool = await resources.postgres(stack, settings.postgres_dsn, MIGRATIONS,
                                          size=settings.postgres_pool_size)
        redis = await resources.redis(stack, settings.redis_url, cluster=settings.redis_cluster)
        await resources.outbox_relay(stack, pool, settings.kafka_bootstrap,
                                     compression=settings.kafka_compression)
        notifier: QueueNotifier | None = None
        if admission is None:
            queue = QueueAdmission(settings.queue_addr, timeout=settings.admission_timeout_seconds,
                                   cache_seconds=settings.admission_cache_seconds)
            stack.push_async_callback(queue.close)
            admission = notifier = queue
        elif isinstance(admission, StaticAdmission):
            notifier = admission
        booking = Booking(
            pool, Inventory(redis),
            hold_ttl=timedelta(seconds=settings.hold_ttl_seconds),
            default_seat_limit=settings.default_seat_limit_per_fan,
            topic=settings.booking_topic,
            sweep_lease=timedelta(seconds=settings.sweep_lease_seconds),
            queue=notifier,
            seats_cache_seconds=settings.seats_cache_seconds,
            payment_grace=timedelta(seconds=settings.payment_grace_seconds),
        )
        consumer = None
        if settings.run_consumer:
            consumer = EventConsumer(pool, settings.kafka_bootstrap, settings.consumer_group,
                                     [settings.catalog_topic], booking.on_event,
                                     client_id=f"booking-{settings.consumer_group}",
                                     is_transient=_transient,
                                     after_commit=booking.after_event,
                                     event_types=Booking.CATALOG_EVENT_TYPES,
                                     max_concurrency=CATALOG_CONSUMER_CONCURRENCY)
            task = asyncio.create_task(consumer.run(), name="booking-consumer")
            stack.push_async_callback(_cancel, task)
            stack.push_async_callback(consumer.stop, 10.0)
        payment_events = PaymentEvents(booking)
        payment_consumer = None
        if settings.run_consumer and settings.run_payment_consumer:
            # Its own group: a slow payment event never holds up the catalog's.
            group = f"{settings.consumer_group}.payment"
            payment_consumer = EventConsumer(pool, settings.kafka_bootstrap, group,
                                             [settings.payment_topic], payment_events.handle,
                                             client_id=f"booking-{group}",
                                             is_transient=_transient,
                                             event_types=PaymentEvents.TYPES,
                                             precheck=payment_events.sell_own,
                                             max_concurrency=settings.payment_consumer_concurrency)
            ptask = asyncio.create_task(payment_consumer.run(), name="booking-payment-consumer")
            stack.push_async_callback(_cancel, ptask)
            stack.push_async_callback(payment_consumer.stop, 10.0)
        if settings.run_sweeper:
            sweeper = asyncio.create_task(booking.run_sweeper(settings.sweep_interval_seconds),
                                          name="booking-sweeper")
            stack.push_async_callback(_cancel, sweeper)
        settled = Listener(connect_like(pool), SETTLED_CHANNEL, booking.settled.on_note,
                           meanwhile="WaitOrder re-reads every second meanwhile")
        await settled.start()
        stack.push_async_callback(settled.stop)
        booking.settled.listening = settled.connected.is_set
        servicer = BookingServicer(booking, admission, pool)
        reg = Registration(pb_grpc.add_BookingServiceServicer_to_server, servicer, SERVICE)
        app = await build_server(settings, [reg], stack)
        app.on_drain.append(booking.settled.drain)
        return Wired(app, booking, consumer, payment_consumer, payment_events)
    except BaseException:
        await stack.aclose()
        raise


async def create_server(settings: Settings) -> App:
    return (await wire(settings)).app
