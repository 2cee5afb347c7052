"""The edge's status feed: Envoy answers the open waiting rooms' public status itself.

``python -m edge.feed [--profile P] [--cluster] [-c envoy.yaml]``, beside the edge's Envoy (devstack
runs it; on Kubernetes it is a container of the edge's pod, k8s/base/edge).

In a sale, nearly every request is a fan polling ``GET /v1/events/{event}/queue``. The front's
cache answered those at about 128k of Envoy's instructions each, against 79k for an answer Envoy
holds in its route table (README: the cache's lookup, the copy of the stored answer and the parse
of its Date on every hit). So every FEED_SECONDS this process asks the queue for the status of
every open room (QueueService.ListOpenQueues: queue opened, sale not closed, one answer shared by
all callers of a replica within 0.2 s) and rewrites the front's route table, which Envoy reads
from a file (edge/config.py: routes/front.json, RDS): one ``direct_response`` route per open
room with fans in it, with the status exactly as the REST answer renders it, ahead of the
routes edge/config.py built (routes/base.json). A status is then at most about FEED_SECONDS +
0.2 s old, as the cache's was (``max-age=1``, counted in whole seconds from the answer's Date,
plus its fill).

Everything else is as before: a room that is not open (or not in the list yet), a poll that asks
for a fresh answer (``cache-control``) or carries a token goes the cache's way or to the queue.

- The file is replaced only when its text changes (Envoy rebuilds the front's route table on each
  replacement; with 100 open rooms that costs it about 4 % of a core at once a second).
- If the queue cannot be asked for STALE_SECONDS, the feed drops its routes, so fans see what the
  cache path says (the queue's answer or its error), never a status frozen in place; likewise on a
  graceful stop. A feed killed outright leaves its last routes until it is started again: on
  Kubernetes its container restarts (a liveness probe checks that it wrote within
  ALIVE_SECONDS: ``--alive``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from ticketping.queue.v1 import queue_service_pb2 as qpb
from ticketping.queue.v1 import queue_service_pb2_grpc as qpb_grpc

from devstack.layout import layout
from meshkit.channels import client_channel

from . import config

log = logging.getLogger("edge.feed")

FEED_SECONDS = 1.0
STALE_SECONDS = 3.0
CALL_TIMEOUT_SECONDS = 2.0
ALIVE_FILE = "feed.alive"  # touched after every round (not a route file: Envoy ignores it)
ALIVE_SECONDS = 10.0
# What GetQueue says of its answer (svc_queue/server.py PUBLIC_STATUS), said here by Envoy.
STATUS_CACHE_CONTROL = "public, max-age=1"
ROUTE_LIST = "type.googleapis.com/envoy.config.route.v3.RouteList"
# Rooms fed at most (the busiest with anyone in them): the rest are answered the cache's way.
MAX_ROOMS = 64


def status_body(queue: qpb.Queue) -> str:
    """The status as the edge's transcoder renders GetQueue's answer (edge/config.py
    print_options: camelCase, every field in field-number order, no whitespace), byte for byte."""
    fields = json_format.MessageToDict(queue, always_print_fields_with_no_presence=True)
    in_order = {f.json_name: fields[f.json_name] for f in queue.DESCRIPTOR.fields if f.json_name in fields}
    return json.dumps({k: _number(v) for k, v in in_order.items()}, separators=(",", ":"),
                      ensure_ascii=False)


def _number(v: Any) -> Any:
    # protobuf's C++ printer writes a whole double as 5, Python's json as 5.0
    return int(v) if isinstance(v, float) and v.is_integer() else v


def route_table(base: dict[str, Any], queues: Iterable[qpb.Queue],
                max_rooms: int = MAX_ROOMS) -> dict[str, Any]:
    """``base`` (the front's RouteConfiguration) with the status routes of the ``max_rooms``
    busiest rooms (most fans waiting or active) ahead of its own. A room nobody is in is left to
    the cache: nobody polls it, and the queue reads a quiet room's status less often
    (svc_queue QUIET_SECONDS), so the feed would hold it older than a second.

    Not as a longer list of routes: Envoy tries a list in order and checks a route's headers
    before its path, so each fed room would cost every request (with 300 rooms fed, /healthz
    fell from 45k to 14k answers/s). The virtual host gets a match tree instead: a request the
    cache would answer (edge.config.fed_request_predicate) has its ``:path`` looked up in a
    hash of the fed rooms' status routes; anything else, or a path not fed, gets base's routes.
    Each room adds one small route, so Envoy's reload stays short (it costs about 75 us per KB
    of the file)."""
    vhost = base["virtual_hosts"][0]
    rooms = sorted((q for q in queues if q.waiting_count + q.active_count > 0),
                   key=lambda q: (-(q.waiting_count + q.active_count), q.name))[:max_rooms]
    if not rooms:
        return base

    def routes(listed: list[dict[str, Any]]) -> dict[str, Any]:
        return {"action": {"name": "routes", "typed_config": {"@type": ROUTE_LIST, "routes": listed}}}

    own = routes(vhost["routes"])
    fed = {f"/v1/{q.name}": routes([config.fed_status_route(base, f"/v1/{q.name}", status_body(q),
                                                            STATUS_CACHE_CONTROL)])
           for q in rooms}
    by_path = {"matcher_tree": {"input": {"name": "path", "typed_config": {
                   "@type": "type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput",
                   "header_name": ":path"}},
               "exact_match_map": {"map": fed}},
               "on_no_match": own}
    tree = {"matcher_list": {"matchers": [{"predicate": config.fed_request_predicate(),
                                           "on_match": {"matcher": by_path}}]},
            "on_no_match": own}
    matched = {k: v for k, v in vhost.items() if k != "routes"}
    return {**base, "virtual_hosts": [{**matched, "matcher": tree}, *base["virtual_hosts"][1:]]}


class Feed:
    def __init__(self, routes: Path, stub: qpb_grpc.QueueServiceStub, *,
                 stale_seconds: float = STALE_SECONDS) -> None:
        self.routes = routes
        self.stub = stub
        self.stale_seconds = stale_seconds
        self.queues: list[qpb.Queue] = []
        self._asked_ok = time.monotonic()
        self._failing = False
        self._base_read: tuple[int, dict[str, Any]] | None = None

    async def round(self) -> bool:
        """Ask the queue once and write the table if it changed; True if it was written."""
        try:
            reply = await self.stub.ListOpenQueues(qpb.ListOpenQueuesRequest(),
                                                   timeout=CALL_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as err:
            if not self._failing:
                log.warning("the queue's open rooms could not be read: %s %s",
                            err.code().name, err.details())
            self._failing = True
            if time.monotonic() - self._asked_ok >= self.stale_seconds:
                self.queues = []
        else:
            if self._failing:
                log.info("the queue's open rooms are read again")
            self._failing = False
            self._asked_ok = time.monotonic()
            self.queues = list(reply.queues)
        written = self.write(self.queues)
        (self.routes / ALIVE_FILE).touch()
        return written

    def _base(self) -> dict[str, Any]:
        """base.json, read again only when it is replaced (the edge's config rendered anew)."""
        path = self.routes / config.BASE_ROUTES
        stamp = path.stat().st_mtime_ns
        if self._base_read is None or self._base_read[0] != stamp:
            self._base_read = (stamp, json.loads(path.read_text()))
        return self._base_read[1]

    def write(self, queues: Iterable[qpb.Queue]) -> bool:
        text = config.discovery_document(route_table(self._base(), queues))
        front = self.routes / config.FRONT_ROUTES
        with contextlib.suppress(FileNotFoundError):
            if front.read_text() == text:
                return False
        config.replace_file(front, text)
        return True

    async def run(self, stop: asyncio.Event, every: float = FEED_SECONDS) -> None:
        try:
            while not stop.is_set():
                started = time.monotonic()
                await self.round()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(0.0, every - (time.monotonic() - started)))
        finally:
            self.write([])  # stopped: no status stays frozen in the edge


