"""OpenTelemetry tracing: off by default, an exporter turns it on (console or OTLP/gRPC)."""

from __future__ import annotations

import grpc
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from .config import ServiceSettings


def _exporter(settings: ServiceSettings) -> SpanExporter | None:
    if settings.otel_exporter == "console":
        return ConsoleSpanExporter()
    if settings.otel_exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=settings.otel_endpoint, insecure=True)
    return None


def setup_tracing(settings: ServiceSettings) -> list[grpc.aio.ServerInterceptor]:
    """Install a tracer provider and return the server interceptors; [] when tracing is off."""
    exporter = _exporter(settings)
    if exporter is None:
        return []
    provider = TracerProvider(resource=Resource.create({"service.name": settings.service_name}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor()]


def client_interceptors(settings: ServiceSettings) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors for a service's own gRPC clients (e.g. payment calling booking)."""
    if settings.otel_exporter == "none":
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors())


def shutdown_tracing() -> None:
    provider = trace.get_tracer_provider()
    shutdown = getattr(provider, "shutdown", None)
    if shutdown is not None:
        shutdown()
