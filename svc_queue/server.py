"""QueueService: translates proto ⇄ domain and domain errors ⇄ status codes."""


from ticketping.queue.v1 import queue_service_pb2_grpc as pb_grpc

from meshkit.redis import AnyRedis
from meshkit.server import mark_unimplemented


class QueueServicer(pb_grpc.QueueServiceServicer):
    def __init__(self, redis: AnyRedis) -> None:
        self.redis = redis
        # Every RPC of the contract is served; those not built yet say so (UNIMPLEMENTED).
        mark_unimplemented(self, pb_grpc.QueueServiceServicer, "the waiting-room issue (#5)")
