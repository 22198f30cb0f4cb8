"""Static checks of the deployment and observability files under deploy/ (no network, fast).

* the Grafana dashboard follows the dashboard JSON model (uid, schemaVersion, variables,
  panels with datasource, targets with expr and refId, gridPos) and shows every metric;
* the Grafana provisioning points at the paths compose.yaml mounts;
* every metric name the dashboard and the rules use is one the service exposes
  (stream/metrics.py's create_metrics() on a fresh registry), the CUDA-only GPU gauges
  being listed explicitly;
* promtool: check rules, check config, test rules (unit tests of every alert), check
  metrics on an exposition of create_metrics() with samples;
* every YAML file parses; compose.yaml validates with `docker compose config` where a
  compose implementation is installed; Dockerfile, compose and Kubernetes manifests have
  the structure the service needs (probes, grace period, GPU, KEDA bounds, PodMonitor);
* every alert's runbook points at a section of docs/operations.md, which also lists every
  metric.

promtool comes from Debian's `prometheus` package; the checks that need it are skipped,
with the reason, only when it is not installed.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from meterwatch.stream.metrics import create_metrics
from tests.conftest import load_observability

obs = load_observability()
REPO = obs.REPO

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not installed (Debian: apt-get install prometheus); .ci/run installs it")

PANEL_TYPES = {"timeseries", "stat", "heatmap", "gauge", "bargauge", "table"}
DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}
GRID_WIDTH = 24
REQUIRED_ALERTS = {
    "MeterwatchServiceDown", "MeterwatchAbsent", "MeterwatchNotReady",
    "MeterwatchInputStopped", "MeterwatchConsumerLagGrowing", "MeterwatchDeadLetterRateHigh",
    "MeterwatchLatencyBudgetBurnFast", "MeterwatchLatencyBudgetBurnSlow",
    "MeterwatchAnomalyRateSpike", "MeterwatchModelReloadRefused",
    "MeterwatchShadowReloadRefused",
}
TOPICS = ("meterwatch.readings", "meterwatch.alerts", "meterwatch.scores",
          "meterwatch.dead-letter", "meterwatch.data-quality", "meterwatch.state")


# --- helpers -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return obs.load_dashboard()


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    (doc,) = obs.load_yaml_documents(obs.COMPOSE)
    return doc


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict[str, Any]]:
    """Every Kubernetes object of deploy/k8s, by (kind, name)."""
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(obs.K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in obs.load_yaml_documents(path):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in objects, f"{key} defined twice"
            objects[key] = doc
    return objects


def _populated_metrics():
    """create_metrics() on a fresh registry, every metric given a sample (labelled ones a
    child), so the exposition shows every name the service can export."""
    m = create_metrics(CollectorRegistry())
    for field in dataclasses.fields(m):
        metric = getattr(m, field.name)
        if not isinstance(metric, (Counter, Gauge, Histogram, Info)):
            continue
        labelnames = getattr(metric, "_labelnames", ())
        if labelnames:
            values = {"reason": "not_json", "topic": "meterwatch.readings", "partition": "0"}
            metric = metric.labels(**{n: values.get(n, "x") for n in labelnames})
        if isinstance(metric, Counter):
            metric.inc(3)
        elif isinstance(metric, Gauge):
            metric.set(2)
        elif isinstance(metric, Histogram):
            metric.observe(0.3)
            metric.observe(7)
        else:
            metric.info({"version": "test"})
    return m


def _all_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    out = [(f"panel {t!r} {r}", e) for t, r, e in obs.dashboard_queries(dashboard)]
    out += [(f"variable ${v}", obs.label_values_to_promql(q))
            for v, q in obs.variable_queries(dashboard)]
    out += [(rule.get("alert") or rule["record"], rule["expr"]) for rule in obs.rules()]
    return out


def _github_anchors(markdown: str) -> set[str]:
    anchors, fenced = set(), False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            text = re.sub(r"[`*_]", "", m.group(1)).strip().lower()
            text = re.sub(r"[^\w\- ]", "", text)
            anchors.add(text.replace(" ", "-"))
    return anchors


def _promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], input=stdin.decode() if stdin else None,
                          capture_output=True, text=True, timeout=120, check=False, cwd=REPO)


def _seconds(duration: str | int | float) -> float:
    if isinstance(duration, (int, float)):
        return float(duration)
    total, units = 0.0, {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration):
        total += float(number) * units[unit]
    assert total > 0, duration
    return total


def _compose_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path (resolved) of a compose service's bind mounts."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts[target] = (obs.COMPOSE.parent / source).resolve()
    return mounts


# --- dashboard ---------------------------------------------------------------------------

def test_dashboard_top_level(dashboard: dict[str, Any]) -> None:
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dashboard["uid"])
    assert dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 39
    assert "id" not in dashboard or dashboard["id"] is None, "provisioned dashboards carry no id"
    assert dashboard["time"]["from"] and dashboard["time"]["to"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for name in ("job", "instance"):
        var = variables[name]
        assert var["type"] == "query"
        assert var["datasource"] == DATASOURCE_REF
        assert var["includeAll"] and var["multi"] and var["allValue"] == ".*"
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        assert query.startswith("label_values(") and query.endswith(f", {name})")
    instance_query = variables["instance"]["query"]["query"]
    assert '$job' in instance_query, "the instance list should follow the job selection"


def test_dashboard_panels_are_well_formed(dashboard: dict[str, Any]) -> None:
    panels = list(obs.iter_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert all(isinstance(i, int) for i in ids)
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = [p["title"] for p in panels if p["type"] != "row"]
    assert len(titles) == len(set(titles)), "panel titles should be unique"
    for panel in panels:
        where = f"panel {panel.get('id')} {panel.get('title')!r}"
        pos = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= pos.keys(), where
        assert all(isinstance(pos[k], int) for k in "hwxy"), where
        assert pos["w"] > 0 and pos["h"] > 0 and pos["x"] >= 0 and pos["y"] >= 0, where
        assert pos["x"] + pos["w"] <= GRID_WIDTH, where
        if panel["type"] == "row":
            assert pos["w"] == GRID_WIDTH and pos["h"] == 1, where
            continue
        assert panel["type"] in PANEL_TYPES, where
        assert panel["title"] and panel.get("description"), where
        assert panel["datasource"] == DATASOURCE_REF, where
        targets = panel["targets"]
        assert targets, where
        refs = [t["refId"] for t in targets]
        assert len(refs) == len(set(refs)) and all(refs), where
        for target in targets:
            assert isinstance(target["expr"], str) and target["expr"].strip(), where
            assert target.get("datasource", DATASOURCE_REF) == DATASOURCE_REF, where
        if panel["type"] == "heatmap":
            for target in targets:
                assert target.get("format") == "heatmap", where
                assert "_bucket" in target["expr"] and "by (le)" in target["expr"], where


def test_dashboard_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in obs.iter_panels(dashboard):
        pos = panel["gridPos"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                other = cells.setdefault((x, y), panel["title"])
                assert other == panel["title"], f"{panel['title']!r} overlaps {other!r}"


def test_dashboard_queries_use_known_variables_and_filters(dashboard: dict[str, Any]) -> None:
    known = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h", "job": ".*",
             "instance": ".*", "datasource": "x"}
    for title, ref, expr in obs.dashboard_queries(dashboard):
        obs.substitute_variables(expr, known)  # KeyError on an unknown variable
        for name in obs.metric_names(expr):
            selectors = re.findall(rf"(?<![\w:]){re.escape(name)}(?![\w:])(\{{[^}}]*\}})?", expr)
            for selector in selectors:
                assert 'job=~"$job"' in selector and 'instance=~"$instance"' in selector, (
                    f"panel {title!r} {ref}: {name} must be filtered by $job and $instance")
        for m in re.finditer(r"histogram_quantile\(\s*([0-9.]+)\s*,\s*sum by \(([^)]*)\)", expr):
            assert 0 < float(m.group(1)) < 1
            assert "le" in [s.strip() for s in m.group(2).split(",")], (title, ref)
        if "histogram_quantile" in expr:
            assert "_bucket" in expr and "rate(" in expr, (title, ref)


# What the dashboard must show: (what, panel type or None, regex over one target's expr).
REQUIRED_PANELS = [
    ("readings/s", None, r"rate\(meterwatch_readings_total"),
    ("days scored/s", None, r"rate\(meterwatch_days_scored_total"),
    ("end-to-end p50", "timeseries",
     r"histogram_quantile\(0\.5, .*meterwatch_end_to_end_latency_seconds_bucket"),
    ("end-to-end p95", "timeseries",
     r"histogram_quantile\(0\.95, .*meterwatch_end_to_end_latency_seconds_bucket"),
    ("end-to-end p99", "timeseries",
     r"histogram_quantile\(0\.99, .*meterwatch_end_to_end_latency_seconds_bucket"),
    ("alert rate", "timeseries", r"rate\(meterwatch_alerts_total"),
    ("consumer lag, total", None, r"^sum(?: by \(topic\))? \(max by \(topic, partition\) "
                                  r"\(meterwatch_consumer_lag_records"),
    ("consumer lag per partition", "timeseries",
     r"^max by \(topic, partition\) \(meterwatch_consumer_lag_records"),
    ("average batch size", "timeseries",
     r"rate\(meterwatch_inferences_total.*\) / .*rate\(meterwatch_executions_total"),
    ("batch size heatmap", "heatmap", r"meterwatch_batch_size_days_bucket"),
    ("batch size quantiles", "timeseries",
     r"histogram_quantile\(0\.95, .*meterwatch_batch_size_days_bucket"),
    ("queue wait p95", "timeseries",
     r"histogram_quantile\(0\.95, .*meterwatch_queue_wait_seconds_bucket"),
    ("inference time p95", "timeseries",
     r"histogram_quantile\(0\.95, .*meterwatch_inference_seconds_bucket"),
    ("dead letters by reason", "timeseries",
     r"sum by \(reason\) \(rate\(meterwatch_dead_letter_records_total"),
    ("open days", "timeseries", r"meterwatch_open_days"),
    ("duplicates", "timeseries", r"meterwatch_duplicate_readings_total"),
    ("late readings", "timeseries", r"meterwatch_late_readings_total"),
    ("days incomplete", "timeseries", r"meterwatch_days_incomplete_total"),
    ("days imputed", "timeseries", r"meterwatch_days_imputed_total"),
    ("rebalances", "timeseries", r"meterwatch_rebalances_total"),
    ("commit latency", "timeseries",
     r"histogram_quantile\(.*meterwatch_commit_latency_seconds_bucket"),
    ("process CPU", "timeseries", r"meterwatch_process_cpu_ratio"),
    ("process RSS", "timeseries", r"meterwatch_process_resident_memory_bytes"),
    ("GPU memory", "timeseries", r"meterwatch_gpu_memory_used_bytes"),
    ("GPU utilisation", "timeseries", r"meterwatch_gpu_utilization_ratio"),
    ("model version", "stat", r"by \(version\) \(meterwatch_model_info"),
]


@pytest.mark.parametrize(("what", "panel_type", "pattern"), REQUIRED_PANELS,
                         ids=[r[0] for r in REQUIRED_PANELS])
def test_dashboard_shows(dashboard: dict[str, Any], what: str, panel_type: str | None,
                         pattern: str) -> None:
    for panel in obs.iter_panels(dashboard):
        if panel_type and panel["type"] != panel_type:
            continue
        if any(re.search(pattern, t.get("expr", "")) for t in panel.get("targets", [])):
            return
    pytest.fail(f"no {panel_type or ''} panel shows {what} (/{pattern}/)")


def test_model_version_stat_shows_the_label(dashboard: dict[str, Any]) -> None:
    (panel,) = [p for p in obs.iter_panels(dashboard) if p["title"] == "Model version"]
    (target,) = panel["targets"]
    assert target.get("instant") and target.get("format") == "table"
    assert panel["options"]["reduceOptions"]["fields"] == "/^version$/"


def test_every_exported_metric_is_on_the_dashboard(dashboard: dict[str, Any]) -> None:
    """A metric added to stream/metrics.py should get a panel (deploy/grafana/...json)."""
    used = set().union(*(obs.metric_names(e) for _, _, e in obs.dashboard_queries(dashboard)))
    missing = []
    for family in create_metrics(CollectorRegistry()).registry.collect():
        names = {n for n in obs.exposition_names(_single(family)) if not n.endswith("_created")}
        if not names & used and not _standard_process(family.name):
            missing.append(family.name)
    assert not missing, f"exported but on no dashboard panel: {missing}"


def _standard_process(name: str) -> bool:
    """prometheus-client's standard process metrics (ProcessCollector) of the service
    (``process_*``) and of its scorer process (``meterwatch_scorer_process_*``): documented
    by prometheus-client, not by this project's operations doc or dashboard."""
    return name.startswith(("process_", "meterwatch_scorer_process_"))


