"""svc_booking's settings: the environment (TP_*) read once at start; a bad value stops it."""

from pydantic import Field, ValidationInfo, field_validator

from meshkit.config import ServiceSettings

# The catalog consumer's records in hand at once (EventConsumer's default; a sale sends none).
CATALOG_CONSUMER_CONCURRENCY = 8


class Settings(ServiceSettings):
    service_name: str = "booking"
    postgres_dsn: str = Field(min_length=1)
    redis_url: str = Field(min_length=1)
    redis_cluster: bool = False
    kafka_bootstrap: str = Field(min_length=1)
    # The waiting room (QueueService.CheckAdmission), e.g. "127.0.0.1:7063".
    queue_addr: str = Field(min_length=1)
    # CheckAdmission's deadline. Past it the call fails closed as UNAVAILABLE (retryable). At 0.5 s,
    # a sale's burst on 2 cores made about 1 hold in 20 fail for a queue that was only slow.
    admission_timeout_seconds: float = Field(default=1.5, gt=0)
    # How long booking takes an active admission's word for it (never past the session's expiry).
    # A fan's holds and order come within a second or two under a sale's load: at 1 s, 1.86
    # CheckAdmission calls per purchase (of 2.6 checked calls); at 2 s, fewer (README).
    admission_cache_seconds: float = Field(default=2.0, ge=0)
    hold_ttl_seconds: float = Field(default=300.0, gt=0)
    # How long past its deadline a PENDING_PAYMENT order keeps its seats for a payment recorded
    # in time whose PaymentSucceeded is late (Kafka down, the relay's backoff, consumer lag).
    payment_grace_seconds: float = Field(default=60.0, ge=0, le=3600)
    # Used when an event says 0 (catalog requires 1..n, so only for old or odd events).
    default_seat_limit_per_fan: int = Field(default=4, ge=1)
    catalog_topic: str = "ticketping.catalog.v1"
    booking_topic: str = "ticketping.booking.v1"
    consumer_group: str = "booking"
    # PaymentSucceeded / PaymentFailed (svc_booking/adapters/payment_events.py), consumed as
    # group "<consumer_group>.payment".
    payment_topic: str = "ticketping.payment.v1"
    # PaymentSucceeded / PaymentFailed records handled at once (each of its own order). At 8, a
    # sale's burst of payments waited in line: webhook -> CONFIRMED p50 1.5-2.2 s in the purchases
    # bench; at 24, 0.55-0.77 s (its p99 halved). Each record holds a pooled connection and takes
    # a second one, hence the larger pool below (checked at start).
    payment_consumer_concurrency: int = Field(default=24, ge=1, le=100)
    postgres_pool_size: int = Field(default=56, ge=2, le=200)
    # How old a replica's copy of an event's seat map may be (ListSeats; the edge caches 1 s too).
    seats_cache_seconds: float = Field(default=0.5, ge=0)
    sweep_interval_seconds: float = Field(default=0.5, gt=0)
    sweep_lease_seconds: float = Field(default=30.0, gt=0)
    # Off in tests that drive the consumer or the sweeper themselves.
    run_consumer: bool = True
    run_sweeper: bool = True
    run_payment_consumer: bool = True

    @field_validator("payment_consumer_concurrency")
    @classmethod
    def _pool_outlasts_the_consumers(cls, concurrency: int, info: ValidationInfo) -> int:
        # A consumer record holds one connection while it waits for a second: with as many
        # records in hand as connections, every one would wait for ever (until the pool's timeout).
        pool = info.data.get("postgres_pool_size")
        records = concurrency + CATALOG_CONSUMER_CONCURRENCY
        if pool is not None and pool <= records:
            raise ValueError(f"with TP_POSTGRES_POOL_SIZE={pool} the consumers' {records} records "
                             "in hand could take every connection and wait for ever; the pool "
                             "must be larger (twice is comfortable)")
        return concurrency
