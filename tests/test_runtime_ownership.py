"""State owned by its application (issue 11, contract item 4), on a real broker, in-process.

Two applications — different group ids *and* different input topics — share the default
output and state topic names and the same household ids. Each must score every one of its
own days exactly once, however the other's marks, states and day scores interleave with its
own. Then ``meterwatch reset --to-earliest`` replays an application's whole input without
scoring a day twice.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from aiokafka import AIOKafkaConsumer

from meterwatch.model import SyntheticConfig, generate
from meterwatch.stream.broker import create_topics
from meterwatch.stream.config import Settings
from meterwatch.stream.errors import ConfigurationError
from meterwatch.stream.outputs import APP_HEADER, app_id, transactional_id
from meterwatch.stream.reset import ResetTarget, reset_application
from meterwatch.stream.service import Service
from meterwatch.stream.simulate import produce_synthetic
from tests.conftest import HISTORY_DAYS, assert_unique

pytestmark = pytest.mark.integration

HOUSEHOLDS = 20


def _app(broker, tag: str) -> Settings:  # type: ignore[no-untyped-def]
    """An application with its own group and input topic; every other topic has its
    default name (shared with every other application on the broker)."""
    return Settings(bootstrap_servers=broker.bootstrap_servers, group_id=f"app-{tag}",
                    input_topic=f"readings-{tag}", metrics_host="127.0.0.1", metrics_port=0,
                    scorer="thread", device="cpu")


async def _scores_of(settings: Settings, expected: int, timeout_s: float = 60) -> list[tuple]:
    """(household, date) of this application's day scores on the (shared) scores topic,
    read as a downstream read_committed consumer; waits for ``expected`` of them."""
    consumer = AIOKafkaConsumer(settings.scores_topic,
                                bootstrap_servers=settings.bootstrap_servers, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                isolation_level="read_committed")
    await consumer.start()
    out: list[tuple] = []
    me = app_id(settings)
    try:
        deadline = time.monotonic() + timeout_s
        quiet = time.monotonic()
        while time.monotonic() < deadline:
            data = await consumer.getmany(timeout_ms=300)
            for recs in data.values():
                for r in recs:
                    if (APP_HEADER, me) in [(k, bytes(v)) for k, v in r.headers]:
                        import orjson

                        doc = orjson.loads(r.value)
                        out.append((doc["household_id"], doc["date"]))
            if any(data.values()):
                quiet = time.monotonic()
            elif len(out) >= expected and time.monotonic() - quiet > 1.5:
                break
    finally:
        await consumer.stop()
    return out


async def _wait_scored(service: Service, n: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while service.metrics.registry.get_sample_value("meterwatch_days_scored_total") < n:
        assert time.monotonic() < deadline, "not all days scored in time"
        assert service.failed is None, service.failed
        await asyncio.sleep(0.2)


async def test_two_applications_share_default_topics_and_keep_their_own_state(
        broker, detector):
    tag = uuid.uuid4().hex[:6]
    a, b = _app(broker, f"a-{tag}"), _app(broker, f"b-{tag}")
    assert transactional_id(a, 3) == f"app-a-{tag}.readings-a-{tag}.3"
    await create_topics(broker.bootstrap_servers, {a.input_topic: 4, b.input_topic: 4})
    data = generate(SyntheticConfig(n_households=HOUSEHOLDS, n_days=HISTORY_DAYS + 2,
                                    anomaly_rate=0.0, seed=4))
    day1, day2 = range(HISTORY_DAYS, HISTORY_DAYS + 1), range(HISTORY_DAYS + 1, HISTORY_DAYS + 2)

    # A scores day 1 and stops (its marks and states land on the shared state topic)
    async with Service(a, detector=detector) as svc:
        await svc.wait_ready()
        await produce_synthetic(a.bootstrap_servers, a.input_topic, data, days=day1, seed=1)
        await _wait_scored(svc, HOUSEHOLDS)
    # B: same households, same days, its own input topic: nothing of A's may apply
    async with Service(b, detector=detector) as svc:
        await svc.wait_ready()
        await produce_synthetic(b.bootstrap_servers, b.input_topic, data,
                                days=range(HISTORY_DAYS, HISTORY_DAYS + 2), seed=2)
        await _wait_scored(svc, 2 * HOUSEHOLDS)
    # A again: resumes from its own mark, scores day 2 only
    async with Service(a, detector=detector) as svc:
        await svc.wait_ready()
        await produce_synthetic(a.bootstrap_servers, a.input_topic, data, days=day2, seed=3)
        await _wait_scored(svc, HOUSEHOLDS)
        # a reset while a member runs is refused before it writes anything (it used to
        # fence the running service with its transactional ids and crash it)
        with pytest.raises(ConfigurationError) as refused:
            await reset_application(a, ResetTarget.parse(True, False, None))
        assert str(refused.value).startswith(f"--group-id: group 'app-a-{tag}' has 1 active "
                                             "member(s)"), refused.value
        await asyncio.sleep(1.5)  # a replayed day 1 would be scored by now
        assert svc.metrics.registry.get_sample_value("meterwatch_days_scored_total") \
            == HOUSEHOLDS

    for settings in (a, b):
        keys = await _scores_of(settings, 2 * HOUSEHOLDS)
        assert_unique(keys)
        assert len(keys) == 2 * HOUSEHOLDS, (settings.group_id, len(keys))

    # reset A to the earliest offsets: its whole input is replayed, no day is scored twice
    offsets = await reset_application(a, ResetTarget.parse(True, False, None))
    assert set(offsets.values()) == {0}
    async with Service(a, detector=detector) as svc:
        await svc.wait_ready()
        deadline = time.monotonic() + 60
        total = 2 * HOUSEHOLDS * 48
        # every replayed reading belongs to a day already scored: dropped as late
        late = "meterwatch_late_readings_total"
        while svc.metrics.registry.get_sample_value(late) < total:
            assert time.monotonic() < deadline, "the input was not replayed"
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.5)
        assert svc.metrics.registry.get_sample_value("meterwatch_days_scored_total") == 0
        assert svc.metrics.registry.get_sample_value(late) == total
    keys = await _scores_of(a, 2 * HOUSEHOLDS)
    assert_unique(keys)
    assert len(keys) == 2 * HOUSEHOLDS
