"""Role-correct metrics, and every PromQL expression of the dashboard and the rules against what really gets exported.

A real Redis server, a real worker (the default model) and a real gateway run as processes; one guarded request
goes through them so that the labelled series exist; then each process's /metrics is read. The gateway must export
only gateway metrics and the worker only worker metrics, and every expression must parse and name only metrics
and labels found there (plus Prometheus' own ``up`` and the recording rules' series).
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families

from service import metrics
from tests.deploy.promql import Parsed, dashboard_expressions, recorded_labels, rule_expressions
from tests.e2e.service import service_processes

TARGET_LABELS = {"job", "instance"}  # attached by Prometheus to every scraped series
SCRAPED_BY_PROMETHEUS = {"up": TARGET_LABELS}
REQUEST = {
    "model": "saffron-guard",
    "messages": [{"role": "user", "content": "How do I pick a lock?"}],
    "max_tokens": 4,
    "safety": {"strategy": "saffron", "budget": 2, "min_new_tokens": 1},
}


def metric_objects() -> list[Counter | Gauge | Histogram]:
    return [obj for obj in vars(metrics).values() if isinstance(obj, Counter | Gauge | Histogram)]


def sample_names(obj: Counter | Gauge | Histogram) -> set[str]:
    if isinstance(obj, Counter):
        return {f"{obj._name}_total", f"{obj._name}_created"}
    if isinstance(obj, Histogram):
        return {f"{obj._name}{suffix}" for suffix in ("_bucket", "_sum", "_count", "_created")}
    return {obj._name}


def registry_of(obj) -> str:
    """Which role registry holds ``obj`` ('gateway', 'worker'), asserting it is exactly one of them."""
    holders = [name for name, registry in (("gateway", metrics.GATEWAY_REGISTRY), ("worker", metrics.WORKER_REGISTRY)) if obj in registry._collector_to_names]
    assert len(holders) == 1, f"{obj._name}: registered in {holders or 'no role registry'}"
    return holders[0]


def test_each_metric_is_registered_by_one_role_and_none_by_default():
    roles = {obj._name: registry_of(obj) for obj in metric_objects()}
    assert {"saffron_requests", "saffron_queue_depth", "saffron_gateway_ready"} <= {n for n, r in roles.items() if r == "gateway"}, roles
    assert {"saffron_worker_busy", "saffron_queue_wait_seconds", "saffron_trie_reused_tokens"} <= {n for n, r in roles.items() if r == "worker"}, roles
    in_default = sorted(n for n in REGISTRY._names_to_collectors if n.startswith("saffron_"))
    assert not in_default, f"registered in prometheus_client's default REGISTRY, which no process serves: {in_default}"


def exported(text: str) -> dict[str, set[str]]:
    """Sample name -> label names, from one /metrics text; families without samples yet get their declared labels."""
    declared = {name: set(obj._labelnames) | ({"le"} if name.endswith("_bucket") else set()) for obj in metric_objects() for name in sample_names(obj)}
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        if not family.samples:
            kind = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}.get(family.type, ("",))
            for name in (family.name + suffix for suffix in kind):
                assert name in declared, f"{name}: exported without samples and not declared in service/metrics.py"
                out[name] = declared[name]
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
            if sample.name in declared:
                assert set(sample.labels) == declared[sample.name], (sample.name, sample.labels, declared[sample.name])
    return out


@pytest.fixture(scope="module")
def scraped() -> Iterator[dict[str, dict[str, set[str]]]]:
    """What the gateway and the worker export after one request went through them: role -> sample name -> labels."""
    with service_processes({"SAFFRON_PREFIX_CACHE": "on"}, workers=("observability",), ready_s=120) as procs:
        base = procs.base_url.removesuffix("/v1")
        answer = httpx.post(f"{procs.base_url}/chat/completions", json=REQUEST, timeout=120)
        assert answer.status_code == 200, answer.text
        yield {
            "gateway": exported(httpx.get(f"{base}/metrics", timeout=10).text),
            "worker": exported(httpx.get(f"http://127.0.0.1:{procs.metrics_ports['observability']}/metrics", timeout=10).text),
        }



@pytest.mark.model
@pytest.mark.timeout(180)
def test_gateway_and_worker_export_only_their_own_metrics(scraped):
    for role, names in scraped.items():
        saffron = {n for n in names if n.startswith("saffron_")}
        own = {n for obj in metric_objects() if registry_of(obj) == role for n in sample_names(obj)}
        assert saffron <= own, f"the {role} exports metrics of the other role: {sorted(saffron - own)}"
        assert {n for n in own if not n.endswith("_created")} <= saffron, f"the {role} misses its own: {sorted(own - saffron)}"
        assert "process_resident_memory_bytes" in names, role
    # The request went through: the labelled series exist with their labels.
    assert scraped["gateway"]["saffron_requests_total"] == {"strategy", "status"}
    assert scraped["worker"]["saffron_trie_query_tokens_total"] == {"model"}
    assert scraped["worker"]["saffron_search_seconds_bucket"] == {"strategy", "le"}


def check(parsed: Parsed, known: dict[str, set[str]]) -> list[str]:
    """What ``parsed`` names that ``known`` (sample name -> labels) lacks."""
    problems = []
    in_expr: set[str] = set(TARGET_LABELS)
    for selector in parsed.selectors:
        for name in selector.names:
            if name not in known:
                problems.append(f"metric {name} is exported by no process")
                continue
            in_expr |= known[name]
            if extra := selector.labels - known[name] - TARGET_LABELS:
                problems.append(f"{name} has no label {sorted(extra)}")
    if extra := parsed.grouping - in_expr:
        problems.append(f"groups by {sorted(extra)}, which none of its metrics has")
    return [f"{parsed.where}: {p}\n    {parsed.text.strip()}" for p in problems]


@pytest.mark.model
@pytest.mark.timeout(180)
def test_every_promql_expression_parses_and_names_only_exported_metrics_and_labels(scraped):
    known = {**scraped["gateway"], **scraped["worker"], **SCRAPED_BY_PROMETHEUS, **recorded_labels()}
    expressions = dashboard_expressions() + rule_expressions()  # parsing raises on a bad expression
    assert len(expressions) > 40, len(expressions)
    problems = [p for parsed in expressions for p in check(parsed, known)]
    assert not problems, "\n".join(problems)