class _single:
    """A registry-like wrapper around one metric family (for obs.exposition_names)."""

    def __init__(self, family: Any) -> None:
        self.family = family

    def collect(self) -> list[Any]:
        return [self.family]


# --- metric names ------------------------------------------------------------------------

def test_every_referenced_metric_is_exported(dashboard: dict[str, Any]) -> None:
    exported = obs.exposition_names(create_metrics(CollectorRegistry()).registry)
    recorded = {rule["record"] for rule in obs.recording_rules()}
    allowed = exported | recorded | obs.GPU_METRICS | obs.PROMETHEUS_SERIES
    unknown: dict[str, list[str]] = {}
    for where, expr in _all_queries(dashboard):
        for name in obs.metric_names(expr) - allowed:
            unknown.setdefault(name, []).append(where)
    assert not unknown, f"metric names that stream/metrics.py does not export: {unknown}"


def test_gpu_allowlist_names_metrics_of_the_source() -> None:
    source = obs.METRICS_SOURCE.read_text(encoding="utf-8")
    for name in obs.GPU_METRICS:
        assert f'"{name}"' in source, f"{name} is not defined in stream/metrics.py"
    exported = obs.exposition_names(create_metrics(CollectorRegistry()).registry)
    stray = sorted(n for n in exported if n.startswith("meterwatch_gpu_"))
    assert set(stray) <= obs.GPU_METRICS, f"GPU metrics missing from the allowlist: {stray}"


