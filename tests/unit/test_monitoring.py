"""monitoring/: Prometheus's config loads, and every alert fires on what it is for and not on its
look-alikes (promtool's rule unit tests, monitoring/alerts_test.yml)."""

from __future__ import annotations

import shutil
import subprocess

import yaml

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


def test_the_cluster_config_labels_the_services_as_the_alerts_select_them():
    """On Kubernetes the alerts need job="ticketping" and a `service` label: the cluster config's
    job keeps the pods k8s/ annotates for scraping, at their port named metrics, and names each
    by its app.kubernetes.io/name, which is the service's name on every such pod
    (tests/unit/test_k8s.py renders them). Debian's promtool is built without Kubernetes
    discovery, so this checks the config's rules against the manifests instead."""
    from tests.unit.test_k8s import rendered

    config = yaml.safe_load((MONITORING / "prometheus-k8s.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "ticketping"
    assert 'job="ticketping"' in (MONITORING / "alerts.yml").read_text()
    relabel = {r.get("target_label"): r for r in job["relabel_configs"]}
    assert relabel["service"]["source_labels"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_name"]
    kept = {tuple(r["source_labels"]): r["regex"] for r in job["relabel_configs"]
            if r.get("action") == "keep"}
    assert kept == {("__meta_kubernetes_pod_annotation_prometheus_io_scrape",
                     "__meta_kubernetes_pod_label_app_kubernetes_io_part_of"): "true;ticketping",
                    ("__meta_kubernetes_pod_container_port_name",): "metrics"}
    namespaces = set(job["kubernetes_sd_configs"][0]["namespaces"]["names"])
    for build in ("overlays/dev", "overlays/prod"):
        docs = rendered(build)
        scraped = {d["metadata"]["name"]: d["spec"]["template"]["metadata"] for d in docs
                   if d["kind"] == "Deployment"
                   and d["spec"]["template"]["metadata"].get("annotations", {}).get("prometheus.io/scrape")}
        assert set(scraped) == {s.name for s in layout("dev").services}
        for name, meta in scraped.items():
            assert meta["labels"]["app.kubernetes.io/name"] == name
            assert meta["labels"]["app.kubernetes.io/part-of"] == "ticketping"
        for d in docs:
            if d["kind"] == "Deployment" and d["metadata"]["name"] in scraped:
                ports = {p["name"]: p["containerPort"] for c in d["spec"]["template"]["spec"]["containers"]
                         for p in c.get("ports", [])}
                annotated = scraped[d["metadata"]["name"]]["annotations"]["prometheus.io/port"]
                assert ports["metrics"] == int(annotated)
        assert {d["metadata"]["namespace"] for d in docs if d["kind"] == "Deployment"} <= namespaces
