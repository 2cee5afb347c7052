"""BookingService: translates proto ⇄ domain and domain errors ⇄ status codes."""

from psycopg_pool import AsyncConnectionPool
from ticketping.booking.v1 import booking_service_pb2_grpc as pb_grpc

from meshkit.redis import AnyRedis
from meshkit.server import mark_unimplemented


class BookingServicer(pb_grpc.BookingServiceServicer):
    def __init__(self, pool: AsyncConnectionPool, redis: AnyRedis) -> None:
        self.pool = pool
        self.redis = redis
        # Every RPC of the contract is served; those not built yet say so (UNIMPLEMENTED).
        mark_unimplemented(self, pb_grpc.BookingServiceServicer, "the booking issue (#6)")
