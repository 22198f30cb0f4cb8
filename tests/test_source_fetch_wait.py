"""Fetches that come back empty while records wait (``stream.consumer.StarvedFetches``).

Found by a half-hour soak (``benchmarks/soak.py``, default settings, the embedded broker): the
embedded Tansu scans a partition's batches on every fetch, and once that took longer than the
fetch's wait (25 ms, the default; from about 35,000 batches a partition here) it answered
every fetch empty. The service stood still, ready, logging nothing, its lag growing by the
input rate. With ``--fetch-max-wait-ms 0`` that happened from the first record. The same
signs come on Kafka from a producer's open transaction, which holds ``read_committed``
consumers at the last stable offset.

Fetches that bring nothing for a while although records wait past the position now wait
longer from then on (doubling from 100 ms, to 5 s at most), with a warning naming the
partitions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from meterwatch.model import SyntheticConfig, generate
from meterwatch.stream.broker import Broker
from meterwatch.stream.consumer import RAISED_FETCH_WAIT_MS
from meterwatch.stream.recovery import read_to_end
from meterwatch.stream.source import Source
from meterwatch.stream.testing import ServiceProcess
from tests.conftest import HISTORY_DAYS, genuine_kafka, read_topic, unique_settings
from tests.test_compression import produce_day

pytestmark = pytest.mark.integration

READING = b'{"household_id":"H1","ts":"2013-03-01T00:30:00Z","kwh":0.25}'
STARVED = "fetches bring no records although"


async def _nothing(partitions: set[int]) -> None:
    return None


async def _take(source: Source, n: int, timeout_s: float) -> list[Any]:
    """Fetch until ``n`` records came (or the time is up)."""
    got: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        for recs in (await source.fetch()).values():
            got.extend(recs)
    return got


async def _produce(bootstrap: str, topic: str, n: int, **options: Any) -> AIOKafkaProducer:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, **options)
    await producer.start()
    if "transactional_id" in options:
        await producer.begin_transaction()
    for _ in range(n):
        await producer.send_and_wait(topic, READING, key=b"H1")
    return producer


async def test_fetches_that_come_back_empty_wait_longer(broker: Broker,
                                                        caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    """``--fetch-max-wait-ms 0``: Tansu answers a fetch that may not wait with nothing, on
    any log; the source raises the wait, says so once and takes every record. On Kafka, a
    wait of 0 brings the records at once (no warning); there an open transaction starves
    the fetches instead: named, waited out with a longer wait, and its records taken when
    it commits."""
    caplog.set_level(logging.INFO, logger="meterwatch.stream.consumer")
    s = unique_settings(broker, topic_partitions=1, fetch_max_wait_ms=0)
    producer = await _produce(s.bootstrap_servers, s.input_topic, 20)
    await producer.stop()
    async with Source(s, on_revoked=_nothing, on_assigned=_nothing) as source:
        got = await _take(source, 20, 60)
        assert [r.offset for r in got] == list(range(20))
        wait = source.fetch_wait_ms
    starved = [r for r in caplog.records if STARVED in r.getMessage()]
    if not genuine_kafka(broker):
        assert [r.levelno for r in starved] == [logging.WARNING], caplog.text
        assert "20 wait on partitions 0" in starved[0].getMessage()
        assert f"within 0 ms; fetches now wait up to {RAISED_FETCH_WAIT_MS} ms" in \
            starved[0].getMessage()
        assert wait == RAISED_FETCH_WAIT_MS
        return
    assert not starved and wait == 0, caplog.text
    await _open_transaction_is_waited_out(broker, caplog)


async def _open_transaction_is_waited_out(broker: Broker,
                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.clear()
    s = unique_settings(broker, topic_partitions=1)  # the default wait
    producer = await _produce(s.bootstrap_servers, s.input_topic, 5,
                              transactional_id=f"{s.input_topic}.tx")
    try:
        async with Source(s, on_revoked=_nothing, on_assigned=_nothing) as source:
            assert await _take(source, 1, 6) == []  # held at the last stable offset
            starved = [r for r in caplog.records if STARVED in r.getMessage()]
            assert starved and starved[0].levelno == logging.WARNING, caplog.text
            assert "5 wait on partitions 0" in starved[0].getMessage()
            assert "open transaction" in starved[0].getMessage()
            assert source.fetch_wait_ms > s.fetch_max_wait_ms
            await producer.commit_transaction()
            got = await _take(source, 5, 30)
            assert [r.offset for r in got] == list(range(5))
    finally:
        await producer.stop()


async def test_recovery_reads_to_the_end_where_fetches_starve(
        broker: Broker, caplog: pytest.LogCaptureFixture) -> None:
    """Recovery's reader (state and output topics) has the same rule: with a wait of 0 it
    reads a partition to its end on either broker (on Tansu it had read nothing until its
    timeout, and the partition's recovery failed)."""
    caplog.set_level(logging.INFO, logger="meterwatch.stream.consumer")
    s = unique_settings(broker, topic_partitions=1)
    producer = await _produce(s.bootstrap_servers, s.input_topic, 20)
    await producer.stop()
    tails = await read_to_end(s, {(s.input_topic, 0): 0}, timeout_s=30, wait_ms=0)
    tail = tails[(s.input_topic, 0)]
    assert [r.offset for r in tail.records] == list(range(20)) and tail.end == 20
    starved = [r for r in caplog.records if STARVED in r.getMessage()]
    assert len(starved) == (0 if genuine_kafka(broker) else 1), caplog.text
    assert all(r.getMessage().startswith("recovery: ") for r in starved)


def test_the_service_scores_with_fetch_max_wait_0(broker: Broker, detector_path: Path,
                                                  tmp_path: Path) -> None:
    """``meterwatch run --fetch-max-wait-ms 0`` (as a variable): every day scored. On the
    embedded broker the service had read nothing, ever, and said nothing."""
    s = unique_settings(broker, fetch_max_wait_ms=0)
    data = generate(SyntheticConfig(n_households=4, n_days=HISTORY_DAYS + 1, seed=5,
                                    anomaly_rate=0.0))
    log = tmp_path / "service.log"
    service = ServiceProcess(s, detector_path, log_path=log).start()
    try:
        service.wait_ready(120)
        asyncio.run(produce_day(s.bootstrap_servers, s.input_topic, data, range(4),
                                HISTORY_DAYS))
        scores = asyncio.run(read_topic(s, s.scores_topic, min_records=4, timeout_s=60))
    finally:
        assert service.terminate() == 0, log.read_text()[-3000:]
    assert sorted(d["household_id"] for d in scores) == sorted(data.household_ids)
    warned = [line for line in log.read_text().splitlines() if STARVED in line]
    assert len(warned) == (0 if genuine_kafka(broker) else 1), log.read_text()[-3000:]
