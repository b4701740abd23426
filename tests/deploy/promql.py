"""Every PromQL expression of the dashboard and the rules, parsed (promql-parser): what each one selects and groups by."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import promql_parser
import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/dashboards/saffron-guard.json"
RULE_FILES = sorted((ROOT / "deploy/prometheus/rules").glob("*.yml"))
GRAFANA_RANGES = re.compile(r"\$(__rate_interval|__interval|__range)\b")
GRAFANA_VARIABLE = re.compile(r"\$\{?(\w+)\}?")
LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>\w+)\)$")


@dataclass
class Selector:
    names: list[str]  # metric names (several for {__name__=~"a|b"})
    labels: set[str]  # label names its matchers use, __name__ aside


@dataclass
class Parsed:
    where: str  # e.g. "panel 'Queue depth' A", "rule SaffronNoLiveWorker"
    text: str
    selectors: list[Selector] = field(default_factory=list)
    grouping: set[str] = field(default_factory=set)  # by / without / on / ignoring / group_left labels


def parse(where: str, text: str) -> Parsed:
    """Parse ``text`` (Grafana's variables replaced by stand-ins) and collect its selectors and grouping labels.

    Raises ValueError (from the parser) on a bad expression.
    """
    expr = promql_parser.parse(GRAFANA_VARIABLE.sub(r"\1", GRAFANA_RANGES.sub("5m", text)))
    parsed = Parsed(where, text)

    def visit(node) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            names = [node.name] if node.name else []
            labels = set()
            for m in node.matchers.matchers:
                if m.name == "__name__":
                    assert re.fullmatch(r"[a-zA-Z_:]+(\|[a-zA-Z_:]+)*", m.value), f"{where}: __name__ matcher {m.value!r}"
                    names += [n for n in m.value.split("|") if n not in names]
                else:
                    labels.add(m.name)
            assert names, f"{where}: a selector without a metric name: {text}"
            parsed.selectors.append(Selector(names, labels))
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            parsed.grouping |= set(node.modifier.labels)
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            if node.modifier.matching is not None:
                parsed.grouping |= set(node.modifier.matching.labels)
            parsed.grouping |= set(node.modifier.group_labels or ())

    promql_parser.walk(expr, visit)
    return parsed


def dashboard_expressions() -> list[Parsed]:
    """Each panel target, and the selector of each ``label_values(selector, label)`` variable (with its label)."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append(parse(f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for var in dash["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = LABEL_VALUES.match(var["query"])
        assert m, f"variable {var['name']}: not label_values(selector, label): {var['query']!r}"
        parsed = parse(f"variable {var['name']}", m["selector"])
        parsed.grouping.add(m["label"])  # the label it lists must exist like a grouping label
        out.append(parsed)
    return out


def rules() -> list[dict]:
    return [rule for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def rule_expressions() -> list[Parsed]:
    return [parse(f"rule {rule.get('alert') or rule['record']}", rule["expr"]) for rule in rules()]


def recorded_labels() -> dict[str, set[str]]:
    """Each recording rule's series name and the labels it keeps (those it groups by)."""
    return {rule["record"]: parse(rule["record"], rule["expr"]).grouping for rule in rules() if "record" in rule}
