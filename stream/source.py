"""The source: the input topic's group consumer, its rebalance listener, pause and resume.

What it guarantees to the application (``stream.service``):

- records are fetched only for partitions the application has taken on: an assigned
  partition is paused until ``on_assigned`` (recovery) returns, and a record of a partition
  the application does not hold is never dropped, the position is rewound to it;
- ``on_revoked`` runs before the group moves on (aiokafka awaits the listener);
- pausing is by reason: a partition is fetched only when neither backpressure nor a loss
  (``lose``) holds it; a loss ends when the group assigns the partition again or the
  application takes it back (``retake``);
- a session timeout the broker refuses is a ``ConfigurationError``, not a retry;
- fetches that keep coming back empty while records wait past the position (the broker did
  not gather them within ``--fetch-max-wait-ms``) wait longer from then on
  (``stream.consumer.StarvedFetches``).

Records are aiokafka's decoded records where ``stream.consumer.raw_records`` takes effect
(the one seam onto aiokafka's internals), ``ConsumerRecord`` objects otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import InvalidSessionTimeoutError

from meterwatch.stream.config import Settings
from meterwatch.stream.consumer import StarvedFetches, raw_records
from meterwatch.stream.preflight import session_timeout_error

log = logging.getLogger(__name__)

Handler = Callable[[set[int]], Awaitable[None]]


class Source:
    """``start``/``stop`` (or ``async with``); ``stop`` is safe twice and after a failed
    ``start``. ``on_revoked``/``on_assigned`` get input partition numbers."""

    def __init__(self, settings: Settings, *, on_revoked: Handler,
                 on_assigned: Handler) -> None:
        self.settings = settings
        self.on_revoked = on_revoked
        self.on_assigned = on_assigned
        self.consumer: AIOKafkaConsumer | None = None
        self.backpressure = False
        self.stopping = False
        self._held: set[int] = set()  # partitions held back until assigned again
        self._starved: StarvedFetches | None = None

    async def __aenter__(self) -> Source:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        s = self.settings
        consumer = AIOKafkaConsumer(
            **s.kafka_options(), group_id=s.group_id, enable_auto_commit=False,
            auto_offset_reset="earliest", max_poll_records=s.fetch_max_records,
            fetch_max_wait_ms=s.fetch_max_wait_ms,
            fetch_max_bytes=64 << 20, max_partition_fetch_bytes=16 << 20,
            isolation_level="read_committed", session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=max(500, s.session_timeout_ms // 4),
            max_poll_interval_ms=300_000,
            # how soon the group sees partitions added to the input (a rebalance follows):
            # aiokafka's default, 5 minutes, left the new partitions unread that long
            metadata_max_age_ms=60_000)
        self.consumer = consumer
        await consumer.start()
        raw_records(consumer)
        self._starved = StarvedFetches(consumer, s.fetch_max_wait_ms, "input")
        consumer.subscribe([s.input_topic], listener=_Listener(self))

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Leave the group (the listener's ``on_revoked`` runs for what is still held; an
        assignment that completes meanwhile is not taken on)."""
        consumer = self.consumer
        if consumer is None or self.stopping:
            return
        self.stopping = True
        try:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(consumer.stop(), timeout_s)
        finally:
            self.consumer = None
            self.stopping = False

    async def fetch(self, timeout_ms: int = 200) -> dict[TopicPartition, list[Any]]:
        consumer = self.consumer
        assert consumer is not None
        try:
            data = await consumer.getmany(timeout_ms=timeout_ms,
                                          max_records=self.settings.fetch_max_records)
        except InvalidSessionTimeoutError:
            raise session_timeout_error(self.settings) from None
        if self._starved is not None and self.consumer is consumer:  # not stopped meanwhile
            await self._starved.after(data)
        return data

    @property
    def fetch_wait_ms(self) -> int:
        """The fetch wait in force: ``--fetch-max-wait-ms``, or raised by the starved-fetch
        rule (``stream.consumer.StarvedFetches``)."""
        if self._starved is None:
            return self.settings.fetch_max_wait_ms
        return self._starved.fetch_wait_ms

    def rewind(self, tp: TopicPartition, offset: int) -> None:
        """Fetched records that nobody took: fetch them again later (never dropped)."""
        assert self.consumer is not None
        with contextlib.suppress(Exception):
            self.consumer.seek(tp, offset)

    def assignment(self) -> set[TopicPartition]:
        return set(self.consumer.assignment()) if self.consumer is not None else set()

    def lose(self, partitions: set[int]) -> None:
        """Fetch nothing more for ``partitions`` until the group assigns them again."""
        self._held |= partitions
        self._apply()

    def retake(self, partitions: set[int]) -> None:
        """Fetch ``partitions`` again: lost to a fence while still assigned here, and
        recovered since (``stream.service``)."""
        self._held -= partitions
        self._apply()

    def set_backpressure(self, on: bool) -> None:
        if on != self.backpressure:
            self.backpressure = on
            self._apply()

    def _apply(self, only: set[TopicPartition] | None = None) -> None:
        if self.consumer is None:
            return
        tps = only if only is not None else self.assignment()
        paused = {tp for tp in tps if self.backpressure or tp.partition in self._held}
        if paused:
            self.consumer.pause(*paused)
        if tps - paused:
            self.consumer.resume(*(tps - paused))


class _Listener(ConsumerRebalanceListener):
    def __init__(self, source: Source) -> None:
        self.source = source

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.source.on_revoked({tp.partition for tp in revoked})

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        src = self.source
        if src.consumer is None or src.stopping:
            return  # leaving the group: not taken on
        # Nothing is fetched for a partition until its state is rebuilt and it is positioned.
        src.consumer.pause(*assigned)
        src._held -= {tp.partition for tp in assigned}
        held = {tp.partition for tp in assigned}
        try:
            await src.on_assigned(held)
        finally:
            src._apply(set(assigned))
