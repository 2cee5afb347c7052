"""How svc_catalog is put together: its resources, its servicer, its server."""

import contextlib
from dataclasses import dataclass
from pathlib import Path

from ticketping.catalog.v1 import catalog_service_pb2_grpc as pb_grpc

from meshkit import resources
from meshkit.listen import Listener
from meshkit.server import App, Registration, build_server

from .adapters.postgres import EventRepository, change_listener
from .config import Settings
from .server import CatalogServicer
from .service import Catalog

SERVICE = "ticketping.catalog.v1.CatalogService"
MIGRATIONS = Path(__file__).parent / "adapters" / "migrations"


@dataclass
class Wired:
    """The server and the parts a test may want to look at (the cache, the repository's counters)."""

    app: App
    catalog: Catalog
    listener: Listener


async def wire(settings: Settings) -> Wired:
    stack = contextlib.AsyncExitStack()
    try:
        pool = await resources.postgres(stack, settings.postgres_dsn, MIGRATIONS,
                                          size=settings.postgres_pool_size)
        await resources.outbox_relay(stack, pool, settings.kafka_bootstrap,
                                     compression=settings.kafka_compression)
        catalog = Catalog(
            EventRepository(pool),
            cache_ttl=settings.cache_ttl_seconds,
            cache_max_entries=settings.cache_max_entries,
        )
        # Every replica drops what another one changed (PostgreSQL NOTIFY catalog_changed).
        listener = change_listener(settings.postgres_dsn, catalog.changed)
        await listener.start()
        stack.push_async_callback(listener.stop)
        servicer = CatalogServicer(catalog, max_age_seconds=settings.http_max_age_seconds)
        reg = Registration(pb_grpc.add_CatalogServiceServicer_to_server, servicer, SERVICE)
        app = await build_server(settings, [reg], stack)
        return Wired(app, catalog, listener)
    except BaseException:
        await stack.aclose()
        raise


async def create_server(settings: Settings) -> App:
    return (await wire(settings)).app
