"""Deployment files parse and agree with the code: services, settings names, metric names, probes.

Docker and Kubernetes are not run here; these checks catch the drift that breaks them silently
(a renamed setting, a metric the dashboard still plots, a probe on the wrong path).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client import Counter, Gauge, Histogram

from service import metrics
from service.config import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "saffron-guard.json"
YAML_FILES = sorted(
    [ROOT / "docker-compose.yml", ROOT / "docker-compose.gpu.yml", *DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")]
)
SETTINGS_VARS = {f"SAFFRON_{name.upper()}" for name in Settings.model_fields}


def load_yaml(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def compose() -> dict:
    return load_yaml(ROOT / "docker-compose.yml")[0]


def k8s_objects() -> list[dict]:
    return [doc for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml" for doc in load_yaml(path)]


def k8s(kind: str, name: str) -> dict:
    found = [o for o in k8s_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def secret_example_keys() -> list[str]:
    secret = load_yaml(K8S / "secret.example.yaml")[0]
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == "saffron-api-keys"
    return list(secret["stringData"])


def container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, containers
    return containers[0]


def exposed_metric_names() -> set[str]:
    """Every sample name service/metrics.py exposes (counters add _total, histograms _bucket/_sum/_count)."""
    names = set()
    for obj in vars(metrics).values():
        if not isinstance(obj, Counter | Gauge | Histogram):
            continue
        base = obj.describe()[0].name
        if isinstance(obj, Counter):
            names |= {f"{base}_total", f"{base}_created"}
        elif isinstance(obj, Histogram):
            names |= {f"{base}_bucket", f"{base}_sum", f"{base}_count", f"{base}_created"}
        else:
            names.add(base)
    return names


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_parses(path):
    assert load_yaml(path), f"{path} is empty"


def test_dashboard_json_parses_and_uses_the_provisioned_datasource():
    dash = json.loads(DASHBOARD.read_text())
    datasource = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")[0]["datasources"][0]
    assert dash["uid"] == "saffron-guard" and dash["panels"], dash.keys()
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        assert panel["targets"], panel["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), ids


def test_every_dashboard_metric_exists_in_service_metrics():
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"\bsaffron_[a-z_]+", e)}
    exposed = exposed_metric_names()
    assert used - exposed == set(), f"dashboard metrics missing from service/metrics.py: {sorted(used - exposed)}"
    # The issue's panels, each by its metric.
    for needed in (
        "saffron_requests_total", "saffron_request_latency_seconds_bucket", "saffron_time_to_first_token_seconds_bucket",
        "saffron_queue_depth", "saffron_queue_wait_seconds_bucket", "saffron_refusals_total",
        "saffron_trie_reused_tokens_total", "saffron_trie_query_tokens_total", "saffron_worker_busy",
        "saffron_generated_tokens_total",
    ):
        assert needed in used, f"no panel uses {needed}"


def test_dashboard_provider_points_where_compose_mounts_the_dashboards():
    provider = load_yaml(DEPLOY / "grafana/provisioning/dashboards/saffron-guard.yml")[0]["providers"][0]
    volumes = compose()["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in volumes, (provider, volumes)
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in volumes, volumes


def test_compose_services_ports_and_healthcheck():
    services = compose()["services"]
    assert set(services) == {"redis", "gateway", "worker", "prometheus", "grafana"}, set(services)
    gateway = services["gateway"]
    assert gateway["ports"][0].endswith(":8000"), gateway["ports"]  # host port: ${SAFFRON_PORT:-8000}
    assert "/health" in " ".join(gateway["healthcheck"]["test"]), gateway["healthcheck"]
    assert "redis" in gateway["depends_on"] and "redis" in services["worker"]["depends_on"]
    assert gateway["command"][0] == "gateway" and services["worker"]["command"] == ["worker"]
    for name in ("gateway", "worker"):
        assert services[name]["build"]["dockerfile"] == "docker/Dockerfile", services[name]["build"]
        assert (ROOT / services[name]["build"]["context"] / "docker/Dockerfile").is_file()
        assert services[name]["environment"]["SAFFRON_REDIS_URL"] == "redis://redis:6379/0"
    assert "deploy" not in services["worker"], "the GPU reservation belongs in docker-compose.gpu.yml (CPU hosts)"


def test_compose_gpu_override_reserves_one_nvidia_gpu_per_worker():
    worker = load_yaml(ROOT / "docker-compose.gpu.yml")[0]["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}], devices
    assert worker["environment"]["SAFFRON_DEVICE"] == "cuda"
    assert "TORCH_INDEX_URL" in worker["build"]["args"]


def test_every_saffron_variable_in_deploy_files_is_a_setting():
    compose_env = set()
    for path in (ROOT / "docker-compose.yml", ROOT / "docker-compose.gpu.yml"):
        for service in load_yaml(path)[0]["services"].values():
            compose_env |= {k for k in service.get("environment", {}) if k.startswith("SAFFRON_")}
    k8s_env = set(k8s("ConfigMap", "saffron-config")["data"]) | set(secret_example_keys())
    for obj in k8s_objects():
        if obj["kind"] == "Deployment":
            k8s_env |= {e["name"] for e in container(obj).get("env", [])}
    unknown = (compose_env | k8s_env) - SETTINGS_VARS
    assert unknown == set(), f"not fields of service.config.Settings: {sorted(unknown)}"
    assert "SAFFRON_REDIS_URL" in compose_env and "SAFFRON_REDIS_URL" in k8s_env


def test_configmap_values_are_valid_settings(monkeypatch):
    for key, value in k8s("ConfigMap", "saffron-config")["data"].items():
        assert isinstance(value, str), f"{key}: ConfigMap values must be strings, got {value!r}"
        monkeypatch.setenv(key, value)
    Settings()  # raises on a bad value


def test_prometheus_scrapes_gateway_and_workers():
    config = load_yaml(DEPLOY / "prometheus/prometheus.yml")[0]
    targets = set()
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            targets |= {f"{n}:{sd['port']}{job.get('metrics_path', '/metrics')}" for n in sd["names"]}
        for sc in job.get("static_configs", []):
            targets |= {f"{t}{job.get('metrics_path', '/metrics')}" for t in sc["targets"]}
    assert {"gateway:8000/metrics", "worker:9101/metrics"} <= targets, targets
    assert Settings().worker_metrics_port == 9101


def test_k8s_manifests():
    kustomization = load_yaml(K8S / "kustomization.yaml")[0]
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    objects = k8s_objects()
    for obj in objects:
        assert "namespace" not in obj["metadata"], f"{obj['kind']}/{obj['metadata']['name']} names a namespace"

    gateway = k8s("Deployment", "saffron-gateway")
    assert gateway["spec"]["replicas"] == 2
    gw = container(gateway)
    assert gw["readinessProbe"]["httpGet"]["path"] == "/ready", gw["readinessProbe"]
    assert gw["livenessProbe"]["httpGet"]["path"] == "/health", gw["livenessProbe"]
    assert {"configMapRef": {"name": "saffron-config"}} in gw["envFrom"]
    assert {"secretRef": {"name": "saffron-api-keys"}} in gw["envFrom"]
    assert "cpu" in gw["resources"]["requests"], "the HPA scales on CPU utilisation of the requests"
    hpa = k8s("HorizontalPodAutoscaler", "saffron-gateway")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "saffron-gateway"
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    k8s("Service", "saffron-gateway")

    worker = k8s("Deployment", "saffron-worker")
    wk = container(worker)
    assert wk["resources"]["limits"]["nvidia.com/gpu"] == 1, wk["resources"]
    assert wk["args"] == ["worker"]
    grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > Settings().worker_shutdown_grace_s, grace
    pdb = k8s("PodDisruptionBudget", "saffron-worker")
    assert pdb["spec"]["selector"]["matchLabels"] == worker["spec"]["selector"]["matchLabels"]

    redis_url = k8s("ConfigMap", "saffron-config")["data"]["SAFFRON_REDIS_URL"]
    k8s("Deployment", "redis")
    redis_svc = k8s("Service", "redis")
    assert redis_url == f"redis://redis:{redis_svc['spec']['ports'][0]['port']}/0"

    for deployment in (o for o in objects if o["kind"] == "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items(), deployment["metadata"]["name"]
    for service in (o for o in objects if o["kind"] == "Service"):
        selector = service["spec"]["selector"]
        assert any(
            selector.items() <= d["spec"]["template"]["metadata"]["labels"].items() for d in objects if d["kind"] == "Deployment"
        ), f"Service {service['metadata']['name']} selects no Deployment's pods"


def test_dockerfile_and_dockerignore():
    dockerfile = (ROOT / "docker/Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", dockerfile, re.M), "base image"
    assert "-r requirements.lock" in dockerfile and "download.pytorch.org/whl/cpu" in dockerfile
    assert "pip install --no-deps --no-build-isolation -e ." in dockerfile
    assert "python -m model_store prepare" in dockerfile
    users = re.findall(r"^USER (\S+)$", dockerfile, re.M)
    assert users and users[-1] not in ("root", "0"), users
    assert re.search(r'^ENTRYPOINT \["saffron-guard"\]$', dockerfile, re.M)
    # Everything the Dockerfile COPYs must survive .dockerignore (an allowlist).
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].removesuffix("/**") for line in ignore if line.startswith("!")}
    copied = {src.rstrip("*") for line in re.findall(r"^COPY (.+) \S+$", dockerfile, re.M) for src in line.split()}
    assert copied <= allowed, f"COPY sources excluded by .dockerignore: {copied - allowed}"
