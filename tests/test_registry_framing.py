"""Records in Confluent Schema Registry's wire format (a zero byte and a 4-byte schema id
before the JSON), as its JSON Schema serializer writes them, values and keys: scored like
plain JSON, through the service on a real broker. Before, every such record was
dead-lettered as ``not_json`` (and with a framed key, ``key_mismatch``)."""

from __future__ import annotations

import pytest
from aiokafka import AIOKafkaProducer

from meterwatch.model import SyntheticConfig, generate
from meterwatch.stream.service import Service
from tests.conftest import HISTORY_DAYS, read_topic, unique_settings
from tests.test_compression import produce_day

pytestmark = pytest.mark.integration

HEADER = b"\x00\x00\x00\x00\x07"  # schema id 7


async def test_framed_json_is_scored_and_framed_avro_is_dead_lettered(broker, detector):
    settings = unique_settings(broker)
    data = generate(SyntheticConfig(n_households=4, n_days=HISTORY_DAYS + 1, seed=9,
                                    anomaly_rate=0.0))
    async with Service(settings, detector=detector) as service:
        await service.wait_ready()
        await produce_day(settings.bootstrap_servers, settings.input_topic, data, range(2),
                          HISTORY_DAYS, header=HEADER)
        # and keys framed too (a JSON Schema key serializer): the id as a JSON string
        await produce_day(settings.bootstrap_servers, settings.input_topic, data, range(2, 4),
                          HISTORY_DAYS, codec="lz4", header=HEADER, key_header=HEADER)
        # an Avro serializer's record on the same topic: one dead letter, nothing else lost
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers)
        await producer.start()
        try:
            await producer.send_and_wait(settings.input_topic, HEADER + b"\x12MAC\x80\xa0",
                                         key=data.household_ids[0].encode())
        finally:
            await producer.stop()
        scores = await read_topic(settings, settings.scores_topic, min_records=4)
        dead = await read_topic(settings, settings.dead_letter_topic, min_records=1)
        assert all(not t.done() for t in service._tasks), "a stage died"
    assert sorted((s["household_id"], s["status"], s["readings"]) for s in scores) == \
        sorted((h, "scored", 48) for h in data.household_ids)
    assert [(d["reason"], "schema id 7" in d["detail"]) for d in dead] == [("not_json", True)]
