"""Booking's calls to the waiting room: is an admission still active (CheckAdmission), and the
notices booking gives it (EndSession when a fan's order is cancelled, MarkSoldOut when
every seat is sold).

Fails closed: a queue that answers UNIMPLEMENTED (not built yet) or "not active" means not
admitted; a queue that cannot be reached in time is UNAVAILABLE (retryable), never a pass.
Positive answers are cached for a second or two (the contract allows it); negative ones are not.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

import grpc
from ticketping.queue.v1 import queue_service_pb2 as qpb
from ticketping.queue.v1 import queue_service_pb2_grpc as qpb_grpc

from meshkit.channels import client_channel
from meshkit.errors import DomainError

log = logging.getLogger(__name__)

_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
              grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL)


class AdmissionUnavailable(DomainError):
    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, detail: str) -> None:
        super().__init__("ADMISSION_CHECK_UNAVAILABLE",
                         f"the waiting room could not confirm the admission: {detail}")


class AdmissionChecker(Protocol):
    async def is_active(self, event_id: str, user_id: str, jti: str) -> bool: ...


class QueueNotifier(Protocol):
    """Best effort: a lost notice costs a slot until the session's TTL, never a wrong sale."""

    async def end_session(self, event_id: str, user_id: str, confirmed: bool) -> None: ...

    async def mark_sold_out(self, event_id: str) -> None: ...


class QueueAdmission:
    """CheckAdmission over gRPC with a short deadline and a small positive cache."""

    def __init__(self, address: str, *, timeout: float = 0.5, cache_seconds: float = 1.0,
                 max_cached: int = 100_000, retry_for: float = 60.0) -> None:
        self._channel = client_channel(address)
        self._stub = qpb_grpc.QueueServiceStub(self._channel)
        self.timeout = timeout
        self.cache_seconds = cache_seconds
        self.max_cached = max_cached
        # (event, user) -> (jti, until): one live session per fan and event, so ending it is one
        # pop, not a scan of every cached session.
        self._cache: dict[tuple[str, str], tuple[str, float]] = {}
        self.retry_for = retry_for  # how long a MarkSoldOut the queue did not take is said again
        self._retries: set[asyncio.Task[None]] = set()

    async def is_active(self, event_id: str, user_id: str, jti: str) -> bool:
        key = (event_id, user_id)
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and cached[0] == jti and cached[1] > now:
            return True
        try:
            resp = await self._stub.CheckAdmission(
                qpb.CheckAdmissionRequest(event=f"events/{event_id}", user_id=user_id, jti=jti),
                timeout=self.timeout)
        except grpc.aio.AioRpcError as err:
            if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise AdmissionUnavailable(err.code().name) from None
            return False  # UNIMPLEMENTED, NOT_FOUND, PERMISSION_DENIED, ...: fail closed
        if resp.active and self.cache_seconds > 0:
            if len(self._cache) >= self.max_cached:
                self._cache = {k: v for k, v in self._cache.items() if v[1] > now}
                if len(self._cache) >= self.max_cached:
                    self._cache.clear()
            self._cache[key] = (jti, now + self.cache_seconds)
        return bool(resp.active)

    async def end_session(self, event_id: str, user_id: str, confirmed: bool) -> None:
        reason = (qpb.SESSION_END_REASON_ORDER_CONFIRMED if confirmed
                  else qpb.SESSION_END_REASON_UNSPECIFIED)
        try:
            await self._stub.EndSession(
                qpb.EndSessionRequest(event=f"events/{event_id}", user_id=user_id, reason=reason),
                timeout=self.timeout)
        except grpc.aio.AioRpcError as err:
            log.warning("EndSession failed; the session ends with its TTL",
                        extra={"event": event_id, "code": err.code().name})
        self._cache.pop((event_id, user_id), None)

    async def mark_sold_out(self, event_id: str) -> None:
        """Said once, when the last seat sells: a lost notice would leave fans waiting for a house
        that has nothing left, so one the queue did not take (busy, restarting) is said again in
        the background, backing off, until it is taken or ``retry_for`` seconds have passed."""
        if await self._mark_sold_out(event_id, first=True):
            return
        task = asyncio.create_task(self._mark_sold_out_until_taken(event_id))
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def _mark_sold_out(self, event_id: str, first: bool = False) -> bool:
        try:
            await self._stub.MarkSoldOut(qpb.MarkSoldOutRequest(event=f"events/{event_id}"),
                                         timeout=self.timeout)
            return True
        except grpc.aio.AioRpcError as err:
            if err.code() not in _RETRYABLE:  # UNIMPLEMENTED, NOT_FOUND: saying it again is no use
                log.warning("MarkSoldOut refused", extra={"event": event_id, "code": err.code().name})
                return True
            if first:
                log.warning("MarkSoldOut failed; retrying in the background",
                            extra={"event": event_id, "code": err.code().name})
            return False

    async def _mark_sold_out_until_taken(self, event_id: str) -> None:
        deadline = time.monotonic() + self.retry_for
        pause = 0.2
        while time.monotonic() < deadline:
            await asyncio.sleep(pause)
            if await self._mark_sold_out(event_id):
                log.info("MarkSoldOut taken on a retry", extra={"event": event_id})
                return
            pause = min(pause * 2, 5.0)
        log.error("MarkSoldOut gave up; the room admits on until the next rebuild or sale says it",
                  extra={"event": event_id})

    async def close(self) -> None:
        for task in list(self._retries):
            task.cancel()
        await asyncio.gather(*self._retries, return_exceptions=True)
        await self._channel.close()


class StaticAdmission:
    """A fake for tests: active unless the (event, user, jti) was revoked, or all inactive."""

    def __init__(self, active: bool = True) -> None:
        self.active = active
        self.revoked: set[tuple[str, str, str]] = set()
        self.calls = 0
        self.ended: list[tuple[str, str, bool]] = []
        self.sold_out: list[str] = []

    async def is_active(self, event_id: str, user_id: str, jti: str) -> bool:
        self.calls += 1
        return self.active and (event_id, user_id, jti) not in self.revoked

    async def end_session(self, event_id: str, user_id: str, confirmed: bool) -> None:
        self.ended.append((event_id, user_id, confirmed))

    async def mark_sold_out(self, event_id: str) -> None:
        self.sold_out.append(event_id)