async def _main(routes: Path, target: str) -> None:
    deadline = time.monotonic() + 60
    while not (routes / config.BASE_ROUTES).exists():  # the edge's config is written first
        if time.monotonic() > deadline:
            raise SystemExit(f"{routes / config.BASE_ROUTES} never appeared")
        await asyncio.sleep(0.2)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    channel = client_channel(target)
    try:
        log.info("feeding %s from %s", routes / config.FRONT_ROUTES, target)
        await Feed(routes, qpb_grpc.QueueServiceStub(channel)).run(stop)
    finally:
        await channel.close()


def alive(routes: Path, within: float = ALIVE_SECONDS) -> bool:
    try:
        return time.time() - (routes / ALIVE_FILE).stat().st_mtime < within
    except FileNotFoundError:
        return False


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default=None)
    ap.add_argument("--cluster", action="store_true",
                    help="in the edge's pod on Kubernetes: the queue by its Service's name")
    ap.add_argument("-c", "--config", type=Path, default=None,
                    help="the edge's envoy.yaml (its routes/ directory is beside it)")
    ap.add_argument("--alive", action="store_true",
                    help=f"exit 0 if the feed wrote within {ALIVE_SECONDS:.0f} s (a liveness probe)")
    args = ap.parse_args(argv)
    lay = layout(args.profile)
    routes = config.routes_dir(args.config or lay.run_dir / "envoy.yaml")
    if args.alive:
        sys.exit(0 if alive(routes) else 1)
    queue = lay.service("queue")
    target = (f"dns:///{queue.name}:{config.CLUSTER_GRPC_PORT}" if args.cluster
              else f"127.0.0.1:{queue.grpc_port}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(_main(routes, target))


if __name__ == "__main__":
    main()
