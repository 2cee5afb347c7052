"""BookingService: translates proto ⇄ domain and domain errors ⇄ status codes.

ADMITTED methods also check the admission claims the edge verified and passed as metadata
(``x-admission-sub``, ``x-admission-event``, ``x-admission-jti``, ``x-admission-iat``): the edge
checks the token's signature only, so here the claims must name this fan (sub = x-user-id) and
the event the request is about, and the waiting room must say the session is still active (a
token issued within the last second or two says so itself: adapters/admission.py).
"""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime, timedelta
from typing import TypeAlias

import grpc
from google.protobuf import empty_pb2
from psycopg_pool import AsyncConnectionPool
from ticketping.booking.v1 import booking_service_pb2 as pb
from ticketping.booking.v1 import booking_service_pb2_grpc as pb_grpc

from meshkit import access
from meshkit.errors import InvalidArgument, PermissionDenied

from .adapters.admission import AdmissionChecker
from .adapters.messages import money, ts
from .domain import model
from .domain.model import Order
from .service import Booking

Ctx: TypeAlias = grpc.aio.ServicerContext
SEATS_CACHE_CONTROL = (("cache-control", "public, max-age=1"),)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ADMISSION_SUB, ADMISSION_EVENT, ADMISSION_JTI, ADMISSION_IAT = access.ADMISSION_CLAIM_HEADERS
# WaitOrder: how long when the caller does not say, and at most (the edge's route for it allows
# a little more: edge/config.py LONG_POLLS).
WAIT_DEFAULT = timedelta(seconds=20)
WAIT_MAX = timedelta(seconds=30)
# A call with a deadline is answered this much before it, so the answer is not cut off.
DEADLINE_MARGIN_SECONDS = 0.25

_STATUS = {"A": pb.SEAT_STATUS_AVAILABLE, "S": pb.SEAT_STATUS_SOLD}
_STATUS_CHAR = {"A": "A", "S": "S"}
_ORDER_STATE = {
    model.OrderState.PENDING_PAYMENT: pb.ORDER_STATE_PENDING_PAYMENT,
    model.OrderState.CONFIRMED: pb.ORDER_STATE_CONFIRMED,
    model.OrderState.CANCELLED: pb.ORDER_STATE_CANCELLED,
    model.OrderState.EXPIRED: pb.ORDER_STATE_EXPIRED,
}


def order_to_proto(o: Order) -> pb.Order:
    return pb.Order(
        name=o.name, state=_ORDER_STATE[o.state], amount=money(o.amount), seat_ids=o.seat_ids,
        event=model.event_name(o.event_id), hold=model.hold_name(o.event_id, o.hold_id),
        user=f"users/{o.user_id}", expire_time=ts(o.expire_time), payment=o.payment,
        create_time=ts(o.create_time), update_time=ts(o.update_time))


def _offset_token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"o:{offset}".encode()).decode()


def _parse_offset(token: str) -> int:
    if not token:
        return 0
    try:
        raw = base64.urlsafe_b64decode(token.encode()).decode()
        if raw.startswith("o:") and int(raw[2:]) >= 0:
            return int(raw[2:])
    except (ValueError, UnicodeDecodeError):
        pass
    raise InvalidArgument("INVALID_PAGE_TOKEN", "page_token is not valid",
                          metadata={"field": "page_token"})


def _issued_at(value: str) -> int | None:
    """The admission token's ``iat`` as the edge passed it (decimal seconds), or None."""
    try:
        return int(value) if value else None
    except ValueError:
        return None


