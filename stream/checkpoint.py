"""The checkpoint: what is committed when, so that nothing is lost or doubled.

Every record about input partition ``p`` goes to partition ``p`` of each output topic, and a
partition has one owner at a time, so each output partition has a single writer (with
transactions, the broker enforces it: ``stream.outputs``).

Per batch of closed days (``stream.service``):

1. publish one **day score** per day to ``scores`` (the ledger; it carries the alert and
   data-quality payloads and the household state after the day) and wait for the acks;
2. publish the **alerts** and **data-quality** records and wait. With transactions, steps 1
   and 2 of a partition are one transaction.

Every ``commit_interval_s``, for each owned partition (``Checkpoint.commit``):

3. publish the **household state** of every household scored since the last commit
   (compacted ``state`` topic, key ``["state", group, input topic, household]``) and wait:
   a mark may only make a day score unnecessary for recovery once the state that includes
   it is durable;
4. compute the safe offset ``C``: the lowest offset still needed by an open day, a day
   waiting in the batcher or a day being scored/published, or the fetch position when none
   is. Offsets never pass a reading whose day has not been emitted, and never go backwards
   (a paranoid check raises ``CheckpointError`` if one would);
5. publish a **mark** ``{offset: C, ends: X}`` (key ``["mark", group, input topic]``) to
   partition ``p`` of the state topic, where ``X`` are the output end offsets at the moment
   the record at ``C`` was consumed (every output about a day that has a reading at ``C`` or
   later lies at or after ``X``); wait. With transactions, steps 3 and 5 are one
   transaction per partition;
6. commit ``C`` to the consumer group (for lag tooling, ``meterwatch reset`` and as the
   fallback when there is no mark).

Recovery (``stream.recovery``) reads the state and outputs back from ``X`` and seeks to ``C``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition

from meterwatch.stream.adoption import Adoption
from meterwatch.stream.assembler import DayAssembler
from meterwatch.stream.batcher import DynamicBatcher
from meterwatch.stream.config import Settings
from meterwatch.stream.errors import PartitionLost
from meterwatch.stream.events import SCHEMA_VERSION  # one version for every document
from meterwatch.stream.metrics import Metrics
from meterwatch.stream.outputs import (
    OutputPublisher,
    OutRecord,
    json_record,
    mark_key,
    output_topics,
    state_key,
)

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A committed offset would go backwards: a bug, never papered over."""


@dataclass
class PartitionWork:
    """What this member holds for one owned input partition."""

    partition: int
    assembler: DayAssembler
    position: int  # next input offset to consume
    #: (input position before a fetch, output end offsets then), oldest first
    snapshots: deque[tuple[int, dict[str, int]]] = field(default_factory=deque)
    committed: int = -1
    dirty: set[int] = field(default_factory=set)  # households whose state is not durable
    #: input partitions when recovered (in the mark: a later recovery that sees more opens
    #: an adoption window, ``stream.adoption``)
    input_partitions: int = 0
    adoption: Adoption | None = None  # while households may take their state from elsewhere


class Checkpoint:
    """Steps 3-6 for the partitions a member owns."""

    def __init__(self, settings: Settings, publisher: OutputPublisher,
                 batcher: DynamicBatcher, metrics: Metrics) -> None:
        self.settings = settings
        self.publisher = publisher
        self.batcher = batcher
        self.metrics = metrics

    def ends(self, partition: int) -> dict[str, int]:
        """The output end offsets of ``partition`` now (for the snapshots of step 5)."""
        return {t: self.publisher.ends.get((t, partition), 0)
                for t in output_topics(self.settings)}

    def safe_offset(self, work: PartitionWork) -> int:
        """Step 4."""
        candidates = [work.position, work.assembler.low_offset(),
                      self.batcher.min_offset(work.partition)]
        c = min(x for x in candidates if x is not None)
        if c < work.committed:
            raise CheckpointError(
                f"partition {work.partition}: safe offset {c} is behind the committed "
                f"{work.committed} (position {work.position}, open days from "
                f"{work.assembler.low_offset()}, queued from "
                f"{self.batcher.min_offset(work.partition)})")
        return c

    async def commit(self, parts: dict[int, PartitionWork], partitions: set[int],
                     consumer: AIOKafkaConsumer) -> None:
        """Steps 3-6 for ``partitions`` (those of them still owned). A partition whose
        producer was fenced raises ``PartitionLost`` after the others are committed."""
        s = self.settings
        mark = mark_key(s)
        records: list[OutRecord] = []
        offsets: dict[TopicPartition, int] = {}
        for p in sorted(partitions):
            work = parts.get(p)
            if work is None:
                continue
            households = work.assembler.households
            # Step 3: household state (before the mark, in the same partition order)
            records.extend(json_record(s.state_topic, p, None, households.snapshot(h),
                                       key_bytes=state_key(s, households.ids[h]))
                           for h in sorted(work.dirty))
            work.dirty.clear()
            # households silent for --household-idle-evict-days leave memory (their state is
            # durable since step 3); not those with days still queued, scored or published
            work.assembler.evict_idle(keep=lambda: self.batcher.households(p))  # noqa: B023
            # Step 4: the safe offset
            c = self.safe_offset(work)
            if c == work.committed:
                continue
            # Step 5: the mark; X = the output ends when the record at c was consumed: the
            # latest snapshot at or before c (older ones are no longer needed)
            snaps = work.snapshots
            while len(snaps) > 1 and snaps[1][0] <= c:
                snaps.popleft()
            ends = snaps[0][1] if snaps and snaps[0][0] <= c else self.ends(p)
            doc = {"schema_version": SCHEMA_VERSION, "group_id": s.group_id,
                   "input_topic": s.input_topic, "partition": p, "offset": c, "ends": ends,
                   "input_partitions": work.input_partitions}
            if work.adoption is not None and work.adoption.open():
                doc["adopt_until"] = work.adoption.until
            records.append(json_record(s.state_topic, p, None, doc, key_bytes=mark))
            offsets[TopicPartition(s.input_topic, p)] = c
        t0 = time.perf_counter()
        lost: set[int] = set()
        why = ""
        try:
            if self.publisher.transactional:  # steps 3 and 5: one transaction a partition
                await self.publisher.send_all(records)
            else:  # step 3 acknowledged before step 5
                await self.publisher.send_all(r for r in records if r.key != mark)
                await self.publisher.send_all(r for r in records if r.key == mark)
        except PartitionLost as exc:
            lost, why = exc.partitions, exc.reason
        offsets = {tp: c for tp, c in offsets.items() if tp.partition not in lost}
        if offsets:
            # Step 6: the group offset
            await consumer.commit(offsets)
            self.metrics.commit_latency.observe(time.perf_counter() - t0)
            for tp, c in offsets.items():
                if tp.partition in parts:
                    parts[tp.partition].committed = c
        if lost:
            # the cause, as publishing says it (a fence, or an expired transactional id)
            raise PartitionLost(lost, f"while committing: {why}")
