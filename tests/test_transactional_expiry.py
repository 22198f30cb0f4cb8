"""A transactional id the broker forgot: an input partition without data for longer than
``transactional.id.expiration.ms`` (7 days by default: an upstream outage of a week, a
quiet partition of a small deployment).

Its producer's next transaction is refused (``InvalidProducerIdMapping``, which aiokafka's
sender wraps as "Unexpected error during batch delivery"). That stopped the service:
CRITICAL ``meterwatch-publish failed``, a traceback, exit 1. Now the partition is taken back
as a fenced one is (``docs/runtime.md``): a new producer, recovery from its last mark, the
pending days replayed, each scored once. On a broker of the test's own with the expiry at
5 s (``tests/own_kafka.py``); Tansu has no transactions, so nothing expires there (the
test asserts that the service runs without them).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from meterwatch.model import SyntheticConfig, generate
from meterwatch.stream.service import Service
from tests.conftest import HISTORY_DAYS, genuine_kafka, read_topic, unique_settings
from tests.own_kafka import own_kafka
from tests.test_compression import produce_day

pytestmark = pytest.mark.integration

EXPIRY_MS = 5_000


async def test_an_expired_transactional_id_is_taken_back(broker, detector, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                          caplog) -> None:
    if not genuine_kafka(broker):
        s = unique_settings(broker)
        async with Service(s, detector=detector) as service:
            await service.wait_ready()
            assert service.publisher.transactional is False
        return
    with own_kafka(tmp_path / "kafka", {
            "transactional.id.expiration.ms": str(EXPIRY_MS),
            "transaction.remove.expired.transaction.cleanup.interval.ms": "1000"}) as kafka:
        s = unique_settings(kafka.broker,
                            topic_partitions=2)
        data = generate(SyntheticConfig(n_households=8, n_days=HISTORY_DAYS + 2, seed=4,
                                        anomaly_rate=0.0))
        n = len(data.household_ids)
        caplog.set_level(logging.WARNING)
        async with Service(s, detector=detector) as service:
            await service.wait_ready()
            assert service.publisher.transactional
            await produce_day(s.bootstrap_servers, s.input_topic, data, range(n), HISTORY_DAYS)
            await read_topic(s, s.scores_topic, min_records=n)
            await asyncio.sleep(EXPIRY_MS / 1000 + 3)  # no data: the ids expire
            await produce_day(s.bootstrap_servers, s.input_topic, data, range(n),
                              HISTORY_DAYS + 1)
            scores = await read_topic(s, s.scores_topic, min_records=2 * n, timeout_s=60)
            assert all(not t.done() for t in service._tasks), "a stage died"
    assert len({(d["household_id"], d["date"]) for d in scores}) == len(scores) == 2 * n
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("no longer knew its transactional id" in m for m in said), said
    assert not [m for m in said if "Unexpected error in sender routine" in m
                or "Future exception was never retrieved" in m], said
