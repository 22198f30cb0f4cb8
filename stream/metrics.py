"""Prometheus metrics of the service, created through one factory that takes a registry.

Every metric the service exports is built here, so names, units and label sets are
reviewed in one place (and ``promtool check metrics`` runs against a live scrape in the
test suite). Tests pass a fresh ``CollectorRegistry()`` and read values back with
``registry.get_sample_value(...)``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psutil
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from meterwatch.model.sustained import SIGNATURES

log = logging.getLogger(__name__)

# Batch sizes are counts of household-days, spanning 1 .. a million on a GPU.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
                      65536, 262144, 1048576)
# Latencies in seconds, from sub-millisecond inference up to a stuck pipeline.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0, 60.0)

#: Reasons a record goes to the dead-letter topic (label values of invalid-record metrics).
INVALID_REASONS = (
    "not_json",
    "bad_shape",
    "missing_field",
    "bad_household",
    "bad_timestamp",
    "not_half_hour",
    "future_timestamp",
    "bad_kwh",
    "too_many_readings",
    "too_large",
    "key_mismatch",
    "internal_error",
)


@dataclass(frozen=True)
class Metrics:
    """The service's metrics; see ``create_metrics``."""

    registry: CollectorRegistry
    records: Counter
    readings: Counter
    invalid_readings: Counter
    dead_letters: Counter
    duplicate_readings: Counter
    late_readings: Counter
    days_completed: Counter
    days_scored: Counter
    days_incomplete: Counter
    days_imputed: Counter
    alerts: Counter
    inferences: Counter
    executions: Counter
    batch_size: Histogram
    queue_wait: Histogram
    inference_seconds: Histogram
    end_to_end_latency: Histogram
    commit_latency: Histogram
    open_days: Gauge
    consumer_lag: Gauge
    input_lost: Counter
    households_adopted: Counter
    partitions_assigned: Gauge
    rebalances: Counter
    paused_partitions: Gauge
    ready: Gauge
    model_info: Info
    model_reloads: Counter
    model_reload_failures: Counter
    alert_threshold: Gauge
    shadow_info: Info
    shadow_reloads: Counter
    shadow_reload_failures: Counter
    shadow_days: Counter
    shadow_alerts: Counter
    shadow_agreement: Gauge
    shadow_abs_diff: Gauge
    shadow_rank_correlation: Gauge
    sustained_changes: Counter
    scorer_up: Gauge
    scorer_restarts: Counter
    partitions_lost: Counter
    partitions_retaken: Counter
    context_reloads: Counter
    context_reload_failures: Counter
    days_without_context: Counter


#: The ``unusual`` label of ``meterwatch_alerts_total``: the first of an alert's ``unusual``
#: list (``stream.alerts.UNUSUAL`` order), or ``rules`` for a data-quality rule alone.
ALERT_KINDS: tuple[str, ...] = ("total", "half_hour", "hours", "shape", "rules")

#: The ``table`` label of ``meterwatch_days_without_context_total``: the context tables
#: whose lack a scored day can show (for bank holidays: a day after the last year the file
#: lists, as a day that is no bank holiday is not listed either).
CONTEXT_TABLES: tuple[str, ...] = ("weather", "household_info", "holidays")

#: The ``reason`` label of ``meterwatch_partitions_lost_total`` (``stream.service``).
LOSS_REASONS: tuple[str, ...] = ("fenced", "group_moved_on", "settle_failed")


