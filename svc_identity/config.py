"""svc_identity's settings: the environment (TP_*) read once at start; a bad value stops it."""

from __future__ import annotations

from pydantic import Field, model_validator

from meshkit import access
from meshkit.config import ServiceSettings, SigningKeySettings
from meshkit.jwtkeys import decode_kek

from .domain.tokens import MAX_ACCESS_TTL_SECONDS

__all__ = ["Settings", "decode_kek"]

# argon2id with OWASP's password-storage configuration (m=19 MiB, t=2, p=1), which OWASP rates as
# strong as its other listed settings. RFC 9106's low-memory profile (m=64 MiB, t=3, p=4) costs about
# 4x the CPU per hash (0.13 s against 0.03 s on one core here), and a sale's first minute is a burst
# of log-ins that hashing would otherwise starve. Deployments may raise these; old hashes keep
# verifying (their parameters are in the hash) and are re-hashed on the next log-in.
_ARGON2_TIME_COST, _ARGON2_MEMORY_KIB, _ARGON2_PARALLELISM = 2, 19 * 1024, 1


class Settings(ServiceSettings, SigningKeySettings):
    service_name: str = "identity"
    postgres_dsn: str = Field(min_length=1)
    redis_url: str = Field(min_length=1)
    redis_cluster: bool = False
    # Prefix of every Redis key identity writes (login throttling); tests give each server its own.
    redis_key_prefix: str = Field(default="tp:identity", min_length=1, pattern=r"^[A-Za-z0-9:_.-]+$")

    # --- user tokens (ES256 JWTs) ---
    jwt_issuer: str = Field(default=access.USER_TOKEN_ISSUER, min_length=1)  # "ticketping-identity"
    jwt_audience: str = Field(default=access.USER_TOKEN_AUDIENCE, min_length=1)  # "ticketping"
    access_token_ttl_seconds: int = Field(default=MAX_ACCESS_TTL_SECONDS, ge=30, le=MAX_ACCESS_TTL_SECONDS)
    refresh_token_ttl_seconds: int = Field(default=30 * 24 * 3600, ge=60)
    # --- signing keys (stored in PostgreSQL; rotated by `rotate-keys` or the interval) ---
    # key_encryption_key, key_publish_ahead_seconds, key_rotation_interval_seconds,
    # key_cache_seconds, jwt_clock_skew_seconds: SigningKeySettings.

    # --- QueueService, for the admission-token keys merged into /.well-known/jwks.json ---
    queue_addr: str | None = None  # host:port; unset: the public JWKS holds identity's keys only
    queue_timeout_seconds: float = Field(default=0.5, gt=0, le=10)
    queue_keys_cache_seconds: float = Field(default=5.0, ge=0, le=60)

    # --- passwords (argon2id); the defaults are OWASP's (see _ARGON2_* above) ---
    argon2_time_cost: int = Field(default=_ARGON2_TIME_COST, ge=1)
    argon2_memory_cost_kib: int = Field(default=_ARGON2_MEMORY_KIB, ge=8)
    argon2_parallelism: int = Field(default=_ARGON2_PARALLELISM, ge=1)
    # Threads hashing at once (each holds argon2_memory_cost_kib of memory while it runs).
    password_hash_workers: int = Field(default=4, ge=1, le=64)
    password_max_length: int = Field(default=1024, ge=16)

    # --- failed-login throttling (Redis) ---
    login_max_failures_per_account: int = Field(default=5, ge=1)
    login_max_failures_per_client: int = Field(default=20, ge=1)
    # Failures are forgotten this long after the last one (or after the block it caused ends).
    login_failure_window_seconds: int = Field(default=900, ge=1)
    # Past the threshold each failure blocks for base * 2^(failures - threshold), at most max.
    login_backoff_base_seconds: float = Field(default=30.0, gt=0)
    login_backoff_max_seconds: float = Field(default=900.0, gt=0)
    # A Redis call of the throttle slower than this is skipped (logins keep working, logged).
    throttle_timeout_seconds: float = Field(default=0.5, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.argon2_memory_cost_kib < 8 * self.argon2_parallelism:
            raise ValueError("argon2_memory_cost_kib must be at least 8 * argon2_parallelism")
        if self.login_backoff_max_seconds < self.login_backoff_base_seconds:
            raise ValueError("login_backoff_max_seconds must be >= login_backoff_base_seconds")
        return self
