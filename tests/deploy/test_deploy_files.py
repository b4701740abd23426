"""Deployment files parse and agree with the code: services, settings names, metric names, probes.

Docker and Kubernetes are not run here; these checks catch the drift that breaks them silently
(a renamed setting, a metric the dashboard still plots, a probe on the wrong path).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from service.config import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "saffron-guard.json"
YAML_FILES = sorted(
    [ROOT / "docker-compose.yml", ROOT / "docker-compose.gpu.yml", *DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")]
)
SETTINGS_VARS = {f"SAFFRON_{name.upper()}" for name in Settings.model_fields}


def load_yaml(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def compose() -> dict:
    return load_yaml(ROOT / "docker-compose.yml")[0]


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_parses(path):
    assert load_yaml(path), f"{path} is empty"


def test_dashboard_json_parses_and_uses_the_provisioned_datasource():
    dash = json.loads(DASHBOARD.read_text())
    datasource = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")[0]["datasources"][0]
    assert dash["uid"] == "saffron-guard" and dash["panels"], dash.keys()
    # Panels read the ${datasource} variable, which offers every datasource of its type: the provisioned one among
    # them. The panels themselves, and their metrics: tests/deploy/test_grafana_dashboard.py, test_observability.py.
    variable = next(v for v in dash["templating"]["list"] if v["name"] == "datasource")
    assert variable["type"] == "datasource" and variable["query"] == datasource["type"], (variable, datasource)
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_provider_points_where_compose_mounts_the_dashboards():
    provider = load_yaml(DEPLOY / "grafana/provisioning/dashboards/saffron-guard.yml")[0]["providers"][0]
    volumes = compose()["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in volumes, (provider, volumes)
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in volumes, volumes




def test_every_saffron_variable_in_deploy_files_is_a_setting():
    """Compose here; the Kubernetes manifests' variables: tests/deploy/test_k8s.py (on the rendered overlays)."""
    compose_env = set()
    for path in (ROOT / "docker-compose.yml", ROOT / "docker-compose.gpu.yml"):
        for service in load_yaml(path)[0]["services"].values():
            compose_env |= {k for k in service.get("environment", {}) if k.startswith("SAFFRON_")}
    unknown = compose_env - SETTINGS_VARS
    assert unknown == set(), f"not fields of service.config.Settings: {sorted(unknown)}"
    assert "SAFFRON_REDIS_URL" in compose_env


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