def test_exposition_names_cover_the_real_exposition() -> None:
    m = _populated_metrics()
    text = generate_latest(m.registry).decode()
    samples = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    derived = obs.exposition_names(m.registry)
    assert samples <= derived, samples - derived
    assert "meterwatch_model_info" in samples and "meterwatch_readings_total" in samples


def test_metric_name_extraction() -> None:
    expr = ('histogram_quantile(0.99, sum by (job, le) (rate(a_bucket{le=~"1(\\\\.0)?", '
            'job="b_total"}[5m]))) / on (job) group_left c:d:rate5m offset 1h > 3 * 1e3 '
            'and absent(up{job="x"}) unless count_over_time(e[1m:10s])')
    assert obs.metric_names(expr) == {"a_bucket", "c:d:rate5m", "up", "e"}
    assert obs.label_values_to_promql('label_values(x{job=~"$job"}, instance)') == (
        'group by (instance) (x{job=~"$job"})')
    assert obs.substitute_variables("rate(x{a=~\"$job\"}[$__rate_interval]) ${job:regex}",
                                    {"job": ".*", "__rate_interval": "1m"}) == (
        'rate(x{a=~".*"}[1m]) .*')


@needs_promtool
def test_promtool_check_metrics_on_the_exposition() -> None:
    exposition = generate_latest(_populated_metrics().registry)
    proc = _promtool("check", "metrics", stdin=exposition)
    findings = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    unexpected = [line for line in findings
                  if not (obs.PROMTOOL_HOUSEHOLD_DAYS_FINDING in line
                          and "days" in line.split()[0])]
    assert proc.returncode in (0, 3), findings  # 3: lint findings only
    assert not unexpected, "\n".join(unexpected)


