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
  not gather them within ``--fetch-max-wait-ms``) wait longer from then on, doubling up to
  ``MAX_FETCH_WAIT_MS`` (``Source.fetch``).

Records are aiokafka's decoded records where ``stream.consumer.raw_records`` takes effect
(the one seam onto aiokafka's internals), ``ConsumerRecord`` objects otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import InvalidSessionTimeoutError

from meterwatch.stream.config import Settings
from meterwatch.stream.consumer import raw_records, set_fetch_wait
from meterwatch.stream.preflight import session_timeout_error

log = logging.getLogger(__name__)

Handler = Callable[[set[int]], Awaitable[None]]

#: The longest wait the starved-fetch rule gives a fetch (far below the consumer's request
#: timeout, 40 s, which a waiting fetch must stay under), and the first wait it raises to.
MAX_FETCH_WAIT_MS = 5_000
RAISED_FETCH_WAIT_MS = 100
#: How long fetches must have come back empty, with records waiting, before the wait is
#: raised (at least twice the current wait, so that a raised wait gets two tries).
STARVED_S = 1.0


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
        #: the fetch wait in force: the setting, or raised by ``_starved``
        self.fetch_wait_ms = settings.fetch_max_wait_ms
        self._starved_since: float | None = None

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
        assert self.consumer is not None
        try:
            data = await self.consumer.getmany(timeout_ms=timeout_ms,
                                               max_records=self.settings.fetch_max_records)
        except InvalidSessionTimeoutError:
            raise session_timeout_error(self.settings) from None
        if any(data.values()):
            self._starved_since = None
        elif self.fetch_wait_ms < MAX_FETCH_WAIT_MS:
            await self._starved()
        return data

    async def _starved(self) -> None:
        """An empty fetch: when fetches have come back empty for a while although records
        wait past the position of a partition that is fetched (not paused), the broker did
        not gather them within the wait. The embedded Tansu answers so once its in-memory
        log is large (its fetch scans it: in a half-hour soak at 6,000 readings/s, from
        about 250,000 records a partition no 25 ms fetch brought anything, and the service
        stood still with its lag growing; with a wait of 0, no fetch ever did). The wait is
        doubled (from ``RAISED_FETCH_WAIT_MS`` up to ``MAX_FETCH_WAIT_MS``) and stays so:
        going back would starve again at the next records (Tansu's scan only grows), and
        the cost of a longer wait is latency on a partition with nothing new, on a broker
        that does not wake a waiting fetch. On Kafka the same signs come from an open
        transaction of a producer, which holds ``read_committed`` consumers at the last
        stable offset until it ends: a longer wait costs nothing there (a waiting fetch
        returns as soon as records come), and the warning says what is happening. The
        first raise and the raise to the cap are warnings, the others information."""
        consumer = self.consumer
        assert consumer is not None
        now = time.monotonic()
        if self._starved_since is None:
            self._starved_since = now
        if now - self._starved_since < max(STARVED_S, 2 * self.fetch_wait_ms / 1000):
            return
        waiting: dict[int, int] = {}
        fetched = sorted(self.assignment() - consumer.paused())
        ends = {tp: consumer.highwater(tp) for tp in fetched}
        unknown = [tp for tp, hw in ends.items() if hw is None]
        if unknown:  # no fetch response has carried one yet (Tansu's, to a wait of 0)
            with contextlib.suppress(Exception):
                ends.update(await asyncio.wait_for(consumer.end_offsets(unknown), 5.0))
        for tp, hw in ends.items():
            if hw is None:
                continue
            try:
                pos = await asyncio.wait_for(consumer.position(tp), 1.0)
            except Exception:  # revoked meanwhile, a reset pending, a timeout
                continue
            if hw > pos:
                waiting[tp.partition] = hw - pos
        if not waiting:
            self._starved_since = None
            return
        old = self.fetch_wait_ms
        new = min(max(2 * old, RAISED_FETCH_WAIT_MS), MAX_FETCH_WAIT_MS)
        parts = ", ".join(str(p) for p in list(waiting)[:8]) + (", ..." * (len(waiting) > 8))
        if not self._set_wait(new):
            self.fetch_wait_ms = MAX_FETCH_WAIT_MS  # do not try again
            log.warning("input: fetches bring no records although %s wait on partitions %s, "
                        "and this aiokafka's fetch wait cannot be raised; raise "
                        "--fetch-max-wait-ms", f"{sum(waiting.values()):,}", parts)
            return
        self._starved_since = now
        first = old == self.settings.fetch_max_wait_ms
        (log.warning if first or new == MAX_FETCH_WAIT_MS else log.info)(
            "input: fetches bring no records although %s wait on partitions %s: the broker "
            "did not gather them within %d ms; fetches now wait up to %d ms (the embedded "
            "Tansu's in-memory log slows its fetches as it grows; on Kafka, a producer's "
            "open transaction holds read_committed consumers back until it ends)",
            f"{sum(waiting.values()):,}", parts, old, new)

    def _set_wait(self, wait_ms: int) -> bool:
        assert self.consumer is not None
        if not set_fetch_wait(self.consumer, wait_ms):
            return False
        self.fetch_wait_ms = wait_ms
        return True

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
