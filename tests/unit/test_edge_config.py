"""Every Envoy config the project produces passes `envoy --mode validate`, and keeps its promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from devstack.layout import DESCRIPTOR_SET, layout
from edge.config import TRUSTED_HEADER_PREFIXES, build, write_config

ENVOY = Path(sys.executable).parent / "envoy"


@pytest.fixture(params=["dev", "test"])
def config_file(request, tmp_path) -> Path:
    return write_config(layout(request.param), tmp_path / f"envoy-{request.param}.yaml")


def test_envoy_validates_the_generated_config(config_file):
    proc = subprocess.run(
        [str(ENVOY), "--mode", "validate", "-c", str(config_file), "--log-level", "warn"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def _filters(cfg: dict) -> list[dict]:
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    return hcm["typed_config"]["http_filters"]


def test_filter_chain_order_and_sanitizing():
    cfg = build(layout("dev"), DESCRIPTOR_SET)
    names = [f["name"].rsplit(".", 1)[-1] for f in _filters(cfg)]
    assert names[-2:] == ["grpc_json_transcoder", "router"]
    assert names.index("header_mutation") < names.index("grpc_json_transcoder")
    mutation = next(f for f in _filters(cfg) if f["name"].endswith("header_mutation"))
    removed = [m["remove_on_match"]["key_matcher"]["prefix"]
               for m in mutation["typed_config"]["mutations"]["request_mutations"]]
    assert set(removed) == set(TRUSTED_HEADER_PREFIXES)
    transcoder = _filters(cfg)[-2]["typed_config"]
    assert transcoder["convert_grpc_status"] is True
    assert set(transcoder["services"]) == {s.proto_service for s in layout("dev").services}


def test_admin_on_loopback_and_upstreams_guarded():
    cfg = build(layout("dev"), DESCRIPTOR_SET)
    assert cfg["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    for cluster in cfg["static_resources"]["clusters"]:
        assert cluster["health_checks"][0]["grpc_health_check"]["service_name"].startswith(
            "ticketping.")
        threshold = cluster["circuit_breakers"]["thresholds"][0]
        assert threshold["retry_budget"]["budget_percent"]["value"] > 0
        assert cluster["outlier_detection"]["consecutive_5xx"] > 0


def test_config_is_yaml_envoy_reads(config_file):
    assert yaml.safe_load(config_file.read_text())["static_resources"]["clusters"]