class BookingServicer(pb_grpc.BookingServiceServicer):
    def __init__(self, booking: Booking, admission: AdmissionChecker,
                 pool: AsyncConnectionPool | None = None) -> None:
        self.booking = booking
        self.admission = admission
        self.pool = pool

    # --- admission -------------------------------------------------------------------------------

    async def _admit(self, context: Ctx, event_id: str) -> str:
        """The caller's user id once their admission names them, this event, and is active."""
        user = access.signed_in_user(context)
        sub, event, jti = (access.single_value(context, h)
                           for h in (ADMISSION_SUB, ADMISSION_EVENT, ADMISSION_JTI))
        if not (sub and event and jti):
            raise PermissionDenied("NOT_ADMITTED", "an admission token for this event is needed")
        if sub != user:
            raise PermissionDenied("ADMISSION_WRONG_USER",
                                   "the admission token was issued to another fan")
        if model.normalize_event(event) != event_id:
            raise PermissionDenied("ADMISSION_WRONG_EVENT",
                                   "the admission token is for another event",
                                   metadata={"admission_event": event,
                                             "event": model.event_name(event_id)})
        if not await self.admission.is_active(event_id, user, jti,
                                              _issued_at(access.single_value(context, ADMISSION_IAT))):
            raise PermissionDenied("NOT_ADMITTED", "the admission is not (or no longer) active",
                                   metadata={"event": model.event_name(event_id)})
        return user

    # --- seats -----------------------------------------------------------------------------------

    async def ListSeats(self, request: pb.ListSeatsRequest, context: Ctx) -> pb.ListSeatsResponse:
        event_id = model.parse_event_name(request.parent)
        layout, values = await self.booking.seat_statuses(event_id)
        sections = layout.seat_map.sections
        if request.section:
            sections = tuple(s for s in sections if s.name == request.section)
        size = max(request.page_size, 0)
        offset = _parse_offset(request.page_token)
        out = pb.ListSeatsResponse()
        if request.view == pb.SEAT_VIEW_COMPACT:
            chosen = sections[offset: offset + size] if size else sections[offset:]
            for s in chosen:
                chars = []
                for row in range(1, s.rows + 1):
                    prefix = f"{s.name}-{row}-"
                    for n in range(1, s.seats_per_row + 1):
                        v = values.get(prefix + str(n), "A")
                        chars.append(_STATUS_CHAR.get(v, "H"))
                out.sections.add(section=s.name, tier=s.tier, rows=s.rows,
                                 seats_per_row=s.seats_per_row, statuses="".join(chars))
            if size and offset + size < len(sections):
                out.next_page_token = _offset_token(offset + size)
        else:
            want = request.status
            index = 0
            for s in sections:
                for row in range(1, s.rows + 1):
                    for n in range(1, s.seats_per_row + 1):
                        sid = f"{s.name}-{row}-{n}"
                        status = _STATUS.get(values.get(sid, "A"), pb.SEAT_STATUS_HELD)
                        if want and status != want:
                            continue
                        if index >= offset and (not size or index < offset + size):
                            out.seats.add(seat_id=sid, section=s.name, row=row, number=n,
                                          tier=s.tier, status=status)
                        index += 1
            if size and index > offset + size:
                out.next_page_token = _offset_token(offset + size)
        await context.send_initial_metadata(SEATS_CACHE_CONTROL)
        return out

    # --- holds -----------------------------------------------------------------------------------

    async def CreateHold(self, request: pb.CreateHoldRequest, context: Ctx) -> pb.Hold:
        event_id = model.parse_event_name(request.parent)
        request_id = model.parse_request_id(request.request_id)
        user = await self._admit(context, event_id)
        priced = await self.booking.create_hold(user, event_id, list(request.seat_ids), request_id,
                                                quantity=request.quantity, section=request.section)
        h = priced.hold
        return pb.Hold(name=h.name, seat_ids=h.seat_ids, expire_time=ts(h.expire_time),
                       create_time=ts(h.create_time), amount=money(priced.amount))

    async def DeleteHold(self, request: pb.DeleteHoldRequest, context: Ctx) -> empty_pb2.Empty:
        event_id, hold_id = model.parse_hold_name(request.name)
        user = await self._admit(context, event_id)
        await self.booking.delete_hold(user, event_id, hold_id)
        return empty_pb2.Empty()

    # --- orders ----------------------------------------------------------------------------------

    async def CreateOrder(self, request: pb.CreateOrderRequest, context: Ctx) -> pb.Order:
        event_id, hold_id = model.parse_hold_name(request.hold, "hold")
        request_id = model.parse_request_id(request.request_id)
        # The admission must name the hold's event: the name's here, and create_order answers
        # NOT_FOUND unless the stored hold is this fan's, in this event.
        user = await self._admit(context, event_id)
        order = await self.booking.create_order(user, event_id, hold_id, request_id)
        return order_to_proto(order)

    async def GetOrder(self, request: pb.GetOrderRequest, context: Ctx) -> pb.Order:
        user = access.signed_in_user(context)
        order = await self.booking.get_order(user, model.parse_order_name(request.name))
        return order_to_proto(order)

    async def WaitOrder(self, request: pb.WaitOrderRequest, context: Ctx) -> pb.Order:
        user = access.signed_in_user(context)
        order_id = model.parse_order_name(request.name)
        wait = request.timeout.ToTimedelta() if request.HasField("timeout") else WAIT_DEFAULT
        if not timedelta(0) <= wait <= WAIT_MAX:
            raise InvalidArgument("INVALID_TIMEOUT",
                                  f"timeout must be between 0s and {WAIT_MAX.total_seconds():g}s",
                                  metadata={"field": "timeout", "max": f"{WAIT_MAX.total_seconds():g}s"})
        seconds = wait.total_seconds()
        remaining = context.time_remaining()
        if remaining is not None:
            seconds = max(0.0, min(seconds, remaining - DEADLINE_MARGIN_SECONDS))
        return order_to_proto(await self.booking.wait_order(user, order_id, seconds))

    async def ListOrders(self, request: pb.ListOrdersRequest, context: Ctx) -> pb.ListOrdersResponse:
        size = request.page_size or 20
        if size < 0:
            raise InvalidArgument("INVALID_PAGE_SIZE", "page_size must not be negative",
                                  metadata={"field": "page_size"})
        size = min(size, 100)
        after = None
        if request.page_token:
            try:
                raw = base64.urlsafe_b64decode(request.page_token.encode()).decode()
                micros, oid = raw.split(":", 1)
                after = (EPOCH + timedelta(microseconds=int(micros)), uuid.UUID(oid))
            except ValueError:
                raise InvalidArgument("INVALID_PAGE_TOKEN", "page_token is not valid",
                                      metadata={"field": "page_token"}) from None
        orders = await self.booking.list_orders(access.signed_in_user(context), after, size + 1)
        out = pb.ListOrdersResponse(orders=[order_to_proto(o) for o in orders[:size]])
        if len(orders) > size:
            last = orders[size - 1]
            stamp = (last.create_time - EPOCH) // timedelta(microseconds=1)
            out.next_page_token = base64.urlsafe_b64encode(
                f"{stamp}:{last.order_id}".encode()).decode()
        return out

    async def CancelOrder(self, request: pb.CancelOrderRequest, context: Ctx) -> pb.Order:
        user = access.signed_in_user(context)
        order = await self.booking.cancel_order(user, model.parse_order_name(request.name))
        return order_to_proto(order)

    async def GetOrderForPayment(self, request: pb.GetOrderForPaymentRequest, context: Ctx) -> pb.Order:
        order = await self.booking.current_order(model.parse_order_name(request.order, "order"))
        return order_to_proto(order)

    async def ConfirmOrder(self, request: pb.ConfirmOrderRequest, context: Ctx) -> pb.Order:
        order_id = model.parse_order_name(request.order, "order")
        prefix, _, pid = request.payment.partition("/")
        if prefix != "payments" or not pid:
            raise InvalidArgument("INVALID_NAME", "payment must be payments/{payment}",
                                  metadata={"field": "payment"})
        return order_to_proto(await self.booking.confirm_order(order_id, request.payment))

    async def ExpireOrder(self, request: pb.ExpireOrderRequest, context: Ctx) -> pb.Order:
        order = await self.booking.expire_order(model.parse_order_name(request.order, "order"))
        return order_to_proto(order)
