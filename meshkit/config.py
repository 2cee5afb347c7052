"""Settings shared by every service, read from the environment (prefix ``TP_``) at start.

A service subclasses :class:`ServiceSettings`, adds its own fields, and calls :func:`load`, which
fails fast, before anything listens, with one line per missing or bad value.
"""

from __future__ import annotations

import sys
from typing import Literal, TypeVar

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .jwtkeys import decode_kek
from .memory import YOUNG_THRESHOLD


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TP_", extra="ignore", frozen=True)

    service_name: str = Field(min_length=1)
    grpc_host: str = "127.0.0.1"
    grpc_port: int = Field(default=0, ge=0, le=65535)  # 0: pick a free port (tests)
    metrics_port: int | None = Field(default=None, ge=0, le=65535)  # None: no metrics endpoint
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_json: bool = True
    shutdown_grace_seconds: float = Field(default=10.0, gt=0)
    # End each client connection after this long (with a grace for calls in flight): clients
    # then resolve the service's name again and reach replicas added since (meshkit.channels).
    # Unset: connections last (one machine, nothing to find).
    grpc_max_connection_age_seconds: float | None = Field(default=None, gt=0)
    # OpenTelemetry: off unless an exporter is named.
    otel_exporter: Literal["none", "console", "otlp"] = "none"
    otel_endpoint: str = "http://127.0.0.1:4317"
    kafka_bootstrap: str | None = None
    # How the outbox relay compresses what it publishes. The events are ~300-byte envelopes in
    # batches of a few: gzip halves their bytes but cost a producer and its consumer together
    # 40-60 us of CPU per event (measured on loopback, README; the broker's cost varied more than
    # that either way). Consumers read any codec whose library is installed, so replicas may
    # differ during a change.
    kafka_compression: Literal["none", "gzip", "zstd", "lz4", "snappy"] = "none"
    # Most PostgreSQL connections one replica keeps (services without a database ignore it). A
    # sale's burst of holds, orders and confirmations each want one; at 10, requests and the
    # event consumers queued for connections and confirmations took seconds.
    postgres_pool_size: int = Field(default=24, ge=2, le=200)
    # Allocations between two young-generation garbage collections (CPython's default: 700). At
    # 700, booking, payment and the waiting room spent 3-9 % of their CPU in a sale collecting,
    # mostly traversing the objects every import left behind (meshkit.memory.tune_gc).
    gc_young_threshold: int = Field(default=YOUNG_THRESHOLD, ge=100, le=1_000_000)


S = TypeVar("S", bound=ServiceSettings)


class SettingsError(SystemExit):
    """Raised (as an exit) when the environment does not make valid settings."""


def load(cls: type[S], **overrides: object) -> S:
    """Build settings from the environment plus ``overrides``; exit with a clear reason if invalid."""
    try:
        return cls(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = [f"invalid configuration for {cls.__name__}:"]
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "?"
            lines.append(f"  TP_{field.upper()}: {err['msg']}")
        print("\n".join(lines), file=sys.stderr)
        raise SettingsError(2) from None


class SigningKeySettings(BaseModel):
    """The settings of a service that signs ES256 JWTs with keys it stores itself (identity's user
    tokens in PostgreSQL, the queue's admission tokens in Redis). Mix in beside ServiceSettings."""

    # 32 bytes, base64 or base64url (e.g. `python -c "import secrets; print(secrets.token_urlsafe(32))"`).
    # Encrypts the stored private keys (AES-256-GCM). Unset: stored unencrypted (a warning at start).
    key_encryption_key: SecretStr | None = None
    # A `next` key signs only after it has been published this long (Envoy caches the JWKS for up
    # to ~60 s and does not refetch on an unknown kid).
    key_publish_ahead_seconds: int = Field(default=120, ge=0)
    # Rotate automatically once the current key has signed this long (None: only on command).
    key_rotation_interval_seconds: int | None = Field(default=None, gt=0)
    # How long a replica trusts its in-memory copy of the keys before reading them again (so a
    # rotation by another replica is seen within this time).
    key_cache_seconds: float = Field(default=10.0, ge=0, le=60)
    # Verifiers' clock skew allowance: a retired key stays published this much past its last token.
    jwt_clock_skew_seconds: int = Field(default=60, ge=0, le=600)

    @field_validator("key_encryption_key")
    @classmethod
    def _kek_is_32_bytes(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and value.get_secret_value() != "":
            decode_kek(value.get_secret_value())
        return value

    @property
    def kek(self) -> bytes | None:
        """The key-encryption key as 32 raw bytes, or None when none is configured."""
        if self.key_encryption_key is None or self.key_encryption_key.get_secret_value() == "":
            return None
        return decode_kek(self.key_encryption_key.get_secret_value())
