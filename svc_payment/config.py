"""svc_payment's settings: the environment (TP_*) read once at start; a bad value stops it."""

from typing import Literal

from pydantic import Field, SecretStr

from meshkit.config import ServiceSettings


class Settings(ServiceSettings):
    service_name: str = "payment"
    postgres_dsn: str = Field(min_length=1)
    kafka_bootstrap: str = Field(min_length=1)
    # Booking's gRPC address (GetOrderForPayment), e.g. "127.0.0.1:7064".
    booking_addr: str = Field(min_length=1)
    booking_timeout_seconds: float = Field(default=2.0, gt=0)
    # Shared with the provider: the key of the webhook's HMAC-SHA256 signature.
    payment_webhook_secret: SecretStr = Field(min_length=16)
    # How far a signature's timestamp may be from now (replays outside it are refused).
    webhook_tolerance_seconds: float = Field(default=300.0, gt=0)
    payment_topic: str = "ticketping.payment.v1"
    booking_topic: str = "ticketping.booking.v1"
    consumer_group: str = "payment"
    run_consumer: bool = True
    # The built-in sandbox provider (the only one so far).
    provider: Literal["sandbox"] = "sandbox"
    # Where the sandbox POSTs its callbacks: the edge's route to HandleWebhook.
    webhook_url: str = "http://127.0.0.1:8080/v1/payments/webhook"
    sandbox_delay_seconds: float = Field(default=1.0, ge=0)
    sandbox_outcome: Literal["approve", "decline", "never"] = "approve"
    sandbox_max_attempts: int = Field(default=8, ge=1)
    # A success callback no payment claims for this long is refunded (migration 0004). It must
    # outlast the provider's re-sends and an order's payment deadline (booking's hold TTL).
    unmatched_refund_seconds: float = Field(default=3600.0, gt=0)
    unmatched_sweep_seconds: float = Field(default=60.0, gt=0)
    # Let CreatePayment's `x-sandbox-outcome` metadata pick one payment's outcome (tests, demo).
    sandbox_outcome_header: bool = False
