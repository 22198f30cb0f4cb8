"""Recovery: rebuilding an assigned input partition from the state and output topics.

When partition ``p`` is assigned (after a crash, a rebalance or a restart), its new owner,
with ``p`` paused (``stream.service``), in this order:

1. opens ``p``'s transactional producer where the broker has transactions
   (``OutputPublisher.open_partition``): the previous owner's producer is fenced and its
   open transaction aborted *before* anything is read back;
2. reads the state partition ``p`` to its end: this application's household states and its
   mark (keys carry the group id and input topic; anything else is skipped);
3. reads ``scores`` from the mark's ``X``: those days are closed; their states (newer
   ``seq``) win. Only records with this application's ``meterwatch.app`` header count;
4. reads ``alerts`` and ``data-quality`` from their ``X``; republishes any alert,
   ``sustained_change`` or data-quality record that a day score promised but that is
   missing (a crash between checkpoint steps 1 and 2);
5. seeks the input to the mark's ``C`` (no mark: the group's committed offset; none: the
   beginning) and replays: open days are rebuilt; readings of closed days are dropped as
   late, so no day is scored twice and no alert is published twice.

A crash at any point leaves either nothing of a day (it is replayed and scored), or its day
score (its side records are completed in 4.), or everything (it is skipped).

Reading ends at the highwater carried by fetch responses (``consumer.highwater(tp)``), not
ListOffsets: the embedded Tansu broker under-reports ListOffsets(latest), and a recovery that
stopped early would miss records and publish duplicates. Reads are ``read_committed``:
aborted transactions (a fenced member's) are never applied.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from meterwatch.stream.adoption import Adoption, latest_elsewhere, window_end
from meterwatch.stream.alerts import data_quality_record
from meterwatch.stream.assembler import DayAssembler
from meterwatch.stream.checkpoint import PartitionWork
from meterwatch.stream.config import Settings
from meterwatch.stream.consumer import StarvedFetches
from meterwatch.stream.outputs import (
    APP_HEADER,
    OutputPublisher,
    OutRecord,
    app_id,
    json_record,
    mark_key,
    output_topics,
    parse_state_key,
)
from meterwatch.stream.timegrid import TimeGrid

log = logging.getLogger(__name__)


@dataclass
class PartitionTail:
    records: list[ConsumerRecord] = field(default_factory=list)
    end: int = 0  # the highwater when reading finished


#: The fetch wait of recovery's reader (raised where fetches starve: ``StarvedFetches``).
_READ_WAIT_MS = 100


class RecoveryError(RuntimeError):
    """A partition could not be read to its end in time."""


async def read_to_end(settings: Settings, starts: Mapping[tuple[str, int], int], *,
                      timeout_s: float = 120.0, missing_ok: bool = False,
                      wait_ms: int = _READ_WAIT_MS) -> dict[tuple[str, int], PartitionTail]:
    """Records of each (topic, partition) from its start offset to the highwater. With
    ``missing_ok``, a partition that the topic's metadata does not have (yet) has none.
    ``wait_ms``: the fetches' wait, raised where they starve (``StarvedFetches``)."""
    out = {k: PartitionTail() for k in starts}
    if not starts:
        return out
    consumer = AIOKafkaConsumer(**settings.kafka_options(), group_id=None,
                                enable_auto_commit=False, fetch_max_wait_ms=wait_ms,
                                max_partition_fetch_bytes=16 << 20,
                                isolation_level="read_committed")
    await consumer.start()
    starved = StarvedFetches(consumer, wait_ms, "recovery")
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
            await starved.after(data)
            for tp, recs in data.items():
                out[tps[tp]].records.extend(recs)
            for tp in list(pending):
                known = consumer.partitions_for_topic(tp.topic) if missing_ok else None
                if known is not None and tp.partition not in known:
                    pending.discard(tp)
                    continue
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


def states_of(settings: Settings, records: Iterable[ConsumerRecord]) -> tuple[
        dict[str, bytes], dict[str, Any] | None]:
    """The latest state record value of each household in one state partition's records,
    and the partition's mark (None: none)."""
    mark = mark_key(settings)
    latest: dict[str, bytes] = {}
    found = None
    for r in records:
        if r.key == mark and r.value is not None:
            found = orjson.loads(r.value)
            continue
        household = parse_state_key(settings, r.key)
        if household is None:
            continue
        if r.value is None:
            latest.pop(household, None)
        else:
            latest[household] = r.value
    return latest, found


