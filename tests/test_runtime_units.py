"""Unit tests of the runtime's pure parts: keys that carry their application, the paranoid
offset check, the reset target parser, the one-line configuration error, the scorer's
restart budget (a real scorer process; no broker)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import numpy as np
import pytest

from meterwatch.stream.assembler import DayAssembler
from meterwatch.stream.batcher import DynamicBatcher
from meterwatch.stream.checkpoint import Checkpoint, CheckpointError, PartitionWork
from meterwatch.stream.config import Settings
from meterwatch.stream.errors import ConfigurationError
from meterwatch.stream.metrics import create_metrics
from meterwatch.stream.outputs import (
    OutputPublisher,
    app_id,
    mark_key,
    parse_state_key,
    state_key,
    transactional_id,
)
from meterwatch.stream.reset import ResetTarget
from meterwatch.stream.scorer import Scorer, ScorerFailed
from meterwatch.stream.timegrid import TimeGrid


def _settings(group: str = "g", topic: str = "t") -> Settings:
    return Settings(group_id=group, input_topic=topic)


def test_state_keys_belong_to_one_application() -> None:
    a, b, c = _settings("g", "t"), _settings("other", "t"), _settings("g", "other")
    key = state_key(a, "MAC000002")
    assert parse_state_key(a, key) == "MAC000002"
    assert parse_state_key(b, key) is None and parse_state_key(c, key) is None
    assert parse_state_key(a, mark_key(a)) is None  # a mark is not a household
    assert parse_state_key(a, b"MAC000002") is None  # a key of the previous version
    assert parse_state_key(a, b'["state",') is None  # garbage
    # a household id that looks like a separator cannot alias another application
    tricky = _settings("g.t", "x")
    assert parse_state_key(a, state_key(tricky, "h")) is None
    assert mark_key(a) != mark_key(b) != mark_key(c)
    assert app_id(a) == b'["g","t"]'
    assert transactional_id(a, 7) == "g.t.7"


def test_committed_offsets_never_go_backwards() -> None:
    s = _settings()
    batcher = DynamicBatcher(max_size=10, max_delay_s=0.01)
    cp = Checkpoint(s, OutputPublisher(s), batcher, create_metrics())
    work = PartitionWork(0, DayAssembler(TimeGrid("UTC")), position=120, committed=100)
    assert cp.safe_offset(work) == 120
    work.position = 90  # a bug elsewhere moved the position behind the committed offset
    with pytest.raises(CheckpointError, match="behind the committed 100"):
        cp.safe_offset(work)


def test_reset_targets() -> None:
    assert ResetTarget.parse(True, False, None).kind == "earliest"
    assert ResetTarget.parse(False, True, None).kind == "latest"
    t = ResetTarget.parse(False, False, "2013-03-01T00:00:00+00:00")
    assert t.kind == "datetime" and t.at is not None and t.at.utcoffset() is not None
    with pytest.raises(ConfigurationError, match=r"^--to-datetime: .*; add one"):
        ResetTarget.parse(False, False, "2013-03-01T00:00:00")
    with pytest.raises(ConfigurationError, match=r"^--to-datetime: "):
        ResetTarget.parse(False, False, "yesterday")


def test_configuration_error_is_one_line_naming_the_flag() -> None:
    err = ConfigurationError("--input-topic", "topic 'x' does not exist", "create it")
    assert str(err) == "--input-topic: topic 'x' does not exist; create it"
    assert isinstance(err, ValueError) and "\n" not in str(err)


async def test_killed_scorer_process_is_restarted_within_budget_then_fails(detector):  # type: ignore[no-untyped-def]
    """A real scorer process, SIGKILLed: down within the supervision interval, restarted
    (``max_restarts`` = 1), and the second death is fatal."""
    events: list[tuple[bool, bool]] = []
    scorer = Scorer(detector, process=True, device="cpu", max_restarts=1,
                    restart_window_s=60,
                    on_change=lambda up, restarted: events.append((up, restarted)))
    async with scorer:
        assert scorer.up and scorer.alive()
        supervisor = asyncio.create_task(scorer.supervise(0.05))
        first = scorer._pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        t0 = time.monotonic()
        while (False, False) not in events:
            await asyncio.sleep(0.01)
            assert time.monotonic() - t0 < 1.0, "the death went unnoticed for 1 s"
        while not scorer.up:
            assert time.monotonic() - t0 < 60, "not restarted"
            await asyncio.sleep(0.05)
        assert events[-1] == (True, True) and scorer._pid != first and scorer.alive()
        assert scorer._pid is not None
        os.kill(scorer._pid, signal.SIGKILL)
        with pytest.raises(ScorerFailed, match="died 2 times"):
            await asyncio.wait_for(supervisor, 10)
        assert not scorer.up
    await scorer.stop()  # safe twice


np.seterr(all="ignore")


def test_retaking_a_fenced_partition_backs_off() -> None:
    """A partition fenced outside a rebalance is taken back after 1 s, then 2, 4, 8 s while
    the fences go on, at most --broker-retry-max-s; 120 s without a fence starts again at
    1 s; each partition counts its own fences (docs/runtime.md)."""
    from meterwatch.stream.service import Service

    svc = Service(Settings(group_id="g", input_topic="t", broker_retry_max_s=10.0))
    assert [svc._retake_delay(3, t) for t in (0.0, 1.0, 3.0, 7.0, 15.0, 25.0, 35.0)] \
        == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    assert svc._retake_delay(5, 36.0) == 1.0
    assert svc._retake_delay(3, 35.0 + 119.0) == 10.0
    assert svc._retake_delay(3, 154.0 + 121.0) == 1.0
