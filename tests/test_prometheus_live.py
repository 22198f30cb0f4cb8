"""A real Prometheus server scraping a running meterwatch service evaluates every query of
the Grafana dashboard and every recording and alerting rule.

Needs ``/usr/bin/prometheus`` and ``promtool`` (Debian package ``prometheus``) and the
``live_service`` fixture of tests/conftest.py: an object whose ``metrics_url`` is the
/metrics address of a meterwatch service running against a real broker that has processed
some readings, including a few invalid records and some alerts. The fixture must be
module- or session-scoped (the Prometheus server here is started once per module).

What is checked, against the live data:

* Prometheus loads deploy/prometheus/rules/*.yml and evaluates every rule without error;
* every metric name that the dashboard, its variables or the rules use is among the names
  Prometheus has ingested (``/api/v1/label/__name__/values``); the GPU gauges are excused
  on a service without CUDA, and so is GPU utilisation without NVML;
* every dashboard query (Grafana variables replaced: ``$__rate_interval`` -> 1m, ``$job``
  and ``$instance`` -> ``.*``) and every rule expression runs with status ``success`` and
  returns data, except: GPU queries without CUDA, and alert conditions, which are empty
  while the condition is false (their behaviour is unit-tested by promtool test rules in
  tests/test_deploy.py); the service-down and absent alerts must be empty here;
* ``promtool check metrics`` accepts a live scrape of /metrics.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import load_observability

pytestmark = pytest.mark.integration

obs = load_observability()

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

SCRAPES_BEFORE_QUERYING = 6
STARTUP_TIMEOUT_S = 90.0

#: Grafana template variables and what they become here.
VARIABLES = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "5m",
    "job": ".*",
    "instance": ".*",
    "datasource": "prometheus",
}

#: Alerts whose condition must be false while the service is up.
MUST_BE_QUIET = ("MeterwatchServiceDown", "MeterwatchAbsent")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PrometheusServer:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def api(self, path: str, **params: str) -> dict[str, Any]:
        data = urllib.parse.urlencode(params).encode() if params else None
        request = urllib.request.Request(self.url + path, data=data)
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                return json.load(resp)
        except urllib.error.HTTPError as err:  # 400/422: PromQL errors come back as JSON
            body = err.read()
            try:
                return json.loads(body)
            except ValueError:
                return {"status": "error", "error": f"HTTP {err.code}: {body[:500]!r}"}

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("/api/v1/query", query=expr)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def _write_config(metrics_url: str, directory: Path) -> Path:
    """deploy/prometheus/prometheus.yml, retargeted at the live service, 1 s intervals."""
    (config,) = obs.load_yaml_documents(obs.PROMETHEUS_CONFIG)
    parsed = urllib.parse.urlsplit(metrics_url)
    assert parsed.hostname and parsed.port, metrics_url
    config["global"].update(
        {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"})
    config["rule_files"] = [str(obs.RULES_DIR / "*.yml")]
    (job,) = [c for c in config["scrape_configs"] if c["job_name"] == obs.JOB]
    job.pop("dns_sd_configs", None)
    job.update({
        "scheme": parsed.scheme or "http",
        "metrics_path": parsed.path or "/metrics",
        "static_configs": [{"targets": [parsed.netloc]}],
    })
    config["scrape_configs"] = [job]
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def _wait(predicate, what: str, server: PrometheusServer, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"prometheus exited ({server.process.returncode}):\n{server.log_tail()}")
        try:
            last = predicate()
        except (OSError, ValueError, KeyError) as err:  # not listening yet, partial answer
            last = err
        else:
            if last:
                return last
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what} (last: {last!r})\n{server.log_tail()}")


@pytest.fixture(scope="module")
def prometheus(live_service, tmp_path_factory):
    if not Path(PROMETHEUS).exists():
        pytest.skip(f"prometheus server not installed ({PROMETHEUS}): apt-get install prometheus")
    directory = tmp_path_factory.mktemp("prometheus")
    config = _write_config(live_service.metrics_url, directory)
    port = _free_port()
    log = directory / "prometheus.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log_file, stderr=subprocess.STDOUT)
    server = PrometheusServer(f"http://127.0.0.1:{port}", process, log)
    try:
        def ready() -> bool:
            with urllib.request.urlopen(server.url + "/-/ready", timeout=2) as resp:
                return resp.status == 200

        _wait(ready, "prometheus to be ready", server, 30)

        def scraped_enough() -> bool:
            result = server.query(
                f'count_over_time(up{{job="{obs.JOB}"}}[1m]) >= {SCRAPES_BEFORE_QUERYING}'
                f' and up{{job="{obs.JOB}"}} == 1')
            return result["status"] == "success" and bool(result["data"]["result"])

        _wait(scraped_enough, f"{SCRAPES_BEFORE_QUERYING} successful scrapes of "
              f"{live_service.metrics_url}", server, STARTUP_TIMEOUT_S)

        def rules_evaluated() -> bool:
            groups = server.api("/api/v1/rules")["data"]["groups"]
            rules = [r for g in groups for r in g["rules"]]
            return bool(rules) and all(r.get("health") != "unknown" for r in rules)

        _wait(rules_evaluated, "every rule to be evaluated", server, 30)
        time.sleep(2)  # a couple more evaluations, so recorded series have two samples
        yield server
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.fixture(scope="module")
def ingested_names(prometheus: PrometheusServer) -> set[str]:
    answer = prometheus.api("/api/v1/label/__name__/values")
    assert answer["status"] == "success", answer
    return set(answer["data"])


@pytest.fixture(scope="module")
def has_cuda(ingested_names: set[str]) -> bool:
    """Whether the service exports GPU gauges (it does only where CUDA is available)."""
    return bool(ingested_names & obs.GPU_METRICS)


def _excused_when_missing(name: str, has_cuda: bool) -> str | None:
    """Why a metric name may be absent from a live scrape, or None if it may not."""
    if name in obs.GPU_METRICS and not has_cuda:
        return "GPU gauges are exported only where CUDA is available"
    if name == "meterwatch_gpu_utilization_ratio":
        return "GPU utilisation needs NVML (pynvml), which may be missing even with CUDA"
    return None


def _check_result(expr: str, answer: dict[str, Any]) -> str | None:
    if answer.get("status") != "success":
        return f"{answer.get('errorType')}: {answer.get('error')}"
    if answer["data"]["resultType"] not in ("vector", "scalar", "matrix"):
        return f"unexpected result type {answer['data']['resultType']}"
    return None


def _is_empty(answer: dict[str, Any]) -> bool:
    return answer["data"]["resultType"] != "scalar" and not answer["data"]["result"]


def test_rules_are_loaded_and_evaluate_cleanly(prometheus: PrometheusServer) -> None:
    answer = prometheus.api("/api/v1/rules")
    assert answer["status"] == "success", answer
    loaded = {g["name"]: g for g in answer["data"]["groups"]}
    expected = obs.rule_groups()
    assert sorted(loaded) == sorted(g["name"] for g in expected)
    problems = []
    for group in expected:
        got = loaded[group["name"]]["rules"]
        assert len(got) == len(group["rules"]), group["name"]
        for rule in got:
            if rule.get("health") != "ok" or rule.get("lastError"):
                problems.append(f"{rule['name']}: health={rule.get('health')} "
                                f"error={rule.get('lastError')}")
    assert not problems, "\n".join(problems)


def test_every_referenced_metric_is_ingested(ingested_names: set[str], has_cuda: bool) -> None:
    dashboard = obs.load_dashboard()
    referenced: dict[str, set[str]] = {}
    for title, ref, expr in obs.dashboard_queries(dashboard):
        for name in obs.metric_names(expr):
            referenced.setdefault(name, set()).add(f"panel {title!r} {ref}")
    for var, query in obs.variable_queries(dashboard):
        for name in obs.metric_names(obs.label_values_to_promql(query)):
            referenced.setdefault(name, set()).add(f"variable ${var}")
    for rule in obs.rules():
        for name in obs.metric_names(rule["expr"]):
            referenced.setdefault(name, set()).add(rule.get("alert") or rule["record"])

    missing, excused = [], []
    for name, users in sorted(referenced.items()):
        if name in ingested_names:
            continue
        reason = _excused_when_missing(name, has_cuda)
        if reason:
            excused.append(f"{name}: {reason}")
        else:
            missing.append(f"{name} (used by {', '.join(sorted(users))})")
    print("absent for a documented reason:\n  " + "\n  ".join(excused or ["none"]))
    assert not missing, "referenced but never ingested:\n" + "\n".join(missing)


def test_every_dashboard_query_returns_data(prometheus: PrometheusServer, has_cuda: bool) -> None:
    dashboard = obs.load_dashboard()
    queries = [(f"panel {title!r} {ref}", expr)
               for title, ref, expr in obs.dashboard_queries(dashboard)]
    queries += [(f"variable ${var}", obs.label_values_to_promql(query))
                for var, query in obs.variable_queries(dashboard)]
    assert queries
    failures, empty_excused = [], []
    for where, raw in queries:
        expr = obs.substitute_variables(raw, VARIABLES)
        answer = prometheus.query(expr)
        error = _check_result(expr, answer)
        if error:
            failures.append(f"{where}: {error}\n    {expr}")
            continue
        if _is_empty(answer):
            reasons = [_excused_when_missing(n, has_cuda) for n in obs.metric_names(expr)]
            excuses = sorted({r for r in reasons if r is not None})
            if not reasons or len(excuses) < len(set(reasons)):
                failures.append(f"{where}: no data\n    {expr}")
            else:
                empty_excused.append(f"{where}: {'; '.join(excuses)}")
    print(f"{len(queries)} dashboard queries; empty for a documented reason:\n  "
          + "\n  ".join(empty_excused or ["none"]))
    assert not failures, "\n".join(failures)


def test_every_rule_expression_runs(prometheus: PrometheusServer, has_cuda: bool) -> None:
    failures, firing, quiet = [], [], []
    for rule in obs.rules():
        name = rule.get("alert") or rule["record"]
        answer = prometheus.query(rule["expr"])
        error = _check_result(rule["expr"], answer)
        if error:
            failures.append(f"{name}: {error}")
            continue
        empty = _is_empty(answer)
        if "record" in rule:
            if empty:
                failures.append(f"recording rule {name}: no data\n    {rule['expr']}")
        elif empty:
            quiet.append(name)  # the alert's condition is false right now
        elif name in MUST_BE_QUIET:
            failures.append(f"alert {name} holds against a running service: "
                            f"{answer['data']['result']}")
        else:
            firing.append(name)
    print("alert conditions false (empty result, as expected when healthy): "
          + ", ".join(quiet or ["none"]))
    print("alert conditions true against this data: " + ", ".join(firing or ["none"]))
    assert not failures, "\n".join(failures)


def test_recorded_series_are_stored(prometheus: PrometheusServer,
                                    ingested_names: set[str]) -> None:
    # Re-read the names: the recording rules kept evaluating since the fixture was set up.
    answer = prometheus.api("/api/v1/label/__name__/values")
    names = set(answer["data"]) | ingested_names
    missing = sorted({r["record"] for r in obs.recording_rules()} - names)
    assert not missing, f"recording rules that stored nothing: {missing}"


def test_promtool_check_metrics_on_a_live_scrape(live_service) -> None:
    if not Path(PROMTOOL).exists():
        pytest.skip(f"promtool not installed ({PROMTOOL}): apt-get install prometheus")
    with urllib.request.urlopen(live_service.metrics_url, timeout=10) as resp:
        exposition = resp.read()
    assert b"meterwatch_ready" in exposition
    proc = subprocess.run([PROMTOOL, "check", "metrics"], input=exposition,
                          capture_output=True, timeout=60, check=False)
    findings = (proc.stdout + proc.stderr).decode(errors="replace").splitlines()
    unexpected = [
        line for line in findings
        if line.strip() and not (
            obs.PROMTOOL_HOUSEHOLD_DAYS_FINDING in line and "days" in line.split()[0])
    ]
    # 0: clean; 3: lint findings only (1 would be an unparsable exposition).
    assert proc.returncode in (0, 3), findings
    assert not unexpected, "\n".join(unexpected)
