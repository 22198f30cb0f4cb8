"""The sink: everything meterwatch writes to Kafka, and how it is keyed and labelled.

Output partition = input partition: the records about a household-day read from input
partition ``p`` go to partition ``p`` of every output topic. One owner per input partition
therefore means one writer per output partition, which is what lets recovery read an output
partition and know it holds everything its predecessor published (``stream.checkpoint``).

Ownership: every record carries the header ``meterwatch.app`` = ``[group id, input topic]``
(JSON), and the keys of household state and marks on the state topic include both
(``state_key``, ``mark_key``). Two applications that share the default output and state
topics therefore never read each other's state, marks or day scores (``stream.recovery``
filters on them).

Producers (``--idempotence``):

- ``auto`` (default): start an idempotent producer. aiokafka asks for a producer id inside
  ``start()``; where the broker answers (Apache Kafka), every owned input partition ``p``
  gets a **transactional** producer of its own, ``transactional.id = <group>.<input>.<p>``,
  opened when ``p`` is assigned (``open_partition``). Opening it fences any older producer
  with that id: a member that lost ``p`` without noticing can no longer write for it (the
  broker refuses it, ``PartitionLost``). Where the fence came from anything but a new owner
  (the group still assigns ``p`` to this member), the service takes ``p`` back
  (``stream.service``, docs/runtime.md). Each ``send_all`` writes a partition's records in
  one transaction. Where the broker refuses a producer id (the embedded Tansu broker answers
  InitProducerId with UnknownError), the failed producer is stopped and one plain producer
  (acks=all) writes everything; every guarantee but fencing rests on recovery, not on the
  producer (see docs/runtime.md for what remains).
- ``on``: like ``auto``, but a broker without producer ids is a configuration error.
- ``off``: one plain producer; no fencing.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.client import CoordinationType
from aiokafka.errors import (
    InvalidProducerEpoch,
    InvalidProducerIdMapping,
    InvalidTxnState,
    KafkaConnectionError,
    KafkaError,
    ProducerFenced,
    TransactionalIdAuthorizationFailed,
    TransactionCoordinatorFenced,
)

from meterwatch.stream.config import Settings
from meterwatch.stream.errors import ConfigurationError, PartitionLost

log = logging.getLogger(__name__)

APP_HEADER = "meterwatch.app"
_FENCED = (ProducerFenced, InvalidProducerEpoch, InvalidTxnState,
           TransactionCoordinatorFenced)
#: What a transaction coordinator answers a producer whose transactional id it forgot:
#: ``transactional.id.expiration.ms`` (7 days by default) without a transaction, e.g. an
#: input partition without data for a week. aiokafka's sender wraps it ("Unexpected error
#: during batch delivery").
_EXPIRED = (InvalidProducerIdMapping,)


def _caused_by(exc: BaseException, types: tuple[type[BaseException], ...]) -> bool:
    """Whether ``exc`` or an exception it was raised from is one of ``types``."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, types):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


@dataclass(frozen=True)
class OutRecord:
    topic: str
    partition: int
    key: bytes | None
    value: bytes | None


def app_id(settings: Settings) -> bytes:
    """The identity of an application: its group id and input topic."""
    return orjson.dumps([settings.group_id, settings.input_topic])


def state_key(settings: Settings, household: str) -> bytes:
    return orjson.dumps(["state", settings.group_id, settings.input_topic, household])


def mark_key(settings: Settings) -> bytes:
    return orjson.dumps(["mark", settings.group_id, settings.input_topic])


def parse_state_key(settings: Settings, key: bytes | None) -> str | None:
    """The household of one of this application's state records (None for anything else:
    marks, other applications' records, records of older versions)."""
    if not key or not key.startswith(b'["state",'):
        return None
    try:
        _kind, group, topic, household = orjson.loads(key)
    except (orjson.JSONDecodeError, ValueError):
        return None
    if group != settings.group_id or topic != settings.input_topic:
        return None
    return str(household)


def transactional_id(settings: Settings, partition: int) -> str:
    return f"{settings.group_id}.{settings.input_topic}.{partition}"


