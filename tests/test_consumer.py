"""The input consumer hands out aiokafka's decoded records instead of ConsumerRecord objects,
with the same contents, through a real broker."""

from __future__ import annotations

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from meterwatch.stream.broker import create_topics
from meterwatch.stream.consumer import raw_records
from tests.conftest import unique_settings

pytestmark = pytest.mark.integration


async def _read(bootstrap: str, topic: str, n: int, *, raw: bool,
                max_records: int) -> tuple[bool, list[tuple]]:
    c = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                         auto_offset_reset="earliest", enable_auto_commit=False,
                         isolation_level="read_committed")
    await c.start()
    took = raw_records(c) if raw else False
    out: list[tuple] = []
    try:
        while len(out) < n:
            batch = await c.getmany(timeout_ms=2000, max_records=max_records)
            assert batch, "no records within 2 s"
            for tp, recs in batch.items():
                assert all(type(r) is not ConsumerRecord for r in recs) == raw
                out += [(tp.partition, r.offset, r.timestamp, r.key, r.value) for r in recs]
    finally:
        await c.stop()
    return took, sorted(out)


async def test_raw_records_match_consumer_records(broker):
    s = unique_settings(broker)
    await create_topics(s.bootstrap_servers, {s.input_topic: 2})
    p = AIOKafkaProducer(bootstrap_servers=s.bootstrap_servers, linger_ms=5)
    await p.start()
    try:
        futures = [await p.send(s.input_topic, b'{"n":%d}' % i, key=b"k%d" % (i % 7),
                                partition=i % 2) for i in range(2500)]
        futures.append(await p.send(s.input_topic, None, key=b"tombstone", partition=0))
        for f in futures:
            await f
    finally:
        await p.stop()
    took, raw = await _read(s.bootstrap_servers, s.input_topic, 2501, raw=True,
                            max_records=333)  # stops inside record batches
    assert took, "the installed aiokafka no longer takes the raw-record path"
    _, plain = await _read(s.bootstrap_servers, s.input_topic, 2501, raw=False,
                           max_records=333)
    assert raw == plain
    assert len({(p, o) for p, o, *_ in raw}) == 2501