def create_metrics(registry: CollectorRegistry | None = None) -> Metrics:
    """Build every metric of the service on ``registry`` (a fresh one when ``None``).

    >>> m = create_metrics()
    >>> m.readings.inc(3)
    >>> m.registry.get_sample_value("meterwatch_readings_total")
    3.0
    """
    reg = registry if registry is not None else CollectorRegistry()

    def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        return Counter(name, doc, labels, registry=reg)

    def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
        return Gauge(name, doc, labels, registry=reg)

    def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(name, doc, buckets=buckets, registry=reg)

    m = Metrics(
        registry=reg,
        records=counter("meterwatch_records", "Kafka records consumed from the readings topic."),
        readings=counter("meterwatch_readings", "Valid half-hourly readings accepted."),
        invalid_readings=counter(
            "meterwatch_invalid_readings", "Readings rejected by validation, by reason.",
            ("reason",)),
        dead_letters=counter(
            "meterwatch_dead_letter_records",
            "Records published to the dead-letter topic, by reason.", ("reason",)),
        duplicate_readings=counter(
            "meterwatch_duplicate_readings",
            "Readings for a slot that already had one (first value kept)."),
        late_readings=counter(
            "meterwatch_late_readings",
            "Readings for a household-day that was already closed (dropped)."),
        days_completed=counter(
            "meterwatch_days_completed", "Household-days whose slots all arrived."),
        days_scored=counter("meterwatch_days_scored", "Household-days scored by the model."),
        days_incomplete=counter(
            "meterwatch_days_incomplete",
            "Household-days closed by the watermark with too many slots missing."),
        days_imputed=counter(
            "meterwatch_days_imputed",
            "Household-days closed by the watermark and scored with imputed slots."),
        alerts=counter(
            "meterwatch_alerts",
            "Alerts published, by what is unusual: the first of the alert's 'unusual' list "
            "(total, half_hour, hours, shape), or rules when only a data-quality rule fired.",
            ("unusual",)),
        inferences=counter("meterwatch_inferences", "Household-days run through the model."),
        executions=counter("meterwatch_executions", "Model batches executed."),
        batch_size=histogram(
            "meterwatch_batch_size_days", "Household-days per model batch.", BATCH_SIZE_BUCKETS),
        queue_wait=histogram(
            "meterwatch_queue_wait_seconds",
            "Time a completed day waited in the batcher before scoring.", LATENCY_BUCKETS),
        inference_seconds=histogram(
            "meterwatch_inference_seconds",
            "Wall time of one model batch, copies included.", LATENCY_BUCKETS),
        end_to_end_latency=histogram(
            "meterwatch_end_to_end_latency_seconds",
            "From the Kafka timestamp of a day's last reading to its outputs being acknowledged.",
            LATENCY_BUCKETS),
        commit_latency=histogram(
            "meterwatch_commit_latency_seconds", "Time of one offset commit.", LATENCY_BUCKETS),
        open_days=gauge("meterwatch_open_days", "Household-days being assembled."),
        consumer_lag=gauge(
            "meterwatch_consumer_lag_records",
            "Records between the consumer position and the partition highwater.",
            ("topic", "partition")),
        input_lost=counter(
            "meterwatch_input_offsets_lost",
            "Input offsets the broker deleted (retention, DeleteRecords) before the group "
            "read them: their readings are lost.", ("topic", "partition")),
        households_adopted=counter(
            "meterwatch_households_adopted",
            "Households that arrived on an input partition without a state there and took "
            "the state they had on another partition (after partitions were added to the "
            "input topic)."),
        partitions_assigned=gauge(
            "meterwatch_partitions_assigned", "Input partitions owned by this process."),
        rebalances=counter("meterwatch_rebalances", "Consumer group rebalances seen."),
        paused_partitions=gauge(
            "meterwatch_paused_partitions", "Input partitions paused by backpressure."),
        ready=gauge("meterwatch_ready", "1 when the service is ready (see /readyz)."),
        model_info=Info("meterwatch_model", "The model serving (version, device, threshold, "
                        "target_far, calibration).", registry=reg),
        model_reloads=counter("meterwatch_model_reloads",
                              "Checkpoints swapped in without a restart."),
        model_reload_failures=counter(
            "meterwatch_model_reload_failures",
            "Candidate checkpoints refused (unloadable, incompatible, non-finite scores); "
            "the old model kept serving."),
        alert_threshold=gauge("meterwatch_alert_threshold",
                              "Score threshold the latest batch was scored against."),
        shadow_info=Info("meterwatch_shadow_model",
                         "The shadow model (--shadow-model-path), when there is one.",
                         registry=reg),
        shadow_reloads=counter("meterwatch_shadow_reloads",
                               "Shadow checkpoints swapped in without a restart."),
        shadow_reload_failures=counter(
            "meterwatch_shadow_reload_failures",
            "Candidate shadow checkpoints refused (unloadable, incompatible, non-finite "
            "scores); the old shadow kept shadowing. Not counted in "
            "meterwatch_model_reload_failures_total."),
        shadow_days=counter("meterwatch_shadow_days",
                            "Household-days scored by the shadow model too."),
        shadow_alerts=counter(
            "meterwatch_shadow_alerts",
            "Alerts of the live or the shadow model, by agreement (both, live_only, "
            "shadow_only).", ("agreement",)),
        shadow_agreement=gauge(
            "meterwatch_shadow_alert_agreement_ratio",
            "Alerts both models raised over alerts either raised, since the shadow serving "
            "first scored (1 while neither alerted)."),
        shadow_abs_diff=gauge(
            "meterwatch_shadow_score_mean_abs_diff",
            "Mean absolute difference of live and shadow scores, since the shadow serving "
            "first scored."),
        shadow_rank_correlation=gauge(
            "meterwatch_shadow_score_rank_correlation",
            "Spearman rank correlation of live and shadow scores over the last 10,000 days."),
        sustained_changes=counter(
            "meterwatch_sustained_changes",
            "sustained_change records built, by signature (docs/sustained.md).",
            ("signature",)),
        scorer_up=gauge("meterwatch_scorer_up", "1 while the scorer can take batches."),
        scorer_restarts=counter("meterwatch_scorer_restarts",
                                "Scorer process restarts after it died."),
        partitions_lost=counter(
            "meterwatch_partitions_lost",
            "Input partitions this member stopped working on outside an orderly revoke, by "
            "reason: fenced (another producer opened its transactional id), group_moved_on "
            "(the group generation changed before a revoke), settle_failed.", ("reason",)),
        partitions_retaken=counter(
            "meterwatch_partitions_retaken",
            "Fenced input partitions taken back because the group still assigned them to "
            "this member."),
        context_reloads=counter(
            "meterwatch_context_reloads",
            "Times --household-info, --weather and --holidays were read again after one "
            "of their files changed."),
        context_reload_failures=counter(
            "meterwatch_context_reload_failures",
            "Changed context files that could not be read; the tables read before go on."),
        days_without_context=counter(
            "meterwatch_days_without_context",
            "Scored household-days without their context, by table: weather (the weather "
            "file has no row for the day), household_info (the household file has no row "
            "for the household), holidays (the day is after the last year the bank holidays "
            "file lists); counted only where that file is given.", ("table",)),
    )
    for table in CONTEXT_TABLES:
        m.days_without_context.labels(table)
    for reason in LOSS_REASONS:
        m.partitions_lost.labels(reason)
    for sig in SIGNATURES:
        m.sustained_changes.labels(sig)
    for kind in ALERT_KINDS:
        m.alerts.labels(kind)
    for agreement in ("both", "live_only", "shadow_only"):
        m.shadow_alerts.labels(agreement)
    for reason in INVALID_REASONS:  # every reason has a series (0) before its first record
        m.invalid_readings.labels(reason)
        m.dead_letters.labels(reason)
    reg.register(_ResourceCollector())
    # prometheus-client's standard process metrics (process_cpu_seconds_total,
    # process_resident_memory_bytes, ...) for this process, and the same for the scorer
    # process under meterwatch_scorer_process_* (absent while there is none).
    ProcessCollector(registry=reg)
    ProcessCollector(namespace="meterwatch_scorer", pid=scorer_pid, registry=reg)
    return m


