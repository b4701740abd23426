"""The Saffron Guard dashboard, built from code (grafana-foundation-sdk); writes dashboards/saffron-guard.json.

    .venv/bin/python deploy/grafana/build.py          # regenerate the JSON after editing this file
    .venv/bin/python deploy/grafana/build.py --check  # exit 1 if the committed JSON is not what this file builds

Never edit the JSON by hand: tests/deploy/test_grafana_dashboard.py fails when it differs from ``build()``, or
when a ``saffron_*`` metric of service/metrics.py has no panel. Each metric is exported only by the process that
owns it (the gateway or a worker), so every query below reads one role; the ``job`` and ``instance`` variables
pick deployments and processes, ``strategy`` the search strategies of the panels that have one. What each panel
means is in deploy/README.md ("Dashboard"), and in each panel's description.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders.common import VizLegendOptions, VizTooltipOptions
from grafana_foundation_sdk.builders.dashboard import (
    AnnotationQuery,
    Dashboard,
    DatasourceVariable,
    QueryVariable,
    Row,
)
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.builders.timeseries import Panel as Timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (
    LegendDisplayMode,
    LegendPlacement,
    SortOrder,
    TooltipDisplayMode,
)
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    DynamicConfigValue,
    VariableRefresh,
    VariableSort,
)

OUT = Path(__file__).resolve().parent / "dashboards" / "saffron-guard.json"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
# One metric of each role: the jobs and instances that run Saffron Guard, whatever their scrape jobs are named.
ROLE_METRICS = '__name__=~"saffron_gateway_ready|saffron_worker_busy"'
TARGET = 'job=~"$job", instance=~"$instance"'
STRATEGY = 'strategy=~"$strategy"'
RATE = "[$__rate_interval]"


def sel(metric: str, *matchers: str) -> str:
    """``metric{job=~"$job", instance=~"$instance", ...}``."""
    return f"{metric}{{{', '.join((TARGET, *matchers))}}}"


def rate(metric: str, *matchers: str) -> str:
    return f"rate({sel(metric, *matchers)}{RATE})"


def rate_by(metric: str, label: str, *matchers: str) -> str:
    """``sum by (label) (rate(metric{...}[$__rate_interval]))``."""
    return f"sum by ({label}) ({rate(metric, *matchers)})"


def query(expr: str, legend: str, ref_id: str) -> Dataquery:
    return Dataquery().expr(expr).legend_format(legend).ref_id(ref_id).datasource(DATASOURCE)


def quantiles(histogram: str, by: str, *matchers: str) -> list[Dataquery]:
    """p50 and p95 of ``histogram`` by the label ``by`` (none if empty)."""
    group = f"le, {by}" if by else "le"
    legend = f"{{{{{by}}}}} " if by else ""
    return [
        query(f"histogram_quantile({q}, sum by ({group}) ({rate(histogram + '_bucket', *matchers)}))", f"{legend}p{round(q * 100)}", ref)
        for q, ref in ((0.5, "A"), (0.95, "B"))
    ]


# A configured limit drawn next to what it limits: a red dashed line.
LIMIT_STYLE = [
    DynamicConfigValue("custom.lineStyle", {"fill": "dash", "dash": [10, 10]}),
    DynamicConfigValue("color", {"mode": "fixed", "fixedColor": "red"}),
]


def panel(title: str, description: str, unit: str, targets: list[Dataquery], limit: str | None = None) -> Timeseries:
    """A time series panel, half the dashboard wide; ``limit`` names the series that is a configured limit."""
    legend = VizLegendOptions().display_mode(LegendDisplayMode.LIST).placement(LegendPlacement.BOTTOM).show_legend(True)
    tooltip = VizTooltipOptions().mode(TooltipDisplayMode.MULTI).sort(SortOrder.DESCENDING)
    built = Timeseries().title(title).description(description).unit(unit).datasource(DATASOURCE).span(12).height(8)
    built = built.legend(legend).tooltip(tooltip).fill_opacity(10).line_width(1).min(0)
    for target in targets:
        built = built.with_target(target)
    return built.override_by_name(limit, LIMIT_STYLE) if limit else built


def variables() -> list:
    def label_variable(name: str, label: str, selector: str, all_value: str | None = None) -> QueryVariable:
        var = (
            QueryVariable(name).label(label).datasource(DATASOURCE).query(f"label_values({selector}, {name})")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC).multi(True).include_all(True)
        )
        return var.all_value(all_value) if all_value is not None else var

    return [
        DatasourceVariable("datasource").label("Data source").type("prometheus"),
        label_variable("job", "Job", f"{{{ROLE_METRICS}}}"),
        label_variable("instance", "Instance", f'{{{ROLE_METRICS}, job=~"$job"}}'),
        # Any strategy, also one not seen yet; the panels without a strategy label ignore it.
        label_variable("strategy", "Strategy", '{__name__=~"saffron_requests_total|saffron_search_seconds_count", job=~"$job"}', ".*"),
    ]


def gateway_panels() -> list[Timeseries]:
    answered = rate("saffron_requests_total", STRATEGY)
    return [
        panel(
            "Request rate by status", "Chat completions the gateways answered per second, by HTTP status (499: the client left).",
            "reqps", [query(f"sum by (status) ({answered})", "{{status}}", "A")],
        ),
        panel(
            "Request latency (p50 / p95)", "End-to-end latency at the gateway, by strategy; the dashed limit is SAFFRON_REQUEST_TIMEOUT_S.",
            "s", [*quantiles("saffron_request_latency_seconds", "strategy", STRATEGY),
                  query(f"max({sel('saffron_request_timeout_seconds')})", "timeout", "C")],
            limit="timeout",
        ),
        panel(
            "Time to first token (p50 / p95)", "From request to the first streamed content, by strategy (streaming requests only).",
            "s", quantiles("saffron_time_to_first_token_seconds", "strategy", STRATEGY),
        ),
        panel(
            "Queue depth", "Jobs queued or running (the jobs stream), as the gateways sample it; past the limit (SAFFRON_MAX_QUEUE) requests get 429.",
            "short", [query(f"max({sel('saffron_queue_depth')})", "depth", "A"), query(f"max({sel('saffron_max_queue')})", "limit", "B")],
            limit="limit",
        ),
        panel(
            "Live workers and ready gateways", "Workers with an unexpired heartbeat (as the gateways see them) and gateways whose /ready answers 200.",
            "short", [query(f"max({sel('saffron_live_workers')})", "live workers", "A"),
                      query(f"sum({sel('saffron_gateway_ready')})", "ready gateways", "B")],
        ),
        panel(
            "Gateway Redis errors and requeued jobs", "Redis errors waiting requests survived, by kind; jobs a gateway queued again because Redis had lost them.",
            "ops", [query(rate_by("saffron_gateway_redis_errors_total", "kind"), "{{kind}}", "A"),
                    query(f"sum({rate('saffron_jobs_requeued_total')})", "requeued", "B")],
        ),
    ]


def worker_panels() -> list[Timeseries]:
    searches = rate_by("saffron_search_seconds_count", "strategy", STRATEGY)
    return [
        panel(
            "Queue wait (p50 / p95)", "Time a job waited in the queue before a worker started it, by strategy.",
            "s", quantiles("saffron_queue_wait_seconds", "strategy", STRATEGY),
        ),
        panel(
            "Search time (p50 / p95)", "Time a worker spent on one search, from its start to its answer, by strategy.",
            "s", quantiles("saffron_search_seconds", "strategy", STRATEGY),
        ),
        panel(
            "Worker busy", "Searches each worker steps right now (at most SAFFRON_WORKER_MAX_ACTIVE).",
            "short", [query(f"sum by (instance) ({sel('saffron_worker_busy')})", "{{instance}}", "A")],
        ),
        panel(
            "Worker jobs by outcome", "Jobs the workers finished per second: ok, error, timeout, cancelled, handed_back, lost, poisoned.",
            "ops", [query(rate_by("saffron_worker_jobs_total", "outcome"), "{{outcome}}", "A")],
        ),
        panel(
            "Refusal and degenerate rate", "Share of finished searches that refuse cleanly (by strategy and source) or that the judge calls degenerate.",
            "percentunit", [
                query(f"{rate_by('saffron_refusals_total', 'strategy, source', STRATEGY)} / on (strategy) group_left {searches}",
                      "{{strategy}} refused ({{source}})", "A"),
                query(f"{rate_by('saffron_degenerate_answers_total', 'strategy', STRATEGY)} / {searches}", "{{strategy}} degenerate", "B"),
            ],
        ),
        panel(
            "Generated tokens / s", "Completion tokens the workers returned per second, by strategy.",
            "short", [query(rate_by("saffron_generated_tokens_total", "strategy", STRATEGY), "{{strategy}}", "A")],
        ),
        panel(
            "Reward-model calls / s", "Sequences scored by a reward model or the judge per second, by strategy.",
            "short", [query(rate_by("saffron_reward_model_calls_total", "strategy", STRATEGY), "{{strategy}}", "A")],
        ),
        panel(
            "Worker Redis errors", "Redis errors the workers survived (retried with backoff), by kind; lost_group: the server lost its data.",
            "ops", [query(rate_by("saffron_worker_redis_errors_total", "kind"), "{{kind}}", "A")],
        ),
    ]


def cache_panels() -> list[Timeseries]:
    return [
        panel(
            "Trie cache hit ratio", "Query tokens served from each model's trie cache instead of being run through the model.",
            "percentunit", [query(f"{rate_by('saffron_trie_reused_tokens_total', 'model')} / {rate_by('saffron_trie_query_tokens_total', 'model')}", "{{model}}", "A")],
        ),
        panel(
            "Trie tokens asked and forwarded / s", "Tokens asked of each model through its cache, and those actually run through it (the misses).",
            "short", [query(rate_by("saffron_trie_query_tokens_total", "model"), "{{model}} asked", "A"),
                      query(rate_by("saffron_trie_forwarded_tokens_total", "model"), "{{model}} forwarded", "B")],
        ),
        panel(
            "Trie cache memory", "Bytes each model's trie cache holds (KV and frontier logits) against SAFFRON_TRIE_CACHE_BYTES, the bound of each.",
            "bytes", [query(f"max by (model) ({sel('saffron_trie_cache_bytes')})", "{{model}}", "A"),
                      query(f"max({sel('saffron_trie_cache_limit_bytes')})", "limit", "B")], limit="limit",
        ),
        panel(
            "Trie evicted tokens / s", "Tokens evicted from each model's cache to stay under SAFFRON_TRIE_CACHE_BYTES.",
            "short", [query(rate_by("saffron_trie_evicted_tokens_total", "model"), "{{model}}", "A")],
        ),
        panel(
            "Batch rows (p50 / p95)", "Sequences asked of each model per worker round, across all the searches a worker steps together.",
            "short", quantiles("saffron_batch_rows", "model"),
        ),
    ]


def prefix_cache_panels() -> list[Timeseries]:
    """The prefix KV workers share in Redis (SAFFRON_PREFIX_CACHE); empty while it is off."""
    blocks = "saffron_prefix_cache_blocks_total"
    hit, looked_up = 'result="hit"', 'result=~"hit|miss"'
    return [
        panel(
            "Prefix cache hit ratio", "Full prefix blocks a worker found in Redis among those it looked up (a cold worker skipping a prefill).",
            "percentunit", [query(f"sum({rate(blocks, hit)}) / sum({rate(blocks, looked_up)})", "hit ratio", "A")],
        ),
        panel(
            "Prefix blocks / s", "Blocks loaded from Redis (hit), looked up and not there (miss), and written back (stored).",
            "short", [query(rate_by(blocks, "result"), "{{result}}", "A")],
        ),
        panel(
            "Prefix KV bytes / s", "Bytes of prefix KV loaded from Redis and stored into it.",
            "Bps", [query(rate_by("saffron_prefix_cache_bytes_total", "direction"), "{{direction}}", "A")],
        ),
        panel(
            "Prefix load and store latency (p50 / p95)", "One load (on the request's path, bounded by SAFFRON_PREFIX_CACHE_TIMEOUT_S) or write-back (off it).",
            "s", quantiles("saffron_prefix_cache_seconds", "operation"),
        ),
        panel(
            "Prefix cache trouble / s", "Redis errors (each falls back to local computation), blocks ignored as bad by reason, loads skipped and write-backs dropped.",
            "short", [query(f"sum({rate('saffron_prefix_cache_errors_total')})", "Redis errors", "A"),
                      query(rate_by("saffron_prefix_cache_bad_blocks_total", "reason"), "bad: {{reason}}", "B"),
                      query(rate_by("saffron_prefix_cache_skipped_total", "operation"), "skipped {{operation}}", "C")],
        ),
    ]


def process_panels() -> list[Timeseries]:
    # process_* come from every Python process Prometheus scrapes; the $job variable holds only ours.
    return [
        panel(
            "Resident memory", "Resident set size of each gateway and worker process.",
            "bytes", [query(f"sum by (job, instance) ({sel('process_resident_memory_bytes')})", "{{job}} {{instance}}", "A")],
        ),
        panel(
            "CPU", "CPU seconds per second of each gateway and worker process (1 = one core).",
            "short", [query(rate_by("process_cpu_seconds_total", "job, instance"), "{{job}} {{instance}}", "A")],
        ),
    ]


def build() -> dict:
    """The dashboard as the JSON-ready dict Grafana provisions."""
    dash = (
        Dashboard("Saffron Guard").uid("saffron-guard").description("Gateway and worker metrics (service/metrics.py), built by deploy/grafana/build.py.")
        .tags(["saffron-guard"]).timezone("browser").editable().tooltip(DashboardCursorSync.CROSSHAIR)
        .refresh("30s").time("now-1h", "now").variables(variables()).annotation(
            AnnotationQuery().name("Annotations & Alerts").datasource(DataSourceRef(type_val="grafana", uid="-- Grafana --"))
            .enable(True).hide(True).icon_color("rgba(0, 211, 255, 1)").type("dashboard").built_in(1)
        )
    )
    sections = (("Gateway", gateway_panels()), ("Workers", worker_panels()), ("Trie cache", cache_panels()), ("Shared prefix cache", prefix_cache_panels()), ("Processes", process_panels()))
    for title, panels in sections:
        dash = dash.with_row(Row(title))
        for built in panels:
            dash = dash.with_panel(built)
    out = json.loads(JSONEncoder().encode(dash.build()))
    for i, item in enumerate(out["panels"], start=1):  # the SDK leaves ids to Grafana; fixed ones keep links stable
        item["id"] = i
    return out


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help=f"exit 1 if {OUT.name} differs from what this file builds")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if OUT.read_text() != text:
            print(f"{OUT} is stale: run python {__file__}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
