"""Input records the broker deleted before the group read them (the service was down, or
lagged, for longer than the input topic's retention; or an operator ran DeleteRecords). The
consumer resumes at the log start offset and aiokafka says so only at INFO: the readings
were lost without a word. Now the service counts them
(``meterwatch_input_offsets_lost_total``) and logs an error naming the offsets."""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete
from aiokafka.errors import KafkaConnectionError, UnknownError

from meterwatch.model import SyntheticConfig, generate
from meterwatch.stream.service import Service
from tests.conftest import HISTORY_DAYS, read_topic, unique_settings
from tests.test_compression import day_records, produce_day

pytestmark = pytest.mark.integration

PARTITIONS = 2


async def test_records_deleted_before_they_were_read_are_counted(broker, detector, caplog):
    settings = unique_settings(broker, topic_partitions=PARTITIONS)
    data = generate(SyntheticConfig(n_households=6, n_days=HISTORY_DAYS + 3, seed=21,
                                    anomaly_rate=0.0))
    n = len(data.household_ids)
    tps = [TopicPartition(settings.input_topic, p) for p in range(PARTITIONS)]
    async with Service(settings, detector=detector) as service:
        await service.wait_ready()
        await produce_day(settings.bootstrap_servers, settings.input_topic, data, range(n),
                          HISTORY_DAYS)
        await read_topic(settings, settings.scores_topic, min_records=n)
    # while the service is down: a day arrives and is deleted before anyone reads it
    await produce_day(settings.bootstrap_servers, settings.input_topic, data, range(n),
                      HISTORY_DAYS + 1)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        ends = await _ends(settings.bootstrap_servers, tps)
        deletion = {tp: RecordsToDelete(ends[tp]) for tp in tps}
        if broker.kind == "tansu":  # it has no DeleteRecords: nothing is ever deleted there
            with pytest.raises(KafkaConnectionError):
                await admin.delete_records(deletion)
            return
        await admin.delete_records(deletion)
    finally:
        await admin.close()
    await produce_day(settings.bootstrap_servers, settings.input_topic, data, range(n),
                      HISTORY_DAYS + 2)
    caplog.set_level(logging.ERROR, logger="meterwatch.stream.service")
    async with Service(settings, detector=detector) as service:
        await service.wait_ready()
        scores = await read_topic(settings, settings.scores_topic, min_records=2 * n)
        lost = {tp.partition: service.metrics.registry.get_sample_value(
            "meterwatch_input_offsets_lost_total",
            {"topic": tp.topic, "partition": str(tp.partition)}) for tp in tps}
        assert all(not t.done() for t in service._tasks), "a stage died"
    dates = sorted({s["date"] for s in scores})
    assert len(dates) == 2 and len(scores) == 2 * n  # the first and the third day, each once
    assert None not in lost.values()  # from 0 on, so that the first loss is an increase
    assert sum(lost.values()) == 48 * n, lost  # every reading of the second day
    errors = [r.getMessage() for r in caplog.records if "deleted by the broker" in r.getMessage()]
    assert len(errors) == sum(1 for v in lost.values() if v), errors


async def _ends(bootstrap: str, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        return await consumer.end_offsets(tps)
    finally:
        await consumer.stop()


async def test_aborted_input_transactions_are_not_counted_as_lost(broker, detector):
    """Producers that write in transactions leave gaps in the offsets the group reads (a
    marker after each transaction, an aborted transaction's records): not a loss."""
    settings = unique_settings(broker, topic_partitions=1)
    data = generate(SyntheticConfig(n_households=3, n_days=HISTORY_DAYS + 2, seed=22,
                                    anomaly_rate=0.0))
    n = len(data.household_ids)
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers,
                                transactional_id=f"{settings.input_topic}.producer")
    if broker.kind == "tansu":  # no transactions there, so no gaps either
        with pytest.raises(UnknownError):
            await producer.start()
        await producer.stop()
        return
    await producer.start()
    try:
        async with Service(settings, detector=detector) as service:
            await service.wait_ready()
            for d, abort in ((HISTORY_DAYS, False), (HISTORY_DAYS + 1, True),
                             (HISTORY_DAYS + 1, False)):
                await producer.begin_transaction()
                await asyncio.gather(*[await producer.send(settings.input_topic, value, key=key)
                                       for key, value in day_records(data, range(n), d)])
                if abort:
                    await producer.abort_transaction()
                    continue
                await producer.commit_transaction()
                scores = await read_topic(settings, settings.scores_topic,
                                          min_records=n * (d - HISTORY_DAYS + 1))
            lost = service.metrics.registry.get_sample_value(
                "meterwatch_input_offsets_lost_total",
                {"topic": settings.input_topic, "partition": "0"})
            assert all(not t.done() for t in service._tasks), "a stage died"
    finally:
        await producer.stop()
    assert lost == 0
    assert sorted((s["household_id"], s["date"]) for s in scores) == sorted(
        {(s["household_id"], s["date"]) for s in scores}) and len(scores) == 2 * n
