"""What the observability checks share: where the files are, how to read the PromQL out of
the Grafana dashboard and the Prometheus rules, and which metric names an expression uses.

Used by tests/test_deploy.py and tests/test_prometheus_live.py (loaded by path: deploy/ is
not a package), and as a script to regenerate the Prometheus Operator copy of the rules::

    python deploy/observability.py prometheusrule   # rewrites deploy/k8s/prometheusrule.yaml
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parent
REPO = DEPLOY.parent
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "meterwatch.json"
GRAFANA_DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
GRAFANA_DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "meterwatch.yaml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULES_DIR = DEPLOY / "prometheus" / "rules"
RULES_TESTS_DIR = DEPLOY / "prometheus" / "tests"
COMPOSE = DEPLOY / "docker" / "compose.yaml"
COMPOSE_GPU = DEPLOY / "docker" / "compose.gpu.yaml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
K8S = DEPLOY / "k8s"
PROMETHEUSRULE = K8S / "prometheusrule.yaml"
OPERATIONS_DOC = REPO / "docs" / "operations.md"
METRICS_SOURCE = REPO / "stream" / "metrics.py"

#: The scrape job name the rules and the dashboard's defaults expect.
JOB = "meterwatch"

#: Exported only where CUDA is present (stream/metrics.py, _gpu_metrics); utilisation also
#: needs NVML. A scrape of a CPU-only service has none of them.
GPU_METRICS = frozenset({
    "meterwatch_gpu_memory_used_bytes",
    "meterwatch_gpu_memory_total_bytes",
    "meterwatch_gpu_utilization_ratio",
})

#: Series that Prometheus makes itself for every target or alert.
PROMETHEUS_SERIES = frozenset({
    "up", "scrape_duration_seconds", "scrape_samples_scraped", "ALERTS", "ALERTS_FOR_STATE",
})

#: promtool's linter reads the token "days" in a name as a time unit and asks for seconds.
#: In meterwatch "days" counts household-days (48 readings each), not a duration, so this
#: one finding is expected for names that carry it; any other finding fails the checks.
PROMTOOL_HOUSEHOLD_DAYS_FINDING = 'use base unit "seconds" instead of "days"'

# Sample-name suffixes per metric family type, as the Prometheus text format writes them.
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "gauge": ("",),
    "stateset": ("",),
    "enum": ("",),
    "unknown": ("",),
}


# --- files -------------------------------------------------------------------------------

def load_yaml_documents(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def load_dashboard() -> dict[str, Any]:
    with DASHBOARD.open(encoding="utf-8") as f:
        return json.load(f)


def rule_files() -> list[Path]:
    return sorted(p for p in RULES_DIR.iterdir() if p.suffix in (".yml", ".yaml"))


def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = []
    for path in rule_files():
        (doc,) = load_yaml_documents(path)
        groups.extend(doc["groups"])
    return groups


def rules() -> list[dict[str, Any]]:
    return [rule for group in rule_groups() for rule in group["rules"]]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def recording_rules() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "record" in rule]


# --- dashboard ---------------------------------------------------------------------------

def iter_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows and the panels of collapsed rows included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) of every PromQL target of the dashboard."""
    return [
        (panel.get("title", ""), target.get("refId", ""), target["expr"])
        for panel in iter_panels(dashboard)
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def variable_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(variable name, query) of every query variable of the dashboard."""
    out = []
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query", "")
        out.append((var["name"], query or var.get("definition", "")))
    return out


_LABEL_VALUES = re.compile(r"^\s*label_values\((?:(?P<expr>.+),\s*)?(?P<label>\w+)\)\s*$")


def label_values_to_promql(query: str) -> str:
    """Grafana's label_values(expr, label) as the PromQL query that yields the same values."""
    m = _LABEL_VALUES.match(query)
    if not m:
        raise ValueError(f"not a label_values() query: {query!r}")
    if m["expr"] is None:
        raise ValueError(f"label_values() without a series selector: {query!r}")
    return f"group by ({m['label']}) ({m['expr']})"


_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


def substitute_variables(expr: str, values: dict[str, str]) -> str:
    """Replace Grafana template variables ($x, ${x}, ${x:fmt}, [[x]]) by ``values[x]``.

    An unknown variable raises KeyError: every variable a query uses must be accounted for.
    """
    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        return values[name]

    return _VARIABLE.sub(repl, expr)


# --- PromQL ------------------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE)
_OFFSET = re.compile(r"\boffset\s+-?[0-9a-zA-Z]+", re.IGNORECASE)
_TOKEN = re.compile(
    r"(?P<number>(?:0[xX][0-9a-fA-F]+)|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?[a-zA-Z]*)"
    r"|(?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)(?P<call>\s*\()?")
_KEYWORDS = frozenset({
    "and", "or", "unless", "bool", "by", "without", "on", "ignoring", "group_left",
    "group_right", "offset", "inf", "nan", "start", "end", "atan2",
})


def metric_names(expr: str) -> set[str]:
    """Metric names that a PromQL expression selects (functions, keywords and labels excluded).

    >>> sorted(metric_names('sum by (le) (rate(a_bucket{le=~"1(\\\\.0)?"}[5m])) / b offset 1h'))
    ['a_bucket', 'b']
    """
    text = _STRING.sub('""', expr)
    text = _BRACES.sub(" ", text)
    text = _BRACKETS.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _OFFSET.sub(" ", text)
    names = set()
    for m in _TOKEN.finditer(text):
        ident = m.group("ident")
        if ident is None or m.group("call") is not None:
            continue  # a number, or a function / aggregation call
        if ident.lower() in _KEYWORDS:
            continue
        names.add(ident)
    return names


def exposition_names(registry: Any) -> set[str]:
    """Every sample name the registry can expose, from its families' names and types.

    Derived from the families rather than the samples, so that a labelled metric that has
    no child yet (no sample) still counts.
    """
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return names


# --- Prometheus Operator copy of the rules ----------------------------------------------

def prometheusrule_document() -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "meterwatch", "labels": {"app.kubernetes.io/name": "meterwatch"}},
        "spec": {"groups": rule_groups()},
    }


_PROMETHEUSRULE_HEADER = """\
# GENERATED from deploy/prometheus/rules/*.yml: do not edit by hand.
# tests/test_deploy.py fails when the two differ. Regenerate with:
#   python deploy/observability.py prometheusrule
# Your Prometheus Operator may select rules by label (its ruleSelector, e.g. `release: ...`):
# add that label with kustomize (deploy/k8s/kustomization.yaml) rather than here.
"""


def render_prometheusrule() -> str:
    class Dumper(yaml.SafeDumper):
        pass

    def str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, str_representer)
    body = yaml.dump(prometheusrule_document(), Dumper=Dumper, sort_keys=False, width=100)
    return _PROMETHEUSRULE_HEADER + body


def main(argv: list[str]) -> int:
    if argv == ["prometheusrule"]:
        PROMETHEUSRULE.write_text(render_prometheusrule(), encoding="utf-8")
        print(f"wrote {PROMETHEUSRULE.relative_to(REPO)}")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
