"""A partition whose transactional id another process takes while the group still assigns it
to the service (a stale instance, an operator's tool): the service neither crashes nor stalls.

``meterwatch run`` (the real service process, default settings) streams 40 households; after
the first day another process opens a transactional producer with the transactional id of
each of the service's input partitions (``<group>.<input topic>.<p>``), which fences the
service's producers, and leaves a transaction open on each scores partition. Readings keep
coming. Right after the service took them back it does that again for one partition (an
intruder that persists).

Genuine Kafka (transactions): each fence is logged, counted in
``meterwatch_partitions_lost_total{reason="fenced"}``, and the partitions are taken back
(``meterwatch_partitions_retaken_total``) after 1 s, the second time after 2 s (the
backoff doubles), which fences the intruder and aborts its open transactions. (With every
partition fenced at once, a publish and a commit of one partition are sometimes both in
flight: the second one crashed the service with aiokafka's AssertionError, in 1 of 4 runs
of this test before the fix.) Tansu has
no transactional producers: the intruder cannot start there, and the plain producer is
unaffected. On both: the service keeps running, every household-day is scored exactly once
(no gap, no duplicate), the fenced partitions' later days are scored, and ``meterwatch run``
exits 0 on SIGTERM. Before the re-take, a fenced partition stayed paused for good.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import time
from collections import Counter

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from meterwatch.model import SyntheticConfig, generate
from meterwatch.stream.outputs import transactional_id
from meterwatch.stream.simulate import produce_synthetic
from tests.conftest import (
    HISTORY_DAYS,
    ServiceProcess,
    assert_unique,
    genuine_kafka,
    metric,
    read_topic,
    unique_settings,
    wait_until,
)

pytestmark = pytest.mark.integration

HOUSEHOLDS = 40
DAYS = 4
LOST = "meterwatch_partitions_lost_total"
RETAKEN = "meterwatch_partitions_retaken_total"


async def _intrude(settings, partition: int) -> str:  # type: ignore[no-untyped-def]
    """Open a transactional producer with the service's transactional id of ``partition``
    and leave a transaction open on that scores partition; the error where the broker has
    no transactions (its text), else ''."""
    intruder = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers,
                                transactional_id=transactional_id(settings, partition),
                                enable_idempotence=True, request_timeout_ms=10_000)
    try:
        await asyncio.wait_for(intruder.start(), 30)
    except (KafkaError, asyncio.TimeoutError) as exc:
        await intruder.stop()
        return repr(exc)
    try:
        await intruder.begin_transaction()
        await intruder.send_and_wait(settings.scores_topic, b'{"intruder": true}',
                                     partition=partition)
        # the transaction stays open: the service's re-take must abort it
    finally:
        await intruder.stop()
    return ""


def _dates(data, days: range) -> list[str]:  # type: ignore[no-untyped-def]
    return [(dt.date(1970, 1, 1) + dt.timedelta(days=int(data.days[d]))).isoformat()
            for d in days]


def test_fenced_partition_is_taken_back(broker, detector_path, tmp_path):  # type: ignore[no-untyped-def]
    settings = unique_settings(broker)
    data = generate(SyntheticConfig(n_households=HOUSEHOLDS, n_days=HISTORY_DAYS + DAYS,
                                    anomaly_rate=0.0, seed=31))
    days = range(HISTORY_DAYS, HISTORY_DAYS + DAYS)
    dates = _dates(data, days)
    log = tmp_path / "service.log"
    svc = ServiceProcess(settings, detector_path, log_path=log).start()
    kafka = genuine_kafka(broker)
    t0 = time.monotonic()

    def produce(d: int) -> None:
        asyncio.run(produce_synthetic(settings.bootstrap_servers, settings.input_topic, data,
                                      days=range(d, d + 1), seed=d))

    def scored() -> float:
        return metric(svc.port, "meterwatch_days_scored_total")

    try:
        svc.wait_ready(120)
        produce(days[0])
        wait_until(lambda: scored() >= HOUSEHOLDS, "the first day scored", service=svc)
        first = asyncio.run(read_topic(settings, settings.scores_topic,
                                       min_records=HOUSEHOLDS))
        # partitions with households (the others write nothing, so they never learn of a
        # fence); the one with the most is fenced a second time
        busy = Counter(s["_partition"] for s in first)
        fenced = busy.most_common(1)[0][0]
        rounds = [sorted(busy), [fenced]]
        for n, (d, victims) in enumerate(zip(days[1:3], rounds, strict=True), start=1):
            refused = [asyncio.run(_intrude(settings, p)) for p in victims]
            if kafka:
                assert refused == [""] * len(victims), refused
            else:  # Tansu answers InitProducerId with an error: no transactions to fence
                assert all(refused), "a transactional producer started without transactions"
            produce(d)  # its publishing or the next commit finds the producer fenced
            wait_until(lambda n=n: scored() >= HOUSEHOLDS * (n + 1), f"day {d} scored",
                       service=svc)
            if kafka:
                want = sum(len(r) for r in rounds[:n])
                wait_until(lambda want=want: metric(svc.port, RETAKEN) >= want,
                           f"intrusion {n} taken back", service=svc)
        for d in days[3:]:
            produce(d)
        wait_until(lambda: scored() >= HOUSEHOLDS * DAYS, "every day scored", service=svc)
        assert metric(svc.port, "meterwatch_partitions_assigned") == settings.topic_partitions
        lost = metric(svc.port, LOST, 'reason="fenced"')
        retaken = metric(svc.port, RETAKEN)
        scores = asyncio.run(read_topic(settings, settings.scores_topic,
                                        min_records=HOUSEHOLDS * DAYS))
        assert svc.proc is not None and svc.proc.poll() is None, "the service exited"
    finally:
        code = svc.terminate()
    wall = time.monotonic() - t0
    text = log.read_text()
    print(f"broker {broker.kind}: partitions {rounds}; lost {lost:.0f}, "
          f"taken back {retaken:.0f}; {len(scores)} scores; {wall:.1f} s")
    assert code == 0, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert not [s for s in scores if "intruder" in s], "the intruder's open transaction was read"
    keys = [(s["household_id"], s["date"]) for s in scores]
    assert_unique(keys)
    assert set(keys) == {(h, date) for h in data.household_ids for date in dates}, \
        f"{len(set(keys))} of {HOUSEHOLDS * DAYS} household-days scored"
    # the fenced partition resumed: its days after the fences are there, once
    after = Counter(s["date"] for s in scores if s["_partition"] == fenced)
    assert all(after[date] == after[dates[0]] > 0 for date in dates), after
    lines = [ln for ln in text.splitlines() if "lost (" in ln]
    if kafka:
        n_fences = len(rounds[0]) + len(rounds[1])
        assert lost == n_fences and retaken == n_fences, (lost, retaken, rounds)
        # one warning per fenced partition, naming it, the reason and the backoff (1 s; the
        # partition fenced again: 2 s), each in one line of the partitions fenced together
        found = [re.search(r"WARNING .*partitions \[([\d, ]+)\] lost \(.*fenced ours\)"
                           r".*taking them back in ([\d.]+) s", ln) for ln in lines]
        assert all(found), lines
        warned = [(int(p), m[2]) for m in found if m for p in m[1].split(", ")]
        assert sorted(warned) == sorted(
            [(p, "1.0") for p in rounds[0]] + [(fenced, "2.0")]), lines
        taken = [int(p) for ln in text.splitlines() if "taken back (" in ln
                 for p in re.search(r"partitions \[([\d, ]+)\] taken", ln)[1].split(", ")]
        assert sorted(taken) == sorted(rounds[0] + rounds[1]), taken
    else:  # the plain producer: nothing was fenced, nothing lost or taken back
        assert (lost, retaken) == (0, 0)
        assert lines == [], lines
