"""Payment's call to booking: the order to pay, read over gRPC (GetOrderForPayment, internal)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc
from ticketping.booking.v1 import booking_service_pb2 as bpb
from ticketping.booking.v1 import booking_service_pb2_grpc as bpb_grpc

from meshkit.channels import client_channel
from meshkit.errors import DomainError, NotFound

from ..domain.model import Money


class BookingUnavailable(DomainError):
    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, detail: str) -> None:
        super().__init__("BOOKING_UNAVAILABLE", f"the order could not be read from booking: {detail}")


@dataclass(frozen=True)
class OrderView:
    order_id: uuid.UUID
    user_id: str
    state: str  # booking's OrderState name without the prefix, e.g. "PENDING_PAYMENT"
    amount: Money
    hold: str
    expire_time: datetime | None


class BookingClient:
    def __init__(self, address: str, *, timeout: float = 2.0) -> None:
        self._channel = client_channel(address)
        self._stub = bpb_grpc.BookingServiceStub(self._channel)
        self.timeout = timeout

    async def order(self, order_id: uuid.UUID) -> OrderView:
        name = f"orders/{order_id}"
        try:
            o = await self._stub.GetOrderForPayment(bpb.GetOrderForPaymentRequest(order=name),
                                                    timeout=self.timeout)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound("ORDER_NOT_FOUND", f"{name} not found", metadata={"order": name}) from None
            raise BookingUnavailable(err.code().name) from None
        return OrderView(
            order_id=order_id, user_id=o.user.removeprefix("users/"),
            state=bpb.OrderState.Name(o.state).removeprefix("ORDER_STATE_"),
            amount=Money(o.amount.currency_code, o.amount.units, o.amount.nanos), hold=o.hold,
            expire_time=o.expire_time.ToDatetime(tzinfo=UTC)
            if o.HasField("expire_time") else None)

    async def close(self) -> None:
        await self._channel.close()
