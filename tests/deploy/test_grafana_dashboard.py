"""The provisioned dashboard is what deploy/grafana/build.py builds, has its variables, plots every metric of
service/metrics.py with the variables applied, and every panel is explained in deploy/README.md."""

from __future__ import annotations

import importlib.util
import json

import pytest
from prometheus_client import Counter, Gauge, Histogram

from service import metrics
from tests.deploy.promql import DASHBOARD, ROOT, dashboard_expressions

BUILD_PY = ROOT / "deploy/grafana/build.py"


@pytest.fixture(scope="module")
def build():
    spec = importlib.util.spec_from_file_location("grafana_build", BUILD_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def test_committed_json_is_what_build_py_builds(build):
    assert DASHBOARD.read_text() == build.render(), f"{DASHBOARD.relative_to(ROOT)} is stale: run .venv/bin/python {BUILD_PY.relative_to(ROOT)}"
    assert build.main(["--check"]) == 0


def test_variables_and_datasource():
    dash = dashboard()
    assert dash["uid"] == "saffron-guard", dash["uid"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert list(variables) == ["datasource", "job", "instance", "strategy"], list(variables)
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance", "strategy"):
        assert variables[name]["multi"] and variables[name]["includeAll"], name
        assert variables[name]["datasource"]["uid"] == "${datasource}", name
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), ids
    for panel in panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and panel.get("description"), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", (panel["title"], target["refId"])


def test_every_query_is_filtered_by_job_and_instance_and_strategy_where_it_has_one():
    for parsed in dashboard_expressions():
        if parsed.where.startswith("variable"):
            continue
        for selector in parsed.selectors:
            assert {"job", "instance"} <= selector.labels, f"{parsed.where}: {parsed.text}"
        if "strategy" in parsed.grouping:
            assert all("strategy" in s.labels for s in parsed.selectors), f"{parsed.where} groups by strategy, not filtered by it"


def test_every_metric_of_service_metrics_has_a_panel():
    used = {name for parsed in dashboard_expressions() if parsed.where.startswith("panel") for s in parsed.selectors for name in s.names}
    missing = []
    for obj in vars(metrics).values():
        if not isinstance(obj, Counter | Gauge | Histogram):
            continue
        base = obj._name
        names = {f"{base}_total"} if isinstance(obj, Counter) else {base + s for s in ("_bucket", "_sum", "_count")} if isinstance(obj, Histogram) else {base}
        if not names & used:
            missing.append(base)
    assert not missing, f"metrics without a panel (add one in deploy/grafana/build.py): {missing}"


def test_readme_explains_every_panel():
    readme = (ROOT / "deploy/README.md").read_text()
    for panel in panels():
        assert f"| {panel['title']} " in readme, f"deploy/README.md: no row for the panel {panel['title']!r} (Dashboard)"
