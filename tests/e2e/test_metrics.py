"""Every metric monitoring/alerts.yml watches is one the running services export."""

from __future__ import annotations

import re
import urllib.request

import httpx
import pytest

from devstack.layout import ROOT, Layout

pytestmark = pytest.mark.e2e


def test_each_metric_an_alert_reads_is_exported(http: httpx.Client, mesh: Layout):
    assert http.get("/v1/events").status_code == 200  # at least one call handled
    exported: set[str] = set()
    for svc in mesh.services:
        body = urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}/metrics", timeout=5).read()
        exported |= {line.split("{")[0].split(" ")[0] for line in body.decode().splitlines()
                     if line and not line.startswith("#")}
    rules = (ROOT / "monitoring" / "alerts.yml").read_text()
    exprs = " ".join(re.findall(r"expr: (.*?)\n\s+(?:for|labels):", rules, flags=re.S))
    watched = set(re.findall(r"\b((?:grpc_server|meshkit|queue)_[a-z_]+)\b", exprs))
    assert len(watched) >= 8, watched
    assert not watched - exported, sorted(watched - exported)