@dataclass
class _Writer:
    producer: AIOKafkaProducer
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class OutputPublisher:
    """The producers, acks=all, and the end offsets they have written.

    ``start``/``stop`` (or ``async with``); ``stop`` is safe twice and after a failed
    ``start``. With transactions, ``open_partition(p)`` before writing for ``p`` and
    ``close_partition(p)`` when ``p`` is revoked.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.producer: AIOKafkaProducer | None = None  # without transactions
        self.transactional = False
        self._writers: dict[int, _Writer] = {}
        self._header = [(APP_HEADER, app_id(settings))]
        #: (topic, partition) -> the next offset after our last acknowledged record
        self.ends: dict[tuple[str, int], int] = {}
        #: the largest record batch a producer builds, and dead-letter record it is given
        self.batch_bytes = MAX_BATCH_BYTES
        self.dead_letter_bytes = DEAD_LETTER_MAX_BYTES

    def fit(self, limits: dict[str, int]) -> None:
        """Size batches and dead letters to the topics' ``max.message.bytes`` (topic ->
        bytes; ``preflight.record_limits``), for the producers made from now on: a batch
        over a topic's limit is refused whole (``MessageSizeTooLargeError``)."""
        self.batch_bytes = fitting_batch(min(limits.values(), default=None))
        dead = limits.get(self.settings.dead_letter_topic, DEAD_LETTER_MAX_BYTES + BATCH_MARGIN)
        self.dead_letter_bytes = min(DEAD_LETTER_MAX_BYTES, dead - BATCH_MARGIN)
        if self.batch_bytes < MAX_BATCH_BYTES or self.dead_letter_bytes < DEAD_LETTER_MAX_BYTES:
            log.info("record batches of at most %d bytes and dead letters of at most %d: the "
                     "output topics' max.message.bytes", self.batch_bytes,
                     self.dead_letter_bytes)

    @property
    def idempotent(self) -> bool:
        return self.transactional

    def _make(self, *, idempotent: bool = False,
              txn_id: str | None = None) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            **self.settings.kafka_options(), acks="all",
            enable_idempotence=idempotent or txn_id is not None, transactional_id=txn_id,
            linger_ms=2, max_batch_size=self.batch_bytes, max_request_size=8 << 20,
            compression_type=None)

    async def __aenter__(self) -> OutputPublisher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self, partitions: int = 1) -> None:
        """Decide the producers (``--idempotence``). With transactions, the transactional
        ids of input partitions ``0 .. partitions - 1`` are checked before the service
        joins its group (``_check_transactional_ids``)."""
        mode = self.settings.idempotence
        self.transactional = False
        if mode != "off" and await self._broker_has_producer_ids(mode, partitions):
            self.transactional = True
            _quiet_fenced_futures(asyncio.get_running_loop())
            _quiet_expired_senders()
            log.info("transactions enabled: one transactional producer per owned input "
                     "partition (transactional.id %s)",
                     transactional_id(self.settings, 0)[:-1] + "<p>")
            return
        producer = self._make()
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        self.producer = producer

    async def _broker_has_producer_ids(self, mode: str, partitions: int) -> bool:
        """Start an idempotent producer (aiokafka asks for a producer id inside ``start``)
        and stop it again; whatever happens, nothing is left open. Where it gets one, the
        transactional ids are checked with its connection."""
        probe = self._make(idempotent=True)
        sender_log = logging.getLogger("aiokafka.producer.sender")
        level = sender_log.level
        sender_log.setLevel(logging.CRITICAL)  # its refusal is logged once, below
        try:
            await probe.start()
        except KafkaConnectionError:
            raise  # not reachable: the caller retries
        except KafkaError as exc:
            if mode == "on":
                raise ConfigurationError(
                    "--idempotence", f"the broker refuses producer ids ({exc!r})",
                    "use --idempotence auto or off with this broker") from None
            log.warning("the broker refuses producer ids (%r): no idempotence, no "
                        "transactions; exactly-once rests on recovery (no fencing)", exc)
            return False
        else:
            await self._check_transactional_ids(probe, partitions)
        finally:
            sender_log.setLevel(level)
            await probe.stop()
        return True

    async def _check_transactional_ids(self, probe: AIOKafkaProducer, partitions: int) -> None:
        """``ConfigurationError`` when the brokers do not let this principal use one of the
        partitions' transactional ids, asked before the service joins its group: a
        FindCoordinator request for each id, which the brokers answer
        TRANSACTIONAL_ID_AUTHORIZATION_FAILED without DESCRIBE on it (WRITE implies
        DESCRIBE). Without the question the refusal came when the first partition opened,
        after joining (a rebalance for the group's other members). Any other answer (a
        coordinator not yet made, on a new cluster) is left to the partition's producer."""
        client = probe.client
        answers = await asyncio.gather(  # at once: one round trip, not one a partition
            *(client.coordinator_lookup(CoordinationType.TRANSACTION,
                                        transactional_id(self.settings, p))
              for p in range(partitions)), return_exceptions=True)
        for partition, answer in enumerate(answers):  # judged in partition order
            if isinstance(answer, TransactionalIdAuthorizationFailed):
                raise self._id_refused(partition)
            if isinstance(answer, KafkaConnectionError):
                raise answer
            if isinstance(answer, BaseException):
                if not isinstance(answer, KafkaError):
                    raise answer
                log.debug("transaction coordinator of partition %d: %r", partition, answer)
                return

    def _id_refused(self, partition: int) -> ConfigurationError:
        return ConfigurationError(
            "--group-id", f"not authorised for transactional id "
            f"{transactional_id(self.settings, partition)!r}",
            "grant WRITE on transactional ids <group>.<input topic>.* or use "
            "--idempotence off")

    async def open_partition(self, partition: int) -> None:
        """With transactions: the producer of ``partition``; starting it fences every older
        producer of the same transactional id (aborting its open transaction)."""
        if not self.transactional or partition in self._writers:
            return
        producer = self._make(txn_id=transactional_id(self.settings, partition))
        try:
            await producer.start()
        except TransactionalIdAuthorizationFailed:
            await producer.stop()
            raise self._id_refused(partition) from None
        except BaseException:
            await producer.stop()
            raise
        self._writers[partition] = _Writer(producer)
        # topic metadata now, not on the first batch (8 producers x 5 topics of lookups)
        s = self.settings
        for topic in (*output_topics(s), s.dead_letter_topic, s.state_topic):
            await producer.partitions_for(topic)

    async def close_partition(self, partition: int) -> None:
        writer = self._writers.pop(partition, None)
        if writer is not None:
            try:
                await writer.producer.stop()
            except KafkaError as exc:
                log.warning("closing the producer of partition %d: %r", partition, exc)

    async def stop(self) -> None:
        for p in list(self._writers):
            await self.close_partition(p)
        if self.producer is not None:
            producer, self.producer = self.producer, None
            await producer.stop()

    async def send_all(self, records: Iterable[OutRecord]) -> None:
        """Send and wait until every record is acknowledged (raises on failure).

        Records are appended to one record batch per (topic, partition) in their order
        (``send_batch``: no per-record future, partitioner or accumulator lookup), so the
        order of each partition is the order given. With transactions, each input
        partition's records are one transaction; a partition whose producer was fenced
        raises ``PartitionLost`` (after the other partitions' transactions completed).
        """
        by_partition: dict[int, dict[tuple[str, int], list[OutRecord]]] = {}
        for r in records:
            by_partition.setdefault(r.partition, {}).setdefault(
                (r.topic, r.partition), []).append(r)
        if not by_partition:
            return
        if not self.transactional:
            assert self.producer is not None, "publisher not started"
            groups = {k: v for g in by_partition.values() for k, v in g.items()}
            await self._send(self.producer, groups)
            return
        results = await asyncio.gather(
            *(self._send_transaction(p, g) for p, g in by_partition.items()),
            return_exceptions=True)
        lost: set[int] = set()
        why: set[str] = set()
        for res in results:
            if isinstance(res, PartitionLost):
                lost |= res.partitions
                if _caused_by(res, _EXPIRED):
                    why.add(res.reason)
                else:
                    why.add("a newer producer with its transactional id (another member, or "
                            "any other process) fenced ours")
            elif isinstance(res, BaseException):
                raise res
        if lost:
            raise PartitionLost(lost, "; ".join(sorted(why)))

    async def _send_transaction(self, partition: int,
                                groups: dict[tuple[str, int], list[OutRecord]]) -> None:
        writer = self._writers.get(partition)
        if writer is None:
            raise PartitionLost({partition}, "not owned by this member")
        async with writer.lock:
            if self._writers.get(partition) is not writer:
                # closed while this waited for the lock (a transaction before this one was
                # fenced): its producer has failed for good, and aiokafka answers a new
                # transaction on it with an AssertionError, which stopped the service
                raise PartitionLost({partition}, "its producer was fenced meanwhile")
            producer = writer.producer
            try:
                await producer.begin_transaction()
                await self._send(producer, groups)
                await producer.commit_transaction()
            except _FENCED as exc:
                await self.close_partition(partition)
                raise PartitionLost({partition}, repr(exc)) from exc
            except KafkaError as exc:
                await self.close_partition(partition)
                if _caused_by(exc, _EXPIRED):
                    # nothing of it was committed: taken back like a fenced partition, with
                    # a new producer (a new producer id), it replays from its last mark;
                    # it stopped the service (exit 1)
                    raise PartitionLost({partition}, "the broker no longer knew its "
                                        "transactional id (transactional.id.expiration.ms "
                                        "without a transaction)") from exc
                raise
            except BaseException:
                # a failed or cancelled transaction: the producer's state is unknown; the
                # next owner (or a re-opened producer) aborts what it left open
                await self.close_partition(partition)
                raise

    async def _send(self, producer: AIOKafkaProducer,
                    groups: dict[tuple[str, int], list[OutRecord]]) -> None:
        header = self._header
        sent = []  # (topic, partition, future, records in the batch)
        for (topic, partition), recs in groups.items():
            batch = producer.create_batch()
            for r in recs:
                if batch.append(key=r.key, value=r.value, timestamp=None,
                                headers=header) is None:
                    sent.append((topic, partition, await producer.send_batch(
                        batch, topic, partition=partition), batch.record_count()))
                    batch = producer.create_batch()
                    if batch.append(key=r.key, value=r.value, timestamp=None,
                                    headers=header) is None:
                        raise ValueError(f"record too large for a batch: {len(r.value or b'')}"
                                         " bytes")
            sent.append((topic, partition, await producer.send_batch(
                batch, topic, partition=partition), batch.record_count()))
        # every future awaited: when the producer is fenced they all fail alike, and one
        # left unawaited is logged as "Future exception was never retrieved" at shutdown
        results = await asyncio.gather(*(f for _, _, f, _ in sent), return_exceptions=True)
        metadata = []
        for res in results:
            if isinstance(res, BaseException):
                raise res
            metadata.append(res)
        for (topic, partition, _, count), md in zip(sent, metadata, strict=True):
            k = (topic, partition)
            end = md.offset + count
            if end > self.ends.get(k, -1):
                self.ends[k] = end


