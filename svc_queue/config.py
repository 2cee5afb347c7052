"""svc_queue's settings: the environment (TP_*) read once at start; a bad value stops it."""

from pydantic import Field

from meshkit.config import ServiceSettings


class Settings(ServiceSettings):
    service_name: str = "queue"
    redis_url: str = Field(min_length=1)
    redis_cluster: bool = False
    kafka_bootstrap: str = Field(min_length=1)
