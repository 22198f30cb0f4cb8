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

from meterwatch.stream.service import Service
from meterwatch.stream.simulate import reading_json
from meterwatch.stream.timegrid import TimeGrid
from tests.conftest import read_topic, unique_settings

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