# --- Prometheus configuration and rules -----------------------------------------------------

@needs_promtool
def test_promtool_check_rules() -> None:
    proc = _promtool("check", "rules", *map(str, obs.rule_files()))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_promtool
def test_promtool_check_config() -> None:
    proc = _promtool("check", "config", str(obs.PROMETHEUS_CONFIG))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rule files found" in proc.stdout, "prometheus.yml should load the rules"


@needs_promtool
def test_promtool_rule_unit_tests() -> None:
    tests = sorted(obs.RULES_TESTS_DIR.glob("*.yml"))
    assert tests
    proc = _promtool("test", "rules", *map(str, tests))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tested = set()
    for path in tests:
        text = path.read_text(encoding="utf-8")
        tested |= set(re.findall(r"\b(Meterwatch[A-Za-z]+)\b", text))
    untested = {rule["alert"] for rule in obs.alert_rules()} - tested
    assert not untested, f"alerts without a promtool unit test: {sorted(untested)}"


def test_prometheus_config_scrapes_the_service() -> None:
    (config,) = obs.load_yaml_documents(obs.PROMETHEUS_CONFIG)
    (job,) = [c for c in config["scrape_configs"] if c["job_name"] == obs.JOB]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["meterwatch"] and sd["port"] == 9464
    assert config["rule_files"] == ["rules/*.yml"]


