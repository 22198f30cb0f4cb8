"""Everything meterwatch writes to Kafka, through one producer.

Output partition = input partition: the records about a household-day read from input
partition ``p`` go to partition ``p`` of every output topic. One owner per input partition
therefore means one writer per output partition, which is what lets recovery read an output
partition and know it holds everything its predecessor published (see ``stream.service``).

Idempotence: ``idempotence="auto"`` turns it on where the broker supports it (probed once at
start with a tombstone on the compacted state topic); the embedded Tansu broker does not
(InitProducerId answers UnknownError), and every guarantee meterwatch claims holds without it
because duplicates are removed at recovery, not by the producer.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from meterwatch.stream.config import Settings

log = logging.getLogger(__name__)

MARK_KEY = b"__mark__"
PROBE_KEY = b"__probe__"


@dataclass(frozen=True)
class OutRecord:
    topic: str
    partition: int
    key: bytes | None
    value: bytes | None


class OutputPublisher:
    """A started aiokafka producer with acks=all and the end offsets it has written."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.producer: AIOKafkaProducer | None = None
        self.idempotent = False
        #: (topic, partition) -> the next offset after our last acknowledged record
        self.ends: dict[tuple[str, int], int] = {}

    def _make(self, idempotent: bool) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            **self.settings.kafka_options(), acks="all", enable_idempotence=idempotent,
            linger_ms=2, max_batch_size=1 << 20, max_request_size=8 << 20,
            compression_type=None)

    async def start(self) -> None:
        mode = self.settings.idempotence
        if mode != "off":
            producer = self._make(True)
            await producer.start()
            try:
                await asyncio.wait_for(producer.send_and_wait(
                    self.settings.state_topic, None, key=PROBE_KEY, partition=0), 15)
                self.producer, self.idempotent = producer, True
                log.info("idempotent producer enabled")
                return
            except (KafkaError, asyncio.TimeoutError) as exc:
                await producer.stop()
                if mode == "on":
                    raise RuntimeError(f"idempotent producer not supported: {exc!r}") from exc
                log.warning("broker refused an idempotent producer (%r): continuing without; "
                            "exactly-once output rests on recovery de-duplication", exc)
        self.producer = self._make(False)
        await self.producer.start()

    async def stop(self) -> None:
        if self.producer is not None:
            producer, self.producer = self.producer, None
            await producer.stop()

    async def send_all(self, records: Iterable[OutRecord]) -> None:
        """Send and wait until every record is acknowledged (raises on failure).

        Records are appended to one record batch per (topic, partition) in their order
        (``send_batch``: no per-record future, partitioner or accumulator lookup), so the
        order of each partition is the order given.
        """
        producer = self.producer
        assert producer is not None, "publisher not started"
        groups: dict[tuple[str, int], list[OutRecord]] = {}
        for r in records:
            groups.setdefault((r.topic, r.partition), []).append(r)
        sent = []  # (topic, partition, future, records in the batch)
        for (topic, partition), recs in groups.items():
            batch = producer.create_batch()
            for r in recs:
                if batch.append(key=r.key, value=r.value, timestamp=None) is None:
                    sent.append((topic, partition, await producer.send_batch(
                        batch, topic, partition=partition), batch.record_count()))
                    batch = producer.create_batch()
                    if batch.append(key=r.key, value=r.value, timestamp=None) is None:
                        raise ValueError(f"record too large for a batch: {len(r.value or b'')}"
                                         " bytes")
            sent.append((topic, partition, await producer.send_batch(
                batch, topic, partition=partition), batch.record_count()))
        if not sent:
            return
        metadata = await asyncio.gather(*(f for _, _, f, _ in sent))
        for (topic, partition, _, count), md in zip(sent, metadata, strict=True):
            k = (topic, partition)
            end = md.offset + count
            if end > self.ends.get(k, -1):
                self.ends[k] = end


def json_record(topic: str, partition: int, key: str | None, doc: object) -> OutRecord:
    return OutRecord(topic, partition, key.encode() if key is not None else None,
                     orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY))


def dead_letter_record(settings: Settings, *, reason: str, detail: str, topic: str,
                       partition: int, offset: int, key: bytes | None, value: bytes | None,
                       timestamp_ms: int | None) -> OutRecord:
    """A dead-letter record (``stream.events.DeadLetter``) keyed like the original."""
    doc = {
        "schema_version": 1, "reason": reason, "detail": detail, "topic": topic,
        "partition": partition, "offset": offset,
        "key": _text_or_b64(key), "value": base64.b64encode(value or b"").decode(),
        "timestamp_ms": timestamp_ms,
    }
    return OutRecord(settings.dead_letter_topic, partition, key, orjson.dumps(doc))


def _text_or_b64(b: bytes | None) -> str | None:
    if b is None:
        return None
    try:
        return b.decode()
    except UnicodeDecodeError:
        return base64.b64encode(b).decode()


def output_topics(settings: Settings) -> Sequence[str]:
    return (settings.scores_topic, settings.alerts_topic, settings.data_quality_topic)
