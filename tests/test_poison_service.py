"""Issue 15's single-record crashes and the key split, through the embedded broker and the
real service: each poison record is dead-lettered with its reason and the service keeps
scoring (before the fix, each of these stopped it for good)."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaProducer

from meterwatch.model import SyntheticConfig, generate
from meterwatch.stream.service import Service
from meterwatch.stream.simulate import reading_json, ts_text
from tests.conftest import HISTORY_DAYS, read_topic, unique_settings

pytestmark = pytest.mark.integration


async def test_poison_records_and_split_keys_do_not_stop_or_split_anything(broker, detector):
    settings = unique_settings(broker, timezone="Europe/London")
    data = generate(SyntheticConfig(n_households=2, n_days=HISTORY_DAYS + 1, seed=5,
                                    anomaly_rate=0.0))
    d = HISTORY_DAYS
    day = int(data.days[d])
    h0, h1 = data.household_ids[:2]
    slot = ts_text(day * 86400 + 20 * 1800).encode()
    poison = [
        (b"PX1", b'{"household_id":"PX1","ts":"2013-03-04T06:00:00Z","kwh":'
         + b"[" * 1000 + b"]" * 1000 + b"}", "bad_kwh"),
        (b"PX1", b'{"household_id":' + b"[" * 1000 + b"]" * 1000
         + b',"ts":"2013-03-04T06:00:00Z","kwh":0.1}', "bad_household"),
        (b"PX1", b'{"household_id":"PX1","ts":' + b"[" * 1000 + b"]" * 1000
         + b',"kwh":0.1}', "bad_timestamp"),
        (b"PX2", b'{"household_id":"PX2","ts":"0001-01-01T00:00:00+14:00","kwh":0.1}',
         "bad_timestamp"),
        (b"PX2", b'{"household_id":"PX2","ts":"0001-01-01T00:00:00Z","kwh":0.1}',
         "bad_timestamp"),
        # a real half-hour of h0 under h1's key, and with no key: would open a second day
        # of h0 on another partition (or change h0's day if it came first)
        (h1.encode(), b'{"household_id":"%s","ts":"%s","kwh":49.0}' % (h0.encode(), slot),
         "key_mismatch"),
        (None, b'{"household_id":"%s","ts":"%s","kwh":49.0}' % (h0.encode(), slot),
         "key_mismatch"),
    ]
    async with Service(settings, detector=detector) as service:
        await service.wait_ready()
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, linger_ms=5)
        await producer.start()
        try:
            futures = [await producer.send(settings.input_topic, v, key=k)
                       for k, v, _ in poison]
            for h, hid in enumerate(data.household_ids):
                for s in range(48):
                    futures.append(await producer.send(
                        settings.input_topic,
                        reading_json(hid, day * 86400 + s * 1800, float(data.kwh[h, d, s])),
                        key=hid.encode()))
            await asyncio.gather(*futures)
        finally:
            await producer.stop()
        scores = await read_topic(settings, settings.scores_topic, min_records=2)
        dead = await read_topic(settings, settings.dead_letter_topic,
                                min_records=len(poison))
        assert all(not t.done() for t in service._tasks), "a stage died"

    assert sorted(d["reason"] for d in dead) == sorted(r for _, _, r in poison)
    assert sorted((s["household_id"], s["status"], s["readings"]) for s in scores) == \
        sorted((h, "scored", 48) for h in data.household_ids)