async def _open_adoption(settings: Settings, consumer: AIOKafkaConsumer,
                         works: Mapping[int, PartitionWork], marks: Mapping[int, Any],
                         latest: dict[int, dict[str, bytes]]) -> None:
    """``stream.adoption``: give each recovered partition that opens an adoption window
    the latest states of the other state partitions (read here, once for all)."""
    count = max(len(consumer.partitions_for_topic(settings.input_topic) or ()),
                max(works) + 1)
    now = time.time()
    for p, work in works.items():
        work.input_partitions = count
        until = window_end(marks.get(p), count, now)
        if until is not None:
            work.adoption = Adoption(p, {}, until)
    opening = [p for p, w in works.items() if w.adoption is not None]
    if not opening:
        return
    others = [p for p in range(count) if p not in latest]
    if others:
        # missing_ok: the member that grows the state topic with the input may not have yet
        recs = await read_to_end(settings, {(settings.state_topic, p): 0 for p in others},
                                 missing_ok=True)
        for p in others:
            latest[p], _ = states_of(settings, recs[(settings.state_topic, p)].records)
    elsewhere = latest_elsewhere(latest)
    for p in opening:
        works[p].adoption.elsewhere = elsewhere  # type: ignore[union-attr]
    log.info("input partitions %s: households arriving there may take their state from "
             "the other %d state partitions (%d households) until %s", opening, count - 1,
             len(elsewhere), time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(
                 min(works[p].adoption.until for p in opening))))  # type: ignore[union-attr]


def _is_ours(record: ConsumerRecord, app: bytes) -> bool:
    return any(k == APP_HEADER and v == app for k, v in (record.headers or ()))


async def recover(settings: Settings, publisher: OutputPublisher, consumer: AIOKafkaConsumer,
                  grid: TimeGrid, partitions: Iterable[int]) -> dict[int, PartitionWork]:
    """Steps 1-5 for ``partitions``; the rebuilt work of each, positioned at its start."""
    s = settings
    t0 = time.perf_counter()
    new = sorted(partitions)
    if not new:
        return {}
    app = app_id(s)
    # Step 1: fence the previous owner first
    await asyncio.gather(*(publisher.open_partition(p) for p in new))
    # Step 2: state and marks
    state_recs = await read_to_end(s, {(s.state_topic, p): 0 for p in new})
    works: dict[int, PartitionWork] = {}
    marks: dict[int, dict[str, Any]] = {}
    latest: dict[int, dict[str, bytes]] = {}
    for p in new:
        asm = DayAssembler(grid, grace_s=s.grace_s, max_imputed=s.max_imputed_slots,
                          idle_evict_days=s.household_idle_evict_days)
        latest[p], found = states_of(s, state_recs[(s.state_topic, p)].records)
        if found is not None:
            marks[p] = found
        for household, value in latest[p].items():
            asm.households.restore(household, orjson.loads(value))
        works[p] = PartitionWork(p, asm, 0)
    await _open_adoption(s, consumer, works, marks, latest)
    # Steps 3-4: outputs since the marks
    topics = output_topics(s)
    starts = {(t, p): int(marks.get(p, {}).get("ends", {}).get(t, 0))
              for p in new for t in topics}
    outs = await read_to_end(s, starts)
    republish: list[OutRecord] = []
    for p in new:
        hh = works[p].assembler.households
        promised: dict[tuple[str, str], dict[str, Any]] = {}
        for r in outs[(s.scores_topic, p)].records:
            if not _is_ours(r, app):
                continue
            doc = orjson.loads(r.value)
            hh.restore_day(doc)
            day = doc["household_id"] + doc["date"]
            if doc.get("alert"):
                promised[(s.alerts_topic, day)] = doc["alert"]
            if doc.get("sustained_change"):  # stream.sustained
                promised[(s.alerts_topic, day + "sustained_change")] = doc["sustained_change"]
            if doc["status"] != "scored":
                promised[(s.data_quality_topic, day)] = data_quality_record(
                    doc["household_id"], doc["date"], doc["status"], doc["readings"],
                    doc["expected_readings"], doc["missing_slots"], reason=doc.get("error"))
        present = set()
        for t in (s.alerts_topic, s.data_quality_topic):
            for r in outs[(t, p)].records:
                if _is_ours(r, app):
                    d = orjson.loads(r.value)
                    present.add((t, d["household_id"] + d["date"] + d.get("type", "")))
        for (t, k), doc in promised.items():
            if (t, k) not in present:
                republish.append(json_record(t, p, doc["household_id"], doc))
        for t in topics:
            publisher.ends[(t, p)] = outs[(t, p)].end
    if republish:
        log.warning("recovery: republishing %d alert/data-quality records", len(republish))
        await publisher.send_all(republish)
    # Step 5: seek (the caller resumes the partitions)
    started = {}
    for p in new:
        tp = TopicPartition(s.input_topic, p)
        if p in marks:
            start = int(marks[p]["offset"])
        else:
            c = await consumer.committed(tp)
            start = c if c is not None and c >= 0 else -1
        if start >= 0:
            consumer.seek(tp, start)
        else:
            await consumer.seek_to_beginning(tp)
            start = await consumer.position(tp)
        works[p].position = works[p].committed = started[p] = start
    log.info("recovered partitions %s in %.2f s (start offsets %s, %d republished)", new,
             time.perf_counter() - t0, started, len(republish))
    return works
