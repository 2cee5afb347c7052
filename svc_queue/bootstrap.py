"""How svc_queue is put together: its resources, its servicer, its server."""

import contextlib

from ticketping.queue.v1 import queue_service_pb2_grpc as pb_grpc

from meshkit import resources
from meshkit.server import App, Registration, build_server

from .config import Settings
from .server import QueueServicer

SERVICE = "ticketping.queue.v1.QueueService"


async def create_server(settings: Settings) -> App:
    stack = contextlib.AsyncExitStack()
    try:
        redis = await resources.redis(stack, settings.redis_url, cluster=settings.redis_cluster)
        servicer = QueueServicer(redis)
        reg = Registration(pb_grpc.add_QueueServiceServicer_to_server, servicer, SERVICE)
        return await build_server(settings, [reg], stack)
    except BaseException:
        await stack.aclose()
        raise
