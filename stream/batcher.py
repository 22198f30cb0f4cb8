"""Dynamic batching of closed household-days for the model.

A batch leaves when it reaches the current target size or when its oldest day has waited
``max_delay``. The target adapts to load: it follows the number of days that arrive while one
batch is being scored (so a busy stream gets big batches and a quiet one gets small,
low-latency ones), and it is capped by ``max_size`` and by the memory cap that the scorer
measures. The queue is bounded: ``backlog`` is what the consumer compares with
``queue_max_days`` to pause its partitions.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from meterwatch.stream.assembler import ClosedDays


@dataclass
class Pending:
    """Closed days of one partition waiting for the model."""

    partition: int
    days: ClosedDays
    enqueued: float  # time.monotonic()
    owner: object = None  # the partition state the days came from (stale after a revoke)


@dataclass
class Batch:
    """Chunks taken together; they pin their offsets until ``release(batch.id)``."""

    id: int
    items: list[Pending] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.items)


class DynamicBatcher:
    """Collects ``Pending`` chunks into batches (see the module docstring)."""

    def __init__(self, *, max_size: int, max_delay_s: float, min_size: int = 1) -> None:
        self.max_size = max_size
        self.max_delay_s = max_delay_s
        self.min_size = min_size
        self.target = min_size
        self.cap = max_size  # lowered by the scorer on memory pressure
        self._queue: deque[Pending] = deque()
        self._backlog = 0
        self._arrived_since_take = 0
        self._event = asyncio.Event()
        self._taken: dict[int, list[Pending]] = {}  # batch id -> chunks not yet released
        self._ids = itertools.count()

    @property
    def backlog(self) -> int:
        return self._backlog

    def put(self, partition: int, days: ClosedDays, owner: object = None) -> None:
        if len(days) == 0:
            return
        self._queue.append(Pending(partition, days, time.monotonic(), owner))
        self._backlog += len(days)
        self._arrived_since_take += len(days)
        self._event.set()

    def pending_partitions(self) -> set[int]:
        return {p.partition for p in self._queue}

    def min_offset(self, partition: int) -> int | None:
        """Lowest offset needed by days of ``partition`` queued or taken but not released."""
        chunks = itertools.chain(self._queue, *self._taken.values())
        offs = [int(p.days.first_offset.min()) for p in chunks if p.partition == partition]
        return min(offs) if offs else None

    def households(self, partition: int) -> set[int]:
        """Household indices of ``partition`` with days queued or taken but not released
        (the assembler must not evict them)."""
        chunks = itertools.chain(self._queue, *self._taken.values())
        out: set[int] = set()
        for p in chunks:
            if p.partition == partition:
                out.update(p.days.household_index.tolist())
        return out

    def release(self, batch_id: int) -> None:
        """The batch's outputs are acknowledged (or it was abandoned to a replay)."""
        self._taken.pop(batch_id, None)

    async def next_batch(self) -> Batch:
        """Wait for the next batch (never empty)."""
        while True:
            if not self._queue:
                self._event.clear()
                await self._event.wait()
                continue
            limit = min(self.target, self.cap)
            wait = self._queue[0].enqueued + self.max_delay_s - time.monotonic()
            if self._backlog >= limit or wait <= 0:
                return self.take(min(self.max_size, self.cap))
            self._event.clear()
            try:
                await asyncio.wait_for(self._event.wait(), timeout=wait)
            except asyncio.TimeoutError:
                pass

    def take(self, limit: int, partitions: set[int] | None = None) -> Batch:
        """Up to ``limit`` days from the head of the queue (whole chunks, split if needed).

        The days stay pinned (``min_offset``) until ``release``: a batch held by a task that
        is cancelled before publishing never lets a commit pass its readings.
        """
        out: list[Pending] = []
        n = 0
        keep: deque[Pending] = deque()
        while self._queue and n < limit:
            p = self._queue.popleft()
            if partitions is not None and p.partition not in partitions:
                keep.append(p)
                continue
            room = limit - n
            if len(p.days) > room:
                first = np.arange(len(p.days)) < room
                head, tail = p.days.select(first), p.days.select(~first)
                self._queue.appendleft(Pending(p.partition, tail, p.enqueued, p.owner))
                p = Pending(p.partition, head, p.enqueued, p.owner)
            out.append(p)
            n += len(p.days)
        self._queue.extendleft(reversed(keep))
        self._backlog -= n
        # adapt: next target ~ what arrived while the last batch was being formed and scored
        arrived = self._arrived_since_take
        self._arrived_since_take = 0
        self.target = max(self.min_size, min(self.max_size, self.cap, arrived))
        batch = Batch(next(self._ids), out)
        if out:
            self._taken[batch.id] = out
        return batch

    def drop(self, partitions: set[int]) -> int:
        """Forget the pending days of revoked partitions; returns how many."""
        for bid, chunks in list(self._taken.items()):
            self._taken[bid] = [p for p in chunks if p.partition not in partitions]
        kept = deque(p for p in self._queue if p.partition not in partitions)
        dropped = self._backlog - sum(len(p.days) for p in kept)
        self._queue = kept
        self._backlog -= dropped
        return dropped

