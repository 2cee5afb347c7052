"""grpc.aio server bootstrap, the same for every service.

A service's ``bootstrap.create_server(settings)`` opens what it needs (pools, clients, background
tasks, all registered on an ``AsyncExitStack``) and calls :func:`build_server`, which adds the
health and reflection services, the interceptors (errors, metrics, tracing) and binds the port.
``python -m svc_x`` calls :func:`main`: uvloop, SIGTERM → health NOT_SERVING → ``stop(grace)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from . import access, metrics
from .config import ServiceSettings, load
from .errors import DomainError, Unimplemented, status_of, to_status
from .logging import setup_logging
from .memory import tune_gc
from .tracing import setup_tracing, shutdown_tracing

log = logging.getLogger(__name__)
STOP_MARGIN = 10.0  # seconds past the grace a gRPC server stop may take before shutdown goes on
S = TypeVar("S", bound=ServiceSettings)


@dataclass
class Registration:
    """One gRPC service to serve: the generated ``add_XServicer_to_server`` and its servicer."""

    add_to_server: Callable[[Any, grpc.aio.Server], None]
    servicer: Any
    full_name: str  # e.g. "ticketping.catalog.v1.CatalogService"


@dataclass
class App:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: list[str]
    resources: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)
    # Called when the server starts to drain: a long call (a long poll) answers now with what it
    # has, rather than hold the drain up or be cut off at the grace's end.
    on_drain: list[Callable[[], None]] = field(default_factory=list)

    async def stop(self, grace: float) -> None:
        """Refuse new work (health NOT_SERVING), let calls in flight finish, then close resources."""
        await self.health.enter_graceful_shutdown()
        for release in self.on_drain:
            release()
        try:  # grpc cancels what is left after `grace`; never let a stuck stop keep the process
            await asyncio.wait_for(self.server.stop(grace), grace + STOP_MARGIN)
        except TimeoutError:
            log.error("gRPC server did not stop in time; closing its resources anyway",
                      extra={"grace_s": grace})
        await self.resources.aclose()


class _Interceptor(grpc.aio.ServerInterceptor):
    """Checks the method's access level, turns DomainError into a status with ErrorInfo, hides
    unexpected errors, records metrics."""

    def __init__(self) -> None:
        # The wrapped handler of each method, made once: the registered handlers never change,
        # and making one per call (the handler object and its closure) cost every call.
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method
        cached = self._wrapped.get(method)
        if cached is not None:
            return cached
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        self._wrapped[method] = wrapped = self._wrap(method, handler)
        return wrapped

    @staticmethod
    def _wrap(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        inner = handler.unary_unary
        level = access.level_of(method)

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            metrics.started(method)
            t0 = time.perf_counter()
            code = "OK"
            try:
                access.check(level, access.caller_of(context.invocation_metadata()))
                return await inner(request, context)
            except DomainError as err:
                code = err.code.name
                status = status_of(err)
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception:
                if _aborted(context):  # context.abort() raises an exception of grpc's own
                    code = context.code().name  # type: ignore[union-attr]
                    raise
                code = "INTERNAL"
                log.exception("unhandled error in %s", method)
                status = to_status(grpc.StatusCode.INTERNAL, "INTERNAL", "internal error")
            finally:
                # Counted before the status goes out (abort sends it): a client that has its
                # answer and then scrapes /metrics finds its call counted.
                metrics.observe(method, code, time.perf_counter() - t0)
            await context.abort_with_status(status)
            raise AssertionError("unreachable")  # abort_with_status always raises

        return grpc.unary_unary_rpc_method_handler(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _aborted(context: grpc.aio.ServicerContext) -> bool:
    code = context.code()
    return code is not None and code != grpc.StatusCode.OK


def mark_unimplemented(servicer: Any, base: type, note: str) -> None:
    """Make every RPC the servicer does not define answer UNIMPLEMENTED with a reason.

    The generated base class answers "Method not implemented!"; this says which issue builds it,
    so a caller (and the REST edge, as HTTP 501) gets an honest answer, not a silent stub.
    """
    own = type(servicer)
    for name, attr in vars(base).items():
        if name.startswith("_") or not callable(attr) or getattr(own, name) is not attr:
            continue

        async def unbuilt(request: Any, context: grpc.aio.ServicerContext, _n: str = name) -> Any:
            raise Unimplemented(
                "NOT_IMPLEMENTED",
                f"{base.__name__.removesuffix('Servicer')}.{_n} is not built yet: {note}",
                metadata={"method": _n},
            )

        setattr(servicer, name, unbuilt)


# Calls in flight when a connection reaches its age get this long to finish: more than the
# longest call a client may make (booking's WaitOrder, at most 30 s).
CONNECTION_AGE_GRACE_SECONDS = 45


# The edge takes up to MAX_REQUEST_HEADERS_KB (edge/config.py) of a client's headers and sends
# them on as metadata, plus the original path again (x-envoy-original-path) and its own: grpc's
# default limit (16 KiB soft) refused a long URL with RESOURCE_EXHAUSTED, a 429 whose message
# listed the edge's internal headers. Room for all of it: the edge, not the service, says "too
# large" (431, in the API's error shape).
MAX_METADATA_BYTES = 64 * 1024


def server_options(settings: ServiceSettings) -> list[tuple[str, int]]:
    options = [
        ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ("grpc.max_send_message_length", 16 * 1024 * 1024),
        ("grpc.max_metadata_size", MAX_METADATA_BYTES),
        ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
        ("grpc.so_reuseport", 0),
    ]
    if settings.grpc_max_connection_age_seconds is not None:
        options += [("grpc.max_connection_age_ms", int(settings.grpc_max_connection_age_seconds * 1000)),
                    ("grpc.max_connection_age_grace_ms", CONNECTION_AGE_GRACE_SECONDS * 1000)]
    return options


async def build_server(
    settings: ServiceSettings,
    registrations: Iterable[Registration],
    resources: contextlib.AsyncExitStack | None = None,
) -> App:
    regs = list(registrations)
    interceptors: list[grpc.aio.ServerInterceptor] = [*setup_tracing(settings), _Interceptor()]
    server = grpc.aio.server(interceptors=interceptors, options=server_options(settings))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for reg in regs:
        reg.add_to_server(reg.servicer, server)
    names = [reg.full_name for reg in regs]
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(f"{settings.grpc_host}:{settings.grpc_port}")
    if port == 0:
        raise SystemExit(f"cannot bind {settings.grpc_host}:{settings.grpc_port}")
    app = App(server, port, health_servicer, names, resources or contextlib.AsyncExitStack())
    return app


async def start(app: App) -> None:
    await app.server.start()
    for name in ("", *app.service_names):
        await app.health.set(name, health_pb2.HealthCheckResponse.SERVING)


def main(settings_cls: type[S], create_server: Callable[[S], Awaitable[App]]) -> None:
    """Entry point of ``python -m svc_x``."""
    settings = load(settings_cls)
    setup_logging(settings.service_name, settings.log_level, settings.log_json)
    uvloop.run(_serve(settings, create_server))


async def _serve(settings: S, create_server: Callable[[S], Awaitable[App]]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if settings.metrics_port is not None:
        metrics.serve_metrics(settings.metrics_port, settings.grpc_host)
    app = await create_server(settings)
    await start(app)
    tune_gc(settings.gc_young_threshold)
    log.info(
        "serving",
        extra={"grpc_port": app.port, "metrics_port": settings.metrics_port,
               "services": app.service_names},
    )
    await stop.wait()
    log.info("shutting down", extra={"grace_seconds": settings.shutdown_grace_seconds})
    await app.stop(settings.shutdown_grace_seconds)
    shutdown_tracing()
    log.info("stopped")
