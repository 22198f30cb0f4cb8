"""Partitions added to the input topic while the service runs (more partitions are how an
operator makes room for more consumers). Before, the group took the new partitions five
minutes later (aiokafka's metadata refresh), their recovery then waited two minutes for
state partitions that did not exist, and the service stopped with a traceback; the
households on the new partitions were not read meanwhile. Then the households that moved
to a new partition started there again as new households; now they take their state along
(``stream.adoption``)."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions
from aiokafka.errors import IncompatibleBrokerVersion

from meterwatch.model import SyntheticConfig, generate
from meterwatch.stream.outputs import output_topics
from meterwatch.stream.preflight import input_partitions as topic_partitions
from meterwatch.stream.service import Service
from tests.conftest import HISTORY_DAYS, read_topic, unique_settings
from tests.test_compression import produce_day

pytestmark = pytest.mark.integration

BEFORE, AFTER = 4, 8


async def test_partitions_added_to_the_input_are_taken_on(broker, detector):
    settings = unique_settings(broker, topic_partitions=BEFORE)
    data = generate(SyntheticConfig(n_households=24, n_days=HISTORY_DAYS + 3, seed=13,
                                    anomaly_rate=0.0))
    n = len(data.household_ids)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        async with Service(settings, detector=detector) as service:
            await service.wait_ready()
            await produce_day(settings.bootstrap_servers, settings.input_topic, data,
                              range(n), HISTORY_DAYS)
            await read_topic(settings, settings.scores_topic, min_records=n)
            grow = {settings.input_topic: NewPartitions(total_count=AFTER)}
            if broker.kind == "tansu":  # it cannot add partitions: nothing to take on there
                with pytest.raises(IncompatibleBrokerVersion):
                    await admin.create_partitions(grow)
                return
            await admin.create_partitions(grow)
            # the group sees it at the consumer's next metadata refresh (every 60 s,
            # stream/source.py), asked for now rather than waited for
            assert service.consumer is not None
            service.consumer._client.force_metadata_update()
            deadline = time.monotonic() + 60
            while set(service.parts) != set(range(AFTER)):
                assert time.monotonic() < deadline, sorted(service.parts)
                assert service.failed is None, service.failed
                await asyncio.sleep(0.2)
            # half the households now hash to a new partition: their days land there
            await produce_day(settings.bootstrap_servers, settings.input_topic, data,
                              range(n), HISTORY_DAYS + 1)
            scores = await read_topic(settings, settings.scores_topic, min_records=2 * n)
            adopted = service.metrics.registry.get_sample_value(
                "meterwatch_households_adopted_total")
            assert all(not t.done() for t in service._tasks), "a stage died"
            assert service.failed is None, service.failed
        for topic in (*output_topics(settings), settings.dead_letter_topic,
                      settings.state_topic):
            assert await topic_partitions(admin, topic) == AFTER, topic
    finally:
        await admin.close()
    days = sorted((s["household_id"], s["date"], s["status"], s["readings"]) for s in scores)
    assert len(days) == 2 * n and len({d[:2] for d in days}) == 2 * n, days
    assert {d[2:] for d in days} == {("scored", 48)}, days
    moved = {s["household_id"] for s in scores if s["_partition"] >= BEFORE}
    assert moved, "no household moved to a new partition"
    # they kept their state: the second day is their second (seq 2), as for the others
    last = max(s["date"] for s in scores)
    assert sorted((s["household_id"], s["seq"]) for s in scores if s["date"] == last) \
        == sorted((h, 2) for h in data.household_ids)
    assert adopted == len(moved)
    # after a restart, the moved households' states are this partition's own (durable)
    async with Service(settings, detector=detector) as service:
        await service.wait_ready()
        await produce_day(settings.bootstrap_servers, settings.input_topic, data, range(n),
                          HISTORY_DAYS + 2)
        scores = await read_topic(settings, settings.scores_topic, min_records=3 * n)
        assert service.metrics.registry.get_sample_value(
            "meterwatch_households_adopted_total") == 0
    last = max(s["date"] for s in scores)
    assert sorted((s["household_id"], s["seq"], s["_partition"] >= BEFORE) for s in scores
                  if s["date"] == last) == sorted((h, 3, h in moved) for h in data.household_ids)
