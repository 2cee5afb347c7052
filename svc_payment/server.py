"""PaymentService: translates proto ⇄ domain and domain errors ⇄ status codes."""

from __future__ import annotations

from typing import TypeAlias, cast

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from ticketping.payment.v1 import payment_service_pb2 as pb
from ticketping.payment.v1 import payment_service_pb2_grpc as pb_grpc

from meshkit import access

from .adapters.messages import money
from .adapters.provider import OUTCOMES, Outcome
from .domain import model
from .domain.model import Payment, PaymentState
from .service import Payments

Ctx: TypeAlias = grpc.aio.ServicerContext
OUTCOME_HEADER = "x-sandbox-outcome"

STATE = {
    PaymentState.PENDING: pb.PAYMENT_STATE_PENDING,
    PaymentState.SUCCEEDED: pb.PAYMENT_STATE_SUCCEEDED,
    PaymentState.FAILED: pb.PAYMENT_STATE_FAILED,
    PaymentState.REFUNDED: pb.PAYMENT_STATE_REFUNDED,
    PaymentState.CANCELLED: pb.PAYMENT_STATE_CANCELLED,
}


def _ts(t: object) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(t)  # type: ignore[arg-type]
    return out


def payment_to_proto(p: Payment) -> pb.Payment:
    return pb.Payment(name=p.name, order=p.order, state=STATE[p.state], amount=money(p.amount),
                      provider_reference=p.provider_reference, provider=p.provider,
                      user=f"users/{p.user_id}", failure_reason=p.failure_reason,
                      create_time=_ts(p.create_time), update_time=_ts(p.update_time))


class PaymentServicer(pb_grpc.PaymentServiceServicer):
    def __init__(self, payments: Payments, *, outcome_header: bool = False) -> None:
        self.payments = payments
        self.outcome_header = outcome_header

    async def CreatePayment(self, request: pb.CreatePaymentRequest, context: Ctx) -> pb.Payment:
        order_id = model.parse_order_name(request.order)
        request_id = model.parse_request_id(request.request_id)
        outcome: Outcome | None = None
        if self.outcome_header:
            wanted = access.single_value(context, OUTCOME_HEADER)
            if wanted in OUTCOMES:
                outcome = cast(Outcome, wanted)
        p = await self.payments.create_payment(access.signed_in_user(context), order_id, request_id, outcome)
        return payment_to_proto(p)

    async def GetPayment(self, request: pb.GetPaymentRequest, context: Ctx) -> pb.Payment:
        user = access.signed_in_user(context)
        p = await self.payments.get_payment(user, model.parse_payment_name(request.name))
        return payment_to_proto(p)

    async def HandleWebhook(self, request: pb.HandleWebhookRequest, context: Ctx) -> pb.HandleWebhookResponse:
        signature = access.single_value(context, model.SIGNATURE_HEADER)
        p, _ = await self.payments.handle_webhook(request.http_body.data, signature)
        return pb.HandleWebhookResponse(payment=p.name, state=STATE[p.state])

    async def RefundPayment(self, request: pb.RefundPaymentRequest, context: Ctx) -> pb.Payment:
        model.parse_request_id(request.request_id)
        p = await self.payments.refund_payment(model.parse_payment_name(request.name),
                                               request.reason or "REFUND_REQUESTED")
        return payment_to_proto(p)
