"""svc_payment's settings: the environment (TP_*) read once at start; a bad value stops it."""

from pydantic import Field

from meshkit.config import ServiceSettings


class Settings(ServiceSettings):
    service_name: str = "payment"
    postgres_dsn: str = Field(min_length=1)
    kafka_bootstrap: str = Field(min_length=1)
