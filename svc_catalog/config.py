"""svc_catalog's settings: the environment (TP_*) read once at start; a bad value stops it."""

from pydantic import Field

from meshkit.config import ServiceSettings


class Settings(ServiceSettings):
    service_name: str = "catalog"
    postgres_dsn: str = Field(min_length=1)
    kafka_bootstrap: str = Field(min_length=1)
    # In-process read cache: entries live this long at most (a fallback: writes invalidate at
    # once, in every replica through PostgreSQL NOTIFY catalog_changed).
    cache_ttl_seconds: float = Field(default=5.0, ge=0)
    cache_max_entries: int = Field(default=10_000, ge=1)
    # `cache-control: public, max-age=N` on public reads (the edge and the apps may cache them).
    http_max_age_seconds: int = Field(default=5, ge=0)
