"""Compressed input: producers in the field compress their record batches (gzip, snappy,
lz4, zstd). The service reads every codec Kafka has, and an installation that lacks one
(``pip install --no-deps``) exits 2 with one line instead of retrying a fetch forever."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from meterwatch.model import SyntheticConfig, generate
from meterwatch.stream.service import Service
from meterwatch.stream.simulate import reading_json
from tests.conftest import HISTORY_DAYS, read_topic, unique_settings
from tests.test_faults_contract import assert_fails_fast, run_to_exit

pytestmark = pytest.mark.integration

CODECS = (None, "gzip", "snappy", "lz4", "zstd")


def day_records(data, households: range, d: int, header: bytes = b"",
                key_header: bytes = b"") -> list[tuple[bytes, bytes]]:
    """(key, value) of day ``d`` of ``households``, all 48 half-hours, each value after
    ``header``; the key the household id, or with ``key_header`` the id as a JSON string
    after it (a Schema Registry key serializer's)."""
    day = int(data.days[d])
    return [(key_header + orjson.dumps(hid) if key_header else hid.encode(),
             header + reading_json(hid, day * 86400 + s * 1800, float(data.kwh[h, d, s])))
            for h in households for hid in (data.household_ids[h],) for s in range(48)]


async def produce_day(bootstrap: str, topic: str, data, households: range, d: int,
                      codec: str | None = None, header: bytes = b"",
                      key_header: bytes = b"") -> None:
    """Day ``d`` of ``households`` (``day_records``), keyed by household (the default
    partitioner), in batches compressed with ``codec``."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, compression_type=codec,
                                linger_ms=20)
    await producer.start()
    try:
        await asyncio.gather(*[await producer.send(topic, value, key=key) for key, value
                               in day_records(data, households, d, header, key_header)])
    finally:
        await producer.stop()


async def test_every_codec_is_read_and_scored(broker, detector):
    settings = unique_settings(broker)
    per = 2
    data = generate(SyntheticConfig(n_households=per * len(CODECS), n_days=HISTORY_DAYS + 1,
                                    seed=9, anomaly_rate=0.0))
    async with Service(settings, detector=detector) as service:
        await service.wait_ready()
        for k, codec in enumerate(CODECS):
            await produce_day(settings.bootstrap_servers, settings.input_topic, data,
                               range(k * per, (k + 1) * per), HISTORY_DAYS, codec)
        scores = await read_topic(settings, settings.scores_topic,
                                  min_records=len(data.household_ids))
        assert all(not t.done() for t in service._tasks), "a stage died"
    assert sorted((s["household_id"], s["status"], s["readings"]) for s in scores) == \
        sorted((h, "scored", 48) for h in data.household_ids)


def test_a_codec_this_installation_lacks_exits_2(broker, detector_path, tmp_path: Path):
    """aiokafka decodes snappy, lz4 and zstd with cramjam; hidden here as if it had been
    left out, an lz4 batch on the input topic stops the service with one line naming the
    topic and the fix (before, it warned "fetch failed" twice a second, forever)."""
    settings = unique_settings(broker)
    data = generate(SyntheticConfig(n_households=1, n_days=HISTORY_DAYS + 1, seed=9,
                                    anomaly_rate=0.0))
    asyncio.run(produce_day(settings.bootstrap_servers, settings.input_topic, data,
                             range(1), HISTORY_DAYS, "lz4"))
    hidden = tmp_path / "without-cramjam"
    hidden.mkdir()
    (hidden / "cramjam.py").write_text('raise ImportError("hidden by the test")\n')
    result = run_to_exit(settings, detector_path, env={"PYTHONPATH": str(hidden)})
    line = assert_fails_fast(result, "--input-topic", mentions="cramjam")
    assert settings.input_topic in line and "lz4" in line, line
