"""edge/feed.py: the open rooms' status routes, Envoy's acceptance of them, and the feed's rounds
against a real gRPC server (the whole path through a running Envoy: tests/e2e/test_queue_edge.py)."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import grpc
import pytest
import yaml
from google.protobuf import duration_pb2
from ticketping.queue.v1 import queue_service_pb2 as qpb
from ticketping.queue.v1 import queue_service_pb2_grpc as qpb_grpc

from devstack.components import ENVOY
from devstack.layout import layout
from edge import config, feed


def _room(i: int, waiting: int = 0, **fields: object) -> qpb.Queue:
    return qpb.Queue(name=f"events/{i:08d}-0000-4000-8000-000000000000/queue", waiting_count=waiting,
                     **fields)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """envoy.yaml and routes/ for the test profile, as devstack writes them."""
    out = tmp_path_factory.mktemp("edge") / "envoy.yaml"
    return config.write_config(layout("test"), out)


def _base(written: Path) -> dict:
    return json.loads((config.routes_dir(written) / config.BASE_ROUTES).read_text())


def test_a_status_is_rendered_as_the_transcoder_renders_it():
    ttl = duration_pb2.Duration(seconds=600)
    q = qpb.Queue(name="events/e1/queue", serving_number=12, waiting_count=0, active_count=3,
                  admit_rate_per_second=50.0, max_active=1000, paused=False, session_ttl=ttl)
    assert feed.status_body(q) == (
        '{"name":"events/e1/queue","servingNumber":"12","waitingCount":"0","activeCount":"3",'
        '"admitRatePerSecond":50,"maxActive":1000,"paused":false,"sessionTtl":"600s","soldOut":false}')
    q.admit_rate_per_second = 12.5
    assert '"admitRatePerSecond":12.5,' in feed.status_body(q)


def test_the_busiest_rooms_are_fed_behind_one_lookup_of_the_path(written):
    base = _base(written)
    assert feed.route_table(base, []) == base
    rooms = [_room(i, waiting=i % 7) for i in range(10)]
    table = feed.route_table(base, rooms, max_rooms=4)
    (vhost,) = table["virtual_hosts"]
    assert "routes" not in vhost
    tree = vhost["matcher"]
    own = base["virtual_hosts"][0]["routes"]
    assert tree["on_no_match"]["action"]["typed_config"]["routes"] == own
    (entry,) = tree["matcher_list"]["matchers"]
    assert entry["predicate"] == config.fed_request_predicate()
    by_path = entry["on_match"]["matcher"]
    assert by_path["on_no_match"] == tree["on_no_match"]
    fed = by_path["matcher_tree"]["exact_match_map"]["map"]
    # most fans waiting first (6, 5, 4, 3 of 0..6 over ten rooms), ties by name
    assert set(fed) == {f"/v1/{_room(i).name}" for i in (6, 5, 4, 3)}
    (route,) = fed[f"/v1/{_room(6).name}"]["action"]["typed_config"]["routes"]
    assert route["match"] == {"path": f"/v1/{_room(6).name}"}
    assert route["direct_response"]["body"]["inline_string"] == feed.status_body(rooms[6])
    off = route["typed_per_filter_config"]
    assert "envoy.filters.http.cache" in off and "envoy.filters.http.grpc_json_transcoder" in off


def test_a_room_nobody_is_in_is_left_to_the_cache(written):
    """Nobody polls it, and the queue reads a quiet room's status only every few seconds."""
    base = _base(written)
    assert feed.route_table(base, [_room(1), _room(2, sold_out=True)]) == base
    active = _room(3, active_count=2)
    table = feed.route_table(base, [_room(1), active, _room(4, waiting=1)])
    fed = table["virtual_hosts"][0]["matcher"]["matcher_list"]["matchers"][0]["on_match"]["matcher"]
    assert set(fed["matcher_tree"]["exact_match_map"]["map"]) == {f"/v1/{_room(3).name}",
                                                                 f"/v1/{_room(4).name}"}


def test_envoy_accepts_the_front_with_rooms_fed(written, tmp_path):
    bootstrap = yaml.safe_load(written.read_text())
    front = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    del front["rds"]
    table = feed.route_table(_base(written), [_room(i, waiting=1) for i in range(3)])
    front["route_config"] = {k: v for k, v in table.items() if k != "@type"}
    path = tmp_path / "fed.yaml"
    path.write_text(yaml.safe_dump(bootstrap))
    check = subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-2000:]


class _Rooms(qpb_grpc.QueueServiceServicer):
    def __init__(self) -> None:
        self.open: list[qpb.Queue] = []

    async def ListOpenQueues(self, request, context):  # noqa: N802 - gRPC's name
        return qpb.ListOpenQueuesResponse(queues=self.open)


async def _serve(rooms: _Rooms) -> tuple[grpc.aio.Server, grpc.aio.Channel]:
    """A real gRPC server answering ListOpenQueues from ``rooms``, and a channel to it."""
    server = grpc.aio.server()
    qpb_grpc.add_QueueServiceServicer_to_server(rooms, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, grpc.aio.insecure_channel(f"127.0.0.1:{port}")


async def test_the_feed_writes_on_change_and_drops_its_rooms_when_the_queue_is_gone(written):
    routes = config.routes_dir(written)
    front = routes / config.FRONT_ROUTES
    base_doc = config.discovery_document(_base(written))
    rooms = _Rooms()
    server, channel = await _serve(rooms)
    try:
        f = feed.Feed(routes, qpb_grpc.QueueServiceStub(channel), stale_seconds=0.5)
        assert not await f.round() and front.read_text() == base_doc  # nothing open yet
        rooms.open = [_room(1, waiting=3)]
        assert await f.round()
        assert f"/v1/{_room(1).name}" in front.read_text()
        assert feed.alive(routes)
        assert not await f.round()  # the same answer: the file is left as it is
        await server.stop(None)
        assert not await f.round()  # the queue just went: the last statuses stay a moment
        await asyncio.sleep(0.6)
        assert await f.round() and front.read_text() == base_doc  # then they go
    finally:
        await channel.close()
        await server.stop(None)


async def test_a_stopped_feed_leaves_no_status_behind(written):
    routes = config.routes_dir(written)
    rooms = _Rooms()
    rooms.open = [_room(2, waiting=1)]
    server, channel = await _serve(rooms)
    try:
        stop = asyncio.Event()
        fed = feed.Feed(routes, qpb_grpc.QueueServiceStub(channel))
        running = asyncio.create_task(fed.run(stop, every=0.05))
        for _ in range(100):
            if _room(2).name in (routes / config.FRONT_ROUTES).read_text():
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the feed never wrote the room")
        stop.set()
        await running
        assert (routes / config.FRONT_ROUTES).read_text() == config.discovery_document(_base(written))
    finally:
        await channel.close()
        await server.stop(None)
