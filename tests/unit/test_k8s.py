"""k8s/: every overlay builds with kustomize, passes the Kubernetes API's schemas (strict: an
unknown or misplaced field fails), and keeps the promises the rest of the project relies on.

There is no cluster here, so what a real API server and the pods would find out is checked from
the manifests themselves: each service's settings are valid for that service (svc_*/config.py),
every name a manifest refers to exists, the edge's rendered config finds the services, and the
NetworkPolicies let each call the mesh makes through, and no others.
"""

from __future__ import annotations

import importlib
import re
import subprocess
from functools import cache
from typing import Any

import kubernetes_validate
import pytest
import yaml

from devstack.install import KUSTOMIZE_BIN
from devstack.layout import KAFKA_DLQ_PARTITIONS, KAFKA_PARTITIONS, KAFKA_PROBE_TOPIC, KAFKA_TOPICS, ROOT
from devstack.layout import layout as local_layout
from edge.config import CLUSTER, CLUSTER_GRPC_PORT, build, cluster_layout
from edge.feed import ALIVE_FILE
from svc_payment.bootstrap import SANDBOX_POOL_SIZE

K8S = ROOT / "k8s"
BUILDS = ["base", "overlays/dev", "overlays/prod"]
KUBERNETES_VERSION = "1.33"
SERVICES = local_layout("dev").services
WORKLOADS = ("Deployment", "StatefulSet", "Job")
# Created by the operator or the overlay's owner, never kept in the repository (k8s/README.md).
SECRETS = {"postgres-credentials": {"username", "password"}, "identity-secrets": {"key-encryption-key"},
           "queue-secrets": {"key-encryption-key"}, "payment-secrets": {"webhook-secret"},
           **{f"{s.name}-database": {"username", "password"} for s in SERVICES if s.needs_postgres}}


