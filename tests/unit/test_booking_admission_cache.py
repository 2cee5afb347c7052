"""svc_booking's QueueAdmission cache: a positive answer is kept for cache_seconds, never past the
session's own expiry, and a token issued within cache_seconds is such an answer (the real queue
behind it: tests/integration/test_queue_rooms.py)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from ticketping.queue.v1 import queue_service_pb2 as qpb

from svc_booking.adapters.admission import QueueAdmission


class FakeQueue:
    def __init__(self, session_left: float) -> None:
        self.session_left = session_left
        self.calls = 0
        self.ended: list[tuple[str, str]] = []

    async def CheckAdmission(self, request: qpb.CheckAdmissionRequest, **_: Any) -> Any:  # noqa: N802
        self.calls += 1
        ends = Timestamp()
        ends.FromMicroseconds(int((time.time() + self.session_left) * 1e6))
        return qpb.CheckAdmissionResponse(active=True, expire_time=ends)

    async def EndSession(self, request: qpb.EndSessionRequest, **_: Any) -> Any:  # noqa: N802
        self.ended.append((request.event.removeprefix("events/"), request.user_id))
        return qpb.EndSessionResponse()


@contextlib.asynccontextmanager
async def _admission(queue: FakeQueue, cache_seconds: float) -> AsyncIterator[QueueAdmission]:
    """A QueueAdmission that asks `queue`, closed when the block ends."""
    admission = QueueAdmission("127.0.0.1:1", cache_seconds=cache_seconds)
    admission._stub = queue  # type: ignore[assignment]
    try:
        yield admission
    finally:
        await admission.close()


async def test_an_active_answer_is_kept_for_the_cache_time() -> None:
    queue = FakeQueue(session_left=300)
    async with _admission(queue, cache_seconds=0.3) as admission:
        assert await admission.is_active("e", "u", "j") and await admission.is_active("e", "u", "j")
        assert queue.calls == 1
        await asyncio.sleep(0.35)
        assert await admission.is_active("e", "u", "j")
        assert queue.calls == 2


async def test_a_session_ending_sooner_than_the_cache_time_is_asked_again_once_ended() -> None:
    queue = FakeQueue(session_left=0.3)
    async with _admission(queue, cache_seconds=60) as admission:
        assert await admission.is_active("e", "u", "j")
        assert await admission.is_active("e", "u", "j")
        assert queue.calls == 1
        await asyncio.sleep(0.35)  # the session's end has passed: its word no longer holds
        assert await admission.is_active("e", "u", "j")
        assert queue.calls == 2
        queue.session_left = -1  # an answer for a session already over is not kept at all
        admission._cache.clear()
        for _ in range(2):
            assert await admission.is_active("e", "u", "j")
        assert queue.calls == 4


async def test_a_token_issued_within_the_cache_time_stands_for_the_answer() -> None:
    """The queue signs the token when it claims the session: for the cache time after its iat,
    the token is a positive answer as fresh as a cached one, and nobody is asked."""
    queue = FakeQueue(session_left=300)
    async with _admission(queue, cache_seconds=2) as admission:
        now = int(time.time())
        assert await admission.is_active("e", "u", "j", issued_at=now)
        assert await admission.is_active("e", "u", "j", issued_at=now - 1)
        assert queue.calls == 0
        assert await admission.is_active("e", "u2", "j", issued_at=now - 3)  # too old: asked
        assert queue.calls == 1
        assert await admission.is_active("e", "u3", "j", issued_at=now + 5)  # clocks disagree
        assert queue.calls == 2
        assert await admission.is_active("e", "u4", "j")  # no iat passed: asked
        assert queue.calls == 3


async def test_a_session_ended_here_is_not_let_in_on_an_earlier_token() -> None:
    queue = FakeQueue(session_left=300)
    async with _admission(queue, cache_seconds=2) as admission:
        issued = int(time.time())
        await admission.end_session("e", "u", confirmed=False)
        assert queue.ended == [("e", "u")]
        assert await admission.is_active("e", "u", "j", issued_at=issued)  # the fake still says yes
        assert queue.calls == 1  # but it was asked
        assert await admission.is_active("e", "other", "j", issued_at=issued)  # another fan: fresh
        assert queue.calls == 1


async def test_no_cache_time_means_every_token_is_checked() -> None:
    queue = FakeQueue(session_left=300)
    async with _admission(queue, cache_seconds=0) as admission:
        now = int(time.time())
        for issued in (now, now + 1):
            assert await admission.is_active("e", "u", "j", issued_at=issued)
        assert queue.calls == 2


async def test_an_answer_asked_before_this_replica_ended_the_session_is_not_kept() -> None:
    """A check under way (or waiting for the batch before it) when this replica ends the
    session may bring back the room's "active" from before the end: it answers the request
    that asked, but is not kept for the next one."""
    queue = FakeQueue(session_left=300)
    gate = asyncio.Event()
    asked = queue.CheckAdmission

    async def slow(request: qpb.CheckAdmissionRequest, **kw: Any) -> Any:
        await gate.wait()
        return await asked(request, **kw)

    queue.CheckAdmission = slow  # type: ignore[method-assign]
    async with _admission(queue, cache_seconds=60) as admission:
        check = asyncio.create_task(admission.is_active("e", "u", "j"))
        await asyncio.sleep(0.01)
        await admission.end_session("e", "u", confirmed=True)
        gate.set()
        assert await check  # the room's answer, from before the end
        queue.CheckAdmission = asked  # type: ignore[method-assign]
        assert await admission.is_active("e", "u", "j")
        assert queue.calls == 2  # asked again: the first answer was not kept
