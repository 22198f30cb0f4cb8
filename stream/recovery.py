"""Reading partitions from an offset to their end, for recovery.

The end is the highwater carried by fetch responses (``consumer.highwater(tp)``), not
ListOffsets: the embedded Tansu broker under-reports ListOffsets(latest), and a recovery that
stopped early would miss records and publish duplicates.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from meterwatch.stream.config import Settings

log = logging.getLogger(__name__)


@dataclass
class PartitionTail:
    records: list[ConsumerRecord] = field(default_factory=list)  # type: ignore[type-arg]
    end: int = 0  # the highwater when reading finished


class RecoveryError(RuntimeError):
    """A partition could not be read to its end in time."""


async def read_to_end(settings: Settings, starts: Mapping[tuple[str, int], int], *,
                      timeout_s: float = 120.0) -> dict[tuple[str, int], PartitionTail]:
    """Records of each (topic, partition) from its start offset to the highwater."""
    out = {k: PartitionTail() for k in starts}
    if not starts:
        return out
    consumer = AIOKafkaConsumer(**settings.kafka_options(), group_id=None,
                                enable_auto_commit=False, fetch_max_wait_ms=100,
                                max_partition_fetch_bytes=16 << 20)
    await consumer.start()
    try:
        tps = {TopicPartition(t, p): (t, p) for t, p in starts}
        consumer.assign(list(tps))
        for tp, k in tps.items():
            consumer.seek(tp, max(0, starts[k]))
        pending = set(tps)
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise RecoveryError(f"could not read {sorted(map(str, pending))} to the end "
                                    f"within {timeout_s:.0f} s")
            data = await consumer.getmany(*pending, timeout_ms=200, max_records=50_000)
            for tp, recs in data.items():
                out[tps[tp]].records.extend(recs)
            for tp in list(pending):
                hw = consumer.highwater(tp)
                if hw is None:
                    continue
                if await consumer.position(tp) >= hw:
                    out[tps[tp]].end = hw
                    pending.discard(tp)
            await asyncio.sleep(0)
    finally:
        await consumer.stop()
    return out
