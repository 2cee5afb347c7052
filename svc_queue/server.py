"""QueueService: translates proto ⇄ domain and domain errors ⇄ status codes.

The caller comes from the edge as metadata (`x-user-id`, `x-user-role`); meshkit's interceptor has
already checked each method's access level (USER, ADMIN, PUBLIC, INTERNAL) before it gets here.
The public room status answers `cache-control: public, max-age=1` (the edge caches it for about a
second); everything about one fan answers `cache-control: no-store`.
"""

from __future__ import annotations

from typing import TypeAlias

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from ticketping.queue.v1 import queue_service_pb2 as pb
from ticketping.queue.v1 import queue_service_pb2_grpc as pb_grpc

from meshkit import access
from meshkit.errors import InvalidArgument, Unauthenticated
from meshkit.server import mark_unimplemented

from .domain.room import (
    RoomStatus,
    Ticket,
    event_name,
    parse_event_name,
    parse_queue_name,
    parse_ticket_name,
    require,
    update_paths,
    validate_change,
)
from .service import Queue

Ctx: TypeAlias = grpc.aio.ServicerContext
PUBLIC_STATUS = (("cache-control", "public, max-age=1"),)
# One BatchCheckAdmission's checks at most: one Redis script call runs them all.
MAX_BATCH_CHECKS = 1000

_STATE = {
    "NOT_JOINED": pb.QUEUE_TICKET_STATE_NOT_JOINED,
    "WAITING": pb.QUEUE_TICKET_STATE_WAITING,
    "ACTIVE": pb.QUEUE_TICKET_STATE_ACTIVE,
    "EXPIRED": pb.QUEUE_TICKET_STATE_EXPIRED,
    "LEFT": pb.QUEUE_TICKET_STATE_LEFT,
    "SOLD_OUT": pb.QUEUE_TICKET_STATE_SOLD_OUT,
}


def _user(context: Ctx) -> str:
    user = access.caller(context).user_id
    if user is None:  # the interceptor already refused this; never guess a user
        raise Unauthenticated("UNAUTHENTICATED", "sign in first (no verified user on the request)")
    return user


def _ts(ms: int) -> Timestamp:
    ts = Timestamp()
    ts.FromMilliseconds(ms)
    return ts


def ticket_proto(t: Ticket) -> pb.QueueTicket:
    msg = pb.QueueTicket(
        event=event_name(t.event_id),
        state=_STATE[t.state.value],
        number=t.number,
        position=t.position,
        eta_seconds=t.eta_seconds,
    )
    if t.state.value == "ACTIVE":
        msg.admission_token = t.token
        msg.admission_expire_time.CopyFrom(_ts(t.expire_ms))
    return msg


def queue_proto(s: RoomStatus) -> pb.Queue:
    ttl = Duration()
    ttl.FromMilliseconds(s.session_ttl_ms)
    return pb.Queue(
        name=f"{event_name(s.event_id)}/queue",
        serving_number=s.serving_number,
        waiting_count=s.waiting_count,
        active_count=s.active_count,
        admit_rate_per_second=s.admit_rate_per_second,
        max_active=s.max_active,
        paused=s.paused,
        session_ttl=ttl,
        sold_out=s.sold_out,
        measured_admit_rate_per_second=s.measured_rate,
    )


