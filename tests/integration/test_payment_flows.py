"""Payment and booking together: real PostgreSQL (one database each) and Kafka, both services
in-process over gRPC, the sandbox provider calling back through a tiny HTTP→gRPC stand-in for the
edge (headers become metadata, the body goes byte for byte into HttpBody, like Envoy's transcoder).

The flows go through the outboxes and the consumers on fresh topics: PaymentSucceeded → booking
confirms (seats SOLD); PaymentFailed → order cancelled (seats free); OrderExpired → a pending
payment is cancelled and a late success refunded; a success booking cannot confirm → order EXPIRED,
payment REFUNDED.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import psycopg
import pytest
import pytest_asyncio
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from google.api import httpbody_pb2
from ticketping.booking.v1 import booking_service_pb2 as bpb
from ticketping.booking.v1 import booking_service_pb2_grpc as bpb_grpc
from ticketping.events.v1 import events_pb2 as ev
from ticketping.payment.v1 import payment_service_pb2 as pb
from ticketping.payment.v1 import payment_service_pb2_grpc as pb_grpc

from devstack.layout import Layout
from meshkit.db import autocommit
from meshkit.errors import error_info
from meshkit.events import EventEnvelope, new_envelope
from meshkit.server import start
from svc_booking.adapters.admission import StaticAdmission
from svc_booking.bootstrap import Wired as BookingWired
from svc_booking.bootstrap import wire as wire_booking
from svc_booking.config import Settings as BookingSettings
from svc_payment.adapters import postgres as payment_db
from svc_payment.bootstrap import Wired as PaymentWired
from svc_payment.bootstrap import wire as wire_payment
from svc_payment.config import Settings as PaymentSettings
from svc_payment.domain import model

from ..support import fresh_database, read_http_request
from .test_booking_support import Clock, fan, new_event

pytestmark = pytest.mark.integration

SECRET = "test-webhook-secret-0123456789"
STATUS_HTTP = {grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.INVALID_ARGUMENT: 400,
               grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.FAILED_PRECONDITION: 412}


# Events a test had parked on payment's DLQ on purpose (the last test counts the rest).
PARKED_ON_PURPOSE: list[str] = []


# --- fixtures ------------------------------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def topics(kafka_bootstrap: str) -> AsyncIterator[dict[str, str]]:
    tag = uuid.uuid4().hex[:8]
    names = {k: f"test.{k}.{tag}.v1" for k in ("catalog", "booking", "payment")}
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        made = [NewTopic(t, 6, 1) for t in names.values()] + [NewTopic(f"{t}.dlq", 1, 1)
                                                               for t in names.values()]
        await admin.create_topics(made)
        yield names
        await admin.delete_topics([t.name for t in made])
    finally:
        await admin.close()


@pytest.fixture(scope="module")
def payment_dsn(infra: Layout) -> Any:
    with fresh_database(infra) as dsn:
        yield dsn


@pytest.fixture(scope="module")
def clock() -> Clock:
    return Clock()


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def booking(pg_dsn: str, redis_url: str, kafka_bootstrap: str, topics: dict[str, str],
                  clock: Clock) -> AsyncIterator[BookingWired]:
    settings = BookingSettings(
        grpc_port=0, postgres_dsn=pg_dsn, redis_url=redis_url, kafka_bootstrap=kafka_bootstrap,
        queue_addr="127.0.0.1:1", seats_cache_seconds=0, catalog_topic=topics["catalog"],
        booking_topic=topics["booking"], payment_topic=topics["payment"],
        consumer_group=f"booking-{uuid.uuid4().hex[:6]}", run_sweeper=False)
    w = await wire_booking(settings, admission=StaticAdmission())
    w.booking.clock = clock
    await start(w.app)
    yield w
    await w.app.stop(1.0)


class FakeEdge:
    """POST /v1/payments/webhook → PaymentService.HandleWebhook, as the edge routes it."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.PaymentServiceStub(self.channel)
        self.answers: list[int] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1/payments/webhook"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            headers, body = await read_http_request(reader)
            md = [(k, v) for k, v in headers.items() if k == model.SIGNATURE_HEADER]
            try:
                resp = await self.stub.HandleWebhook(pb.HandleWebhookRequest(
                    http_body=httpbody_pb2.HttpBody(content_type=headers.get("content-type", ""),
                                                    data=body)), metadata=md)
                status, out = 200, json.dumps({"payment": resp.payment}).encode()
            except grpc.aio.AioRpcError as err:
                status, out = STATUS_HTTP.get(err.code(), 503), (err.details() or "").encode()
            self.answers.append(status)
            writer.write(f"HTTP/1.1 {status} X\r\ncontent-length: {len(out)}\r\nconnection: close\r\n"
                         "content-type: application/json\r\n\r\n".encode() + out)
            await writer.drain()
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        await self.channel.close()


@pytest.fixture(scope="module")
def payment_clock() -> Clock:
    return Clock()


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def payment(payment_dsn: str, kafka_bootstrap: str, topics: dict[str, str], booking: BookingWired,
                  payment_clock: Clock) -> AsyncIterator[tuple[PaymentWired, FakeEdge]]:
    # The edge needs the payment port and the payment needs the edge's URL: bind the edge's
    # socket first, then point the edge's channel at the payment server once it is up.
    edge = FakeEdge(0)
    url = await edge.start()
    settings = PaymentSettings(
        grpc_port=0, postgres_dsn=payment_dsn, kafka_bootstrap=kafka_bootstrap,
        booking_addr=f"127.0.0.1:{booking.app.port}", payment_webhook_secret=SECRET,
        booking_topic=topics["booking"], payment_topic=topics["payment"],
        consumer_group=f"payment-{uuid.uuid4().hex[:6]}", webhook_url=url,
        sandbox_delay_seconds=0.2)
    w = await wire_payment(settings)
    w.payments.clock = payment_clock
    await start(w.app)
    await edge.channel.close()
    edge.channel = grpc.aio.insecure_channel(f"127.0.0.1:{w.app.port}")
    edge.stub = pb_grpc.PaymentServiceStub(edge.channel)
    yield w, edge
    await w.app.stop(1.0)
    await edge.stop()


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def stubs(booking: BookingWired, payment: tuple[PaymentWired, FakeEdge]
                ) -> AsyncIterator[tuple[bpb_grpc.BookingServiceStub, pb_grpc.PaymentServiceStub]]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{booking.app.port}") as bch, \
            grpc.aio.insecure_channel(f"127.0.0.1:{payment[0].app.port}") as pch:
        yield bpb_grpc.BookingServiceStub(bch), pb_grpc.PaymentServiceStub(pch)


# --- helpers -----------------------------------------------------------------------------------


def rid() -> str:
    return str(uuid.uuid4())


def user() -> str:
    return f"fan-{uuid.uuid4().hex[:8]}"


def me(u: str) -> tuple[tuple[str, str], ...]:
    return (("x-user-id", u), ("x-user-role", "USER"))


async def wait_for(what: str, check: Callable[[], Awaitable[bool]], patience: float = 30.0) -> None:
    deadline = time.monotonic() + patience
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        await asyncio.sleep(0.05)


async def ordered(booking: BookingWired, bstub: bpb_grpc.BookingServiceStub, u: str,
                  seats: tuple[str, ...] = ("A-1-1", "A-1-2")) -> tuple[str, bpb.Order]:
    event_id = await new_event(booking)
    h = await bstub.CreateHold(bpb.CreateHoldRequest(parent=f"events/{event_id}", seat_ids=seats,
                                                     request_id=rid()), metadata=fan(u, event_id))
    o = await bstub.CreateOrder(bpb.CreateOrderRequest(hold=h.name, request_id=rid()),
                                metadata=fan(u, event_id))
    assert o.state == bpb.ORDER_STATE_PENDING_PAYMENT
    return event_id, o


