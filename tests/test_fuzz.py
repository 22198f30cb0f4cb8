"""10,000+ malformed records interleaved with a valid stream, through the real broker.

The service stays up, every bad record lands on the dead-letter topic with a reason and its
source partition/offset, and the alerts for the valid stream equal those of a clean run.
"""

from __future__ import annotations

import base64
import random
from collections import Counter

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from meterwatch.model import SyntheticConfig, generate
from meterwatch.stream.service import Service
from meterwatch.stream.simulate import day_records
from tests.conftest import HISTORY_DAYS, inject_gross, read_topic, unique_settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_BAD = 10_000
HOUSEHOLDS = 40
DAYS = 3


def _bad_record(rng: random.Random, i: int) -> bytes:
    kind = 11 if i % 500 == 0 else i % 11  # oversized arrays are rare (700 kB each)
    hid = f"SYN{rng.randrange(1, HOUSEHOLDS):06d}"
    ok_ts = "2013-01-23T10:00:00Z"
    docs = [
        None,  # random bytes
        {"household_id": hid, "ts": ok_ts, "kwh": "0.3"},  # wrong type
        {"household_id": [hid], "ts": ok_ts, "kwh": 0.3},
        {"household_id": hid, "ts": ok_ts, "kwh": -rng.random()},  # negative
        {"household_id": hid, "ts": ok_ts, "kwh": 1e6 * (1 + rng.random())},  # absurd
        {"household_id": hid, "ts": "2099-06-01T00:00:00Z", "kwh": 0.3},  # far future
        {"household_id": hid, "ts": f"2013-01-23T10:{rng.randrange(1, 29):02d}:00Z", "kwh": 0.3},
        {"household_id": hid, "kwh": 0.3},  # missing field
        {"household_id": hid, "ts": "13/01/2013 10:00", "kwh": 0.3},  # bad timestamp
        {"household_id": "", "ts": ok_ts, "kwh": 0.3},
    ]
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    if kind == 10:  # NaN / Infinity are not JSON
        bad_number = rng.choice(["NaN", "Infinity"])
        return f'{{"household_id":"{hid}","ts":"{ok_ts}","kwh":{bad_number}}}'.encode()
    if kind == 11:  # oversized array
        return orjson.dumps([{"household_id": hid, "ts": ok_ts, "kwh": 0.1}] * 10_001)
    return orjson.dumps(docs[kind])


async def _run(broker, detector, data, days, bad: bool):  # type: ignore[no-untyped-def]
    settings = unique_settings(broker)
    rng = random.Random(3)
    produced_bad: list[bytes] = []
    async with Service(settings, detector=detector) as service:
        await service.wait_ready()
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers,
                                    linger_ms=5, max_request_size=4 << 20)
        await producer.start()
        try:
            futures = []
            nprng = __import__("numpy").random.default_rng(0)
            valid = [r for d in days for r in day_records(data, d, nprng, array_fraction=0.1)]
            per_valid = (N_BAD + 1) / len(valid) if bad else 0
            owed = 0.0
            for key, value, _ in valid:
                owed += per_valid
                while owed >= 1:
                    owed -= 1
                    b = _bad_record(rng, len(produced_bad))
                    produced_bad.append(b)
                    futures.append(await producer.send(
                        settings.input_topic, b, key=rng.choice([key, None, b"\xff\xfe"])))
                futures.append(await producer.send(settings.input_topic, value, key=key))
            for f in futures:
                await f
        finally:
            await producer.stop()
        scores = await read_topic(settings, settings.scores_topic,
                                  min_records=HOUSEHOLDS * DAYS, timeout_s=120)
        alerts = await read_topic(settings, settings.alerts_topic)
        dead = await read_topic(settings, settings.dead_letter_topic,
                                min_records=len(produced_bad), timeout_s=120)
        assert all(not t.done() for t in service._tasks), "a stage died"
    return settings, scores, alerts, dead, produced_bad


async def test_fuzzed_stream_gives_the_clean_alerts_and_dead_letters_every_bad_record(
        broker, detector):
    data = generate(SyntheticConfig(n_households=HOUSEHOLDS, n_days=HISTORY_DAYS + DAYS,
                                    anomaly_rate=0.0, seed=31))
    days = range(HISTORY_DAYS, HISTORY_DAYS + DAYS)
    truth = inject_gross(data, days)
    _, clean_scores, clean_alerts, clean_dead, _ = await _run(broker, detector, data, days, False)
    settings, scores, alerts, dead, bad = await _run(broker, detector, data, days, True)

    assert len(bad) >= N_BAD and not clean_dead
    # every bad record is dead-lettered once, with a reason and where it came from
    assert len(dead) == len(bad)
    assert Counter(base64.b64decode(d["value"]) for d in dead) == Counter(bad)
    assert len({(d["partition"], d["offset"]) for d in dead}) == len(dead)
    assert all(d["reason"] and d["topic"] == settings.input_topic for d in dead)
    reasons = Counter(d["reason"] for d in dead)
    assert {"not_json", "bad_kwh", "future_timestamp", "not_half_hour", "missing_field",
            "bad_timestamp", "bad_household", "too_many_readings"} <= set(reasons), reasons
    # the valid stream's outcome is unchanged
    key = lambda d: (d["household_id"], d["date"])  # noqa: E731
    assert sorted(map(key, scores)) == sorted(map(key, clean_scores))
    assert sorted(map(key, alerts)) == sorted(map(key, clean_alerts))
    assert set(truth) <= set(map(key, alerts))
    clean = {key(s): s["score"] for s in clean_scores}
    for s in scores:
        assert s["score"] == pytest.approx(clean[key(s)], rel=1e-4, abs=1e-4)