class QueueServicer(pb_grpc.QueueServiceServicer):
    def __init__(self, queue: Queue) -> None:
        self.queue = queue
        # Every RPC of the contract is served; any added later and not built yet says so.
        mark_unimplemented(self, pb_grpc.QueueServiceServicer, "the waiting-room issue (#5)")

    # -- fans (USER) ------------------------------------------------------------------------

    async def JoinQueue(self, request: pb.JoinQueueRequest, context: Ctx) -> pb.QueueTicket:
        ticket = await self.queue.join(parse_queue_name(request.name), _user(context))
        return ticket_proto(ticket)

    async def GetQueueTicket(self, request: pb.GetQueueTicketRequest, context: Ctx) -> pb.QueueTicket:
        ticket = await self.queue.ticket(parse_ticket_name(request.name), _user(context))
        return ticket_proto(ticket)

    async def LeaveQueue(self, request: pb.LeaveQueueRequest, context: Ctx) -> pb.QueueTicket:
        ticket = await self.queue.leave(parse_queue_name(request.name), _user(context))
        return ticket_proto(ticket)

    # -- the room ---------------------------------------------------------------------------

    async def GetQueue(self, request: pb.GetQueueRequest, context: Ctx) -> pb.Queue:
        status = await self.queue.status(parse_queue_name(request.name))
        await context.send_initial_metadata(PUBLIC_STATUS)
        return queue_proto(status)

    async def UpdateQueue(self, request: pb.UpdateQueueRequest, context: Ctx) -> pb.Queue:
        q = request.queue
        event_id = parse_queue_name(q.name)
        present = {f for f in ("max_active", "admit_rate_per_second", "paused") if q.HasField(f)}
        if q.HasField("session_ttl"):
            present.add("session_ttl")
        change = validate_change(
            update_paths(list(request.update_mask.paths), present),
            max_active=q.max_active, rate=q.admit_rate_per_second, paused=q.paused,
            session_ttl_ms=q.session_ttl.ToMilliseconds(),
            max_session_ttl_ms=self.queue.max_session_ttl_ms,
        )
        status = await self.queue.update(event_id, change)
        return queue_proto(status)

    # -- internal (booking, identity, the edge) ---------------------------------------------

    async def EndSession(self, request: pb.EndSessionRequest, context: Ctx) -> pb.EndSessionResponse:
        event_id = parse_event_name(request.event)
        ended = await self.queue.end_session(
            event_id, require(request.user_id, "user_id"),
            expired=request.reason == pb.SESSION_END_REASON_EXPIRED,
        )
        return pb.EndSessionResponse(ended=ended)

    async def MarkSoldOut(self, request: pb.MarkSoldOutRequest, context: Ctx) -> pb.Queue:
        return queue_proto(await self.queue.mark_sold_out(parse_event_name(request.event)))

    async def CheckAdmission(
        self, request: pb.CheckAdmissionRequest, context: Ctx
    ) -> pb.CheckAdmissionResponse:
        event_id = parse_event_name(request.event)
        (answer,) = await self._check(
            event_id, [(require(request.user_id, "user_id"), require(request.jti, "jti"))])
        return answer

    async def BatchCheckAdmission(
        self, request: pb.BatchCheckAdmissionRequest, context: Ctx
    ) -> pb.BatchCheckAdmissionResponse:
        event_id = parse_event_name(request.event)
        if not request.requests:
            raise InvalidArgument("MISSING_FIELD", "requests is required", metadata={"field": "requests"})
        if len(request.requests) > MAX_BATCH_CHECKS:
            raise InvalidArgument("TOO_MANY_REQUESTS", f"at most {MAX_BATCH_CHECKS} checks in one batch",
                                  metadata={"field": "requests", "limit": str(MAX_BATCH_CHECKS)})
        sessions = []
        for i, r in enumerate(request.requests):
            if r.event and r.event != request.event:
                raise InvalidArgument("EVENT_MISMATCH", "every check must be for the batch's event",
                                      metadata={"field": f"requests[{i}].event", "event": request.event})
            sessions.append((require(r.user_id, f"requests[{i}].user_id"),
                             require(r.jti, f"requests[{i}].jti")))
        return pb.BatchCheckAdmissionResponse(responses=await self._check(event_id, sessions))

    async def _check(self, event_id: str, sessions: list[tuple[str, str]]) -> list[pb.CheckAdmissionResponse]:
        """Each (user, jti) checked (validated by the caller), in one Redis script."""
        return [pb.CheckAdmissionResponse(active=False) if exp is None
                else pb.CheckAdmissionResponse(active=True, expire_time=_ts(exp))
                for exp in await self.queue.check(event_id, sessions)]

    async def ListOpenQueues(
        self, request: pb.ListOpenQueuesRequest, context: Ctx
    ) -> pb.ListOpenQueuesResponse:
        return pb.ListOpenQueuesResponse(queues=[queue_proto(s) for s in await self.queue.open_rooms()])

    async def GetAdmissionKeys(
        self, request: pb.GetAdmissionKeysRequest, context: Ctx
    ) -> pb.GetAdmissionKeysResponse:
        keys = await self.queue.jwks()
        return pb.GetAdmissionKeysResponse(keys=[pb.JsonWebKey(**k) for k in keys])