async def awaiting_callback(booking: BookingWired, payment: tuple[PaymentWired, FakeEdge],
                            stubs: tuple[bpb_grpc.BookingServiceStub, pb_grpc.PaymentServiceStub],
                            u: str, seats: tuple[str, ...] = ("A-1-1", "A-1-2"),
                            ) -> tuple[str, bpb.Order, pb.Payment]:
    """An order of these seats and its payment, whose checkout never calls back by itself: the
    test sends the provider's callback."""
    event_id, o = await ordered(booking, stubs[0], u, seats)
    payment[0].provider.plan(o.name, "never")
    p = await stubs[1].CreatePayment(pb.CreatePaymentRequest(order=o.name, request_id=rid()), metadata=me(u))
    return event_id, o, p


async def order_state(bstub: bpb_grpc.BookingServiceStub, o: bpb.Order) -> int:
    return (await bstub.GetOrderForPayment(bpb.GetOrderForPaymentRequest(order=o.name))).state


async def payment_state(pstub: pb_grpc.PaymentServiceStub, p: pb.Payment, u: str) -> int:
    return (await pstub.GetPayment(pb.GetPaymentRequest(name=p.name), metadata=me(u))).state


async def seat_statuses(bstub: bpb_grpc.BookingServiceStub, event_id: str, seats: tuple[str, ...]
                        ) -> set[int]:
    resp = await bstub.ListSeats(bpb.ListSeatsRequest(parent=f"events/{event_id}"))
    return {s.status for s in resp.seats if s.seat_id in seats}


async def count(pool: Any, query: str, *args: Any) -> int:
    """The count a ``SELECT count(*) ...`` query answers."""
    async with pool.connection() as conn:
        row = await (await conn.execute(query, args)).fetchone()
        return int(row[0])


async def outbox_count(pool: Any, key: str, event_type: str) -> int:
    return await count(pool, "SELECT count(*) FROM outbox WHERE key = %s AND headers->>'event_type' = %s",
                       key, event_type)


