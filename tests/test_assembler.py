"""Day assembly: completion, duplicates, late readings, watermark closing, DST days."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from meterwatch.stream.assembler import COMPLETE, IMPUTED, INCOMPLETE, DayAssembler
from meterwatch.stream.parse import ParsedBatch
from meterwatch.stream.timegrid import TimeGrid

DAY0 = (dt.date(2013, 1, 7) - dt.date(1970, 1, 1)).days


def batch(hh: list[str], ts: np.ndarray, kwh: np.ndarray) -> tuple[ParsedBatch, np.ndarray,
                                                                     np.ndarray]:
    n = len(hh)
    pb = ParsedBatch.of(hh, ts.astype(np.int64), kwh.astype(np.float32),
                     np.arange(n, dtype=np.int32))
    return pb, np.arange(n, dtype=np.int64) + 1000, np.full(n, 5, dtype=np.int64)


def readings(households: int, days: int, start_day: int = DAY0) -> tuple[list[str], np.ndarray,
                                                                          np.ndarray]:
    hh, ts, kwh = [], [], []
    for h in range(households):
        for d in range(days):
            for s in range(48):
                hh.append(f"H{h}")
                ts.append((start_day + d) * 86400 + s * 1800)
                kwh.append(0.1 * h + s / 100)
    return hh, np.array(ts), np.array(kwh)


def test_shuffled_days_complete_once_with_exact_values():
    hh, ts, kwh = readings(10, 3)
    perm = np.random.default_rng(0).permutation(len(hh))
    asm = DayAssembler(TimeGrid(), grace_s=3 * 86400)  # the shuffle spans all three days
    closed = []
    for chunk in np.array_split(perm, 7):
        res = asm.add(*batch([hh[i] for i in chunk], ts[chunk], kwh[chunk]))
        closed.append(res.closed)
    got = [(h, int(d)) for c in closed for h, d in zip(c.household_ids, c.day, strict=True)]
    assert sorted(got) == sorted((f"H{h}", DAY0 + d) for h in range(10) for d in range(3))
    c = next(c for c in closed if len(c))
    assert (c.status == COMPLETE).all()
    h = int(c.household_ids[0][1:])
    np.testing.assert_allclose(c.kwh[0], 0.1 * h + np.arange(48) / 100, rtol=1e-6)
    assert asm.open_days == 0


def test_duplicates_keep_first_and_late_readings_are_dropped():
    hh, ts, kwh = readings(1, 1)
    asm = DayAssembler(TimeGrid())
    res = asm.add(*batch(hh[:10] + hh[:10], np.r_[ts[:10], ts[:10]], np.r_[kwh[:10], kwh[:10] + 9]))
    assert res.duplicates == 10 and res.accepted == 10
    res = asm.add(*batch(hh[10:], ts[10:], kwh[10:]))
    assert len(res.closed) == 1
    np.testing.assert_allclose(res.closed.kwh[0, :10], kwh[:10], rtol=1e-6)
    res = asm.add(*batch(hh[:3], ts[:3], kwh[:3]))
    assert res.late == 3 and len(res.closed) == 0 and asm.open_days == 0


def test_watermark_closes_imputed_and_incomplete_days():
    asm = DayAssembler(TimeGrid(), grace_s=3600, max_imputed=4)
    hh, ts, kwh = readings(2, 1)
    keep = [i for i in range(96) if not (i < 48 and i % 48 in (5, 6)) and not (i >= 48 and i % 2)]
    asm.add(*batch([hh[i] for i in keep], ts[keep], kwh[keep]))
    assert asm.open_days == 2
    # a reading of the next day at 00:30 is not past the grace yet, at 01:30 it is
    res = asm.add(*batch(["H9"], np.array([(DAY0 + 1) * 86400 + 1800]), np.array([1.0])))
    assert len(res.closed) == 0
    res = asm.add(*batch(["H9"], np.array([(DAY0 + 1) * 86400 + 3600]), np.array([1.0])))
    status = dict(zip(res.closed.household_ids, res.closed.status.tolist(), strict=True))
    assert status == {"H0": IMPUTED, "H1": INCOMPLETE}
    i0 = res.closed.household_ids.index("H0")
    assert np.isnan(res.closed.kwh[i0, [5, 6]]).all()
    assert asm.low_offset() is not None  # H9's day stays open


def test_low_offset_tracks_the_oldest_open_day():
    asm = DayAssembler(TimeGrid())
    hh, ts, kwh = readings(2, 1)
    pb, off, kts = batch(hh, ts, kwh)
    asm.add(ParsedBatch.of(hh[:47], pb.ts[:47], pb.kwh[:47], pb.record[:47]), off, kts)
    assert asm.low_offset() == 1000
    asm.add(ParsedBatch.of(hh[47:48], pb.ts[47:48], pb.kwh[47:48], pb.record[47:48]), off, kts)
    assert asm.low_offset() is None


@pytest.mark.parametrize(("date", "expected"), [(dt.date(2013, 3, 31), 46),
                                                (dt.date(2013, 10, 27), 50)])
def test_dst_days_complete_in_europe_london(date: dt.date, expected: int):
    grid = TimeGrid("Europe/London")
    day = (date - dt.date(1970, 1, 1)).days
    start, end = grid.bounds(day)
    ts = np.arange(start, end, 1800)
    assert len(ts) == expected
    asm = DayAssembler(grid)
    res = asm.add(*batch(["H"] * len(ts), ts, np.full(len(ts), 0.5)))
    assert len(res.closed) == 1 and res.closed.status[0] == COMPLETE
    assert int(res.closed.day[0]) == day
    k = res.closed.kwh[0]
    if expected == 46:
        assert np.isnan(k[[2, 3]]).all() and np.isfinite(np.delete(k, [2, 3])).all()
    else:
        np.testing.assert_allclose(k, 0.5)


def test_memory_is_compact_per_open_day():
    asm = DayAssembler(TimeGrid(), initial_rows=1024)
    n = 20_000
    hh = [f"H{i}" for i in range(n)]
    asm.add(*batch(hh, np.full(n, DAY0 * 86400), np.ones(n)))
    assert asm.open_days == n
    assert asm.memory_bytes() / len(asm.row_hh) < 240