def test_alert_rules_are_documented() -> None:
    alerts = obs.alert_rules()
    assert {a["alert"] for a in alerts} >= REQUIRED_ALERTS
    anchors = _github_anchors(obs.OPERATIONS_DOC.read_text(encoding="utf-8"))
    for rule in alerts:
        name = rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule.get("for"), f"{name}: no `for`, it would fire on a single evaluation"
        annotations = rule["annotations"]
        assert annotations.get("summary") and annotations.get("description"), name
        runbook = annotations["runbook"]
        assert runbook.startswith("docs/operations.md#"), name
        assert runbook.split("#", 1)[1] in anchors, f"{name}: no section for {runbook}"


def test_recording_rules_follow_the_naming_convention() -> None:
    names = [rule["record"] for rule in obs.recording_rules()]
    assert len(names) == len(set(names))
    for name in names:
        assert re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", name), name


def test_prometheusrule_matches_the_rules_files() -> None:
    (doc,) = obs.load_yaml_documents(obs.PROMETHEUSRULE)
    assert doc == obs.prometheusrule_document(), (
        "deploy/k8s/prometheusrule.yaml is stale: python deploy/observability.py prometheusrule")


# --- YAML, compose, Dockerfile -------------------------------------------------------------

YAML_FILES = sorted(p for p in obs.DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))


@pytest.mark.parametrize("path", YAML_FILES, ids=[str(p.relative_to(REPO)) for p in YAML_FILES])
def test_yaml_parses(path: Path) -> None:
    docs = obs.load_yaml_documents(path)
    assert docs and all(isinstance(d, dict) for d in docs)


