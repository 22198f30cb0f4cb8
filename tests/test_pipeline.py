"""End to end on a real broker: readings in, exactly one score per day, alerts for the gross
anomalies, malformed records dead-lettered, metrics moving."""

from __future__ import annotations

import asyncio
import base64
import time
import urllib.request
from collections import Counter

import pytest
from aiokafka import AIOKafkaProducer

from meterwatch.model import SyntheticConfig, generate
from meterwatch.stream.broker import create_topics
from meterwatch.stream.events import Alert, DayScore, DeadLetter
from meterwatch.stream.metrics import ALERT_KINDS
from meterwatch.stream.service import Service
from meterwatch.stream.simulate import MALFORMED, produce_synthetic
from tests.conftest import HISTORY_DAYS, assert_unique, inject_gross, read_topic, unique_settings

pytestmark = pytest.mark.integration

N_HOUSEHOLDS = 50
N_DAYS = 3


async def test_pipeline_end_to_end(broker, detector):
    # default producer settings (--idempotence auto) on whichever broker runs the tests
    settings = unique_settings(broker, scorer="process", idempotence="auto")
    await create_topics(settings.bootstrap_servers, {settings.input_topic: 4})
    data = generate(SyntheticConfig(n_households=N_HOUSEHOLDS, n_days=HISTORY_DAYS + N_DAYS,
                                    anomaly_rate=0.0, seed=11))
    days = range(HISTORY_DAYS, HISTORY_DAYS + N_DAYS)
    truth = inject_gross(data, days)
    assert len(truth) == 5

    async with Service(settings, detector=detector) as service:
        await service.wait_ready()
        port = service.metrics_port
        before = await asyncio.to_thread(_scrape, port)
        assert "meterwatch_readings_total 0.0" in before
        # malformed records interleaved with the valid stream, on the same partitions
        stats = await produce_synthetic(settings.bootstrap_servers, settings.input_topic, data,
                                        days=days, malformed_every=500, seed=3)
        assert stats.malformed >= len(MALFORMED)
        expected_days = N_HOUSEHOLDS * N_DAYS
        scores = await read_topic(settings, settings.scores_topic, min_records=expected_days,
                                  timeout_s=60)
        alerts = await read_topic(settings, settings.alerts_topic, min_records=len(truth))
        dead = await read_topic(settings, settings.dead_letter_topic,
                                min_records=stats.malformed)
        after = await asyncio.to_thread(_scrape, port)

    # every complete day scored exactly once
    assert_unique([(s["household_id"], s["date"]) for s in scores])
    assert len(scores) == expected_days
    for s in scores:
        DayScore.model_validate({k: v for k, v in s.items() if not k.startswith("_")})
        assert s["status"] == "scored" and s["readings"] == 48
    # the gross anomalies are alerts, with valid alert JSON that explains them
    flagged = {}
    for a in alerts:
        alert = Alert.model_validate({k: v for k, v in a.items() if not k.startswith("_")})
        flagged[(alert.household_id, alert.date.isoformat())] = alert
        assert a["_key"] == alert.household_id
        assert alert.score > alert.threshold and alert.top_slots and alert.summary
    missed = set(truth) - set(flagged)
    assert not missed, f"gross anomalies not alerted: {missed}"
    for key, kind in truth.items():
        slots = {s.slot for s in flagged[key].top_slots}
        if kind == "zero_6h":  # the explanation points into the zero run
            assert slots & set(range(30, 42)), (key, slots)
    false_alarms = set(flagged) - set(truth)
    assert len(false_alarms) <= 0.05 * expected_days, false_alarms
    # malformed records are on the dead-letter topic with reason, partition and offset
    assert len(dead) == stats.malformed
    reasons = {d["reason"] for d in dead}
    assert {r for _, r in MALFORMED} <= reasons, reasons
    for d in dead:
        dl = DeadLetter.model_validate({k: v for k, v in d.items() if not k.startswith("_")})
        assert dl.topic == settings.input_topic and dl.offset >= 0
        assert base64.b64decode(dl.value) in {m for m, _ in MALFORMED}
    # /metrics shows the counters moving
    assert _value(after, "meterwatch_readings_total") == stats.readings
    assert _value(after, "meterwatch_days_scored_total") == expected_days
    assert _value(after, "meterwatch_alerts_total") == len(alerts)
    kinds = Counter((a.get("unusual") or ["rules"])[0] for a in alerts)
    assert set(kinds) <= set(ALERT_KINDS), kinds
    for kind in ALERT_KINDS:  # each kind counts its own alerts
        assert _value(after, f'meterwatch_alerts_total{{unusual="{kind}"}}') == kinds[kind]
    assert _value(after, "meterwatch_batch_size_days_count") >= 1
    assert _value(after, "meterwatch_end_to_end_latency_seconds_count") == expected_days
    assert sum(v for k, v in _samples(after, "meterwatch_dead_letter_records_total")) \
        == stats.malformed


async def test_json_array_records_and_health_endpoints(broker, detector):
    """A whole day as one JSON array record; /healthz and /readyz answer."""
    settings = unique_settings(broker, topic_partitions=1, idempotence="auto")
    await create_topics(settings.bootstrap_servers, {settings.input_topic: 1})
    data = generate(SyntheticConfig(n_households=2, n_days=HISTORY_DAYS + 1, seed=5,
                                    anomaly_rate=0.0))
    async with Service(settings, detector=detector) as service:
        await service.wait_ready()
        ready = await asyncio.to_thread(_scrape, service.metrics_port, "/readyz")
        assert '"ready":true' in ready
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers)
        await producer.start()
        try:
            from meterwatch.stream.simulate import reading_json

            d = HISTORY_DAYS
            for h, hid in enumerate(data.household_ids):
                day = int(data.days[d])
                body = b"[" + b",".join(reading_json(hid, day * 86400 + s * 1800,
                                                     float(data.kwh[h, d, s]))
                                        for s in range(48)) + b"]"
                await producer.send_and_wait(settings.input_topic, body, key=hid.encode())
        finally:
            await producer.stop()
        scores = await read_topic(settings, settings.scores_topic, min_records=2)
    assert sorted(s["household_id"] for s in scores) == sorted(data.household_ids)


def _scrape(port: int, path: str = "/metrics") -> str:
    deadline = time.monotonic() + 5
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                return r.read().decode()
        except urllib.error.HTTPError as e:  # 503 from /readyz still has a body
            return e.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _samples(text: str, name: str) -> list[tuple[str, float]]:
    return [(line.rsplit(" ", 1)[0], float(line.rsplit(" ", 1)[1]))
            for line in text.splitlines() if line.startswith(name)]


def _value(text: str, name: str) -> float:
    """The sum of a metric's samples (over its labels, if any)."""
    return sum(v for k, v in _samples(text, name) if k == name or k.startswith(name + "{"))
