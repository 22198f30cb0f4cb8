"""Messy field input through the real broker, each with its documented outcome.

Europe/London days 2013-10-25 .. 2013-10-29 (27 October has 50 half-hours):

* H0 sends every reading twice          -> 5 days scored once, duplicates counted
* H1 is clean (shuffled within days)     -> 5 days scored, the DST day with 50 readings
* H2 stops reporting at 12:00 on the DST day -> 2 days scored, the DST day reported
  incomplete (data-quality topic, score null), nothing after
* H3 misses 2 half-hours on 26 October   -> that day is closed by the watermark and scored
  with the 2 slots imputed (status "imputed", listed in missing_slots)
* afterwards, readings for H0's first day again -> dropped and counted as late
"""

from __future__ import annotations

import asyncio
import datetime as dt

import numpy as np
import pytest
from aiokafka import AIOKafkaProducer

from meterwatch.model import SyntheticData
from meterwatch.stream.broker import create_topics
from meterwatch.stream.outputs import parse_state_key
from meterwatch.stream.service import Service
from meterwatch.stream.simulate import reading_json
from meterwatch.stream.timegrid import TimeGrid
from tests.conftest import HISTORY_DAYS, read_topic, unique_settings

pytestmark = pytest.mark.integration

TZ = "Europe/London"
DATES = [dt.date(2013, 10, 25) + dt.timedelta(days=i) for i in range(5)]
DST = dt.date(2013, 10, 27)


def _day(d: dt.date) -> int:
    return (d - dt.date(1970, 1, 1)).days


def _readings(hid: str, date: dt.date, grid: TimeGrid, scale: float) -> list[tuple[int, float]]:
    start, end = grid.bounds(_day(date))
    out = []
    for ts in range(start, end, 1800):
        local = dt.datetime.fromtimestamp(ts, dt.timezone.utc).astimezone(grid._tz)
        hour = local.hour + local.minute / 60
        kwh = scale * (0.2 + 0.3 * np.exp(-((hour - 8) ** 2) / 2) + 0.6 * np.exp(
            -((hour - 19) ** 2) / 3))
        out.append((ts, round(float(kwh), 4)))
    return out


async def test_messy_input_has_documented_outcomes(broker, detector):
    settings = unique_settings(broker, timezone=TZ, topic_partitions=2, grace_s=3600,
                               max_imputed_slots=4)
    grid = TimeGrid(TZ)
    rng = np.random.default_rng(0)
    records: list[tuple[str, bytes]] = []
    for date in DATES:
        day_recs = []
        for h, hid in enumerate(["H0", "H1", "H2", "H3"]):
            for ts, kwh in _readings(hid, date, grid, scale=1 + 0.3 * h):
                local = dt.datetime.fromtimestamp(ts, dt.timezone.utc).astimezone(grid._tz)
                if hid == "H2" and (date > DST or (date == DST and local.hour >= 12)):
                    continue  # stopped reporting
                if hid == "H3" and date == DATES[1] and local.hour == 3:
                    continue  # two half-hours never arrive
                day_recs.append((hid, reading_json(hid, ts, kwh)))
                if hid == "H0":
                    day_recs.append((hid, reading_json(hid, ts, kwh)))  # duplicate
        rng.shuffle(day_recs)
        records.extend(day_recs)

    async with Service(settings, detector=detector) as service:
        await service.wait_ready()
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, linger_ms=5)
        await producer.start()
        try:
            futures = [await producer.send(settings.input_topic, v, key=k.encode())
                       for k, v in records]
            await asyncio.gather(*futures)
            scores = await read_topic(settings, settings.scores_topic, min_records=18,
                                      timeout_s=60)
            # late: H0's first day again, after it was scored
            late = [reading_json("H0", ts, kwh) for ts, kwh in
                    _readings("H0", DATES[0], grid, 1.0)[:5]]
            await asyncio.gather(*[await producer.send(settings.input_topic, v, key=b"H0")
                                   for v in late])
        finally:
            await producer.stop()
        dq = await read_topic(settings, settings.data_quality_topic, min_records=2)
        await asyncio.sleep(1.0)
        m = service.metrics.registry.get_sample_value
        duplicates = m("meterwatch_duplicate_readings_total")
        late_count = m("meterwatch_late_readings_total")
        scores = await read_topic(settings, settings.scores_topic, min_records=18)

    by = {(s["household_id"], s["date"]): s for s in scores}
    assert len(by) == len(scores) == 18, sorted(by)
    for hid in ("H0", "H1"):
        for date in DATES:
            s = by[(hid, date.isoformat())]
            assert s["status"] == "scored" and s["score"] is not None
            assert s["readings"] == s["expected_readings"] == (50 if date == DST else 48)
    assert [by[("H2", d.isoformat())]["status"] for d in DATES[:3]] == \
        ["scored", "scored", "incomplete"]
    h2 = by[("H2", DST.isoformat())]
    assert h2["score"] is None and h2["readings"] == 26 and h2["expected_readings"] == 50
    assert ("H2", DATES[3].isoformat()) not in by
    h3 = by[("H3", DATES[1].isoformat())]
    assert h3["status"] == "imputed" and h3["missing_slots"] == [6, 7]
    assert h3["score"] is not None
    kinds = {(d["household_id"], d["date"]): d["kind"] for d in dq}
    assert kinds == {("H2", DST.isoformat()): "incomplete_day",
                     ("H3", DATES[1].isoformat()): "imputed_day"}
    assert duplicates == 48 * 4 + 50
    assert late_count == 5


