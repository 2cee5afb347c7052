"""Prometheus metrics per gRPC method: requests, errors and a latency histogram.

Served on the service's metrics port (``TP_METRICS_PORT``) at ``/metrics``.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

STARTED = Counter(
    "grpc_server_started_total", "RPCs started on the server.", ["grpc_service", "grpc_method"]
)
HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, by status code.",
    ["grpc_service", "grpc_method", "grpc_code"],
)
ERRORS = Counter(
    "grpc_server_errors_total",
    "RPCs that ended with a status other than OK.",
    ["grpc_service", "grpc_method", "grpc_code"],
)
LATENCY = Histogram(
    "grpc_server_handling_seconds",
    "Time to handle an RPC on the server.",
    ["grpc_service", "grpc_method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


def split_method(full_method: str) -> tuple[str, str]:
    """'/pkg.Service/Method' -> ('pkg.Service', 'Method')."""
    _, service, method = full_method.split("/", 2)
    return service, method


def observe(full_method: str, code_name: str, seconds: float) -> None:
    service, method = split_method(full_method)
    HANDLED.labels(service, method, code_name).inc()
    LATENCY.labels(service, method).observe(seconds)
    if code_name != "OK":
        ERRORS.labels(service, method, code_name).inc()


def started(full_method: str) -> None:
    STARTED.labels(*split_method(full_method)).inc()


def serve_metrics(port: int, host: str = "127.0.0.1") -> int:
    """Start the /metrics HTTP endpoint in a background thread; return the bound port."""
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_address[1])