_QUIETED: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


class _ExpiredSender(logging.Filter):
    """aiokafka's sender logs "Unexpected error in sender routine" with a traceback when
    the broker no longer knows a producer's transactional id (``_EXPIRED``); the service
    logs that once, as the partitions it takes back, so these go to debug."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and _caused_by(exc, _EXPIRED):
            log.debug("aiokafka's sender: %s (%r)", record.getMessage(), exc)
            return False
        return True


def _quiet_expired_senders() -> None:
    sender = logging.getLogger("aiokafka.producer.sender")
    if not any(isinstance(f, _ExpiredSender) for f in sender.filters):
        sender.addFilter(_ExpiredSender())


def _quiet_fenced_futures(loop: asyncio.AbstractEventLoop) -> None:
    """A fenced producer's sender fails its transaction's internal futures (aiokafka), which
    nobody awaits: when they are collected asyncio logs each as "Future exception was never
    retrieved" with a ProducerFenced traceback, which reads like a crash. The fence itself
    is logged once, by the service (``PartitionLost``); these go to debug. Everything else
    reaches the loop's previous exception handler."""
    if loop in _QUIETED:
        return
    _QUIETED.add(loop)
    previous = loop.get_exception_handler()

    def handler(lp: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        exc = context.get("exception")
        if isinstance(exc, BaseException) and (isinstance(exc, _FENCED)
                                               or _caused_by(exc, _EXPIRED)) and \
                str(context.get("message", "")).startswith("Future exception was never"):
            log.debug("a fenced producer's future: %s", context.get("exception"))
        elif previous is not None:
            previous(lp, context)
        else:
            lp.default_exception_handler(context)

    loop.set_exception_handler(handler)


def json_record(topic: str, partition: int, key: str | None, doc: object, *,
                key_bytes: bytes | None = None) -> OutRecord:
    """A JSON document as a record; the key is ``key`` (text) or ``key_bytes``."""
    if key is not None:
        key_bytes = key.encode()
    # copied to its own size: the bytes orjson returns keep its whole write buffer (~8 KiB)
    # allocated, and a closed day's documents wait for their acknowledgements
    # (benchmarks/memory.py --only pending: 16.7 KB -> 1.1 KB per pending day)
    value = memoryview(orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)).tobytes()
    return OutRecord(topic, partition, key_bytes, value)


#: Largest record batch a producer builds (before ``OutputPublisher.fit``), and what is
#: kept below a topic's ``max.message.bytes`` for the batch's own header and records'.
MAX_BATCH_BYTES = 1 << 20
BATCH_MARGIN = 1024
#: Largest dead-letter record (key + value): well under the 1 MB a broker accepts by default
#: (``message.max.bytes``) and the producer's ``max_request_size``, whatever the input.
DEAD_LETTER_MAX_BYTES = 512 * 1024
#: Longest original key kept (in the document and as the record key); household ids are
#: at most 64 characters, so a longer key is never a valid one.
DEAD_LETTER_MAX_KEY = 1024
_MAX_DETAIL = 4000


def fitting_batch(limit: int | None) -> int:
    """The largest record batch to build for a topic whose ``max.message.bytes`` is
    ``limit`` (None: not known)."""
    return MAX_BATCH_BYTES if limit is None else max(1, min(MAX_BATCH_BYTES,
                                                            limit - BATCH_MARGIN))


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
