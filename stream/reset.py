"""``meterwatch reset``: move an application's input position, keeping exactly-once.

An application (a group id and an input topic) resumes each input partition from its
**mark** on the state topic, not from the group's committed offset (``stream.checkpoint``),
so Kafka's own ``kafka-consumer-groups --reset-offsets`` is not enough. This command, run
while no member of the group is running:

1. checks the connection (the same fail-fast checks as ``meterwatch run``), that the input
   topic exists and that the group has no active member (a running member would overwrite
   the new position with its next commit);
2. finds the target offset of every input partition: the earliest, the latest (the fetch
   highwater: the embedded Tansu broker under-reports ListOffsets), or the first record at
   or after a time;
3. reads the application's current mark of each partition and keeps its output ends ``X``:
   recovery still reads every day score written since, so days already scored stay closed;
4. writes a new mark ``{offset: target, ends: X}`` per partition (with transactions, through
   the partition's transactional producer, which also fences any forgotten member) and
   commits the target offsets to the group.

Why exactly-once holds: household state and closed-day bitmaps are untouched. Replaying
earlier readings rebuilds the days that were open and drops the readings of days already
scored (late), so no day is scored twice and no alert is published twice; days not yet
scored are scored once. Moving forward (``--to-latest``) skips readings: days they belonged
to close incomplete or imputed, as with any gap.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from meterwatch.stream.config import Settings
from meterwatch.stream.errors import ConfigurationError
from meterwatch.stream.events import SCHEMA_VERSION
from meterwatch.stream.outputs import (
    OutputPublisher,
    json_record,
    mark_key,
    output_topics,
)
from meterwatch.stream.preflight import check_connection, check_files, input_partitions
from meterwatch.stream.recovery import read_to_end

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResetTarget:
    """Where to: ``"earliest"``, ``"latest"`` or a time (timezone-aware)."""

    kind: str
    at: dt.datetime | None = None

    @classmethod
    def parse(cls, earliest: bool, latest: bool, when: str | None) -> ResetTarget:
        if earliest:
            return cls("earliest")
        if latest:
            return cls("latest")
        assert when is not None
        try:
            at = dt.datetime.fromisoformat(when)
        except ValueError:
            raise ConfigurationError("--to-datetime", f"{when!r} is not an ISO 8601 time",
                                     "write it like 2013-01-01T00:00:00+00:00") from None
        if at.tzinfo is None:
            raise ConfigurationError("--to-datetime", f"{when!r} has no UTC offset",
                                     "add one, e.g. +00:00") from None
        return cls("datetime", at)


async def reset_application(settings: Settings, target: ResetTarget) -> dict[int, int]:
    """Steps 1-4; returns ``{partition: new offset}``."""
    s = settings
    # Step 1: connection, input topic, no active member
    check_files(s, service=False)
    await check_connection(s)
    admin = AIOKafkaAdminClient(**s.kafka_options())
    await admin.start()
    try:
        if s.input_topic not in set(await admin.list_topics()):
            raise ConfigurationError("--input-topic", f"topic {s.input_topic!r} does not "
                                     "exist", "give the application's input topic")
        if s.state_topic not in set(await admin.list_topics()):
            raise ConfigurationError("--state-topic", f"topic {s.state_topic!r} does not "
                                     "exist", "give the application's state topic")
        members = await _active_members(admin, s.group_id)
        if members:
            raise ConfigurationError(
                "--group-id", f"group {s.group_id!r} has {members} active member(s)",
                "stop every meterwatch run of this group first")
        n_partitions = await input_partitions(admin, s.input_topic)
    finally:
        await admin.close()
    consumer = AIOKafkaConsumer(**s.kafka_options(), group_id=s.group_id,
                                enable_auto_commit=False, isolation_level="read_committed")
    await consumer.start()
    try:
        parts = list(range(n_partitions))
        tps = [TopicPartition(s.input_topic, p) for p in parts]
        consumer.assign(tps)
        # Step 2: the target offsets
        offsets = await _targets(consumer, tps, target)
        # Step 3: the current marks (their output ends stay)
        state = await read_to_end(s, {(s.state_topic, p): 0 for p in parts})
        key = mark_key(s)
        ends: dict[int, dict[str, Any]] = {}
        for p in parts:
            for r in state[(s.state_topic, p)].records:
                if r.key == key and r.value is not None:
                    ends[p] = orjson.loads(r.value).get("ends", {})
        # Step 4: new marks, then the group's offsets
        publisher = OutputPublisher(s)
        await publisher.start()
        try:
            for p in parts:
                await publisher.open_partition(p)
            await publisher.send_all([json_record(s.state_topic, p, None, {
                "schema_version": SCHEMA_VERSION, "group_id": s.group_id,
                "input_topic": s.input_topic, "partition": p, "offset": offsets[p],
                "ends": ends.get(p, {t: 0 for t in output_topics(s)})},
                key_bytes=key) for p in parts])
        finally:
            await publisher.stop()
        await consumer.commit({tp: offsets[tp.partition] for tp in tps})
    finally:
        await consumer.stop()
    log.info("group %s, input %s: reset to %s", s.group_id, s.input_topic, offsets)
    return offsets


async def _active_members(admin: AIOKafkaAdminClient, group: str) -> int:
    try:
        responses = await admin.describe_consumer_groups([group])
    except Exception as exc:  # a broker without DescribeGroups: cannot check
        log.warning("could not check the group for active members (%r); make sure none "
                    "is running", exc)
        return 0
    n = 0
    for resp in responses:  # DescribeGroups v0-v3 name the fields "group" and "state"
        for g in resp.to_object().get("groups", []):
            if g.get("group") == group and g.get("state") not in ("Empty", "Dead"):
                n += len(g.get("members") or [])
    return n


async def _targets(consumer: AIOKafkaConsumer, tps: list[TopicPartition],
                   target: ResetTarget) -> dict[int, int]:
    if target.kind == "earliest":
        begin = await consumer.beginning_offsets(tps)
        return {tp.partition: int(o) for tp, o in begin.items()}
    if target.kind == "datetime":
        assert target.at is not None
        ms = int(target.at.timestamp() * 1000)
        found = await consumer.offsets_for_times({tp: ms for tp in tps})
        out = {}
        latest = None
        for tp in tps:
            ot = found.get(tp)
            if ot is None:  # nothing at or after that time: the end
                latest = latest or await _highwaters(consumer, tps)
                out[tp.partition] = latest[tp.partition]
            else:
                out[tp.partition] = int(ot.offset)
        return out
    return await _highwaters(consumer, tps)


async def _highwaters(consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> dict[int, int]:
    """Each partition's end from a fetch response's highwater (not ListOffsets, which the
    embedded Tansu broker under-reports)."""
    ends = await consumer.end_offsets(tps)
    out = {tp.partition: int(o) for tp, o in ends.items()}
    for tp in tps:
        consumer.seek(tp, max(0, out[tp.partition] - 1))
    for _ in range(20):
        await consumer.getmany(*tps, timeout_ms=200, max_records=1)
        hws = {tp: consumer.highwater(tp) for tp in tps}
        if all(h is not None for h in hws.values()):
            for tp, h in hws.items():
                out[tp.partition] = max(out[tp.partition], int(h or 0))
            break
    return out
