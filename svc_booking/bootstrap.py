"""How svc_booking is put together: its resources, its servicer, its server."""

import contextlib
from pathlib import Path

from ticketping.booking.v1 import booking_service_pb2_grpc as pb_grpc

from meshkit import resources
from meshkit.server import App, Registration, build_server

from .config import Settings
from .server import BookingServicer

SERVICE = "ticketping.booking.v1.BookingService"
MIGRATIONS = Path(__file__).parent / "adapters" / "migrations"


async def create_server(settings: Settings) -> App:
    stack = contextlib.AsyncExitStack()
    try:
        pool = await resources.postgres(stack, settings.postgres_dsn, MIGRATIONS)
        redis = await resources.redis(stack, settings.redis_url, cluster=settings.redis_cluster)
        await resources.outbox_relay(stack, pool, settings.kafka_bootstrap)
        servicer = BookingServicer(pool, redis)
        reg = Registration(pb_grpc.add_BookingServiceServicer_to_server, servicer, SERVICE)
        return await build_server(settings, [reg], stack)
    except BaseException:
        await stack.aclose()
        raise
