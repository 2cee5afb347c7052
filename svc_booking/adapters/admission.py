"""Booking's calls to the waiting room: is an admission still active (CheckAdmission), and the
notice booking gives it when a fan's order is cancelled (EndSession). That every seat is sold
goes to the waiting room as an event (EventSoldOut, through booking's outbox): durable, where a
call retried in memory was lost with the process.

Fails closed: a queue that answers UNIMPLEMENTED (not built yet) or "not active" means not
admitted; a queue that cannot be reached in time is UNAVAILABLE (retryable), never a pass.
Positive answers are cached for a second or two (the contract allows it), never past the session's
own expiry; negative ones are not.

An admission token is such a positive answer too: the waiting room signs it at the moment it
claims the fan's session (its ``iat``), so for the same second or two after that moment booking
takes the token's word without asking, exactly as it takes a cached answer's. A flash sale's
fan holds right after being admitted: this spares most purchases their one CheckAdmission call
(README "Admission"). A session this replica ended (EndSession) is never taken on an older
token's word.
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

# After a waiting room answers BatchCheckAdmission with UNIMPLEMENTED: one CheckAdmission per
# check this long (seconds), then the batch is tried again.
SINGLE_CHECKS_FOR = 60.0


class AdmissionUnavailable(DomainError):
    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, detail: str) -> None:
        super().__init__("ADMISSION_CHECK_UNAVAILABLE",
                         f"the waiting room could not confirm the admission: {detail}")


class AdmissionChecker(Protocol):
    async def is_active(self, event_id: str, user_id: str, jti: str,
                        issued_at: int | None = None) -> bool:
        """``issued_at``: the token's ``iat`` (Unix seconds) when the edge passed it."""


class QueueNotifier(Protocol):
    """Best effort: a lost notice costs a slot until the session's TTL, never a wrong sale."""

    async def end_session(self, event_id: str, user_id: str, confirmed: bool) -> None: ...