#: Set by the service when it knows the scorer's pid (``SCORER_PID[0] = pid``); when
#: unset, the scorer is found among this process's children (the multiprocessing worker).
SCORER_PID: list[int | None] = [None]


def scorer_pid() -> int | str:
    """The scorer process's pid, or a name that matches no process (no samples) when it runs
    in a thread or has not started."""
    if SCORER_PID[0] is not None:
        return SCORER_PID[0]
    try:
        for child in psutil.Process(os.getpid()).children():
            cmd = child.cmdline()
            if any("spawn_main" in part for part in cmd):
                return child.pid
    except psutil.Error:
        pass
    return "none"


class _ResourceCollector(Collector):
    """Process CPU and memory (psutil) and, where CUDA is present, GPU memory and use."""

    def __init__(self) -> None:
        self._proc = psutil.Process(os.getpid())
        self._proc.cpu_percent(None)  # first call primes the counter

    def collect(self) -> Iterator[Metric]:
        cpu = GaugeMetricFamily(
            "meterwatch_process_cpu_ratio",
            "Process CPU use since the last scrape, in cores (1.0 = one core busy).")
        cpu.add_metric([], self._proc.cpu_percent(None) / 100.0)
        yield cpu
        rss = GaugeMetricFamily("meterwatch_process_resident_memory_bytes",
                                "Resident set size of the process (psutil).")
        rss.add_metric([], float(self._proc.memory_info().rss))
        yield rss
        yield from _gpu_metrics()


