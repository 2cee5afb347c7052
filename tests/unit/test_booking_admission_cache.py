"""svc_booking's QueueAdmission cache: a positive answer is kept for cache_seconds, never past the
session's own expiry (the real queue behind it: tests/integration/test_queue_rooms.py)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from ticketping.queue.v1 import queue_service_pb2 as qpb

from svc_booking.adapters.admission import QueueAdmission


class FakeQueue:
    def __init__(self, session_left: float) -> None:
        self.session_left = session_left
        self.calls = 0

    async def CheckAdmission(self, request: qpb.CheckAdmissionRequest, **_: Any) -> Any:  # noqa: N802
        self.calls += 1
        ends = Timestamp()
        ends.FromMicroseconds(int((time.time() + self.session_left) * 1e6))
        return qpb.CheckAdmissionResponse(active=True, expire_time=ends)


async def _admission(queue: FakeQueue, cache_seconds: float) -> QueueAdmission:
    admission = QueueAdmission("127.0.0.1:1", cache_seconds=cache_seconds)
    admission._stub = queue  # type: ignore[assignment]
    return admission


async def test_an_active_answer_is_kept_for_the_cache_time() -> None:
    queue = FakeQueue(session_left=300)
    admission = await _admission(queue, cache_seconds=0.3)
    try:
        assert await admission.is_active("e", "u", "j") and await admission.is_active("e", "u", "j")
        assert queue.calls == 1
        await asyncio.sleep(0.35)
        assert await admission.is_active("e", "u", "j")
        assert queue.calls == 2
    finally:
        await admission.close()


async def test_a_session_ending_sooner_than_the_cache_time_is_asked_again_once_ended() -> None:
    queue = FakeQueue(session_left=0.3)
    admission = await _admission(queue, cache_seconds=60)
    try:
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
    finally:
        await admission.close()
