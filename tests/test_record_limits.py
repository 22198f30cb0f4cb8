"""Output topics whose ``max.message.bytes`` is below the producers' 1 MiB batches.

A platform team that creates the service's topics with a smaller record limit (or a broker
whose ``message.max.bytes`` is smaller) made the first full batch fail with
``MessageSizeTooLargeError``: CRITICAL, traceback, the service stopped (exit 1), and after
a restart it failed again at the same batch. A dead letter of up to 512 KiB failed the same
way on a dead-letter topic with a smaller limit. Now the service reads each output topic's
limit at start and sizes its batches and dead letters to fit (``OutputPublisher.fit``); a
limit too small for its records (64 KiB; 8 KiB for dead letters) is exit 2 naming the
topic's setting. Tansu does not answer DescribeConfigs: there nothing is known and nothing
changes (asserted, so the day it answers, this says so).
"""

from __future__ import annotations

import base64
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from meterwatch.model import SyntheticConfig, generate
from meterwatch.stream.broker import create_topics
from meterwatch.stream.config import Settings
from meterwatch.stream.outputs import BATCH_MARGIN, DEAD_LETTER_MAX_BYTES, MAX_BATCH_BYTES
from meterwatch.stream.preflight import record_limits
from meterwatch.stream.service import Service
from tests.cli_helpers import clean_env, meterwatch
from tests.conftest import create_topics_now, genuine_kafka, read_topic, unique_settings
from tests.test_compression import produce_day
from tests.test_faults_contract import assert_fails_fast, run_to_exit

pytestmark = pytest.mark.integration


async def create_outputs(s: Settings, limits: dict[str, int]) -> None:
    """The output topics as a platform team makes them: as many partitions as the input,
    the state compacted, ``max.message.bytes`` of ``limits`` (topic -> bytes)."""
    outputs = (s.scores_topic, s.alerts_topic, s.data_quality_topic, s.dead_letter_topic,
               s.state_topic)
    await create_topics(s.bootstrap_servers, {t: s.topic_partitions for t in outputs},
                        compacted=(s.state_topic,),
                        configs={t: {"max.message.bytes": str(n)} for t, n in limits.items()})


async def test_batches_and_dead_letters_fit_the_topics_limits(broker, detector) -> None:  # type: ignore[no-untyped-def]
    s = unique_settings(broker)
    await create_outputs(s, {s.scores_topic: 66_000, s.dead_letter_topic: 100_000})
    # 400 households: a day's scores are about 150 KB per partition, more than 66,000
    data = generate(SyntheticConfig(n_households=400, n_days=2, seed=5, anomaly_rate=0.0))
    n = len(data.household_ids)
    huge = b"[" + b"1," * 150_000 + b"1]"  # 300 KB, not readings: a dead letter
    async with Service(s, detector=detector) as service:
        await service.wait_ready()
        for d in range(2):
            await produce_day(s.bootstrap_servers, s.input_topic, data, range(n), d)
        producer = AIOKafkaProducer(bootstrap_servers=s.bootstrap_servers)
        await producer.start()
        try:
            await producer.send_and_wait(s.input_topic, huge, key=b"H1")
        finally:
            await producer.stop()
        scores = await read_topic(s, s.scores_topic, min_records=2 * n, timeout_s=120)
        dead = await read_topic(s, s.dead_letter_topic, min_records=1)
        assert all(not t.done() for t in service._tasks), "a stage died"
        batch, dead_bytes = service.publisher.batch_bytes, service.publisher.dead_letter_bytes
    assert len({(d["household_id"], d["date"]) for d in scores}) == len(scores) == 2 * n
    [letter] = dead
    assert letter["reason"] == "too_many_readings"
    kept = base64.b64decode(letter["value"])
    assert huge.startswith(kept)
    size = len(orjson.dumps({k: v for k, v in letter.items() if not k.startswith("_")}))
    if genuine_kafka(broker):
        assert batch == 66_000 - BATCH_MARGIN  # the smallest limit of all its topics
        assert dead_bytes == 100_000 - BATCH_MARGIN
        assert letter["value_truncated"] is True and letter["value_size"] == len(huge)
        assert 0.9 * dead_bytes < size <= dead_bytes
    else:  # Tansu does not say its topics' limits (and does not enforce them)
        assert (batch, dead_bytes) == (MAX_BATCH_BYTES, DEAD_LETTER_MAX_BYTES)
        assert kept == huge  # (300 KB fit 512 KiB)


async def test_a_limit_too_small_for_the_records_exits_2(broker, detector_path) -> None:  # type: ignore[no-untyped-def]
    s = unique_settings(broker)
    await create_outputs(s, {s.state_topic: 50_000})
    if not genuine_kafka(broker):
        admin = AIOKafkaAdminClient(bootstrap_servers=s.bootstrap_servers)
        await admin.start()
        try:
            assert await record_limits(s, admin) == {}  # nothing known, nothing refused
        finally:
            await admin.close()
        return
    line = assert_fails_fast(run_to_exit(s, detector_path), "--state-topic")
    assert line == (f"meterwatch: error: --state-topic: topic {s.state_topic!r} takes record "
                    "batches of at most 50000 bytes (max.message.bytes); raise its "
                    "max.message.bytes to at least 65536, or name another topic")


def test_simulate_fits_the_input_topics_limit(broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """``meterwatch simulate`` into an input topic made with ``max.message.bytes`` 100,000:
    its 1 MiB batches were refused whole (``MessageSizeTooLargeError``, exit 1)."""
    s = unique_settings(broker, create_input=False)
    create_topics_now(s.bootstrap_servers, {s.input_topic: 2},
                      configs={s.input_topic: {"max.message.bytes": "100000"}})
    env = clean_env(METERWATCH_BOOTSTRAP_SERVERS=s.bootstrap_servers,
                    METERWATCH_INPUT_TOPIC=s.input_topic)
    # 300 households: a day is about 1.5 MB of records, 750 KB a partition
    proc = meterwatch("simulate", "--households", "300", "--days", "1", env=env, timeout=120,
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("produced 14,400 readings in "), line  # every one acknowledged