def _gpu_metrics() -> Iterator[Metric]:
    """GPU memory and utilisation from NVML (``nvidia-ml-py``, optional): never through torch,
    which would create a CUDA context in this process (hundreds of MB of device memory on
    every visible GPU) although the scorer process owns the device. Without NVML (no
    driver, or the package is not installed) there are no GPU series."""
    nvml = _nvml()
    if nvml is None:
        return
    used = GaugeMetricFamily("meterwatch_gpu_memory_used_bytes",
                             "GPU memory in use on the device (all processes).", labels=["gpu"])
    total = GaugeMetricFamily("meterwatch_gpu_memory_total_bytes",
                              "GPU memory on the device.", labels=["gpu"])
    util = GaugeMetricFamily("meterwatch_gpu_utilization_ratio",
                             "GPU busy fraction over the last sample period.", labels=["gpu"])
    try:
        for label, handle in _visible_gpus(nvml):
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            used.add_metric([label], float(mem.used))
            total.add_metric([label], float(mem.total))
            util.add_metric([label], nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
    except Exception as exc:  # a scrape must not fail because the driver hiccuped
        log.debug("NVML query failed: %s", exc)
        return
    yield used
    yield total
    yield util


_NVML_STATE: dict[str, object] = {}


def _nvml() -> Any:
    """The initialised ``pynvml`` module, or None (checked once per process)."""
    if "module" not in _NVML_STATE:
        _NVML_STATE["module"] = None
        try:
            import pynvml

            pynvml.nvmlInit()
            _NVML_STATE["module"] = pynvml
        except Exception as exc:  # not installed, no driver, no GPU
            log.debug("no GPU metrics: NVML unavailable (%s)", exc)
    return _NVML_STATE["module"]


def _visible_gpus(nvml: Any) -> list[tuple[str, object]]:
    """(label, NVML handle) of the GPUs this process may use, in CUDA's numbering:
    ``CUDA_VISIBLE_DEVICES`` (indices or ``GPU-`` UUIDs) when set, else all."""
    count = nvml.nvmlDeviceGetCount()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [(str(i), nvml.nvmlDeviceGetHandleByIndex(i)) for i in range(count)]
    out = []
    for pos, item in enumerate(x.strip() for x in visible.split(",") if x.strip()):
        if item.isdigit() and int(item) < count:
            out.append((str(pos), nvml.nvmlDeviceGetHandleByIndex(int(item))))
        elif item.startswith(("GPU-", "MIG-")):
            try:
                out.append((str(pos), nvml.nvmlDeviceGetHandleByUUID(item)))
            except Exception:
                break
        else:
            break  # CUDA stops at the first entry it cannot use
    return out
