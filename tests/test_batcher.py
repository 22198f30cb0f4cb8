"""Dynamic batcher: size/delay triggers, adaptive target, offsets pinned until release."""

from __future__ import annotations

import asyncio

import numpy as np

from meterwatch.stream.assembler import ClosedDays
from meterwatch.stream.batcher import DynamicBatcher


def days(n: int, first_offset: int) -> ClosedDays:
    return ClosedDays(
        np.arange(n, dtype=np.int32), [f"H{i}" for i in range(n)], np.zeros(n, np.int32),
        np.zeros((n, 48), np.float32), np.zeros(n, np.uint8), np.full(n, 48, np.int16),
        np.full(n, 48, np.int16), np.full(n, first_offset, np.int64), np.zeros(n, np.int64),
        np.ones(n, np.int64))


def test_taken_days_pin_their_offsets_until_released():
    """A batch held by a task (waiting for a lock, being scored, cancelled) must keep the
    commit from passing its readings: the race the shutdown benchmark found."""
    b = DynamicBatcher(max_size=100, max_delay_s=0.01)
    b.put(0, days(3, 40))
    b.put(0, days(2, 70))
    batch = b.take(3)
    assert [len(p.days) for p in batch.items] == [3]
    assert b.backlog == 2
    assert b.min_offset(0) == 40  # taken, not released: still pinned
    b.release(batch.id)
    assert b.min_offset(0) == 70
    rest = b.take(100)
    b.release(rest.id)
    assert b.min_offset(0) is None and not b.take(10)


def test_batch_leaves_on_size_or_delay():
    async def run() -> None:
        b = DynamicBatcher(max_size=4, max_delay_s=0.05)
        b.put(1, days(6, 0))
        batch = await asyncio.wait_for(b.next_batch(), 1)  # target 1: leaves at once
        assert sum(len(p.days) for p in batch.items) == 4  # capped by max_size
        b.release(batch.id)
        b.target = 10  # a big target: the remaining 2 days leave after max_delay
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        batch = await asyncio.wait_for(b.next_batch(), 1)
        assert sum(len(p.days) for p in batch.items) == 2
        assert loop.time() - t0 >= 0.04

    asyncio.run(run())


def test_target_follows_arrivals():
    b = DynamicBatcher(max_size=1000, max_delay_s=0.01)
    for _ in range(5):
        b.put(0, days(50, 0))
    b.release(b.take(1000).id)
    assert b.target == 250


def test_a_batch_whose_publishing_fails_stays_pinned():
    """Only acknowledged outputs release a batch: a failed (or cancelled) publish leaves its
    days pinned, so the commit a stop makes next cannot pass them."""
    import pytest
    from aiokafka.errors import KafkaError

    from meterwatch.stream.config import Settings
    from meterwatch.stream.service import Service

    async def run() -> None:
        svc = Service(Settings(bootstrap_servers="127.0.0.1:9", metrics_port=0))
        svc.batcher.put(0, days(3, 40))
        taken = svc.batcher.take(10)

        async def broker_gone(records: object) -> None:
            raise KafkaError("broker gone")

        svc.publisher.send_all = broker_gone  # type: ignore[method-assign]
        with pytest.raises(KafkaError):
            await svc._publish(taken, [[], []], [[], []], {})
        assert svc.batcher.min_offset(0) == 40

        async def acknowledged(records: object) -> None:
            return None

        svc.publisher.send_all = acknowledged  # type: ignore[method-assign]
        await svc._publish(taken, [[], []], [[], []], {})
        assert svc.batcher.min_offset(0) is None

    asyncio.run(run())


def test_households_with_days_in_flight_are_reported_until_released():
    """The assembler must not evict (and reuse the index of) a household whose days are
    queued or being scored: the batcher says which they are."""
    b = DynamicBatcher(max_size=100, max_delay_s=0.01)
    b.put(0, days(3, 40))
    b.put(1, days(5, 10))
    assert b.households(0) == {0, 1, 2} and b.households(1) == {0, 1, 2, 3, 4}
    batch = b.take(3)
    assert b.households(0) == {0, 1, 2}  # taken, not released
    b.release(batch.id)
    assert b.households(0) == set() and b.households(2) == set()
