"""Settings shared by every service, read from the environment (prefix ``TP_``) at start.

A service subclasses :class:`ServiceSettings`, adds its own fields, and calls :func:`load`, which
fails fast, before anything listens, with one line per missing or bad value.
"""

from __future__ import annotations

import sys
from typing import Literal, TypeVar

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TP_", extra="ignore", frozen=True)

    service_name: str = Field(min_length=1)
    grpc_host: str = "127.0.0.1"
    grpc_port: int = Field(default=0, ge=0, le=65535)  # 0: pick a free port (tests)
    metrics_port: int | None = Field(default=None, ge=0, le=65535)  # None: no metrics endpoint
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_json: bool = True
    shutdown_grace_seconds: float = Field(default=10.0, gt=0)
    # OpenTelemetry: off unless an exporter is named.
    otel_exporter: Literal["none", "console", "otlp"] = "none"
    otel_endpoint: str = "http://127.0.0.1:4317"
    kafka_bootstrap: str | None = None
    # Most PostgreSQL connections one replica keeps (services without a database ignore it). A
    # sale's burst of holds, orders and confirmations each want one; at 10, requests and the
    # event consumers queued for connections and confirmations took seconds.
    postgres_pool_size: int = Field(default=24, ge=2, le=200)


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
