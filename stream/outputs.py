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


#: Largest dead-letter record (key + value): well under the 1 MB a broker accepts by default
#: (``message.max.bytes``) and the producer's ``max_request_size``, whatever the input.
DEAD_LETTER_MAX_BYTES = 512 * 1024
#: Longest original key kept (in the document and as the record key); household ids are
#: at most 64 characters, so a longer key is never a valid one.
DEAD_LETTER_MAX_KEY = 1024
_MAX_DETAIL = 4000


def dead_letter_record(settings: Settings, *, reason: str, detail: str, topic: str,
                       partition: int, offset: int, key: bytes | None, value: bytes | None,
                       timestamp_ms: int | None,
                       max_bytes: int = DEAD_LETTER_MAX_BYTES) -> OutRecord:
    """A dead-letter record (``stream.events.DeadLetter``) keyed like the original.

    It always fits in ``max_bytes`` (key and value together): an original value whose
    base64 would not fit is cut, and the document says so with ``value_truncated: true``
    and ``value_size`` (the original length in bytes); a key over ``DEAD_LETTER_MAX_KEY``
    bytes is cut the same way (``key_truncated``, ``key_size``) and the record has no key.
    """
    raw = value or b""
    doc: dict[str, object] = {
        "schema_version": 1, "reason": reason, "detail": detail[:_MAX_DETAIL],
        "topic": topic, "partition": partition, "offset": offset,
        "key": _text_or_b64(key), "value": "", "timestamp_ms": timestamp_ms,
    }
    out_key = key
    if key is not None and len(key) > DEAD_LETTER_MAX_KEY:
        doc["key"] = _text_or_b64(key[:DEAD_LETTER_MAX_KEY])
        doc.update(key_truncated=True, key_size=len(key))
        out_key = None
    # room for the value's base64, after the rest of the document and the flags below
    head = len(orjson.dumps(doc)) + len(out_key or b"") + 64
    room = max(0, (max_bytes - head) // 4 * 3)
    if len(raw) > room:
        doc.update(value_truncated=True, value_size=len(raw))
        raw = raw[:room]
    doc["value"] = base64.b64encode(raw).decode()
    return OutRecord(settings.dead_letter_topic, partition, out_key, orjson.dumps(doc))


def _text_or_b64(b: bytes | None) -> str | None:
    if b is None:
        return None
    try:
        return b.decode()
    except UnicodeDecodeError:
        return base64.b64encode(b).decode()


def output_topics(settings: Settings) -> Sequence[str]:
    return (settings.scores_topic, settings.alerts_topic, settings.data_quality_topic)