# -- issue 15 item 2: scores and state do not depend on batching ---------------------------
ORDER_HOUSEHOLDS, ORDER_DAYS = 16, 5


def _household_day(data: SyntheticData, h: int, d: int) -> list[bytes]:
    hid = data.household_ids[h]
    day = int(data.days[HISTORY_DAYS + d])
    return [reading_json(hid, day * 86400 + s * 1800, float(data.kwh[h, HISTORY_DAYS + d, s]))
            for s in range(48)]


def _array_record(readings: list[bytes]) -> bytes:
    return b"[" + b",".join(readings) + b"]"


async def _stream(broker, detector, data: SyntheticData, mode: str):  # type: ignore[no-untyped-def]
    """Stream the same household-days in one of several batchings; the day scores and the
    final household states (state topic) it gave."""
    # every day is complete, so the grace only decides lateness: two days let a household
    # upload days 3 and 4 in one record after other households have moved on (with one hour,
    # its day 3 would be more than the grace behind the partition's watermark: late)
    settings = unique_settings(broker, topic_partitions=2, scorer="thread", grace_s=2 * 86400)
    rng = np.random.default_rng(5)
    hids = data.household_ids[:ORDER_HOUSEHOLDS]
    n = ORDER_HOUSEHOLDS

    def day_records(d: int) -> list[tuple[str, bytes]]:
        recs = [(hids[h], r) for h in range(n) for r in _household_day(data, h, d)]
        if mode == "shuffled":
            recs = [recs[i] for i in rng.permutation(len(recs))]
        return recs

    # one step per producer burst; "bulk" and "shuffled" produce everything before the
    # service starts (fetches then hold several days), the others wait for each day's scores
    if mode == "days 3+4 in one record":
        steps = [day_records(0), day_records(1),
                 [(hids[h], _array_record(_household_day(data, h, 2) + _household_day(data, h, 3)))
                  for h in range(n)], day_records(4)]
        expect = [n, 2 * n, 4 * n, 5 * n]
    elif mode == "days 3+4 in one burst":
        steps = [day_records(0), day_records(1), day_records(2) + day_records(3), day_records(4)]
        expect = [n, 2 * n, 4 * n, 5 * n]
    else:
        steps = [day_records(d) for d in range(ORDER_DAYS)]
        expect = [n * (d + 1) for d in range(ORDER_DAYS)]
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, linger_ms=5,
                                max_request_size=8 << 20)
    await producer.start()

    async def produce(recs: list[tuple[str, bytes]]) -> None:
        await asyncio.gather(*[await producer.send(settings.input_topic, v, key=k.encode())
                               for k, v in recs])

    try:
        if mode in ("bulk", "shuffled"):
            await create_topics(settings.bootstrap_servers, {settings.input_topic: 2})
            await produce([r for step in steps for r in step])
        async with Service(settings, detector=detector) as service:
            await service.wait_ready()
            if mode in ("bulk", "shuffled"):
                await read_topic(settings, settings.scores_topic, min_records=n * ORDER_DAYS,
                                 timeout_s=60)
            else:
                for step, count in zip(steps, expect, strict=True):
                    await produce(step)
                    await read_topic(settings, settings.scores_topic, min_records=count,
                                     timeout_s=60)
    finally:
        await producer.stop()
    scores = await read_topic(settings, settings.scores_topic, min_records=n * ORDER_DAYS)
    state = {}
    for r in await read_topic(settings, settings.state_topic):
        household = parse_state_key(settings, r["_key"].encode())
        if household is not None:  # not a mark
            state[household] = r  # the newest record of each household wins
    return scores, state


