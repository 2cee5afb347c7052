"""monitoring/: Prometheus's config loads, and every alert fires on what it is for and not on its
look-alikes (promtool's rule unit tests, monitoring/alerts_test.yml)."""

from __future__ import annotations

import shutil
import subprocess

from devstack.layout import ROOT, layout

MONITORING = ROOT / "monitoring"


def _promtool(*args: str) -> str:
    tool = shutil.which("promtool")
    assert tool, "promtool is missing: `make install` (Debian's prometheus package) puts it there"
    proc = subprocess.run([tool, *args], cwd=MONITORING, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_the_config_and_its_rules_load():
    assert "SUCCESS" in _promtool("check", "config", "prometheus.yml")


def test_every_alert_fires_when_it_should_and_only_then():
    assert "SUCCESS" in _promtool("test", "rules", "alerts_test.yml")


def test_the_config_scrapes_every_service_of_the_local_mesh():
    text = (MONITORING / "prometheus.yml").read_text()
    for svc in layout("dev").services:
        assert f'"127.0.0.1:{svc.metrics_port}"' in text and f"service: {svc.name}" in text
