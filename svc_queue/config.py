"""svc_queue's settings: the environment (TP_*) read once at start; a bad value stops it."""

from __future__ import annotations

from pydantic import Field, model_validator

from meshkit.config import ServiceSettings, SigningKeySettings

from .domain.room import ADMISSION_AUDIENCE, ADMISSION_ISSUER, MAX_ADMIT_RATE


class Settings(ServiceSettings, SigningKeySettings):
    service_name: str = "queue"
    redis_url: str = Field(min_length=1)
    redis_cluster: bool = False
    kafka_bootstrap: str = Field(min_length=1)
    # Prefix of the queue's Redis keys that belong to no room: the room registry and the
    # admission-token keys. (A room's keys are always `{q:<event>}:...`.)
    redis_key_prefix: str = Field(default="tp:queue", min_length=1, pattern=r"^[A-Za-z0-9:_.-]+$")
    # Most Redis script calls one replica has in flight (more wait their turn). Keep it under
    # the client's pool size (redis-py's single-node pool refuses past 100 connections).
    redis_max_in_flight: int = Field(default=64, ge=1, le=4000)

    # --- events (Kafka) ---
    consume_events: bool = True
    consumer_group: str = Field(default="queue", min_length=1)
    catalog_topic: str = Field(default="ticketping.catalog.v1", min_length=1)
    booking_topic: str = Field(default="ticketping.booking.v1", min_length=1)

    # --- catalog: rebuilds a room lost from Redis (svc_queue/recovery.py) ---
    # host:port of CatalogService. Unset: a room missing from Redis stays 404 until catalog
    # publishes the event again.
    catalog_addr: str | None = None
    catalog_timeout_seconds: float = Field(default=1.0, gt=0, le=30)
    # An id catalog does not know (or not published) is remembered this long...
    catalog_not_found_cache_seconds: float = Field(default=5.0, ge=0, le=600)
    # ... in a table of at most this many ids (the oldest go first).
    catalog_not_found_cache_size: int = Field(default=10_000, ge=1)

    # --- admission ---
    admission_loop: bool = True  # every replica runs one; any number may
    admission_tick_seconds: float = Field(default=0.15, ge=0.005, le=1.0)
    # How often a loop re-reads the room registry (a newly published room waits at most this).
    admission_registry_refresh_seconds: float = Field(default=1.0, ge=0.01, le=60)
    # A new room's settings (admins change them live with PATCH /v1/events/{event}/queue).
    default_max_active: int = Field(default=1000, ge=0)
    default_admit_rate_per_second: float = Field(default=50.0, gt=0, le=MAX_ADMIT_RATE)
    session_ttl_seconds: float = Field(default=600.0, ge=1)
    # The longest session (and admission token) an admin may configure; sessions never extend.
    max_session_ttl_seconds: float = Field(default=1800.0, ge=1, le=24 * 3600)
    # A served fan must read queue/me within this window, or the slot returns to the pool.
    claim_window_seconds: float = Field(default=60.0, ge=0.1, le=3600)

    # --- admission tokens (ES256 JWTs) ---
    admission_issuer: str = Field(default=ADMISSION_ISSUER, min_length=1)
    admission_audience: str = Field(default=ADMISSION_AUDIENCE, min_length=1)
    # The signing keys (stored in Redis, encrypted with key_encryption_key): SigningKeySettings.

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.session_ttl_seconds > self.max_session_ttl_seconds:
            raise ValueError("session_ttl_seconds must not exceed max_session_ttl_seconds")
        return self

    @property
    def registry_key(self) -> str:
        return f"{self.redis_key_prefix}:rooms"

    @property
    def keys_key(self) -> str:
        return f"{self.redis_key_prefix}:admission-keys"
