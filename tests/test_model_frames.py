"""``score_frame``: a pandas DataFrame of readings, long or wide, scored like the service."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from meterwatch.model import (
    Detector,
    HouseholdState,
    SyntheticConfig,
    TrainConfig,
    generate,
    score_frame,
    train_detector,
)

START = dt.date(2013, 3, 1)


@pytest.fixture(scope="module")
def setup() -> tuple[Detector, object]:
    data = generate(SyntheticConfig(n_households=12, n_days=16, anomaly_rate=0.0, seed=3,
                                    start_day=START))
    ids, day, kwh, _ = data.long(slice(0, 12))
    det = train_detector(kwh, day, ids, data.tables,
                         TrainConfig(device="cpu", max_epochs=3, seed=0))
    return det, data


def _wide(data, days: range) -> pd.DataFrame:  # type: ignore[no-untyped-def]
    rows = []
    for h, hid in enumerate(data.household_ids[:4]):
        for d in days:
            rows.append({"household_id": hid,
                         "date": START + dt.timedelta(days=d),
                         **{f"hh_{i}": float(v) for i, v in enumerate(data.kwh[h, d])}})
    return pd.DataFrame(rows)


def _long(wide: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for r in wide.itertuples(index=False):
        midnight = dt.datetime.combine(r.date, dt.time(), tzinfo=dt.timezone.utc)
        for i in range(48):
            rows.append({"household_id": r.household_id,
                         "ts": midnight + dt.timedelta(minutes=30 * i),
                         "kwh": getattr(r, f"hh_{i}")})
    return pd.DataFrame(rows).sample(frac=1.0, random_state=0)  # any row order


def test_long_and_wide_agree_and_match_sequential_scoring(setup) -> None:  # type: ignore[no-untyped-def]
    det, data = setup
    wide = _wide(data, range(12, 15))
    out_w = score_frame(det, wide, tables=data.tables)
    out_l = score_frame(det, _long(wide), tables=data.tables)
    assert len(out_w) == 12 and list(out_w.columns[:3]) == ["household_id", "date", "score"]
    np.testing.assert_allclose(out_w.score, out_l.score, rtol=1e-5)
    assert (out_w.readings == 48).all()
    # same as calling the detector day by day with the state carried over
    h = 0
    state = HouseholdState.empty(1)
    expected = []
    for d in range(12, 15):
        s = det.score(data.kwh[h, d][None], np.array([data.days[d]], np.int32),
                      [data.household_ids[h]], state, data.tables)
        expected.append(float(s.score[0]))
        state = s.state
    got = out_w[out_w.household_id == data.household_ids[h]].score.to_numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # datetime64 dates (the old pitfall: day = -1572528128) are real dates here
    wide64 = wide.assign(date=pd.to_datetime(wide.date))
    np.testing.assert_allclose(score_frame(det, wide64, tables=data.tables).score,
                               out_w.score, rtol=1e-5)
    assert out_w.date.iloc[0] == START + dt.timedelta(days=12)


def test_clear_errors(setup) -> None:  # type: ignore[no-untyped-def]
    det, data = setup
    wide = _wide(data, range(12, 14))
    with pytest.raises(ValueError, match="more than once"):
        score_frame(det, pd.concat([wide, wide.iloc[:1]]))
    with pytest.raises(ValueError, match="holds numbers"):
        score_frame(det, wide.assign(date=np.arange(len(wide))))
    with pytest.raises(ValueError, match="time of day"):
        score_frame(det, wide.assign(date=pd.Timestamp("2013-03-13 12:00")))
    with pytest.raises(ValueError, match=r"hh_0 \.\. hh_47"):
        score_frame(det, wide.drop(columns=["hh_5"]))
    long = _long(wide)
    with pytest.raises(ValueError, match="a second reading"):
        score_frame(det, pd.concat([long, long.iloc[:1]]))
    with pytest.raises(ValueError, match="not the start of a half-hour"):
        score_frame(det, long.assign(ts=long.ts + dt.timedelta(minutes=10)))
    with pytest.raises(ValueError, match="household_id"):
        score_frame(det, long.drop(columns=["household_id"]))
    with pytest.raises(ValueError, match="DataFrame"):
        score_frame(det, [1, 2, 3])  # type: ignore[arg-type]


def test_naive_times_of_the_hour_the_clocks_go_back(setup) -> None:  # type: ignore[no-untyped-def]
    """Wall-clock times without offsets, in time order, across the night the clocks go back
    (Europe/London, 27 October 2013: 01:00-01:59 twice): scored as the same instants with
    offsets are. Before, every such frame was refused ("ambiguous/nonexistent")."""
    det, data = setup
    rng = np.random.default_rng(0)
    start = pd.Timestamp("2013-10-26", tz="Europe/London")
    instants = pd.date_range(start, pd.Timestamp("2013-10-29", tz="Europe/London"),
                             freq="30min", inclusive="left")
    assert len(instants) == 3 * 48 + 2  # the repeated hour's two half-hours
    aware = pd.DataFrame([{"household_id": hid, "ts": t, "kwh": float(rng.gamma(2, 0.1))}
                          for t in instants for hid in data.household_ids[:2]])
    naive = aware.assign(ts=aware.ts.dt.tz_localize(None))
    out_a = score_frame(det, aware, tables=data.tables, timezone="Europe/London")
    out_n = score_frame(det, naive, tables=data.tables, timezone="Europe/London")
    assert len(out_a) == 6 and out_a.readings.tolist() == [48] * 6
    np.testing.assert_array_equal(out_n.score, out_a.score)
    # a time the clocks skip (spring, 01:30) is still refused, naming the row
    skipped = naive.head(2).assign(ts=pd.Timestamp("2013-03-31 01:30"))
    with pytest.raises(ValueError, match=r"row 0: missing, or a time the clocks skip in "
                                         r"Europe/London"):
        score_frame(det, skipped, tables=data.tables, timezone="Europe/London")
