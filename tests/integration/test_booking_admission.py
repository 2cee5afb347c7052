"""The admission check against a real gRPC QueueService (fakes of the waiting room's answers).

While svc_queue answers UNIMPLEMENTED (not built yet), booking fails closed: 403 NOT_ADMITTED.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from google.protobuf.timestamp_pb2 import Timestamp
from ticketping.queue.v1 import queue_service_pb2 as qpb
from ticketping.queue.v1 import queue_service_pb2_grpc as qpb_grpc

from svc_booking.adapters.admission import AdmissionUnavailable, QueueAdmission

pytestmark = pytest.mark.integration


class ActiveFor(qpb_grpc.QueueServiceServicer):
    """Says active for one (event, user, jti) only; records the calls."""

    def __init__(self, event: str, user: str, jti: str) -> None:
        self.want = (event, user, jti)
        self.calls: list[tuple[str, str, str]] = []

    async def CheckAdmission(self, request: qpb.CheckAdmissionRequest, context: object
                             ) -> qpb.CheckAdmissionResponse:
        got = (request.event, request.user_id, request.jti)
        self.calls.append(got)
        if got == self.want:
            return qpb.CheckAdmissionResponse(active=True, expire_time=Timestamp(seconds=2_000_000_000))
        return qpb.CheckAdmissionResponse(active=False)

    async def EndSession(self, request: qpb.EndSessionRequest, context: object
                         ) -> qpb.EndSessionResponse:
        self.calls.append(("end", request.event, request.user_id, request.reason))  # type: ignore[arg-type]
        return qpb.EndSessionResponse(ended=True)


async def serve(servicer: qpb_grpc.QueueServiceServicer) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    qpb_grpc.add_QueueServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest_asyncio.fixture(loop_scope="session")
async def unbuilt_queue() -> AsyncIterator[str]:
    server, addr = await serve(qpb_grpc.QueueServiceServicer())  # every method UNIMPLEMENTED
    yield addr
    await server.stop(0)


async def test_unimplemented_queue_means_not_admitted(unbuilt_queue: str) -> None:
    check = QueueAdmission(unbuilt_queue, timeout=1.0)
    try:
        assert await check.is_active("e1", "u1", "j1") is False
        # the notices are best effort: an unbuilt queue does not fail the sale
        await check.end_session("e1", "u1", confirmed=True)
    finally:
        await check.close()


async def test_active_session_passes_and_is_cached_briefly() -> None:
    fake = ActiveFor("events/e1", "u1", "j1")
    server, addr = await serve(fake)
    check = QueueAdmission(addr, timeout=1.0, cache_seconds=30)
    try:
        assert await check.is_active("e1", "u1", "j1") is True
        assert await check.is_active("e1", "u1", "j1") is True
        assert await check.is_active("e1", "u1", "j2") is False
        assert await check.is_active("e1", "u1", "j2") is False
        assert fake.calls == [("events/e1", "u1", "j1"), ("events/e1", "u1", "j2"),
                              ("events/e1", "u1", "j2")]  # only the positive answer is cached
        # an ended session is forgotten at once, not after the cache time
        await check.end_session("e1", "u1", confirmed=True)
        assert fake.calls[-1] == ("end", "events/e1", "u1", qpb.SESSION_END_REASON_ORDER_CONFIRMED)
        fake.want = ("", "", "")
        assert await check.is_active("e1", "u1", "j1") is False
    finally:
        await check.close()
        await server.stop(0)


async def test_unreachable_queue_is_unavailable_not_a_pass() -> None:
    check = QueueAdmission("127.0.0.1:1", timeout=0.3)
    try:
        with pytest.raises(AdmissionUnavailable):
            await check.is_active("e1", "u1", "j1")
    finally:
        await check.close()


async def test_a_waiting_room_without_batches_gets_one_check_per_call() -> None:
    """A waiting room from before BatchCheckAdmission (a rolling upgrade) answers it
    UNIMPLEMENTED: the checks that came together are asked one by one, each gets its own
    answer, and the batch is not tried again for a while."""

    fake = ActiveFor("events/e1", "u1", "j1")
    server, addr = await serve(fake)
    check = QueueAdmission(addr, timeout=1.0, cache_seconds=0)
    try:
        asks = [("u1", "j1"), ("u2", "j1"), ("u1", "j2")] * 4
        got = await asyncio.gather(*(check.is_active("e1", u, j) for u, j in asks))
        assert got == [(u, j) == ("u1", "j1") for u, j in asks]
        first = len(fake.calls)
        assert set(fake.calls) == {("events/e1", u, j) for u, j in asks} and first <= len(asks)
        got = await asyncio.gather(*(check.is_active("e1", u, j) for u, j in asks))
        assert got == [(u, j) == ("u1", "j1") for u, j in asks]
        assert len(fake.calls) > first
    finally:
        await check.close()
        await server.stop(0)


async def test_a_caller_giving_up_spares_the_others_and_an_unreachable_queue_fails_each() -> None:

    class Slow(ActiveFor):
        async def CheckAdmission(self, request: qpb.CheckAdmissionRequest, context: object
                                 ) -> qpb.CheckAdmissionResponse:
            await asyncio.sleep(0.3)
            return await super().CheckAdmission(request, context)

    fake = Slow("events/e1", "u1", "j1")
    server, addr = await serve(fake)
    check = QueueAdmission(addr, timeout=2.0, cache_seconds=0)
    try:
        first = asyncio.create_task(check.is_active("e1", "u0", "j0"))  # a batch of one, under way
        await asyncio.sleep(0.05)
        waiting = [asyncio.create_task(check.is_active("e1", "u1", "j1")) for _ in range(3)]
        await asyncio.sleep(0.05)
        waiting[0].cancel()  # a caller gives up: the others sharing its answer still get it
        assert await first is False
        assert [await w for w in waiting[1:]] == [True, True]
        assert waiting[0].cancelled()
        assert fake.calls == [("events/e1", "u0", "j0"), ("events/e1", "u1", "j1")]  # asked once
    finally:
        await check.close()
        await server.stop(0)

    gone = QueueAdmission("127.0.0.1:1", timeout=0.3)
    try:
        answers = await asyncio.gather(*(gone.is_active("e1", f"u{i}", "j") for i in range(5)),
                                       return_exceptions=True)
        assert all(isinstance(a, AdmissionUnavailable) for a in answers)
    finally:
        await gone.close()
