"""Fault injection against the real broker: SIGKILL crashes, rebalances, a late broker.

The claim under test: whatever happens to the service processes, every complete household-
day gets exactly one score on the scores topic, and every alert appears exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import socket
import threading
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
    genuine_kafka,
    inject_gross,
    read_topic,
    unique_settings,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HOUSEHOLDS = 200
DAYS = 10


def workload(seed: int, households: int = HOUSEHOLDS, days: int = DAYS):  # type: ignore[no-untyped-def]
    """(data, streamed day range, injected anomalies) for ``households`` x ``days``."""
    data = generate(SyntheticConfig(n_households=households, n_days=HISTORY_DAYS + days,
                                    anomaly_rate=0.0, seed=seed))
    streamed = range(HISTORY_DAYS, HISTORY_DAYS + days)
    truth = inject_gross(data, streamed)
    return data, streamed, truth


async def produce_paced(settings, data, days, seconds_per_day: float,  # type: ignore[no-untyped-def]
                        unpaced: asyncio.Event | None = None):
    """One day of readings every ``seconds_per_day`` (nothing to wait for after the last
    one); once ``unpaced`` is set, the remaining days at once. The readings produced."""
    total = 0
    for i, d in enumerate(days):
        if i and unpaced is None:
            await asyncio.sleep(seconds_per_day)
        elif i and unpaced is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(unpaced.wait(), seconds_per_day)
        stats = await produce_synthetic(settings.bootstrap_servers, settings.input_topic, data,
                                        days=range(d, d + 1), seed=d)
        total += stats.readings
    return total


async def check_exactly_once(settings, truth, expected: int = HOUSEHOLDS * DAYS) -> None:  # type: ignore[no-untyped-def]
    """Every complete day has exactly one score; every alert is there exactly once and
    agrees with the scores (read as a downstream ``read_committed`` consumer reads them)."""
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


async def test_sigkill_at_random_moments_keeps_exactly_once(broker, detector_path, tmp_path):
    # default settings: a killed member leaves the group after the 10 s session timeout;
    # the scorer runs in its own process (the default): a killed service must not leave it
    settings = unique_settings(broker)
    data, days, truth = workload(seed=21)
    rng = random.Random(5)
    log = tmp_path / "service.log"
    proc = ServiceProcess(settings, detector_path, log_path=log).start()
    await asyncio.to_thread(proc.wait_ready)
    # each incarnation waits out its predecessor's session: the stream outlasts five of them.
    # Tansu also holds every join for half the session (docs/startup.md section 9): 22-24 s
    # an incarnation there, against 12 s on Kafka; at Kafka's pace the stream once ended
    # before the fifth kill. (After the fifth, the rest goes at once: the pace costs nothing.)
    session_s = settings.session_timeout_ms / 1000
    pace = session_s + 2 + (0 if genuine_kafka(broker) else session_s / 2)
    kills_done = asyncio.Event()
    producer = asyncio.create_task(produce_paced(settings, data, days, seconds_per_day=pace,
                                                 unpaced=kills_done))
    kills = 0
    while kills < 5:  # each kill hits a member that owns partitions and is processing
        await asyncio.sleep(rng.uniform(0.3, 3.0))
        assert proc.kill() == [], "the killed service's scorer process outlived it"
        assert proc.children_at_kill >= 1, "no scorer process to outlive the service"
        kills += 1
        proc = ServiceProcess(settings, detector_path, log_path=log).start()
        await asyncio.to_thread(proc.wait_ready, 120)
    assert not producer.done(), "the stream ended before the fifth kill"
    kills_done.set()  # the pace was there to outlast the kills: the rest of the days at once
    await producer
    assert kills >= 5
    await asyncio.to_thread(proc.wait_ready, 120)
    await check_exactly_once(settings, truth)
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
    data, days, truth = workload(seed=22)
    logs = [tmp_path / f"service-{i}.log" for i in range(3)]
    first = ServiceProcess(settings, detector_path, log_path=logs[0]).start()
    await asyncio.to_thread(first.wait_ready)
    producer = asyncio.create_task(produce_paced(settings, data, days, seconds_per_day=2.0))
    await asyncio.sleep(4)
    others = [ServiceProcess(settings, detector_path, log_path=logs[i]).start()
              for i in (1, 2)]  # 1 -> 3 members
    for o in others:
        await asyncio.to_thread(o.wait_ready, 120)
    await asyncio.sleep(6)
    for o in others:  # 3 -> 1 member, gracefully (SIGTERM)
        assert o.terminate() == 0
    await producer
    await check_exactly_once(settings, truth)
    assert first.terminate() == 0
    for path in logs:
        assert "Traceback" not in path.read_text(), path.read_text()[-3000:]


class LateListener:
    """A loopback port that refuses connections until ``open()``, then forwards each one to
    ``target`` (the session's broker): to a client, a broker that comes up late. Clients
    only bootstrap through it; metadata then sends them to the broker's own address."""

    def __init__(self, target: str) -> None:
        host, port = target.split(",")[0].rsplit(":", 1)
        self.target = (host, int(port))
        self.port = free_port()
        self._sock: socket.socket | None = None

    def open(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(16)
        self._sock = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _accept(self, sock: socket.socket) -> None:
        while True:
            try:
                client, _ = sock.accept()
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                return
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pipe, args=(a, b), daemon=True).start()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(1 << 16):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def test_service_waits_for_a_late_broker(broker: Broker, detector_path: Path, tmp_path: Path):
    """Started before its broker answers: alive, not ready, retrying; ready once it does."""
    late = LateListener(broker.bootstrap_servers)
    settings = unique_settings(broker).model_copy(
        update={"bootstrap_servers": f"127.0.0.1:{late.port}"})
    proc = ServiceProcess(settings, detector_path, log_path=tmp_path / "svc.log").start()
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
        # several retries with backoff (counted in the log), still alive, still not ready
        log = tmp_path / "svc.log"
        deadline = time.monotonic() + 90
        while log.read_text().count("retrying") < 3:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            assert proc.proc is not None and proc.proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        assert not proc.ready()
        late.open()
        proc.wait_ready(90)
    finally:
        code = proc.terminate()
        late.close()
    assert code == 0
