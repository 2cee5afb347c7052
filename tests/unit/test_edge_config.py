"""Every Envoy config the project produces passes `envoy --mode validate`, and keeps its promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from devstack.layout import DESCRIPTOR_SET, layout
from edge.config import (
    CACHE_VALIDATORS,
    CLUSTER,
    CLUSTER_GRPC_PORT,
    CORE_CLUSTER,
    FILL_CLUSTER,
    TRANSPORT_HEADERS,
    TRUSTED_HEADER_PREFIXES,
    TRUSTED_HEADERS,
    build,
    cluster_layout,
    write_config,
)

ENVOY = Path(sys.executable).parent / "envoy"


@pytest.fixture(params=["dev", "test", "cluster"])
def config_file(request, tmp_path) -> Path:
    """The local profiles' configs, and the one the edge's pod renders on Kubernetes (k8s/)."""
    if request.param == "cluster":
        return write_config(cluster_layout(layout("dev")), tmp_path / "envoy-cluster.yaml",
                            placement=CLUSTER)
    return write_config(layout(request.param), tmp_path / f"envoy-{request.param}.yaml")


def test_the_cluster_config_finds_every_replica_by_name_and_logs_to_stdout():
    cfg = build(cluster_layout(layout("dev")), DESCRIPTOR_SET, CLUSTER)
    res = cfg["static_resources"]
    (edge,) = [lis for lis in res["listeners"] if lis["name"] == "edge"]
    assert edge["address"]["socket_address"]["address"] == "0.0.0.0"
    inner = [lis for lis in res["listeners"] if lis["name"] != "edge"]
    assert {lis["address"]["socket_address"]["address"] for lis in inner} == {"127.0.0.1"}
    assert cfg["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    for svc in layout("dev").services:
        (cluster,) = [c for c in res["clusters"] if c["name"] == svc.name]
        assert cluster["cluster_type"]["name"] == "envoy.clusters.dns" and "type" not in cluster
        (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        assert endpoint["endpoint"]["address"]["socket_address"] == {
            "address": svc.name, "port_value": CLUSTER_GRPC_PORT}
    paths = [log["typed_config"]["path"] for lis in res["listeners"]
             for log in lis["filter_chains"][0]["filters"][0]["typed_config"].get("access_log", [])]
    assert len(paths) >= 2 and set(paths) == {"/dev/stdout"}


def test_envoy_validates_the_generated_config(config_file):
    proc = subprocess.run(
        [str(ENVOY), "--mode", "validate", "-c", str(config_file), "--log-level", "warn"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def _filters(cfg: dict, listener: str = "edge_core") -> list[dict]:
    (found,) = [lis for lis in cfg["static_resources"]["listeners"] if lis["name"] == listener]
    return found["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]


def test_filter_chain_order_and_sanitizing():
    cfg = build(layout("dev"), DESCRIPTOR_SET)
    names = [f["name"].rsplit(".", 1)[-1] for f in _filters(cfg)]
    assert names[-6:] == ["header_mutation", "lua", "grpc_json_transcoder", "jwt_authn", "rbac", "router"]
    assert names[0] == "buffer" and set(names[1:-6]) == {"health_check"}
    # The front: the cache, then the core's chain; never both at work on one route (they break
    # each other, edge-notes.md).
    front = _filters(cfg, "edge")
    assert [f["name"] for f in front] == [
        "envoy.filters.http.cache", *(f["name"] for f in _filters(cfg))]
    core_filters = {f["name"] for f in front[1:-1]}
    for route in _routes(cfg):
        off = {name for name, c in route.get("typed_per_filter_config", {}).items() if c["disabled"]}
        assert off in (core_filters, {"envoy.filters.http.cache"}), route["match"]
    mutation = next(f for f in _filters(cfg) if f["name"].endswith("header_mutation"))
    removed = [m["remove_on_match"]["key_matcher"]
               for m in mutation["typed_config"]["mutations"]["request_mutations"]
               if "remove_on_match" in m]
    assert {m["prefix"] for m in removed if "prefix" in m} == set(TRUSTED_HEADER_PREFIXES)
    assert {m["exact"] for m in removed if "exact" in m} == set(TRUSTED_HEADERS)
    assert "x-admission-token" not in TRUSTED_HEADERS
    transcoder = _filters(cfg)[-4]["typed_config"]
    assert transcoder["convert_grpc_status"] is True
    assert set(transcoder["services"]) == {s.proto_service for s in layout("dev").services}


def _hcm(cfg: dict, listener: str) -> dict:
    (found,) = [lis for lis in cfg["static_resources"]["listeners"] if lis["name"] == listener]
    return found["filter_chains"][0]["filters"][0]["typed_config"]


def _routes(cfg: dict, listener: str = "edge") -> list[dict]:
    (found,) = [lis for lis in cfg["static_resources"]["listeners"] if lis["name"] == listener]
    hcm = found["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm["route_config"]["virtual_hosts"][0]["routes"]


def test_the_fronts_cache_misses_are_collapsed_in_edge_fill():
    cfg = build(layout("dev"), DESCRIPTOR_SET)
    fill = [f["name"].rsplit(".", 1)[-1] for f in _filters(cfg, FILL_CLUSTER)]
    # Only the router behind the cache: cache_v2 sends its own upstream requests past the rest.
    assert fill == ["header_mutation", "cache_v2", "router"]
    mutations = _filters(cfg, FILL_CLUSTER)[0]["typed_config"]["mutations"]
    assert {m["remove"] for m in mutations["request_mutations"]} == set(CACHE_VALIDATORS)
    assert "if-modified-since" in CACHE_VALIDATORS
    assert {m["remove"] for m in mutations["response_mutations"]} == set(TRANSPORT_HEADERS)
    assert not any(h.startswith("cache-") or h in ("content-type", "date") for h in TRANSPORT_HEADERS)
    assert [r["route"]["cluster"] for r in _routes(cfg, FILL_CLUSTER)] == [CORE_CLUSTER]

    first, fresh, *rest = _routes(cfg)
    assert first["route"]["cluster"] == FILL_CLUSTER
    headers = {h["name"]: h for h in first["match"]["headers"]}
    assert headers[":method"]["string_match"] == {"exact": "GET"}
    for token in ("authorization", "x-admission-token", "cache-control"):
        assert headers[token]["present_match"] is False
    assert headers[":path"]["invert_match"] and headers["content-type"]["invert_match"]
    # Nothing to collapse: requests that ask for a fresh answer go to the core, to be stored.
    assert fresh["route"]["cluster"] == CORE_CLUSTER
    assert [h for h in fresh["match"]["headers"]] == [
        h for h in first["match"]["headers"] if h["name"] != "cache-control"]
    # Everything else (tokens, writes, native gRPC, health) is handled in the front, in one hop,
    # by the core's own routes, and never stored.
    assert [{k: v for k, v in r.items() if k != "typed_per_filter_config"} for r in rest] == \
        _routes(cfg, CORE_CLUSTER)
    assert all(r["typed_per_filter_config"]["envoy.filters.http.cache"]["disabled"] for r in rest)
    # What the front handles itself is logged there; a cached poll is not logged at all.
    assert "or_filter" in _hcm(cfg, "edge")["access_log"][0]["filter"]


def test_no_router_adds_envoy_headers():
    cfg = build(layout("test"), DESCRIPTOR_SET)
    routers = [f for lis in cfg["static_resources"]["listeners"]
               for chain in lis["filter_chains"] for nf in chain["filters"]
               for f in nf.get("typed_config", {}).get("http_filters", []) if f["name"].endswith(".router")]
    assert len(routers) >= 4  # edge, edge_fill, edge_core, edge_keys
    assert all(r["typed_config"]["suppress_envoy_headers"] for r in routers)


def test_long_polls_outlast_their_service_limit_in_front_and_core():
    """WaitOrder may wait 30 s: its route allows 35 s and no per-try timeout, ahead of its
    service's 15 s catch-all, in every listener that routes to the services."""
    from svc_booking.server import WAIT_MAX
    cfg = build(layout("test"), DESCRIPTOR_SET)
    path = "/ticketping.booking.v1.BookingService/WaitOrder"
    for lis in cfg["static_resources"]["listeners"][:3:2]:  # edge (front), edge_core
        routes = lis["filter_chains"][0]["filters"][0]["typed_config"]["route_config"][
            "virtual_hosts"][0]["routes"]
        mine = [i for i, r in enumerate(routes) if r["match"].get("path") == path]
        catch_all = [i for i, r in enumerate(routes)
                     if r["match"].get("prefix") == "/ticketping.booking.v1.BookingService/"]
        assert len(mine) == 1 and mine[0] < catch_all[0], lis["name"]
        route = routes[mine[0]]["route"]
        assert route["cluster"] == "booking" and "per_try_timeout" not in route["retry_policy"]
        assert float(route["timeout"].rstrip("s")) > WAIT_MAX.total_seconds()