def test_grafana_provisioning_matches_compose(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = _compose_mounts(grafana)
    assert mounts["/etc/grafana/provisioning"] == obs.DEPLOY / "grafana" / "provisioning"
    (providers,) = obs.load_yaml_documents(obs.GRAFANA_DASHBOARD_PROVIDERS)
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    path = provider["options"]["path"]
    assert mounts[path] == obs.DASHBOARD.parent, "provider path is not where compose mounts"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{path}/{obs.DASHBOARD.name}"
    (datasources,) = obs.load_yaml_documents(obs.GRAFANA_DATASOURCES)
    (ds,) = datasources["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]
    (config,) = obs.load_yaml_documents(obs.PROMETHEUS_CONFIG)
    assert ds["jsonData"]["timeInterval"] == config["global"]["scrape_interval"]


def _partitions_in_compose(compose: dict[str, Any]) -> int:
    env = compose["services"]["kafka-init"]["environment"]["METERWATCH_PARTITIONS"]
    m = re.fullmatch(r"\$\{METERWATCH_PARTITIONS:-(\d+)\}|(\d+)", str(env))
    assert m, env
    return int(m.group(1) or m.group(2))


def test_compose_structure(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"kafka", "kafka-init", "meterwatch", "prometheus", "grafana"} <= services.keys()
    assert not any("zookeeper" in name for name in services), "KRaft mode needs no ZooKeeper"

    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    roles = set(kafka["environment"]["KAFKA_PROCESS_ROLES"].split(","))
    assert roles == {"broker", "controller"}
    assert kafka["healthcheck"]["test"]

    init = services["kafka-init"]
    assert init["depends_on"]["kafka"]["condition"] == "service_healthy"
    script = "\n".join(init["command"])
    for topic in TOPICS:
        assert re.search(rf"create {re.escape(topic)}\s", script), topic
    assert re.search(r"create meterwatch\.state .*cleanup\.policy=compact", script)

    mw = services["meterwatch"]
    assert mw["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"
    build = mw["build"]
    assert (obs.COMPOSE.parent / build["context"]).resolve() == REPO
    assert (REPO / build["dockerfile"]).resolve() == obs.DOCKERFILE
    env = mw["environment"]
    assert env["METERWATCH_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert str(env["METERWATCH_METRICS_PORT"]) == "9464"
    assert _seconds(mw["stop_grace_period"]) > float(env["METERWATCH_SHUTDOWN_TIMEOUT_S"])
    assert mw.get("stop_signal", "SIGTERM") == "SIGTERM"

    prom = services["prometheus"]
    assert _compose_mounts(prom)["/etc/prometheus"] == obs.PROMETHEUS_CONFIG.parent
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]


def test_compose_gpu_override() -> None:
    (doc,) = obs.load_yaml_documents(obs.COMPOSE_GPU)
    (device,) = doc["services"]["meterwatch"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True,
                               timeout=60, check=False)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


@pytest.mark.parametrize("files", [[obs.COMPOSE], [obs.COMPOSE, obs.COMPOSE_GPU]],
                         ids=["compose", "compose+gpu"])
def test_docker_compose_config(files: list[Path]) -> None:
    command = _compose_command()
    if command is None:
        pytest.skip("neither the `docker compose` plugin nor docker-compose is installed")
    args = [a for f in files for a in ("-f", str(f))]
    proc = subprocess.run([*command, *args, "config", "-q"], capture_output=True, text=True,
                          timeout=120, check=False, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = obs.DOCKERFILE.read_text(encoding="utf-8")
    text = re.sub(r"\\\n", " ", "\n".join(
        line for line in text.splitlines() if not line.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile() -> None:
    instructions = _dockerfile_instructions()
    args = dict(a.partition("=")[::2] for k, a in instructions if k == "ARG" and "=" in a)
    froms = [rest for k, rest in instructions if k == "FROM"]
    final = froms[-1].split()[0]
    image = args.get(final.strip("${}"), final)
    # the image runs the Python CI tests (this interpreter's minor version), and it is one
    # pyproject.toml's requires-python accepts
    tested = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert re.fullmatch(rf"python:{re.escape(tested)}(\.\d+)?-slim-\w+", image), image
    import tomllib

    floor = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert floor == ">=3.11" and sys.version_info >= (3, 11), floor
    after_final = instructions[max(i for i, (k, _) in enumerate(instructions) if k == "FROM"):]
    final_stage = dict(after_final)
    user = final_stage["USER"].split(":")[0]
    assert user not in ("root", "0"), "the service must not run as root"
    assert "9464" in final_stage["EXPOSE"].split()
    assert final_stage["STOPSIGNAL"] == "SIGTERM"
    healthcheck = final_stage["HEALTHCHECK"]
    assert "/healthz" in healthcheck and "urllib" in healthcheck
    assert json.loads(final_stage["ENTRYPOINT"]) == ["meterwatch"]
    assert json.loads(final_stage["CMD"]) == ["run"]
    copy_all = [rest for k, rest in instructions if k == "COPY" and rest.split() == [".", "."]]
    assert copy_all, "the build stage should copy the (filtered) repository root"
    ignore = (obs.DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
    for needed in ("!pyproject.toml", "!stream/", "!model/"):
        assert needed in ignore, needed


def _settings_env_names() -> set[str]:
    from meterwatch.stream.config import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    return {f"{prefix}{name}".upper() for name in Settings.model_fields}


def test_service_environment_names_are_settings(
        compose: dict[str, Any], k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    """pydantic-settings ignores an unknown METERWATCH_* variable without a word, so a
    misspelt one (METERWATCH_MODEL for METERWATCH_MODEL_PATH) would silently do nothing."""
    known = _settings_env_names()
    given: dict[str, str] = {}
    for name in compose["services"]["meterwatch"]["environment"]:
        given[name] = "compose.yaml meterwatch.environment"
    for key, value in _dockerfile_instructions():
        if key == "ENV":
            for name in re.findall(r"(?:^|\s)(METERWATCH_\w+)=", value):
                given[name] = "Dockerfile ENV"
    deployment = k8s[("Deployment", "meterwatch")]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    for env in container.get("env", []):
        given[env["name"]] = "deployment.yaml env"
    for source in container["envFrom"]:
        ref = source.get("configMapRef") or source.get("secretRef")
        kind = "ConfigMap" if "configMapRef" in source else "Secret"
        obj = k8s[(kind, ref["name"])]
        for name in {**obj.get("data", {}), **obj.get("stringData", {})}:
            given[name] = f"{kind} {ref['name']}"
    unknown = {n: where for n, where in given.items()
               if n.startswith("METERWATCH_") and n not in known}
    assert not unknown, f"not settings of stream/config.py: {unknown}"
    assert {"METERWATCH_BOOTSTRAP_SERVERS", "METERWATCH_MODEL_PATH",
            "METERWATCH_SHUTDOWN_TIMEOUT_S", "METERWATCH_METRICS_PORT"} <= known


# --- Kubernetes ----------------------------------------------------------------------------

def test_k8s_objects_are_complete(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    (kustomization,) = obs.load_yaml_documents(obs.K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    present = {p.name for p in obs.K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    for (kind, name), doc in k8s.items():
        assert doc["apiVersion"] and kind and name
    kinds = {kind for kind, _ in k8s}
    assert {"Deployment", "ConfigMap", "Secret", "PodMonitor", "ScaledObject",
            "PodDisruptionBudget", "PrometheusRule", "TriggerAuthentication"} <= kinds


def test_k8s_deployment(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    deployment = k8s[("Deployment", "meterwatch")]
    assert deployment["apiVersion"] == "apps/v1"
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    (container,) = pod["containers"]
    (port,) = container["ports"]
    assert port["name"] == "metrics" and port["containerPort"] == 9464

    config = k8s[("ConfigMap", "meterwatch-config")]["data"]
    env = {**config, **{e["name"]: e.get("value") for e in container.get("env", [])}}
    assert int(env["METERWATCH_METRICS_PORT"]) == port["containerPort"]
    timeout = float(env.get("METERWATCH_SHUTDOWN_TIMEOUT_S", 30))
    assert pod["terminationGracePeriodSeconds"] > timeout
    assert env["METERWATCH_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert env["METERWATCH_SASL_MECHANISM"] == "SCRAM-SHA-512"

    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in ("metrics", 9464), probe
    assert "lifecycle" not in container, "SIGTERM is handled; no preStop hook"

    resources = container["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1
    assert resources["requests"]["cpu"] and resources["limits"]["memory"]

    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False

    for source in container["envFrom"]:
        if "configMapRef" in source:
            assert ("ConfigMap", source["configMapRef"]["name"]) in k8s
        if "secretRef" in source:
            assert ("Secret", source["secretRef"]["name"]) in k8s
    for volume in pod["volumes"]:
        if "secret" in volume:
            assert ("Secret", volume["secret"]["secretName"]) in k8s
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            assert ("PersistentVolumeClaim", claim) in k8s


def test_k8s_secrets_hold_placeholders_only(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    for (kind, name), doc in k8s.items():
        if kind != "Secret":
            continue
        assert "data" not in doc, f"{name}: use stringData placeholders"
        for key, value in doc["stringData"].items():
            assert "REPLACE-ME" in value or key in ("sasl", "tls"), f"{name}/{key}"


def test_k8s_podmonitor(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    monitor = k8s[("PodMonitor", "meterwatch")]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    pod_labels = k8s[("Deployment", "meterwatch")]["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pod_labels[monitor["spec"]["jobLabel"]] == obs.JOB
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"


def test_k8s_scaledobject(k8s: dict[tuple[str, str], dict[str, Any]],
                          compose: dict[str, Any]) -> None:
    scaled = k8s[("ScaledObject", "meterwatch")]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert ("Deployment", spec["scaleTargetRef"]["name"]) in k8s
    partitions = _partitions_in_compose(compose)
    assert spec["maxReplicaCount"] == partitions == 12
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "kafka"
    config = k8s[("ConfigMap", "meterwatch-config")]["data"]
    meta = trigger["metadata"]
    assert all(isinstance(v, str) for v in meta.values()), "KEDA trigger metadata is strings"
    assert meta["topic"] == "meterwatch.readings"
    assert meta["consumerGroup"] == config["METERWATCH_GROUP_ID"]
    assert meta["bootstrapServers"] == config["METERWATCH_BOOTSTRAP_SERVERS"]
    assert int(meta["lagThreshold"]) > 0
    auth = k8s[("TriggerAuthentication", trigger["authenticationRef"]["name"])]
    for ref in auth["spec"]["secretTargetRef"]:
        secret = k8s[("Secret", ref["name"])]
        assert ref["key"] in secret["stringData"], ref


def test_k8s_pdb(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    pdb = k8s[("PodDisruptionBudget", "meterwatch")]
    assert pdb["apiVersion"] == "policy/v1"
    pod_labels = k8s[("Deployment", "meterwatch")]["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"].get("maxUnavailable") == 1


def test_kubectl_kustomize_builds() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: `kubectl kustomize deploy/k8s` not run")
    proc = subprocess.run([kubectl, "kustomize", str(obs.K8S)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert all(d["metadata"].get("namespace") == "meterwatch"
               for d in docs if d["kind"] != "Namespace")


# --- operations doc ------------------------------------------------------------------------

def test_operations_doc_lists_every_metric() -> None:
    doc = obs.OPERATIONS_DOC.read_text(encoding="utf-8")
    registry = create_metrics(CollectorRegistry()).registry
    names = {n for n in obs.exposition_names(registry) if not n.endswith("_created")}
    names = {re.sub(r"_(bucket|sum|count)$", "", n) for n in names} | set(obs.GPU_METRICS)
    missing = sorted(n for n in names if f"`{n}`" not in doc and not _standard_process(n))
    assert not missing, f"docs/operations.md does not list: {missing}"