async def refusal(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    """The call's error: (code, reason, metadata)."""
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call
    info = error_info(exc.value)
    assert info is not None, exc.value
    return exc.value.code(), info.reason, dict(info.metadata)


async def fails(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    code, reason, _ = await refusal(call)
    return code, reason


async def payments_of(pw: PaymentWired, o: bpb.Order) -> int:
    return await count(pw.payments.pool, "SELECT count(*) FROM payments WHERE order_id = %s", order_uuid(o))


def signed(body: bytes, t: int | None = None, secret: str = SECRET) -> tuple[tuple[str, str], ...]:
    stamp = int(time.time()) if t is None else t
    return ((model.SIGNATURE_HEADER, model.sign(secret.encode(), stamp, body)),)


def webhook(body: bytes) -> pb.HandleWebhookRequest:
    return pb.HandleWebhookRequest(http_body=httpbody_pb2.HttpBody(content_type="application/json",
                                                                   data=body))


async def succeeded_then_refunded(pstub: pb_grpc.PaymentServiceStub, p: pb.Payment, u: str,
                                  captured: model.Money) -> None:
    """The provider's signed success for ``p`` makes it SUCCEEDED; then wait until a booking
    event that the money can buy nothing has it REFUNDED."""
    body = model.webhook_body(f"evt_{uuid.uuid4().hex}", model.SUCCEEDED_TYPE, p.provider_reference,
                              captured)
    resp = await pstub.HandleWebhook(webhook(body), metadata=signed(body))
    assert resp.state == pb.PAYMENT_STATE_SUCCEEDED

    async def refunded() -> bool:
        return await payment_state(pstub, p, u) == pb.PAYMENT_STATE_REFUNDED
    await wait_for("payment REFUNDED", refunded)


def order_uuid(o: bpb.Order) -> str:
    return o.name.removeprefix("orders/")


# --- tests -------------------------------------------------------------------------------------


async def test_full_purchase(booking: BookingWired, payment: tuple[PaymentWired, FakeEdge],
                             stubs: tuple[bpb_grpc.BookingServiceStub, pb_grpc.PaymentServiceStub]) -> None:
    bstub, pstub = stubs
    pw, edge = payment
    u = user()
    seats = ("A-1-1", "A-1-2")
    event_id, o = await ordered(booking, bstub, u, seats)
    request_id = rid()
    t0 = time.monotonic()
    p = await pstub.CreatePayment(pb.CreatePaymentRequest(order=o.name, request_id=request_id),
                                  metadata=me(u))
    assert p.state == pb.PAYMENT_STATE_PENDING and p.provider == "sandbox"
    assert p.provider_reference.startswith("sbx_") and p.order == o.name and p.user == f"users/{u}"
    assert (p.amount.currency_code, p.amount.units) == ("KRW", 330000) == (o.amount.currency_code,
                                                                            o.amount.units)
    # the same request id: the first answer; another request id while it is pending: the same payment
    again = await pstub.CreatePayment(pb.CreatePaymentRequest(order=o.name, request_id=request_id),
                                      metadata=me(u))
    other = await pstub.CreatePayment(pb.CreatePaymentRequest(order=o.name, request_id=rid()),
                                      metadata=me(u))
    assert again.name == p.name == other.name
    # another fan can neither pay this order nor see this payment
    stranger = user()
    assert await fails(pstub.CreatePayment(pb.CreatePaymentRequest(order=o.name, request_id=rid()),
                                           metadata=me(stranger))) == (grpc.StatusCode.NOT_FOUND,
                                                                        "ORDER_NOT_FOUND")
    assert await fails(pstub.GetPayment(pb.GetPaymentRequest(name=p.name), metadata=me(stranger))) == (
        grpc.StatusCode.NOT_FOUND, "PAYMENT_NOT_FOUND")
    assert (await fails(pstub.GetPayment(pb.GetPaymentRequest(name=p.name))))[0] == \
        grpc.StatusCode.UNAUTHENTICATED

    async def confirmed() -> bool:
        return await order_state(bstub, o) == bpb.ORDER_STATE_CONFIRMED
    await wait_for("order CONFIRMED", confirmed)
    elapsed = time.monotonic() - t0
    assert await payment_state(pstub, p, u) == pb.PAYMENT_STATE_SUCCEEDED
    assert await seat_statuses(bstub, event_id, seats) == {bpb.SEAT_STATUS_SOLD}
    final = await bstub.GetOrderForPayment(bpb.GetOrderForPaymentRequest(order=o.name))
    assert final.payment == p.name
    assert edge.answers.count(200) >= 1
    assert await outbox_count(booking.booking.pool, order_uuid(o), "order_confirmed") == 1
    # a paid order cannot be paid again
    assert await fails(pstub.CreatePayment(pb.CreatePaymentRequest(order=o.name, request_id=rid()),
                                           metadata=me(u))) == (grpc.StatusCode.FAILED_PRECONDITION,
                                                                 "ORDER_NOT_PAYABLE")
    print(f"create payment → CONFIRMED: {elapsed:.2f}s (sandbox delay 0.2 s)")


async def test_an_order_confirmed_by_its_only_payment_is_passed_over_without_a_transaction(
        booking: BookingWired, payment: tuple[PaymentWired, FakeEdge],
        stubs: tuple[bpb_grpc.BookingServiceStub, pb_grpc.PaymentServiceStub]) -> None:
    """Every purchase ends in OrderConfirmed, which payment handles only to refund the order's
    other payments: with none, it is passed over (no de-duplication mark, no transaction). Once
    the order has another payment, the same event is handled."""
    bstub, pstub = stubs
    pw, _ = payment
    assert pw.consumer is not None
    u = user()
    _, o = await ordered(booking, bstub, u)
    passed_before = pw.consumer.passed_total
    p = await pstub.CreatePayment(pb.CreatePaymentRequest(order=o.name, request_id=rid()), metadata=me(u))

    async def confirmed() -> bool:
        return await order_state(bstub, o) == bpb.ORDER_STATE_CONFIRMED
    await wait_for("order CONFIRMED", confirmed)
    async with booking.booking.pool.connection() as conn:
        row = await (await conn.execute(
            "SELECT event_id, payload FROM outbox WHERE key = %s AND headers->>'event_type' = %s",
            (order_uuid(o), "order_confirmed"))).fetchone()
    event_id, env = row[0], EventEnvelope.FromString(row[1])
    assert env.order_confirmed.payment == p.name
    assert await pw.payments.needs_handling(env) is False

    async def passed_over() -> bool:
        return pw.consumer is not None and pw.consumer.passed_total > passed_before
    await wait_for("the consumer passed OrderConfirmed over", passed_over)
    assert await count(pw.payments.pool, "SELECT count(*) FROM processed_events WHERE event_id = %s",
                       event_id) == 0
    assert await payment_state(pstub, p, u) == pb.PAYMENT_STATE_SUCCEEDED  # nothing refunded

    # Another (failed) payment of the order: now the event has something to look at.
    async with pw.payments.pool.connection() as conn:
        await conn.execute(
            "INSERT INTO payments (payment_id, order_id, hold, user_id, state, currency_code, units,"
            " nanos, provider, provider_reference, failure_reason, create_time, update_time, request_id)"
            " SELECT %s, order_id, hold, user_id, 'FAILED', currency_code, units, nanos, provider,"
            " %s, 'DECLINED', create_time, update_time, %s FROM payments WHERE payment_id = %s",
            (uuid.uuid4(), f"sbx_other_{uuid.uuid4().hex}", uuid.uuid4(),
             uuid.UUID(p.name.removeprefix("payments/"))))
    assert await pw.payments.needs_handling(env) is True
    # Events it does not look into are always handled.
    other = EventEnvelope()
    other.CopyFrom(env)
    other.order_expired.order = o.name
    assert await pw.payments.needs_handling(other) is True


async def test_webhook_bad_signature_stale_timestamp_and_replay_change_nothing(
    booking: BookingWired, payment: tuple[PaymentWired, FakeEdge],
    stubs: tuple[bpb_grpc.BookingServiceStub, pb_grpc.PaymentServiceStub],
) -> None:
    bstub, pstub = stubs
    pw, _ = payment
    u = user()
    _, o, p = await awaiting_callback(booking, payment, stubs, u)
    body = model.webhook_body(f"evt_{uuid.uuid4().hex}", model.SUCCEEDED_TYPE, p.provider_reference,
                              model.Money("KRW", 330000))

    async def nothing_changed() -> None:
        assert await payment_state(pstub, p, u) == pb.PAYMENT_STATE_PENDING
        assert await count(pw.payments.pool, "SELECT count(*) FROM provider_events WHERE payment_id = %s",
                           p.name.removeprefix("payments/")) == 0
        assert await outbox_count(pw.payments.pool, order_uuid(o), "payment_succeeded") == 0

    assert await fails(pstub.HandleWebhook(webhook(body), metadata=signed(body, secret="x" * 20))) == (
        grpc.StatusCode.UNAUTHENTICATED, "BAD_SIGNATURE")
    assert await fails(pstub.HandleWebhook(webhook(body + b" "), metadata=signed(body))) == (
        grpc.StatusCode.UNAUTHENTICATED, "BAD_SIGNATURE")
    assert await fails(pstub.HandleWebhook(webhook(body))) == (grpc.StatusCode.UNAUTHENTICATED,
                                                               "BAD_SIGNATURE")
    stale = signed(body, t=int(time.time()) - 301)
    assert await fails(pstub.HandleWebhook(webhook(body), metadata=stale)) == (
        grpc.StatusCode.UNAUTHENTICATED, "STALE_TIMESTAMP")
    await nothing_changed()

    good = signed(body)
    first = await pstub.HandleWebhook(webhook(body), metadata=good)
    assert (first.payment, first.state) == (p.name, pb.PAYMENT_STATE_SUCCEEDED)
    replay = await pstub.HandleWebhook(webhook(body), metadata=good)  # the same callback again
    resent = await pstub.HandleWebhook(webhook(body), metadata=signed(body))  # re-signed later
    assert replay.state == resent.state == pb.PAYMENT_STATE_SUCCEEDED
    # the stale copy of a callback already processed is still refused
    assert (await fails(pstub.HandleWebhook(webhook(body), metadata=stale)))[1] == "STALE_TIMESTAMP"

    async def confirmed() -> bool:
        return await order_state(bstub, o) == bpb.ORDER_STATE_CONFIRMED
    await wait_for("order CONFIRMED", confirmed)
    assert await outbox_count(pw.payments.pool, order_uuid(o), "payment_succeeded") == 1
    await asyncio.sleep(0.5)
    assert await outbox_count(booking.booking.pool, order_uuid(o), "order_confirmed") == 1


async def test_the_replica_that_opened_a_payment_applies_its_callback_without_reading_it_back(
    booking: BookingWired, payment: tuple[PaymentWired, FakeEdge],
    stubs: tuple[bpb_grpc.BookingServiceStub, pb_grpc.PaymentServiceStub], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The callback of a payment this replica just opened applies to the payment as written (no
    read of it); one it no longer keeps (another replica's, or after a restart) is read."""
    _, pstub = stubs
    pw, _ = payment
    reads = 0
    real = payment_db.by_reference

    async def counted(*args: Any, **kw: Any) -> Any:
        nonlocal reads
        reads += 1
        return await real(*args, **kw)
    monkeypatch.setattr(payment_db, "by_reference", counted)
    for kept in (True, False):
        u = user()
        _, o, p = await awaiting_callback(booking, payment, stubs, u)
        if not kept:
            assert pw.payments.opened.take(p.provider_reference) is not None  # as if elsewhere
        reads = 0
        body = model.webhook_body(f"evt_{uuid.uuid4().hex}", model.SUCCEEDED_TYPE, p.provider_reference,
                                  model.Money("KRW", 330000))
        resp = await pstub.HandleWebhook(webhook(body), metadata=signed(body))
        assert resp.state == pb.PAYMENT_STATE_SUCCEEDED
        assert reads == (0 if kept else 1)
        assert await outbox_count(pw.payments.pool, order_uuid(o), "payment_succeeded") == 1


@pytest.mark.parametrize("first", ["success", "decline"])
async def test_racing_callbacks_apply_one_outcome_once(
    first: str, booking: BookingWired, payment: tuple[PaymentWired, FakeEdge],
    stubs: tuple[bpb_grpc.BookingServiceStub, pb_grpc.PaymentServiceStub],
) -> None:
    """The one-statement path of a callback (a pending payment read, then moved if still as read)
    against itself and the transaction that sorts out the rest: one success sent 10 times and a
    decline sent 10 times, all at once. Whichever lands first decides; the other is a no-op or
    a refund, and every callback is recorded once."""
    _, pstub = stubs
    pw, _ = payment
    u = user()
    _, o, p = await awaiting_callback(booking, payment, stubs, u)
    won = model.webhook_body(f"evt_{uuid.uuid4().hex}", model.SUCCEEDED_TYPE, p.provider_reference,
                             model.Money("KRW", 330000))
    lost = model.webhook_body(f"evt_{uuid.uuid4().hex}", model.FAILED_TYPE, p.provider_reference,
                              model.Money("KRW", 330000))
    bodies = (won, lost) if first == "success" else (lost, won)
    answers = await asyncio.gather(*(pstub.HandleWebhook(webhook(b), metadata=signed(b))
                                     for _ in range(10) for b in bodies))
    final = await payment_state(pstub, p, u)
    pid = p.name.removeprefix("payments/")
    assert await count(pw.payments.pool, "SELECT count(*) FROM provider_events WHERE payment_id = %s",
                       pid) == 2
    succeeded = await outbox_count(pw.payments.pool, order_uuid(o), "payment_succeeded")
    failed = await outbox_count(pw.payments.pool, order_uuid(o), "payment_failed")
    refunded = await outbox_count(pw.payments.pool, order_uuid(o), "payment_refunded")
    if final == pb.PAYMENT_STATE_SUCCEEDED:  # the success came first; the decline changed nothing
        assert (succeeded, failed, refunded) == (1, 0, 0)
    else:  # the decline came first; the money that arrived anyway went back
        assert final == pb.PAYMENT_STATE_REFUNDED and (succeeded, failed, refunded) == (0, 1, 1)
    assert {a.state for a in answers} <= {pb.PAYMENT_STATE_SUCCEEDED, pb.PAYMENT_STATE_FAILED,
                                          pb.PAYMENT_STATE_REFUNDED}


async def test_wrong_amount_is_refunded_and_the_order_cancelled(
    booking: BookingWired, payment: tuple[PaymentWired, FakeEdge],
    stubs: tuple[bpb_grpc.BookingServiceStub, pb_grpc.PaymentServiceStub],
) -> None:
    bstub, pstub = stubs
    pw, _ = payment
    u = user()
    seats = ("A-2-1",)
    event_id, o, p = await awaiting_callback(booking, payment, stubs, u, seats)
    body = model.webhook_body(f"evt_{uuid.uuid4().hex}", model.SUCCEEDED_TYPE, p.provider_reference,
                              model.Money("KRW", 1000))
    resp = await pstub.HandleWebhook(webhook(body), metadata=signed(body))
    assert resp.state == pb.PAYMENT_STATE_FAILED
    got = await pstub.GetPayment(pb.GetPaymentRequest(name=p.name), metadata=me(u))
    assert got.failure_reason == "AMOUNT_MISMATCH"
    refund = await pw.provider.refund_of(p.name.removeprefix("payments/"))
    assert refund is not None and refund.amount == model.Money("KRW", 1000)  # what was captured goes back

    async def cancelled() -> bool:
        return await order_state(bstub, o) == bpb.ORDER_STATE_CANCELLED
    await wait_for("order CANCELLED", cancelled)
    assert await seat_statuses(bstub, event_id, seats) == {bpb.SEAT_STATUS_AVAILABLE}


async def test_decline_cancels_the_order_and_frees_the_seats(
    booking: BookingWired, payment: tuple[PaymentWired, FakeEdge],
    stubs: tuple[bpb_grpc.BookingServiceStub, pb_grpc.PaymentServiceStub],
) -> None:
    bstub, pstub = stubs
    pw, _ = payment
    u = user()
    seats = ("A-1-1", "A-1-2", "A-1-3")
    event_id, o = await ordered(booking, bstub, u, seats)
    pw.provider.plan(o.name, "decline")
    p = await pstub.CreatePayment(pb.CreatePaymentRequest(order=o.name, request_id=rid()), metadata=me(u))

    async def cancelled() -> bool:
        return await order_state(bstub, o) == bpb.ORDER_STATE_CANCELLED
    await wait_for("order CANCELLED", cancelled)
    got = await pstub.GetPayment(pb.GetPaymentRequest(name=p.name), metadata=me(u))
    assert (got.state, got.failure_reason) == (pb.PAYMENT_STATE_FAILED, "CARD_DECLINED")
    assert await seat_statuses(bstub, event_id, seats) == {bpb.SEAT_STATUS_AVAILABLE}
    assert await count(booking.booking.pool, "SELECT count(*) FROM sold_seats WHERE event_id = %s",
                       event_id) == 0
    # the seats can be held again by another fan
    other = user()
    h = await bstub.CreateHold(bpb.CreateHoldRequest(parent=f"events/{event_id}", seat_ids=seats,
                                                     request_id=rid()), metadata=fan(other, event_id))
    assert list(h.seat_ids) == list(seats)


async def test_same_payment_succeeded_twice_confirms_once(
    booking: BookingWired, payment: tuple[PaymentWired, FakeEdge], kafka_bootstrap: str,
    topics: dict[str, str], stubs: tuple[bpb_grpc.BookingServiceStub, pb_grpc.PaymentServiceStub],
) -> None:
    bstub, pstub = stubs
    pw, _ = payment
    u = user()
    assert booking.payment_consumer is not None
    passed = booking.payment_consumer.passed_total
    _, o = await ordered(booking, bstub, u)
    await pstub.CreatePayment(pb.CreatePaymentRequest(order=o.name, request_id=rid()), metadata=me(u))

    async def confirmed() -> bool:
        return await order_state(bstub, o) == bpb.ORDER_STATE_CONFIRMED
    await wait_for("order CONFIRMED", confirmed)

    async def counted() -> bool:  # the sale commits before the consumer counts the record
        assert booking.payment_consumer is not None
        return booking.payment_consumer.passed_total > passed
    await wait_for("the record counted", counted)
    # The replica that made the order sold it in its precheck (no de-duplication mark) ...
    assert booking.payment_consumer.passed_total == passed + 1
    async with pw.payments.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT payload FROM outbox WHERE key = %s AND headers->>'event_type' = 'payment_succeeded'",
            (order_uuid(o),))
        (payload,) = await cur.fetchone()  # type: ignore[misc]
    from meshkit.events import new_envelope, parse, payload_of
    original = parse(bytes(payload))
    copy = new_envelope("payment", original.aggregate_id, payload_of(original))  # same payment, new id
    seen = booking.payment_consumer.processed_total + booking.payment_consumer.duplicates_total
    dups = booking.payment_consumer.duplicates_total
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        for value in (bytes(payload), copy.SerializeToString()):  # redelivery, then a re-publication
            await producer.send_and_wait(topics["payment"], value, key=original.aggregate_id.encode())
    finally:
        await producer.stop()

    async def handled() -> bool:
        c = booking.payment_consumer
        assert c is not None
        return c.processed_total + c.duplicates_total >= seen + 2
    await wait_for("both records handled", handled)
    # ... so both copies went the marked way, and found it sold to this payment already.
    assert booking.payment_consumer.duplicates_total == dups
    assert booking.payment_consumer.dlq_total == 0
    assert await outbox_count(booking.booking.pool, order_uuid(o), "order_confirmed") == 1
    assert await count(booking.booking.pool, "SELECT count(*) FROM sold_seats WHERE order_id = %s",
                       order_uuid(o)) == 2


async def test_a_refund_the_provider_refuses_is_parked_and_holds_up_nothing(
    booking: BookingWired, payment: tuple[PaymentWired, FakeEdge],
    stubs: tuple[bpb_grpc.BookingServiceStub, pb_grpc.PaymentServiceStub], topics: dict[str, str],
    kafka_bootstrap: str,
) -> None:
    """The provider answers no to a refund (here: a charge it never made). Asking again gets the
    same no, so the consumer must not retry it for ever: it used to, as if the provider were
    down, and every later booking event waited behind it. Now the event is tried a few times and
    parked on the DLQ for an operator, the payment stays as it was, and the next events pass."""
    bstub, pstub = stubs
    pw, _ = payment
    assert pw.consumer is not None
    u = user()
    event_id, o = await ordered(booking, bstub, u, ("A-8-1",))
    p = await pstub.CreatePayment(pb.CreatePaymentRequest(order=o.name, request_id=rid()), metadata=me(u))

    async def succeeded() -> bool:
        return await payment_state(pstub, p, u) == pb.PAYMENT_STATE_SUCCEEDED
    await wait_for("payment SUCCEEDED", succeeded)
    unknown = f"sbx_{uuid.uuid4().hex}"
    async with pw.payments.pool.connection() as conn:
        await conn.execute("UPDATE payments SET provider_reference = %s WHERE provider_reference = %s",
                           (unknown, p.provider_reference))
    assert await fails(pstub.RefundPayment(pb.RefundPaymentRequest(name=p.name, reason="X", request_id=rid()))
                       ) == (grpc.StatusCode.FAILED_PRECONDITION, "PROVIDER_REFUSED")

    parked = pw.consumer.dlq_total
    gone = new_envelope("booking", order_uuid(o), ev.OrderExpired(
        order=o.name, event=f"events/{event_id}", user_id=u, seat_ids=["A-8-1"]))
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topics["booking"], gone.SerializeToString(), key=order_uuid(o).encode())
    finally:
        await producer.stop()
    # Another fan's order expires meanwhile: its pending payment is cancelled all the same.
    _, o2, p2 = await awaiting_callback(booking, payment, stubs, u2 := user(), ("A-8-5",))
    await bstub.ExpireOrder(bpb.ExpireOrderRequest(order=o2.name))

    async def cancelled() -> bool:
        return await payment_state(pstub, p2, u2) == pb.PAYMENT_STATE_CANCELLED
    await wait_for("the next order's payment CANCELLED", cancelled)

    async def dead_lettered() -> bool:
        return pw.consumer is not None and pw.consumer.dlq_total == parked + 1
    await wait_for("the refused refund's event parked on the DLQ", dead_lettered)
    PARKED_ON_PURPOSE.append(gone.event_id)
    assert await payment_state(pstub, p, u) == pb.PAYMENT_STATE_SUCCEEDED
    assert await pw.provider.refunds_of(unknown) == []


@pytest.mark.parametrize("captured", [model.Money("KRW", 165000), model.Money("KRW", 170000),
                                      model.Money("USD", 125, 500_000_000)],
                         ids=["the order's amount", "more", "another currency"])
async def test_late_success_after_the_order_expired_is_refunded(
    booking: BookingWired, payment: tuple[PaymentWired, FakeEdge],
    stubs: tuple[bpb_grpc.BookingServiceStub, pb_grpc.PaymentServiceStub], captured: model.Money,
) -> None:
    """OrderExpired reaches payment first: the pending payment is cancelled, the late success
    that follows is refunded at once (booking never sees a PaymentSucceeded), by what the
    provider says it captured, whatever the order cost."""
    bstub, pstub = stubs
    pw, _ = payment
    u = user()
    seats = ("A-3-1",)
    event_id, o, p = await awaiting_callback(booking, payment, stubs, u, seats)
    expired = await bstub.ExpireOrder(bpb.ExpireOrderRequest(order=o.name))
    assert expired.state == bpb.ORDER_STATE_EXPIRED

    async def cancelled() -> bool:
        return await payment_state(pstub, p, u) == pb.PAYMENT_STATE_CANCELLED
    await wait_for("payment CANCELLED", cancelled)
    body = model.webhook_body(f"evt_{uuid.uuid4().hex}", model.SUCCEEDED_TYPE, p.provider_reference,
                              captured)
    resp = await pstub.HandleWebhook(webhook(body), metadata=signed(body))
    assert resp.state == pb.PAYMENT_STATE_REFUNDED
    got = await pstub.GetPayment(pb.GetPaymentRequest(name=p.name), metadata=me(u))
    assert got.failure_reason == "ORDER_EXPIRED"
    refund = await pw.provider.refund_of(p.name.removeprefix("payments/"))
    assert refund is not None and refund.amount == captured
    assert await outbox_count(pw.payments.pool, order_uuid(o), "payment_refunded") == 1
    assert await outbox_count(pw.payments.pool, order_uuid(o), "payment_succeeded") == 0
    assert await order_state(bstub, o) == bpb.ORDER_STATE_EXPIRED
    assert await seat_statuses(bstub, event_id, seats) == {bpb.SEAT_STATUS_AVAILABLE}


async def test_success_booking_cannot_confirm_ends_expired_and_refunded(
    booking: BookingWired, payment: tuple[PaymentWired, FakeEdge], clock: Clock, payment_clock: Clock,
    stubs: tuple[bpb_grpc.BookingServiceStub, pb_grpc.PaymentServiceStub],
) -> None:
    """The money arrives after the deadline but before the sweeper expired the order: payment
    says SUCCEEDED, booking refuses to confirm (ORDER_NOT_PAYABLE), expires the order, and its
    OrderExpired makes payment refund."""
    bstub, pstub = stubs
    pw, _ = payment
    u = user()
    seats = ("A-4-1", "A-4-2")
    event_id, o, p = await awaiting_callback(booking, payment, stubs, u, seats)
    # Both clocks: the payment deadline has passed when payment records the success.
    clock.offset = payment_clock.offset = timedelta(minutes=10)
    try:
        await succeeded_then_refunded(pstub, p, u, model.Money("KRW", 330000))
    finally:
        clock.offset = payment_clock.offset = timedelta()
    assert await order_state(bstub, o) == bpb.ORDER_STATE_EXPIRED
    assert await seat_statuses(bstub, event_id, seats) == {bpb.SEAT_STATUS_AVAILABLE}
    assert await outbox_count(booking.booking.pool, order_uuid(o), "order_confirmed") == 0
    assert await outbox_count(pw.payments.pool, order_uuid(o), "payment_refunded") == 1
    assert await pw.provider.refund_of(p.name.removeprefix("payments/")) is not None
    # RefundPayment (internal) on a refunded payment: the same answer, no second refund
    again = await pstub.RefundPayment(pb.RefundPaymentRequest(name=p.name, reason="X", request_id=rid()))
    assert again.state == pb.PAYMENT_STATE_REFUNDED and again.failure_reason == "ORDER_EXPIRED"
    assert len(await pw.provider.refunds_of(p.provider_reference)) == 1


async def test_a_success_for_an_order_booking_lost_is_refunded(
    booking: BookingWired, payment: tuple[PaymentWired, FakeEdge],
    stubs: tuple[bpb_grpc.BookingServiceStub, pb_grpc.PaymentServiceStub],
) -> None:
    """Booking's data lost the order (restored from an older backup) while its payment went on:
    the provider's success can confirm nothing, so the fan's money goes back, once. Before,
    booking only logged the PaymentSucceeded and the payment stayed SUCCEEDED for good."""
    bstub, pstub = stubs
    pw, _ = payment
    u = user()
    _, o, p = await awaiting_callback(booking, payment, stubs, u, ("A-5-1",))
    async with booking.booking.pool.connection() as conn:  # the loss
        await conn.execute("DELETE FROM orders WHERE order_id = %s", (order_uuid(o),))
    await succeeded_then_refunded(pstub, p, u, model.Money("KRW", 165000))
    got = await pstub.GetPayment(pb.GetPaymentRequest(name=p.name), metadata=me(u))
    assert got.failure_reason == "ORDER_UNKNOWN"
    assert await outbox_count(booking.booking.pool, order_uuid(o), "payment_order_unknown") == 1
    assert await outbox_count(pw.payments.pool, order_uuid(o), "payment_refunded") == 1
    assert len(await pw.provider.refunds_of(p.provider_reference)) == 1
    assert await fails(bstub.GetOrderForPayment(bpb.GetOrderForPaymentRequest(order=o.name))) == \
        (grpc.StatusCode.NOT_FOUND, "ORDER_NOT_FOUND")


async def test_a_success_recorded_in_time_confirms_though_booking_reads_it_after_the_deadline(
    booking: BookingWired, payment: tuple[PaymentWired, FakeEdge], clock: Clock,
    stubs: tuple[bpb_grpc.BookingServiceStub, pb_grpc.PaymentServiceStub],
) -> None:
    """The fan pays before the deadline, and PaymentSucceeded reaches booking after it (Kafka
    down, the relay's backoff, lag). The sweeper leaves the pending order and its seats for the
    grace, and the success confirms it: the deadline is judged by when payment recorded the
    success, not by when booking reads it. Before, the fan lost the seats and got a refund."""
    bstub, pstub = stubs
    pw, _ = payment
    u = user()
    seats = ("A-6-1", "A-6-2")
    event_id, o, p = await awaiting_callback(booking, payment, stubs, u, seats)
    b = booking.booking
    clock.offset = b.hold_ttl + b.payment_grace / 2  # booking's clock only: past the deadline
    try:
        b.forget_event_ids()
        await b.sweep_once()
        assert await order_state(bstub, o) == bpb.ORDER_STATE_PENDING_PAYMENT  # its grace
        assert await seat_statuses(bstub, event_id, seats) == {bpb.SEAT_STATUS_HELD}
        body = model.webhook_body(f"evt_{uuid.uuid4().hex}", model.SUCCEEDED_TYPE, p.provider_reference,
                                  model.Money("KRW", 330000))
        resp = await pstub.HandleWebhook(webhook(body), metadata=signed(body))
        assert resp.state == pb.PAYMENT_STATE_SUCCEEDED

        async def confirmed() -> bool:
            return await order_state(bstub, o) == bpb.ORDER_STATE_CONFIRMED
        await wait_for("order CONFIRMED", confirmed)
    finally:
        clock.offset = timedelta()
    assert await seat_statuses(bstub, event_id, seats) == {bpb.SEAT_STATUS_SOLD}
    assert await payment_state(pstub, p, u) == pb.PAYMENT_STATE_SUCCEEDED


async def test_the_sweeper_expires_a_pending_order_once_its_grace_is_over(
    booking: BookingWired, clock: Clock,
    stubs: tuple[bpb_grpc.BookingServiceStub, pb_grpc.PaymentServiceStub],
) -> None:
    bstub, _ = stubs
    seats = ("A-7-1",)
    event_id, o = await ordered(booking, bstub, user(), seats)
    b = booking.booking
    clock.offset = b.hold_ttl + b.payment_grace + timedelta(seconds=1)
    try:
        b.forget_event_ids()
        await b.sweep_once()
    finally:
        clock.offset = timedelta()
    assert await order_state(bstub, o) == bpb.ORDER_STATE_EXPIRED
    assert await seat_statuses(bstub, event_id, seats) == {bpb.SEAT_STATUS_AVAILABLE}


async def test_expired_order_cannot_be_paid_and_unknown_reference_is_404(
    booking: BookingWired, payment: tuple[PaymentWired, FakeEdge],
    stubs: tuple[bpb_grpc.BookingServiceStub, pb_grpc.PaymentServiceStub],
) -> None:
    bstub, pstub = stubs
    u = user()
    _, o = await ordered(booking, bstub, u, ("A-5-1",))
    await bstub.ExpireOrder(bpb.ExpireOrderRequest(order=o.name))
    assert await fails(pstub.CreatePayment(pb.CreatePaymentRequest(order=o.name, request_id=rid()),
                                           metadata=me(u))) == (grpc.StatusCode.FAILED_PRECONDITION,
                                                                 "ORDER_NOT_PAYABLE")
    assert (await fails(pstub.CreatePayment(pb.CreatePaymentRequest(order=o.name, request_id="x"),
                                            metadata=me(u))))[1] == "INVALID_REQUEST_ID"
    body = model.webhook_body("evt_unknown", model.SUCCEEDED_TYPE, "sbx_nope", model.Money("KRW", 1))
    assert await fails(pstub.HandleWebhook(webhook(body), metadata=signed(body))) == (
        grpc.StatusCode.NOT_FOUND, "PAYMENT_NOT_FOUND")


async def test_callback_racing_the_payment_row_is_retried_by_the_provider(
    booking: BookingWired, payment: tuple[PaymentWired, FakeEdge],
    stubs: tuple[bpb_grpc.BookingServiceStub, pb_grpc.PaymentServiceStub],
) -> None:
    """With no delay the sandbox may call back before the payment row is written (the checkout
    is opened first): the webhook answers 404, the provider re-sends, the purchase completes."""
    bstub, pstub = stubs
    pw, _ = payment
    u = user()
    event_id, o = await ordered(booking, bstub, u, ("A-6-1",))
    pw.provider.plan(o.name, "approve", delay=0.0)
    p = await pstub.CreatePayment(pb.CreatePaymentRequest(order=o.name, request_id=rid()), metadata=me(u))

    async def confirmed() -> bool:
        return await order_state(bstub, o) == bpb.ORDER_STATE_CONFIRMED
    await wait_for("order CONFIRMED", confirmed)
    co = await pw.provider.checkout(p.provider_reference)
    assert co is not None and co.delivered and co.attempts >= 1
    assert await seat_statuses(bstub, event_id, ("A-6-1",)) == {bpb.SEAT_STATUS_SOLD}
    # A callback that only raced its payment is forgotten by the unmatched sweep, never refunded.
    await pw.payments.refund_unmatched(older_than=0)
    assert await pw.provider.refunds_of(p.provider_reference) == []
    assert await count(pw.payments.pool, "SELECT count(*) FROM unmatched_callbacks WHERE reference = %s",
                       p.provider_reference) == 0


async def test_money_captured_for_no_payment_is_refunded_once_nothing_claims_it(
    booking: BookingWired, payment: tuple[PaymentWired, FakeEdge],
    stubs: tuple[bpb_grpc.BookingServiceStub, pb_grpc.PaymentServiceStub],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The checkout is opened, then the process dies before writing the payment, and the app
    never retries. The provider's success finds no payment (404, re-sent until it gives up); it
    is kept in mind, and once no payment has claimed it for TP_UNMATCHED_REFUND_SECONDS the money
    is refunded, once, as the callback states it."""
    bstub, pstub = stubs
    pw, _ = payment
    u = user()
    _, o = await ordered(booking, bstub, u, ("A-7-6",))
    real = pw.provider.create_checkout
    refs: list[str] = []

    async def checkout(*args: Any, **kw: Any) -> str:
        refs.append(await real(*args, **kw))
        return refs[-1]

    async def died(*args: Any, **kw: Any) -> Any:
        raise psycopg.OperationalError("the process died between the checkout and the insert")

    monkeypatch.setattr(pw.provider, "create_checkout", checkout)
    monkeypatch.setattr(payment_db, "insert_unless_ended", died)
    pw.provider.plan(o.name, "never")  # its success is sent below
    with pytest.raises(grpc.aio.AioRpcError):
        await pstub.CreatePayment(pb.CreatePaymentRequest(order=o.name, request_id=rid()), metadata=me(u))
    monkeypatch.undo()
    assert refs and await payments_of(pw, o) == 0
    captured = model.Money("KRW", 165000)
    body = model.webhook_body(f"evt_{uuid.uuid4().hex}", model.SUCCEEDED_TYPE, refs[0], captured)
    assert await fails(pstub.HandleWebhook(webhook(body), metadata=signed(body))) == (
        grpc.StatusCode.NOT_FOUND, "PAYMENT_NOT_FOUND")
    await pw.payments.refund_unmatched(older_than=3600)  # too young: a payment may still claim it
    assert await pw.provider.refunds_of(refs[0]) == []
    await pw.payments.refund_unmatched(older_than=0)
    assert [r.amount for r in await pw.provider.refunds_of(refs[0])] == [captured]
    # The provider re-sends; nothing claims it still; the sweep runs again: no second refund.
    assert (await fails(pstub.HandleWebhook(webhook(body), metadata=signed(body))))[1] == "PAYMENT_NOT_FOUND"
    await pw.payments.refund_unmatched(older_than=0)
    assert len(await pw.provider.refunds_of(refs[0])) == 1


async def test_an_unmatched_capture_whose_refund_is_refused_is_left_to_an_operator(
    payment: tuple[PaymentWired, FakeEdge],
    stubs: tuple[bpb_grpc.BookingServiceStub, pb_grpc.PaymentServiceStub],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sweep asks the provider to refund money captured for no payment; the provider says no
    (the sandbox: a charge it never made). The refusal is recorded and the sweep does not ask
    again on every pass, nor does it stop at that one: the next capture is still refunded."""
    _, pstub = stubs
    pw, _ = payment
    refused = f"sbx_{uuid.uuid4().hex}"  # no checkout of the sandbox's
    real = await pw.provider.create_checkout(uuid.uuid4(), f"orders/{uuid.uuid4()}", model.Money("KRW", 1000),
                                             "never")
    for ref in (refused, real):
        body = model.webhook_body(f"evt_{uuid.uuid4().hex}", model.SUCCEEDED_TYPE, ref,
                                  model.Money("KRW", 1000))
        answer = await fails(pstub.HandleWebhook(webhook(body), metadata=signed(body)))
        assert answer[1] == "PAYMENT_NOT_FOUND"
    asked: list[str] = []
    refund = pw.provider.refund

    async def counted(reference: str, *args: Any) -> str:
        asked.append(reference)
        return await refund(reference, *args)

    monkeypatch.setattr(pw.provider, "refund", counted)
    await pw.payments.refund_unmatched(older_than=0)
    assert {refused, real} <= set(asked)
    assert len(await pw.provider.refunds_of(real)) == 1 and await pw.provider.refunds_of(refused) == []
    assert await count(pw.payments.pool, "SELECT count(*) FROM unmatched_callbacks WHERE reference = %s "
                       "AND refusal LIKE %s AND refunded_at IS NULL", refused, f"%{refused}%") == 1
    first_pass = len(asked)
    await pw.payments.refund_unmatched(older_than=0)
    assert not {refused, real} & set(asked[first_pass:])  # neither is asked for again


async def test_the_payment_insert_waits_for_an_order_ending_in_progress_and_sees_it(
    payment: tuple[PaymentWired, FakeEdge],
) -> None:
    """CreatePayment's write is one statement (migration 0006) that takes the order's lock and
    only then reads whether the order is over: an OrderExpired being recorded at that moment (its
    transaction holds the lock) is waited for and seen, so no PENDING payment outlives its order."""
    pw, _ = payment
    order_id, now = uuid.uuid4(), datetime.now(UTC)

    def pending(reference: str) -> model.Payment:
        return model.Payment(uuid.uuid4(), order_id, "", user(), model.PaymentState.PENDING,
                             model.Money("KRW", 1000), "sandbox", reference, "", now, now)

    async with await psycopg.AsyncConnection.connect(pw.payments.pool.conninfo) as ender:
        await ender.execute("BEGIN")
        await payment_db.lock_order(ender, order_id)  # the consumer, recording OrderExpired
        async with autocommit(pw.payments.pool) as conn:
            insert = asyncio.create_task(payment_db.insert_unless_ended(conn, pending(rid()), uuid.uuid4()))
            await asyncio.sleep(0.3)
            assert not insert.done()  # waits for the order's lock
            await payment_db.mark_order_ended(ender, order_id, "EXPIRED")
            await ender.execute("COMMIT")
            assert await insert == ("EXPIRED", False)
    assert await count(pw.payments.pool, "SELECT count(*) FROM payments WHERE order_id = %s", order_id) == 0


async def test_order_ending_while_the_payment_is_created_is_not_left_pending(
    booking: BookingWired, payment: tuple[PaymentWired, FakeEdge],
    stubs: tuple[bpb_grpc.BookingServiceStub, pb_grpc.PaymentServiceStub],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The order expires (and payment has consumed OrderExpired) after CreatePayment read it as
    payable but before the payment row is written: CreatePayment refuses, no PENDING payment is
    left behind, the checkout is cancelled."""
    bstub, pstub = stubs
    pw, _ = payment
    u = user()
    _, o = await ordered(booking, bstub, u, ("A-7-1",))
    real = pw.provider.create_checkout
    refs: list[str] = []

    async def slow_checkout(*args: Any, **kw: Any) -> str:
        await bstub.ExpireOrder(bpb.ExpireOrderRequest(order=o.name))

        async def ended() -> bool:
            async with pw.payments.pool.connection() as conn:
                cur = await conn.execute("SELECT 1 FROM ended_orders WHERE order_id = %s", (order_uuid(o),))
                return await cur.fetchone() is not None
        await wait_for("payment saw OrderExpired", ended)
        ref = await real(*args, **kw)
        refs.append(ref)
        return ref

    monkeypatch.setattr(pw.provider, "create_checkout", slow_checkout)
    pw.provider.plan(o.name, "never")
    assert await fails(pstub.CreatePayment(pb.CreatePaymentRequest(order=o.name, request_id=rid()),
                                           metadata=me(u))) == (grpc.StatusCode.FAILED_PRECONDITION,
                                                                 "ORDER_NOT_PAYABLE")
    assert refs
    co = await pw.provider.checkout(refs[0])
    assert co is not None and co.cancelled
    assert await count(pw.payments.pool, "SELECT count(*) FROM payments WHERE order_id = %s AND "
                       "(state <> 'CANCELLED' OR failure_reason <> 'CHECKOUT_DROPPED')", order_uuid(o)) == 0
    # A customer who was already paying is not stopped by the cancel: the money is given back.
    body = model.webhook_body(f"evt_{uuid.uuid4().hex}", model.SUCCEEDED_TYPE, refs[0],
                              model.Money("KRW", 165000))
    resp = await pstub.HandleWebhook(webhook(body), metadata=signed(body))
    assert resp.state == pb.PAYMENT_STATE_REFUNDED
    kept = await pstub.GetPayment(pb.GetPaymentRequest(name=resp.payment), metadata=me(u))
    assert kept.failure_reason == "CHECKOUT_DROPPED" and kept.provider_reference == refs[0]
    assert [r.amount for r in await pw.provider.refunds_of(refs[0])] == [model.Money("KRW", 165000)]


async def test_a_checkout_dropped_for_a_concurrent_payment_is_refunded_if_paid_anyway(
    booking: BookingWired, payment: tuple[PaymentWired, FakeEdge],
    stubs: tuple[bpb_grpc.BookingServiceStub, pb_grpc.PaymentServiceStub],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two CreatePayment calls of one order with different request ids (a double tap): both open
    a checkout, the second writes its payment first, so the first answers with the second's
    payment and drops its own checkout. That checkout is kept as a CANCELLED payment: if the
    customer pays it anyway, the webhook refunds the money instead of answering 404 until the
    provider gives up (money kept, no order)."""
    bstub, pstub = stubs
    pw, _ = payment
    u = user()
    event_id, o = await ordered(booking, bstub, u, ("A-7-3", "A-7-4"))
    real = pw.provider.create_checkout
    refs: list[str] = []
    second_written = asyncio.Event()

    async def checkout(*args: Any, **kw: Any) -> str:
        ref = await real(*args, **kw)
        refs.append(ref)
        if len(refs) == 1:
            await second_written.wait()
        return ref

    monkeypatch.setattr(pw.provider, "create_checkout", checkout)
    pw.provider.plan(o.name, "never")  # the first checkout's own callback: none, we send it below
    first = asyncio.ensure_future(pstub.CreatePayment(
        pb.CreatePaymentRequest(order=o.name, request_id=rid()), metadata=me(u)))

    async def first_opened() -> bool:
        return len(refs) == 1
    await wait_for("the first checkout opened", first_opened)
    second = await pstub.CreatePayment(pb.CreatePaymentRequest(order=o.name, request_id=rid()),
                                       metadata=me(u))
    second_written.set()
    got = await first
    assert got.name == second.name and got.provider_reference == refs[1]
    dropped = await pw.provider.checkout(refs[0])
    assert dropped is not None and dropped.cancelled

    async def confirmed() -> bool:
        return await order_state(bstub, o) == bpb.ORDER_STATE_CONFIRMED
    await wait_for("order CONFIRMED by the second payment", confirmed)
    body = model.webhook_body(f"evt_{uuid.uuid4().hex}", model.SUCCEEDED_TYPE, refs[0],
                              model.Money("KRW", 330000))
    resp = await pstub.HandleWebhook(webhook(body), metadata=signed(body))
    assert resp.state == pb.PAYMENT_STATE_REFUNDED
    kept = await pstub.GetPayment(pb.GetPaymentRequest(name=resp.payment), metadata=me(u))
    assert kept.failure_reason == "CHECKOUT_DROPPED" and kept.provider_reference == refs[0]
    assert [r.amount for r in await pw.provider.refunds_of(refs[0])] == [model.Money("KRW", 330000)]
    assert await payment_state(pstub, second, u) == pb.PAYMENT_STATE_SUCCEEDED
    assert await order_state(bstub, o) == bpb.ORDER_STATE_CONFIRMED
    assert await seat_statuses(bstub, event_id, ("A-7-3", "A-7-4")) == {bpb.SEAT_STATUS_SOLD}
    # The same webhook again: a replay, no second refund.
    again = await pstub.HandleWebhook(webhook(body), metadata=signed(body))
    assert again.state == pb.PAYMENT_STATE_REFUNDED
    assert len(await pw.provider.refunds_of(refs[0])) == 1


async def test_a_request_id_used_for_one_order_cannot_pay_another(
    booking: BookingWired, payment: tuple[PaymentWired, FakeEdge],
    stubs: tuple[bpb_grpc.BookingServiceStub, pb_grpc.PaymentServiceStub],
) -> None:
    """It was answered with the first order's payment, and the app believed the second paid."""
    bstub, pstub = stubs
    pw, _ = payment
    u = user()
    _, first = await ordered(booking, bstub, u, ("A-7-7",))
    _, second = await ordered(booking, bstub, u, ("A-7-8",))
    key = rid()
    pw.provider.plan(first.name, "never")
    p = await pstub.CreatePayment(pb.CreatePaymentRequest(order=first.name, request_id=key), metadata=me(u))
    code, reason, md = await refusal(pstub.CreatePayment(
        pb.CreatePaymentRequest(order=second.name, request_id=key), metadata=me(u)))
    assert (code, reason, md["used_for"]) == (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_ID_REUSED", p.name)
    assert await payments_of(pw, second) == 0


async def test_a_new_payment_after_a_declined_one_is_refused(
    booking: BookingWired, payment: tuple[PaymentWired, FakeEdge],
    stubs: tuple[bpb_grpc.BookingServiceStub, pb_grpc.PaymentServiceStub],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A declined payment cancels its order (PaymentFailed). Until booking has done so, the order
    still reads PENDING_PAYMENT: a second payment then must be refused, not taken and refunded
    a moment later with the seats gone."""
    bstub, pstub = stubs
    pw, _ = payment
    u = user()
    _, o = await ordered(booking, bstub, u, ("A-7-5",))
    pw.provider.plan(o.name, "never")
    p = await pstub.CreatePayment(pb.CreatePaymentRequest(order=o.name, request_id=rid()), metadata=me(u))
    before = await pw.payments.booking.order(uuid.UUID(order_uuid(o)))
    assert before.state == "PENDING_PAYMENT"

    async def not_yet_cancelled(order_id: uuid.UUID) -> Any:
        return before  # booking has not consumed the PaymentFailed yet

    monkeypatch.setattr(pw.payments.booking, "order", not_yet_cancelled)
    body = model.webhook_body(f"evt_{uuid.uuid4().hex}", model.FAILED_TYPE, p.provider_reference,
                              model.Money("KRW", 165000), reason="CARD_DECLINED")
    assert (await pstub.HandleWebhook(webhook(body), metadata=signed(body))).state == pb.PAYMENT_STATE_FAILED
    code, reason, md = await refusal(pstub.CreatePayment(
        pb.CreatePaymentRequest(order=o.name, request_id=rid()), metadata=me(u)))
    assert (code, reason, md["payment"]) == (grpc.StatusCode.FAILED_PRECONDITION, "ORDER_NOT_PAYABLE", p.name)
    assert await payments_of(pw, o) == 1


async def test_concurrent_purchases_money_and_seats_agree(
    booking: BookingWired, payment: tuple[PaymentWired, FakeEdge],
    stubs: tuple[bpb_grpc.BookingServiceStub, pb_grpc.PaymentServiceStub],
) -> None:
    """60 fans pay at once (every third declined): every succeeded payment has exactly one
    CONFIRMED order, every failed one a CANCELLED order, and sold seats match the paid orders."""
    bstub, pstub = stubs
    pw, _ = payment
    event_id = await new_event(booking, sections=(("A", 10, 10, "VIP"), ("B", 10, 10, "R")))
    fans = [(user(), (f"A-{i // 10 + 1}-{i % 10 + 1}", f"B-{i // 10 + 1}-{i % 10 + 1}")) for i in range(60)]

    async def buy(i: int, u: str, seats: tuple[str, ...]) -> tuple[str, str, str]:
        h = await bstub.CreateHold(bpb.CreateHoldRequest(parent=f"events/{event_id}", seat_ids=seats,
                                                         request_id=rid()), metadata=fan(u, event_id))
        o = await bstub.CreateOrder(bpb.CreateOrderRequest(hold=h.name, request_id=rid()),
                                    metadata=fan(u, event_id))
        pw.provider.plan(o.name, "decline" if i % 3 == 0 else "approve", delay=0.05)
        p = await pstub.CreatePayment(pb.CreatePaymentRequest(order=o.name, request_id=rid()), metadata=me(u))
        return u, o.name, p.name

    t0 = time.monotonic()
    bought = await asyncio.gather(*(buy(i, u, seats) for i, (u, seats) in enumerate(fans)))

    async def settled() -> bool:
        return await count(booking.booking.pool, "SELECT count(*) FROM orders WHERE event_id = %s "
                           "AND state IN ('CONFIRMED', 'CANCELLED')", event_id) == 60
    await wait_for("every order settled", settled, patience=60)
    print(f"60 concurrent purchases settled in {time.monotonic() - t0:.2f}s")
    for i, (u, order, pay) in enumerate(bought):
        p = await pstub.GetPayment(pb.GetPaymentRequest(name=pay), metadata=me(u))
        o = await bstub.GetOrderForPayment(bpb.GetOrderForPaymentRequest(order=order))
        if i % 3 == 0:
            assert (p.state, o.state) == (pb.PAYMENT_STATE_FAILED, bpb.ORDER_STATE_CANCELLED)
        else:
            assert (p.state, o.state, o.payment) == (pb.PAYMENT_STATE_SUCCEEDED,
                                                     bpb.ORDER_STATE_CONFIRMED, pay)
    async with booking.booking.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*), count(DISTINCT seat_id) FROM sold_seats WHERE event_id = %s", (event_id,))
        assert await cur.fetchone() == (80, 80)
    # The seat map follows each commit (Redis, after PostgreSQL; its answer is kept half a second)
    want = {bpb.SEAT_STATUS_SOLD: 80, bpb.SEAT_STATUS_AVAILABLE: 120}
    counts: dict[int, int] = {}

    async def seat_map_agrees() -> bool:
        statuses = await bstub.ListSeats(bpb.ListSeatsRequest(parent=f"events/{event_id}"))
        counts.update({s: sum(1 for x in statuses.seats if x.status == s) for s in want})
        return counts == want
    await wait_for("the seat map to show 80 seats sold and 120 available", seat_map_agrees, patience=10)


async def test_nothing_was_parked_on_a_dlq(booking: BookingWired,
                                           payment: tuple[PaymentWired, FakeEdge]) -> None:
    assert booking.payment_consumer is not None and payment[0].consumer is not None
    assert booking.payment_consumer.dlq_total == 0
    assert payment[0].consumer.dlq_total == len(PARKED_ON_PURPOSE)
    assert payment[0].consumer.processed_total > 0