async def test_scores_and_state_do_not_depend_on_batching(broker, detector, synthetic):
    # the five streams are independent (topics, group and service of their own): they run
    # side by side, each still in its own order (its waits overlap, nothing else changes)
    modes = ("one day at a time", "bulk", "shuffled", "days 3+4 in one burst",
             "days 3+4 in one record")
    async with asyncio.TaskGroup() as group:  # one failing stops the others
        tasks = {mode: group.create_task(_stream(broker, detector, synthetic, mode))
                 for mode in modes}
    runs = {mode: task.result() for mode, task in tasks.items()}
    ref_scores, ref_state = runs["one day at a time"]
    assert len(ref_scores) == ORDER_HOUSEHOLDS * ORDER_DAYS
    for h in synthetic.household_ids[:ORDER_HOUSEHOLDS]:  # seq follows the calendar
        mine = sorted((s["date"], s["seq"]) for s in ref_scores if s["household_id"] == h)
        assert [q for _, q in mine] == list(range(1, ORDER_DAYS + 1))

    def by_day(scores: list[dict]) -> dict[tuple[str, str], dict]:
        return {(s["household_id"], s["date"]): s for s in scores}

    ref = by_day(ref_scores)
    for mode, (scores, state) in runs.items():
        got = by_day(scores)
        assert len(got) == len(scores) == len(ref), mode
        for key, s in ref.items():
            g = got[key]
            assert (g["status"], g["seq"], g["is_alert"]) == (s["status"], s["seq"],
                                                              s["is_alert"]), (mode, key)
            if s["score"] is not None:
                assert g["score"] == pytest.approx(s["score"], rel=1e-4, abs=1e-5), (mode, key)
            for k, v in s["state"].items():
                assert g["state"][k] == pytest.approx(v, rel=1e-4, abs=1e-5, nan_ok=True), \
                    (mode, key, k)
        assert set(state) == set(ref_state), mode
        for hid, doc in ref_state.items():
            assert state[hid]["seq"] == doc["seq"] == ORDER_DAYS, (mode, hid)
            assert state[hid]["closed_max"] == doc["closed_max"], (mode, hid)
            for k, v in doc.items():
                if k.startswith("_") or k in ("seq", "closed_max"):
                    continue
                assert np.allclose(np.array(state[hid][k], dtype=float), np.array(v, dtype=float),
                                   rtol=1e-3, atol=1e-4, equal_nan=True), (mode, hid, k)


async def test_readings_dated_today_do_not_poison_the_watermark(broker, detector, synthetic):
    """Issue 15 item 6: in the middle of a stream of 2013 days, one household's reading
    dated today and 200 one-reading households dated today: no valid reading is dropped,
    every day is scored."""
    import time as _time

    settings = unique_settings(broker, topic_partitions=2, scorer="thread")
    n, days = 12, 3
    hids = synthetic.household_ids[:n]
    now = int(_time.time()) // 1800 * 1800
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, linger_ms=5)
    await producer.start()
    try:
        async with Service(settings, detector=detector) as service:
            await service.wait_ready()
            for d in range(days):
                recs = [(hids[h], r) for h in range(n) for r in _household_day(synthetic, h, d)]
                recs.sort(key=lambda kv: kv[1][kv[1].index(b'"ts"'):])  # time order
                if d == 1:  # half-way through day 1: the poison
                    mid = len(recs) // 2
                    poison = [(hids[0], reading_json(hids[0], now, 0.5))]
                    poison += [(f"TODAY{i}", reading_json(f"TODAY{i}", now, 0.5))
                               for i in range(200)]
                    recs = recs[:mid] + poison + recs[mid:]
                await asyncio.gather(*[await producer.send(settings.input_topic, v,
                                                           key=k.encode()) for k, v in recs])
                await read_topic(settings, settings.scores_topic, min_records=n * (d + 1),
                                 timeout_s=60)
            await asyncio.sleep(1.0)
            late = service.metrics.registry.get_sample_value("meterwatch_late_readings_total")
    finally:
        await producer.stop()
    scores = await read_topic(settings, settings.scores_topic)
    mine = [s for s in scores if s["household_id"] in hids]
    assert late == 0
    # every 2013 day complete and scored once (household 0's day dated today stays open:
    # later days wait behind earlier open days, never the other way round)
    scored = {(s["household_id"], s["date"]) for s in mine if s["status"] == "scored"}
    assert len(scored) == len(mine) == n * days
    assert not [s for s in scores if s["household_id"].startswith("TODAY")]
