"""How svc_payment is put together: its resources, its servicer, its server."""

import contextlib
from pathlib import Path

from ticketping.payment.v1 import payment_service_pb2_grpc as pb_grpc

from meshkit import resources
from meshkit.server import App, Registration, build_server

from .config import Settings
from .server import PaymentServicer

SERVICE = "ticketping.payment.v1.PaymentService"
MIGRATIONS = Path(__file__).parent / "adapters" / "migrations"


async def create_server(settings: Settings) -> App:
    stack = contextlib.AsyncExitStack()
    try:
        pool = await resources.postgres(stack, settings.postgres_dsn, MIGRATIONS)
        await resources.outbox_relay(stack, pool, settings.kafka_bootstrap)
        servicer = PaymentServicer(pool)
        reg = Registration(pb_grpc.add_PaymentServiceServicer_to_server, servicer, SERVICE)
        return await build_server(settings, [reg], stack)
    except BaseException:
        await stack.aclose()
        raise