def test_admin_on_loopback_and_upstreams_guarded():
    cfg = build(layout("dev"), DESCRIPTOR_SET)
    assert cfg["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    for listener in cfg["static_resources"]["listeners"][1:]:
        assert listener["address"]["socket_address"]["address"] == "127.0.0.1"
    services = {s.name for s in layout("dev").services}
    for cluster in (c for c in cfg["static_resources"]["clusters"] if c["name"] in services):
        assert cluster["health_checks"][0]["grpc_health_check"]["service_name"].startswith(
            "ticketping.")
        threshold = cluster["circuit_breakers"]["thresholds"][0]
        assert threshold["retry_budget"]["budget_percent"]["value"] > 0
        assert cluster["outlier_detection"]["consecutive_5xx"] > 0


def test_config_is_yaml_envoy_reads(config_file):
    assert yaml.safe_load(config_file.read_text())["static_resources"]["clusters"]


def test_jwt_rules_and_rbac_follow_the_contracts():
    cfg = build(layout("dev"), DESCRIPTOR_SET)
    by_name = {f["name"].rsplit(".", 1)[-1]: f["typed_config"] for f in _filters(cfg)}
    rules = {r["match"]["path"]: r["requires"] for r in by_name["jwt_authn"]["rules"]}
    user = {"provider_name": "user"}
    assert rules["/ticketping.identity.v1.IdentityService/GetUser"] == user
    assert rules["/ticketping.catalog.v1.CatalogService/CreateEvent"] == user
    public = rules["/ticketping.catalog.v1.CatalogService/ListEvents"]
    assert public["requires_any"]["requirements"] == [user, {"allow_missing": {}}]
    # Internal and provider-signed methods have no JWT rule: the first are refused by routing,
    # the second prove themselves in the request.
    assert "/ticketping.booking.v1.BookingService/ConfirmOrder" not in rules
    assert "/ticketping.payment.v1.PaymentService/HandleWebhook" not in rules
    policy = by_name["rbac"]["rules"]["policies"]["admin-methods-need-admin-role"]
    admin_paths = {r["url_path"]["path"]["exact"] for r in policy["permissions"][0]["or_rules"]["rules"]}
    assert "/ticketping.catalog.v1.CatalogService/PublishEvent" in admin_paths
    assert "/ticketping.queue.v1.QueueService/UpdateQueue" in admin_paths
    assert "/ticketping.catalog.v1.CatalogService/ListEvents" not in admin_paths
    admitted = rules["/ticketping.booking.v1.BookingService/CreateHold"]
    assert admitted == {"requires_all": {"requirements": [user, {"provider_name": "admission"}]}}
    admission = by_name["jwt_authn"]["providers"]["admission"]
    assert admission["from_headers"] == [{"name": "x-admission-token"}]
    assert admission["remote_jwks"]["http_uri"]["uri"].endswith("/v1/internal/queue/jwks")
    assert admission["issuer"] != by_name["jwt_authn"]["providers"]["user"]["issuer"]
    provider = by_name["jwt_authn"]["providers"]["user"]
    assert provider["remote_jwks"]["http_uri"]["uri"].endswith("/v1/internal/identity/jwks")
    assert {h["header_name"] for h in provider["claim_to_headers"]} == {"x-user-id", "x-user-role"}


def test_the_benchmarks_baseline_envoy_validates(tmp_path):
    from bench.baseline import config

    path = tmp_path / "baseline.yaml"
    path.write_text(yaml.safe_dump(config(18080, 18901, {"/x": ("application/json", "{}")})))
    proc = subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
