"""Prometheus metrics per gRPC method: requests, errors and a latency histogram.

Served on the service's metrics port (``TP_METRICS_PORT``) at ``/metrics``.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

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


@functools.cache
def _children(full_method: str) -> tuple[Any, Any, Any]:
    """The method's started counter, latency histogram and OK counter (looked up once: a labels()
    lookup per call was three per RPC). Only methods the server has are ever asked for."""
    service, method = split_method(full_method)
    return (STARTED.labels(service, method), LATENCY.labels(service, method),
            HANDLED.labels(service, method, "OK"))


def observe(full_method: str, code_name: str, seconds: float) -> None:
    _, latency, ok = _children(full_method)
    latency.observe(seconds)
    if code_name == "OK":
        ok.inc()
        return
    service, method = split_method(full_method)
    HANDLED.labels(service, method, code_name).inc()
    ERRORS.labels(service, method, code_name).inc()


def started(full_method: str) -> None:
    _children(full_method)[0].inc()


def serve_metrics(port: int, host: str = "127.0.0.1") -> int:
    """Start the /metrics HTTP endpoint in a background thread; return the bound port."""
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_address[1])


class _PoolCollector(Collector):
    """psycopg_pool's own counters, read at each scrape: is the service waiting for connections?"""

    def __init__(self) -> None:
        self.pools: weakref.WeakSet[Any] = weakref.WeakSet()

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        gauges = {"pool_max": "most connections", "pool_size": "connections open",
                  "pool_available": "connections idle", "requests_waiting": "requests waiting now"}
        names = {"requests_waiting": "pool_requests_waiting"}
        counters = {"requests_num": ("meshkit_db_pool_requests", "connections asked for"),
                    "requests_queued": ("meshkit_db_pool_requests_queued", "requests that had to wait"),
                    "requests_wait_ms": ("meshkit_db_pool_wait_milliseconds", "time spent waiting")}
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for key, text in gauges.items():
            name = f"meshkit_db_{names.get(key, key)}"
            families[key] = GaugeMetricFamily(name, f"PostgreSQL pool: {text}.", labels=["pool"])
        for key, (metric, text) in counters.items():
            families[key] = CounterMetricFamily(metric, f"PostgreSQL pool: {text}.", labels=["pool"])
        seen: dict[str, int] = {}
        for pool in list(self.pools):
            seen[pool.name] = seen.get(pool.name, 0) + 1
            label = pool.name if seen[pool.name] == 1 else f"{pool.name}#{seen[pool.name]}"
            stats = pool.get_stats()
            for key, family in families.items():
                family.add_metric([label], stats.get(key, 0))
        yield from families.values()


_POOLS = _PoolCollector()
REGISTRY.register(_POOLS)


def watch_pool(pool: Any) -> None:
    """Export ``pool``'s use (a psycopg_pool pool) on /metrics while it lives."""
    _POOLS.pools.add(pool)


# The outbox relays' and event consumers' counts: is every committed event published, and every
# published one handled? (Counters of the process, so they never go down when one relay or
# consumer object is replaced by another.)
OUTBOX_PUBLISHED = Counter("meshkit_outbox_published", "Outbox relay: rows published to Kafka.")
OUTBOX_FAILED_PASSES = Counter("meshkit_outbox_failed_passes",
                               "Outbox relay: publish passes that failed (rows stay, sent again).")
OUTBOX_PURGED = Counter("meshkit_outbox_purged", "Outbox relay: published rows deleted after retention.")
_CONSUMER = {
    "processed": "events handled and committed",
    "duplicates": "events seen before (skipped)",
    "retries": "failed handler attempts, retried",
    "dead_lettered": "events parked on the dead-letter topic",
    "commit_failures": "offset commits that failed",
    "marks_purged": "de-duplication marks deleted after their retention",
}
_CONSUMER_COUNTERS = {name: Counter(f"meshkit_consumer_{name}", f"Event consumer: {text}.", ["group"])
                      for name, text in _CONSUMER.items()}


def consumer_counters(group: str) -> dict[str, Any]:
    """One consumer group's counters (children looked up once), by the names of _CONSUMER."""
    return {name: counter.labels(group) for name, counter in _CONSUMER_COUNTERS.items()}


class _EventsCollector(Collector):
    """What is read at each scrape: when a relay last published, and each consumer's lag."""

    def __init__(self) -> None:
        self.relays: weakref.WeakSet[Any] = weakref.WeakSet()
        self.consumers: weakref.WeakSet[Any] = weakref.WeakSet()

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        relays, consumers = list(self.relays), list(self.consumers)
        if relays:  # a service without an outbox has no such time (an alert watches it)
            last = GaugeMetricFamily("meshkit_outbox_last_pass_timestamp_seconds",
                                     "Outbox relay: last successful publish pass (unix time, 0: never).")
            last.add_metric([], max(r.last_pass_at for r in relays))
            yield last
        lag = GaugeMetricFamily("meshkit_consumer_lag", "Event consumer: records published to its "
                                "partitions and not handled yet (as of its last fetch).", labels=["group"])
        for c in consumers:
            lag.add_metric([c.group_id], c.lag())
        yield lag


_EVENTS = _EventsCollector()
REGISTRY.register(_EVENTS)


def watch_relay(relay: Any) -> None:
    """Export when an outbox relay last published on /metrics while it lives."""
    _EVENTS.relays.add(relay)


def watch_consumer(consumer: Any) -> None:
    """Export an event consumer's lag on /metrics while it lives."""
    _EVENTS.consumers.add(consumer)
