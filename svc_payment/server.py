"""PaymentService: translates proto ⇄ domain and domain errors ⇄ status codes."""

from psycopg_pool import AsyncConnectionPool
from ticketping.payment.v1 import payment_service_pb2_grpc as pb_grpc

from meshkit.server import mark_unimplemented


class PaymentServicer(pb_grpc.PaymentServiceServicer):
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool
        # Every RPC of the contract is served; those not built yet say so (UNIMPLEMENTED).
        mark_unimplemented(self, pb_grpc.PaymentServiceServicer, "the payment issue (#7)")
