"""Fault injection against the real broker: SIGKILL crashes, rebalances, a late broker.

The claim under test: whatever happens to the service processes, every complete household-
day gets exactly one score on the scores topic, and every alert appears exactly once.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from meterwatch.model import SyntheticConfig, generate
from meterwatch.stream.broker import Broker, free_port
from meterwatch.stream.simulate import produce_synthetic
from tests.conftest import (
    HISTORY_DAYS,
    ServiceProcess,
    assert_unique,
    inject_gross,
    metric,
    read_topic,
    unique_settings,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HOUSEHOLDS = 200
DAYS = 10


def _workload(seed: int):  # type: ignore[no-untyped-def]
    data = generate(SyntheticConfig(n_households=HOUSEHOLDS, n_days=HISTORY_DAYS + DAYS,
                                    anomaly_rate=0.0, seed=seed))
    days = range(HISTORY_DAYS, HISTORY_DAYS + DAYS)
    truth = inject_gross(data, days)
    return data, days, truth


async def _produce_paced(settings, data, days, seconds_per_day: float):  # type: ignore[no-untyped-def]
    total = 0
    for d in days:
        stats = await produce_synthetic(settings.bootstrap_servers, settings.input_topic, data,
                                        days=range(d, d + 1), seed=d)
        total += stats.readings
        await asyncio.sleep(seconds_per_day)
    return total


async def _check_exactly_once(settings, truth) -> None:  # type: ignore[no-untyped-def]
    expected = HOUSEHOLDS * DAYS
    scores = await read_topic(settings, settings.scores_topic, min_records=expected,
                              timeout_s=120)
    assert_unique([(s["household_id"], s["date"]) for s in scores])
    assert len(scores) == expected, f"{len(scores)} scores for {expected} complete days"
    assert all(s["status"] == "scored" for s in scores)
    alerts = await read_topic(settings, settings.alerts_topic, min_records=len(truth))
    assert_unique([(a["household_id"], a["date"]) for a in alerts])
    flagged = {(a["household_id"], a["date"]) for a in alerts}
    assert set(truth) <= flagged, f"missing alerts: {set(truth) - flagged}"
    promised = {(s["household_id"], s["date"]) for s in scores if s["is_alert"]}
    assert promised == flagged, "alerts topic and day scores disagree"


def _wait_scored(proc: ServiceProcess, n: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if metric(proc.port, "meterwatch_days_scored_total") >= n:
                return
        except OSError:
            pass
        time.sleep(0.5)


async def test_sigkill_at_random_moments_keeps_exactly_once(broker, detector_path, tmp_path):
    # a short session: a killed member leaves the group (and a restart joins) in seconds
    # the scorer in its own process: a killed service must not leave it behind
    settings = unique_settings(broker, session_timeout_ms=3000, scorer="process")
    data, days, truth = _workload(seed=21)
    rng = random.Random(5)
    log = tmp_path / "service.log"
    proc = ServiceProcess(settings, detector_path, log_path=log).start()
    await asyncio.to_thread(proc.wait_ready)
    producer = asyncio.create_task(_produce_paced(settings, data, days, seconds_per_day=7.0))
    kills = 0
    while kills < 5:  # each kill hits a member that owns partitions and is processing
        await asyncio.sleep(rng.uniform(0.3, 3.0))
        assert proc.kill() == [], "the killed service's scorer process outlived it"
        assert proc.children_at_kill >= 1, "no scorer process to outlive the service"
        kills += 1
        proc = ServiceProcess(settings, detector_path, log_path=log).start()
        await asyncio.to_thread(proc.wait_ready, 120)
    assert not producer.done(), "the stream ended before the fifth kill"
    await producer
    assert kills >= 5
    await asyncio.to_thread(proc.wait_ready, 120)
    await _check_exactly_once(settings, truth)
    assert proc.terminate() == 0
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    # the kills hit a running pipeline: later incarnations resumed from committed offsets
    recoveries = [line for line in text.splitlines() if "recovered partitions" in line]
    assert len(recoveries) >= kills
    resumed = [r for r in recoveries if re.search(r"start offsets \{[^}]*: [1-9]", r)]
    assert len(resumed) >= 3, recoveries


async def test_rebalance_one_three_one_keeps_exactly_once(broker, detector_path, tmp_path):
    settings = unique_settings(broker, topic_partitions=6)
    data, days, truth = _workload(seed=22)
    logs = [tmp_path / f"service-{i}.log" for i in range(3)]
    first = ServiceProcess(settings, detector_path, log_path=logs[0]).start()
    await asyncio.to_thread(first.wait_ready)
    producer = asyncio.create_task(_produce_paced(settings, data, days, seconds_per_day=2.0))
    await asyncio.sleep(4)
    others = [ServiceProcess(settings, detector_path, log_path=logs[i]).start()
              for i in (1, 2)]  # 1 -> 3 members
    for o in others:
        await asyncio.to_thread(o.wait_ready, 120)
    await asyncio.sleep(6)
    for o in others:  # 3 -> 1 member, gracefully (SIGTERM)
        assert o.terminate() == 0
    await producer
    await _check_exactly_once(settings, truth)
    assert first.terminate() == 0
    for path in logs:
        assert "Traceback" not in path.read_text(), path.read_text()[-3000:]


def test_service_waits_for_a_late_broker(detector_path: Path, tmp_path: Path):
    """Started before its broker: alive, not ready, retrying; ready once the broker is up."""
    port = free_port()
    b = Broker(f"127.0.0.1:{port}", "tansu", supports_idempotence=False)
    settings = unique_settings(b)
    proc = ServiceProcess(settings, detector_path, log_path=tmp_path / "svc.log").start()
    broker = None
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                health = urllib.request.urlopen(f"http://127.0.0.1:{proc.port}/healthz",
                                                timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert health.status == 200
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{proc.port}/readyz", timeout=2)
        assert err.value.code == 503
        assert b'"broker_reachable":false' in err.value.read()
        time.sleep(3)  # several retries with backoff
        assert proc.proc is not None and proc.proc.poll() is None
        broker = Broker.start(prefer="tansu", port=port)
        proc.wait_ready(90)
        assert "retrying" in (tmp_path / "svc.log").read_text()
    finally:
        proc.terminate()
        if broker is not None:
            broker.stop()
