"""The admission-token keys of svc_queue (QueueService.GetAdmissionKeys), for the public JWKS.

Asked with a short deadline and remembered for a few seconds. When the queue cannot answer
(down, slow, not built yet), the public JWKS carries identity's keys only and a warning is
logged; user tokens never depend on this.
"""

from __future__ import annotations

import logging
import time

import grpc
from ticketping.queue.v1 import queue_service_pb2 as queue_pb
from ticketping.queue.v1 import queue_service_pb2_grpc as queue_grpc

from meshkit.channels import client_channel

log = logging.getLogger(__name__)

_JWK_FIELDS = ("kty", "crv", "x", "y", "kid", "use", "alg")


class QueueKeys:
    def __init__(self, addr: str | None, *, timeout: float, cache_seconds: float) -> None:
        self.addr = addr
        self.timeout = timeout
        self.cache_seconds = cache_seconds
        self._channel = client_channel(addr) if addr else None
        self._stub = queue_grpc.QueueServiceStub(self._channel) if self._channel else None
        self._cached: tuple[float, list[dict[str, str]]] | None = None

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def keys(self) -> list[dict[str, str]]:
        if self._stub is None:
            return []
        now = time.monotonic()
        if self._cached is not None and now - self._cached[0] < self.cache_seconds:
            return self._cached[1]
        try:
            reply = await self._stub.GetAdmissionKeys(
                queue_pb.GetAdmissionKeysRequest(), timeout=self.timeout
            )
        except grpc.aio.AioRpcError as err:
            log.warning(
                "admission-token keys unavailable; the public JWKS has identity's keys only",
                extra={"queue_addr": self.addr, "grpc_code": err.code().name, "detail": err.details()},
            )
            return []
        keys = [{f: getattr(k, f) for f in _JWK_FIELDS} for k in reply.keys]
        self._cached = (now, keys)
        return keys
