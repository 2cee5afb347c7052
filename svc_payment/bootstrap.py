"""How svc_payment is put together: its resources, its servicer, its server."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path

from ticketping.payment.v1 import payment_service_pb2_grpc as pb_grpc

from meshkit import metrics, resources
from meshkit.consumer import EventConsumer, is_database_unavailable
from meshkit.db import close_pool, open_pool
from meshkit.server import App, Registration, build_server

from .adapters.booking import BookingClient
from .adapters.provider import SandboxProvider
from .config import Settings
from .server import PaymentServicer
from .service import Payments, ProviderUnavailable

SERVICE = "ticketping.payment.v1.PaymentService"
MIGRATIONS = Path(__file__).parent / "adapters" / "migrations"
# The sandbox PSP's own connections: the service calls it while holding one of its pool's (a refund
# inside the webhook's transaction), so the two must not compete for the same ones.
SANDBOX_POOL_SIZE = 8


@dataclass
class Wired:
    app: App
    payments: Payments
    provider: SandboxProvider
    consumer: EventConsumer | None


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _transient(exc: BaseException) -> bool:
    """Not the event's fault: retried until it passes, never parked (a refund must happen)."""
    return is_database_unavailable(exc) or isinstance(exc, ProviderUnavailable)


async def wire(settings: Settings) -> Wired:
    stack = contextlib.AsyncExitStack()
    try:
        pool = await resources.postgres(stack, settings.postgres_dsn, MIGRATIONS,
                                          size=settings.postgres_pool_size)
        await resources.outbox_relay(stack, pool, settings.kafka_bootstrap,
                                     compression=settings.kafka_compression)
        booking = BookingClient(settings.booking_addr, timeout=settings.booking_timeout_seconds)
        stack.push_async_callback(booking.close)
        secret = settings.payment_webhook_secret.get_secret_value().encode()
        sandbox_pool = await open_pool(settings.postgres_dsn, migrations=MIGRATIONS, min_size=1,
                                       max_size=SANDBOX_POOL_SIZE, name="sandbox")
        stack.push_async_callback(close_pool, sandbox_pool)
        metrics.watch_pool(sandbox_pool)
        provider = SandboxProvider(sandbox_pool, settings.webhook_url, secret,
                                   delay=settings.sandbox_delay_seconds, outcome=settings.sandbox_outcome,
                                   max_attempts=settings.sandbox_max_attempts)
        stack.push_async_callback(provider.close)
        await provider.start()  # resumes the callbacks a previous process did not send
        payments = Payments(pool, booking, provider, webhook_secret=secret,
                            webhook_tolerance=settings.webhook_tolerance_seconds,
                            topic=settings.payment_topic)
        consumer = None
        if settings.run_consumer:
            consumer = EventConsumer(pool, settings.kafka_bootstrap, settings.consumer_group,
                                     [settings.booking_topic], payments.on_booking_event,
                                     client_id=f"payment-{settings.consumer_group}",
                                     is_transient=_transient,
                                     event_types=Payments.BOOKING_EVENT_TYPES,
                                     precheck=payments.needs_handling)
            task = asyncio.create_task(consumer.run(), name="payment-consumer")
            stack.push_async_callback(_cancel, task)
            stack.push_async_callback(consumer.stop, 10.0)
        sweeper = asyncio.create_task(
            payments.sweep_unmatched(settings.unmatched_sweep_seconds, settings.unmatched_refund_seconds),
            name="payment-unmatched-sweeper")
        stack.push_async_callback(_cancel, sweeper)
        servicer = PaymentServicer(payments, outcome_header=settings.sandbox_outcome_header)
        reg = Registration(pb_grpc.add_PaymentServiceServicer_to_server, servicer, SERVICE)
        app = await build_server(settings, [reg], stack)
        return Wired(app, payments, provider, consumer)
    except BaseException:
        await stack.aclose()
        raise


async def create_server(settings: Settings) -> App:
    return (await wire(settings)).app
