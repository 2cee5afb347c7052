"""The edge as it runs on Kubernetes: services found by DNS name, not by address.

k8s/ runs the config `python -m edge.config --cluster` renders, where each service is a name
resolved (and resolved again) by Envoy's DNS cluster. There is no cluster DNS here, so a second
Envoy runs that placement with the name `localhost` for every service, on ports of its own, in
front of the test mesh: health, JWKS, REST and native gRPC all pass through the resolved hosts.
"""

from __future__ import annotations

import dataclasses
import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.components import another_envoy
from devstack.layout import Layout
from edge.config import CLUSTER, build, write_config

from ..integration.test_booking_recovery import free_port
from .test_mesh import ROUTES

pytestmark = pytest.mark.e2e

SHIFT = 300  # the second Envoy's ports: the test mesh's edge ports plus this


@pytest.fixture(scope="module")
def by_name(mesh: Layout) -> Iterator[Layout]:
    lay = dataclasses.replace(
        mesh, edge_port=mesh.edge_port + SHIFT, edge_inner_port=mesh.edge_inner_port + SHIFT,
        edge_keys_port=mesh.edge_keys_port + SHIFT, edge_fill_port=mesh.edge_fill_port + SHIFT,
        envoy_admin_port=mesh.envoy_admin_port + SHIFT)
    placement = dataclasses.replace(CLUSTER, host="127.0.0.1", service_host="localhost")
    path = write_config(lay, mesh.run_dir / "envoy-by-name.yaml", placement=placement)
    with another_envoy(mesh, "envoy-by-name", path, lay.envoy_admin_port):
        yield lay


def test_every_service_is_reached_through_a_resolved_name(by_name: Layout):
    admin = f"http://127.0.0.1:{by_name.envoy_admin_port}"
    clusters = json.load(urllib.request.urlopen(f"{admin}/clusters?format=json", timeout=5))
    hosts = {c["name"]: c.get("host_statuses", []) for c in clusters["cluster_statuses"]}
    for svc in by_name.services:
        (host,) = hosts[svc.name]
        assert host["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": svc.grpc_port}
        assert host["hostname"] == "localhost"
    with httpx.Client(base_url=f"http://127.0.0.1:{by_name.edge_port}", timeout=10) as http:
        for path in ("/healthz", *(f"/healthz/{s.name}" for s in by_name.services)):
            assert http.get(path).status_code == 200, path
        for service, (method, path, body, status, reason) in ROUTES.items():
            resp = http.request(method, path, json=body)
            assert resp.status_code == status, (service, resp.text)
            if reason is not None:
                assert resp.json()["details"][0]["reason"] == reason, service


async def test_native_grpc_reaches_each_service_by_name(by_name: Layout):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{by_name.edge_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for s in by_name.services:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=s.proto_service),
                                     metadata=[("x-tp-service", s.name)], timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, s.name


def test_the_edge_is_ready_while_each_service_has_a_healthy_replica(mesh: Layout):
    """In a cluster each replica is a host of its service's Envoy cluster, and the kubelet's
    readiness probe is /healthz: one replica down must not take every edge pod out of its
    Service. The real config, with a dead second replica added to identity and only dead
    replicas for catalog."""
    lay = dataclasses.replace(
        mesh, edge_port=mesh.edge_port + 2 * SHIFT, edge_inner_port=mesh.edge_inner_port + 2 * SHIFT,
        edge_keys_port=mesh.edge_keys_port + 2 * SHIFT, edge_fill_port=mesh.edge_fill_port + 2 * SHIFT,
        envoy_admin_port=mesh.envoy_admin_port + 2 * SHIFT)
    config = build(lay)
    dead = [free_port(), free_port()]  # nothing listens there

    def endpoints(cluster: str) -> list[dict[str, Any]]:
        (c,) = (c for c in config["static_resources"]["clusters"] if c["name"] == cluster)
        return c["load_assignment"]["endpoints"][0]["lb_endpoints"]

    def host(port: int) -> dict[str, Any]:
        return {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}

    endpoints("identity").append(host(dead[0]))
    endpoints("catalog")[:] = [host(p) for p in dead]
    path = mesh.run_dir / "envoy-one-replica-down.yaml"
    path.write_text(yaml.safe_dump(config))
    with another_envoy(mesh, "envoy-one-replica-down", path, lay.envoy_admin_port), \
            httpx.Client(base_url=f"http://127.0.0.1:{lay.edge_port}", timeout=10) as http:
        assert http.get("/healthz/identity").status_code == 200  # one of two replicas is enough
        assert http.get("/healthz/queue").status_code == 200
        assert http.get("/healthz/catalog").status_code == 503  # none at all is not
        assert http.get("/healthz").status_code == 503