@cache
def rendered(path: str) -> tuple[dict[str, Any], ...]:
    proc = subprocess.run([str(KUSTOMIZE_BIN), "build", str(K8S / path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


@pytest.fixture(params=BUILDS)
def docs(request) -> tuple[dict[str, Any], ...]:
    return rendered(request.param)


def _of(docs, kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def _one(docs, kind: str, name: str) -> dict[str, Any]:
    (found,) = _of(docs, kind, name)
    return found


def _pod(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]


def _containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"]]


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_every_build_passes_the_api_schemas_strictly(docs):
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {err.message} at {list(err.path)}")


def test_the_overlays_set_namespace_and_image(docs):
    if docs is rendered("base"):
        return
    (ns,) = _of(docs, "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for doc in docs:
        if doc["kind"] not in ("Namespace",):
            assert doc["metadata"].get("namespace") == ns["metadata"]["name"], doc["metadata"]
    images = {c["image"] for w in docs if w["kind"] in WORKLOADS for c in _containers(_pod(w)["spec"])}
    assert "ticketping" not in images and any(":" in i and "ticketping" in i for i in images)


def test_every_pod_is_non_root_with_nothing_to_escalate_and_bounded(docs):
    for w in (d for d in docs if d["kind"] in WORKLOADS):
        spec, name = _pod(w)["spec"], f"{w['kind']}/{w['metadata']['name']}"
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec.get("automountServiceAccountToken") is False, name
        for c in _containers(spec):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], name
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), (name, c["name"], kind)
            if "ticketping" in c["image"]:
                assert sc["readOnlyRootFilesystem"] is True, (name, c["name"])


def test_each_service_has_its_deployment_headless_service_autoscaler_and_budget(docs):
    for svc in SERVICES:
        deployment = _one(docs, "Deployment", svc.name)
        labels = _pod(deployment)["metadata"]["labels"]
        (app,) = _pod(deployment)["spec"]["containers"]
        assert app["command"] == ["python", "-m", svc.module]
        assert app["readinessProbe"]["grpc"] == {"port": CLUSTER_GRPC_PORT, "service": svc.proto_service}
        assert app["startupProbe"]["grpc"] == {"port": CLUSTER_GRPC_PORT, "service": svc.proto_service}
        assert app["livenessProbe"]["grpc"] == {"port": CLUSTER_GRPC_PORT}
        assert {p["name"]: p["containerPort"] for p in app["ports"]}["grpc"] == CLUSTER_GRPC_PORT
        service = _one(docs, "Service", svc.name)
        assert service["spec"]["clusterIP"] == "None"  # every replica's address (meshkit.channels)
        assert _matches(service["spec"]["selector"], labels)
        assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["grpc"] == CLUSTER_GRPC_PORT
        hpa = _one(docs, "HorizontalPodAutoscaler", svc.name)
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                 "name": svc.name}
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        pdb = _one(docs, "PodDisruptionBudget", svc.name)
        assert _matches(pdb["spec"]["selector"]["matchLabels"], labels)


def test_an_autoscaled_deployment_leaves_its_replica_count_to_the_autoscaler(docs):
    """A replicas field would be applied again by every `kubectl apply` (a hotfix mid-sale),
    scaling the replicas the autoscaler added back down at once."""
    targets = [h["spec"]["scaleTargetRef"]["name"] for h in docs if h["kind"] == "HorizontalPodAutoscaler"]
    assert {"edge", *(s.name for s in SERVICES)} <= set(targets)
    for name in targets:
        assert "replicas" not in _one(docs, "Deployment", name)["spec"], name


def _environment(docs, container: dict[str, Any]) -> dict[str, str]:
    """The container's variables as the kubelet sets them, secrets replaced by placeholders."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env |= _one(docs, "ConfigMap", source["configMapRef"]["name"])["data"]
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = re.sub(r"\$\(([A-Z_]+)\)", lambda m: env[m.group(1)], var["value"])
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            assert ref["key"] in SECRETS[ref["name"]], ref
            # URL-safe, as k8s/README.md makes them; a key-encryption key is 32 bytes.
            env[var["name"]] = "A" * 43 if "encryption" in ref["key"] else f"placeholder-{ref['key']}"
    return env


@cache
def _settings(module: str) -> type:
    return importlib.import_module(f"{module}.config").Settings


def test_each_service_gets_valid_settings_and_no_variable_it_does_not_read(docs):
    read_by_some: set[str] = set()
    for svc in SERVICES:
        (app,) = _pod(_one(docs, "Deployment", svc.name))["spec"]["containers"]
        env = _environment(docs, app)
        cls = _settings(svc.module)
        fields = {f"TP_{name.upper()}" for name in cls.model_fields}
        read_by_some |= fields
        own = {v["name"] for v in app.get("env", []) if v["name"].startswith("TP_")}
        assert own <= fields, f"{svc.name} does not read {sorted(own - fields)}"
        values = {k[3:].lower(): v for k, v in env.items() if k in fields}
        settings = cls(**values)  # raises on a missing or bad value, with the field's name
        assert settings.grpc_host == "0.0.0.0" and settings.grpc_port == CLUSTER_GRPC_PORT
        assert settings.metrics_port is not None and settings.grpc_max_connection_age_seconds
        if "postgres_dsn" in values:
            assert values["postgres_dsn"].endswith(f"@postgres:5432/{svc.database}")
    shared = set(_common(docs)["data"])
    assert shared <= read_by_some, sorted(shared - read_by_some)


def _common(docs) -> dict[str, Any]:
    """The services' shared settings: generated, so named ticketping-common-<hash of its data>."""
    (found,) = [cm for cm in _of(docs, "ConfigMap") if re.fullmatch(r"ticketping-common-[a-z0-9]{10}",
                                                                     cm["metadata"]["name"])]
    return found


def test_a_changed_setting_rolls_the_services(docs):
    """Every service's pod template names the shared settings by their hashed name: a changed
    setting is a new ConfigMap and a changed pod template, so `kubectl apply -k` rolls the pods
    onto it. A ConfigMap changed in place would reach each pod only when it next restarted."""
    name = _common(docs)["metadata"]["name"]
    for svc in SERVICES:
        (app,) = _pod(_one(docs, "Deployment", svc.name))["spec"]["containers"]
        assert [s["configMapRef"]["name"] for s in app["envFrom"]] == [name], svc.name


def test_the_shared_settings_name_follows_their_data():
    base, dev, prod = (_common(rendered(b)) for b in BUILDS)
    # the dev overlay changes no setting: the same data, the same name (in its namespace)
    assert (base["data"], base["metadata"]["name"]) == (dev["data"], dev["metadata"]["name"])
    assert prod["data"]["TP_OTEL_EXPORTER"] == "otlp"  # the tracing component's, in the hash
    assert prod["metadata"]["name"] != dev["metadata"]["name"]


# PostgreSQL connections a replica opens besides its pool: a LISTEN connection (catalog's
# changes, booking's settled orders) and the payment sandbox's own pool.
EXTRA_CONNECTIONS = {"catalog": 1, "booking": 1, "payment": SANDBOX_POOL_SIZE}
RESERVED_CONNECTIONS = 3 + 20  # superuser_reserved_connections; migrations, psql, backups


def test_the_database_takes_every_pool_at_the_autoscalers_maximum(docs):
    """The pools grow under load, that is during a sale: if every replica's pool at the
    autoscalers' maximum did not fit max_connections, PostgreSQL would answer "too many clients"
    exactly then, and booking's payment consumer would stall."""
    (postgres,) = _pod(_one(docs, "StatefulSet", "postgres"))["spec"]["containers"]
    args = postgres["args"]
    limit = int(next(a.split("=")[1] for a in args if a.startswith("max_connections=")))
    needed = {}
    for svc in SERVICES:
        (app,) = _pod(_one(docs, "Deployment", svc.name))["spec"]["containers"]
        env = _environment(docs, app)
        if "TP_POSTGRES_DSN" not in env:
            continue
        cls = _settings(svc.module)
        pool = int(env.get("TP_POSTGRES_POOL_SIZE", cls.model_fields["postgres_pool_size"].default))
        replicas = _one(docs, "HorizontalPodAutoscaler", svc.name)["spec"]["maxReplicas"]
        needed[svc.name] = replicas * (pool + EXTRA_CONNECTIONS.get(svc.name, 0))
    assert set(needed) == {"identity", "catalog", "booking", "payment"}
    assert sum(needed.values()) <= limit - RESERVED_CONNECTIONS, (needed, limit)


def _quantity(value: str) -> float:
    """A Kubernetes quantity (``100m``, ``2``, ``256Mi``, ``2Gi``) as a plain number."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    for unit, factor in units.items():
        if value.endswith(unit):
            return float(value[: -len(unit)]) * factor
    return float(value)


def test_the_dev_overlay_fits_a_laptop_s_cluster():
    """What the scheduler must find for the dev overlay's pods (autoscaled ones at their
    minimum), on kind or minikube on a 16 GB, 4-core machine. With production's reservations
    for the data stores it asked for 22 GiB and 6 CPUs, and those pods stayed Pending."""
    docs = rendered("overlays/dev")
    memory = cpu = 0.0
    for w in docs:
        if w["kind"] not in ("Deployment", "StatefulSet"):
            continue
        (hpa,) = _of(docs, "HorizontalPodAutoscaler", w["metadata"]["name"]) or [None]
        replicas = hpa["spec"]["minReplicas"] if hpa else w["spec"].get("replicas", 1)
        for c in _pod(w)["spec"]["containers"]:
            requests = c["resources"]["requests"]
            memory += replicas * _quantity(requests["memory"])
            cpu += replicas * _quantity(requests["cpu"])
    assert memory <= 9 * 2**30 and cpu <= 2.0, (memory / 2**30, cpu)


def test_every_name_a_manifest_refers_to_exists(docs):
    pods = [(w, _pod(w)["metadata"]["labels"]) for w in docs if w["kind"] in WORKLOADS]
    for service in _of(docs, "Service"):
        assert any(_matches(service["spec"]["selector"], labels) for _, labels in pods), service
    for kind in ("HorizontalPodAutoscaler",):
        for hpa in _of(docs, kind):
            ref = hpa["spec"]["scaleTargetRef"]
            assert _of(docs, ref["kind"], ref["name"]), hpa["metadata"]["name"]
    for pdb in _of(docs, "PodDisruptionBudget"):
        assert any(_matches(pdb["spec"]["selector"]["matchLabels"], labels) for _, labels in pods)
    for w, _ in pods:
        spec = _pod(w)["spec"]
        maps = {s["configMapRef"]["name"] for c in _containers(spec) for s in c.get("envFrom", [])}
        maps |= {v["configMap"]["name"] for v in spec.get("volumes", []) if "configMap" in v}
        for name in maps:
            assert _of(docs, "ConfigMap", name), (w["metadata"]["name"], name)
        secrets = {v["valueFrom"]["secretKeyRef"]["name"] for c in _containers(spec)
                   for v in c.get("env", []) if "secretKeyRef" in v.get("valueFrom", {})}
        assert secrets <= set(SECRETS), secrets
    # No secret's value is in the repository: the overlays' owners create them (README).
    assert not _of(docs, "Secret")
    readme = (K8S / "README.md").read_text()
    for name, keys in SECRETS.items():
        assert name in readme and all(k in readme for k in keys), name


def _secret_users(docs, workload: dict[str, Any]) -> set[str]:
    return {v["valueFrom"]["secretKeyRef"]["name"] for c in _containers(_pod(workload)["spec"])
            for v in c.get("env", []) if "secretKeyRef" in v.get("valueFrom", {})}


def test_each_service_logs_in_to_its_database_as_its_own_role_never_the_superuser(docs):
    """The superuser's Secret goes to PostgreSQL and the roles Job only; each service's DSN is built
    from its own Secret, whose role the Job makes (roles.sh, run for real in
    tests/integration/test_k8s_postgres_roles.py)."""
    with_db = [s for s in SERVICES if s.needs_postgres]
    users = {w["metadata"]["name"]: _secret_users(docs, w) for w in docs if w["kind"] in WORKLOADS}
    holders = {name for name, secrets in users.items() if "postgres-credentials" in secrets}
    assert holders == {"postgres", "postgres-roles"}, holders
    for svc in with_db:
        assert f"{svc.name}-database" in users[svc.name], svc.name
        assert {n for n in users[svc.name] if n.endswith("-database")} == {f"{svc.name}-database"}
    job = _one(docs, "Job", "postgres-roles")
    (container,) = _pod(job)["spec"]["containers"]
    env = {v["name"]: v["valueFrom"]["secretKeyRef"] for v in container["env"] if "valueFrom" in v}
    for svc in with_db:
        assert env[f"{svc.name.upper()}_DB_USER"] == {"name": f"{svc.name}-database", "key": "username"}
        assert env[f"{svc.name.upper()}_DB_PASSWORD"] == {"name": f"{svc.name}-database", "key": "password"}
    script = _one(docs, "ConfigMap", "postgres-init")["data"]["roles.sh"]
    assert f"${{SERVICES:-{' '.join(s.name for s in with_db)}}}" in script


def test_the_edge_config_the_pod_renders_finds_every_service(docs):
    cfg = build(cluster_layout(local_layout("dev")), placement=CLUSTER)
    for cluster in cfg["static_resources"]["clusters"]:
        if cluster.get("cluster_type", {}).get("name") != "envoy.clusters.dns":
            continue
        (ep,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        address = ep["endpoint"]["address"]["socket_address"]
        service = _one(docs, "Service", address["address"])
        assert address["port_value"] in {p["port"] for p in service["spec"]["ports"]}
    edge = _one(docs, "Deployment", "edge")
    (render,) = _pod(edge)["spec"]["initContainers"]
    assert render["command"][:4] == ["python", "-m", "edge.config", "--cluster"]
    envoy, feed = _pod(edge)["spec"]["containers"]
    assert feed["command"] == ["python", "-m", "edge.feed", "--cluster", "-c", "/etc/envoy/envoy.yaml"]
    assert render["command"][-1] == "/etc/envoy/envoy.yaml"
    assert feed["livenessProbe"]["exec"]["command"][-1].count(f"/etc/envoy/routes/{ALIVE_FILE}") == 1
    edge_port = local_layout("dev").edge_port
    assert {p["containerPort"] for p in envoy["ports"]} == {edge_port}
    assert _one(docs, "Service", "edge")["spec"]["ports"][0]["port"] == edge_port
    # The services' Services are headless: Envoy's DNS cluster balances over every replica.
    payment = _environment(docs, _pod(_one(docs, "Deployment", "payment"))["spec"]["containers"][0])
    assert payment["TP_WEBHOOK_URL"] == f"http://edge:{edge_port}/v1/payments/webhook"


def _allowed(docs, client: dict[str, str], server: dict[str, str], port: int) -> bool:
    """Would the NetworkPolicies let a pod labelled `client` reach `server`'s port (same namespace)?"""
    policies = [p for p in _of(docs, "NetworkPolicy") if "Ingress" in p["spec"]["policyTypes"]
                and _matches(p["spec"]["podSelector"].get("matchLabels", {}), server)
                and not p["spec"]["podSelector"].get("matchExpressions")]
    if not policies:
        return True
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ports = {p["port"] for p in rule.get("ports", [])}  # numbers (the policies use no names)
            peers = rule.get("from")
            if ports and port not in ports:
                continue
            if peers is None or any(
                    "podSelector" in peer and "namespaceSelector" not in peer
                    and _matches(peer["podSelector"].get("matchLabels", {}), client)
                    and _expressions_match(peer["podSelector"].get("matchExpressions", []), client)
                    for peer in peers):
                return True
    return False


def _expressions_match(expressions: list[dict[str, Any]], labels: dict[str, str]) -> bool:
    for e in expressions:
        if e["operator"] == "In" and labels.get(e["key"]) not in e["values"]:
            return False
        if e["operator"] == "NotIn" and labels.get(e["key"]) in e["values"]:
            return False
    return True


def test_network_policies_let_the_mesh_s_calls_through_and_no_others(docs):
    labels = {w["metadata"]["name"]: _pod(w)["metadata"]["labels"] for w in docs if w["kind"] in WORKLOADS}
    grpc, redis, postgres, kafka = CLUSTER_GRPC_PORT, 6379, 5432, 9092
    calls = [("edge", s.name, grpc) for s in SERVICES]
    calls += [("identity", "queue", grpc), ("queue", "catalog", grpc), ("booking", "queue", grpc),
              ("payment", "booking", grpc)]
    calls += [(s.name, "redis", redis) for s in SERVICES if s.needs_redis]
    calls += [(s.name, "postgres", postgres) for s in SERVICES if s.needs_postgres]
    calls += [(s.name, "kafka", kafka) for s in SERVICES]
    for client, server, port in calls:
        assert _allowed(docs, labels[client], labels[server], port), (client, server, port)
    refused = [("edge", "postgres", postgres), ("edge", "redis", redis), ("catalog", "redis", redis),
               ("queue", "postgres", postgres), ("catalog", "booking", grpc),
               ("identity", "payment", grpc)]
    for client, server, port in refused:
        assert not _allowed(docs, labels[client], labels[server], port), (client, server, port)


def test_the_kafka_topics_are_the_ones_the_services_use(docs):
    (job,) = [j for j in _of(docs, "Job") if "topic" in j["metadata"]["name"]]
    script = " ".join(" ".join(c.get("command", []) + c.get("args", []))
                      for c in _containers(_pod(job)["spec"]))
    for topic in (t for t in KAFKA_TOPICS if t != KAFKA_PROBE_TOPIC):
        assert re.search(rf"{re.escape(topic)}\b(?!\.dlq)", script), topic
        assert f"{topic}.dlq" in script, topic
    assert KAFKA_PROBE_TOPIC not in script
    assert str(KAFKA_PARTITIONS) in script and str(KAFKA_DLQ_PARTITIONS) in script