class QueueAdmission:
    """CheckAdmission over gRPC with a short deadline and a small positive cache."""

    def __init__(self, address: str, *, timeout: float = 0.5, cache_seconds: float = 2.0,
                 max_cached: int = 100_000, max_batch: int = 500) -> None:
        self._channel = client_channel(address)
        self._stub = qpb_grpc.QueueServiceStub(self._channel)
        self.timeout = timeout
        self.cache_seconds = cache_seconds
        self.max_cached = max_cached
        # (event, user) -> (jti, until): one live session per fan and event, so ending it is one
        # pop, not a scan of every cached session.
        self._cache: dict[tuple[str, str], tuple[str, float]] = {}
        # (event, user) -> when this replica ended the fan's session (Unix seconds): a token
        # issued before that is not fresh. Kept no longer than a token stays fresh.
        self._ended: dict[tuple[str, str], float] = {}
        # event -> (user, jti) -> the answer: the checks waiting for the next batch; and the
        # events with a batch under way (one at a time per event, so the batches grow with the load).
        self._waiting: dict[str, dict[tuple[str, str], asyncio.Future[qpb.CheckAdmissionResponse]]] = {}
        self._sending: set[str] = set()
        self._senders: set[asyncio.Task[None]] = set()
        self.max_batch = max_batch
        self._single_until = 0.0  # until then, no BatchCheckAdmission (the queue had none)

    def fresh(self, key: tuple[str, str], issued_at: int) -> bool:
        """Whether a token issued at ``issued_at`` (whole seconds, rounded down by the queue) is
        recent enough to stand for the waiting room's answer. A token from the future beyond a
        second (the two clocks disagree) is not."""
        if self.cache_seconds <= 0:
            return False
        age = time.time() - issued_at
        return -1.0 < age < self.cache_seconds and self._ended.get(key, 0.0) < issued_at

    async def is_active(self, event_id: str, user_id: str, jti: str,
                        issued_at: int | None = None) -> bool:
        key = (event_id, user_id)
        if issued_at is not None and self.fresh(key, issued_at):
            return True
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and cached[0] == jti and cached[1] > now:
            return True
        asked = time.time()
        resp = await self._ask(event_id, user_id, jti)
        # Not kept if this replica ended the session meanwhile: the answer may be from before.
        if resp.active and self.cache_seconds > 0 and self._ended.get(key, 0.0) < asked:
            keep = self.cache_seconds
            if resp.HasField("expire_time"):  # never past the session's own end
                keep = min(keep, resp.expire_time.ToMicroseconds() / 1e6 - time.time())
            if keep > 0:
                if len(self._cache) >= self.max_cached:
                    self._cache = {k: v for k, v in self._cache.items() if v[1] > now}
                    if len(self._cache) >= self.max_cached:
                        self._cache.clear()
                self._cache[key] = (jti, now + keep)
        return bool(resp.active)

    async def _ask(self, event_id: str, user_id: str, jti: str) -> qpb.CheckAdmissionResponse:
        """The waiting room's answer for one session, asked together with every other check of
        the event that comes while one batch is under way (the same session's once)."""
        waiting = self._waiting.setdefault(event_id, {})
        answer = waiting.get((user_id, jti))
        if answer is None:
            answer = waiting[(user_id, jti)] = asyncio.get_running_loop().create_future()
            if event_id not in self._sending:
                self._sending.add(event_id)
                sender = asyncio.create_task(self._send(event_id))
                self._senders.add(sender)
                sender.add_done_callback(self._senders.discard)
        # Shielded: a caller that gives up must not cancel the answer others wait for too.
        return await asyncio.shield(answer)

    async def _send(self, event_id: str) -> None:
        """Batches of the event's waiting checks, one after another, until none is left."""
        try:
            while waiting := self._waiting.pop(event_id, None):
                batch = list(waiting.items())
                if len(batch) > self.max_batch:  # the rest go in the next batch
                    self._waiting[event_id] = dict(batch[self.max_batch:])
                    batch = batch[:self.max_batch]
                try:
                    answers = await self._check(event_id, [session for session, _ in batch])
                except Exception as exc:  # noqa: BLE001 - each waiter gets it
                    for _, answer in batch:
                        if not answer.done():
                            answer.set_exception(exc)
                else:
                    for (_, answer), resp in zip(batch, answers, strict=True):
                        if not answer.done():
                            answer.set_result(resp)
        finally:
            self._sending.discard(event_id)

    async def _check(self, event_id: str, sessions: list[tuple[str, str]]
                     ) -> list[qpb.CheckAdmissionResponse]:
        event = f"events/{event_id}"
        requests = [qpb.CheckAdmissionRequest(event=event, user_id=u, jti=j) for u, j in sessions]
        try:
            if len(requests) > 1 and time.monotonic() >= self._single_until:
                try:
                    batch = qpb.BatchCheckAdmissionRequest(event=event, requests=requests)
                    return list((await self._stub.BatchCheckAdmission(batch, timeout=self.timeout)).responses)
                except grpc.aio.AioRpcError as err:
                    if err.code() != grpc.StatusCode.UNIMPLEMENTED:
                        raise
                    # A waiting room from before BatchCheckAdmission (a rolling upgrade): one
                    # call per check for a while.
                    self._single_until = time.monotonic() + SINGLE_CHECKS_FOR
            return list(await asyncio.gather(
                *(self._stub.CheckAdmission(r, timeout=self.timeout) for r in requests)))
        except grpc.aio.AioRpcError as err:
            if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise AdmissionUnavailable(err.code().name) from None
            # UNIMPLEMENTED, NOT_FOUND, PERMISSION_DENIED, ...: fail closed
            log.warning("the waiting room refused the admission check; not admitted",
                        extra={"event": event_id, "code": err.code().name})
            return [qpb.CheckAdmissionResponse(active=False)] * len(sessions)

    async def end_session(self, event_id: str, user_id: str, confirmed: bool) -> None:
        reason = (qpb.SESSION_END_REASON_ORDER_CONFIRMED if confirmed
                  else qpb.SESSION_END_REASON_UNSPECIFIED)
        # Before the call: a request meanwhile is let in neither on the cache nor on its token.
        self._cache.pop((event_id, user_id), None)
        now = time.time()
        if len(self._ended) >= self.max_cached:
            self._ended = {k: t for k, t in self._ended.items() if now - t < self.cache_seconds}
        self._ended[(event_id, user_id)] = now
        try:
            await self._stub.EndSession(
                qpb.EndSessionRequest(event=f"events/{event_id}", user_id=user_id, reason=reason),
                timeout=self.timeout)
        except grpc.aio.AioRpcError as err:
            log.warning("EndSession failed; the session ends with its TTL",
                        extra={"event": event_id, "code": err.code().name})

    async def close(self) -> None:
        await self._channel.close()


class StaticAdmission:
    """A fake for tests: active unless the (event, user, jti) was revoked, or all inactive."""

    def __init__(self, active: bool = True) -> None:
        self.active = active
        self.revoked: set[tuple[str, str, str]] = set()
        self.calls = 0
        self.ended: list[tuple[str, str, bool]] = []

    async def is_active(self, event_id: str, user_id: str, jti: str,
                        issued_at: int | None = None) -> bool:
        self.calls += 1
        return self.active and (event_id, user_id, jti) not in self.revoked

    async def end_session(self, event_id: str, user_id: str, confirmed: bool) -> None:
        self.ended.append((event_id, user_id, confirmed))

