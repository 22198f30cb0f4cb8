"""Sustained-change detector, alert budget curve and the new injected shapes."""

import datetime as dt
import json
from dataclasses import fields, replace

import numpy as np
import pytest

from meterwatch.model.calibration import FarCurve
from meterwatch.model.inject import (
    ANOMALY_TYPES,
    PERSISTENT_TYPES,
    SWEEPS,
    inject_type,
    persistent_change,
)
from meterwatch.model.sustained import (
    STATE_BYTES,
    SUSTAINED_STATS,
    SustainedDetector,
    SustainedState,
    day_features,
    from_columns,
    storage_columns,
    stored,
    to_columns,
)


def _household(days: int, seed: int = 0) -> np.ndarray:
    """A plausible household: night base load, morning and evening peaks, day noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(48) / 2
    shape = 0.12 + 0.25 * np.exp(-((t - 8) ** 2) / 2) + 0.6 * np.exp(-((t - 19) ** 2) / 4)
    level = np.exp(rng.normal(0, 0.15, days))[:, None]
    noise = np.exp(rng.normal(0, 0.25, (days, 48)))
    return (shape[None, :] * level * noise).astype(np.float32)


@pytest.mark.parametrize("change", ["evening_cut", "level_40", "night_zero", "vacancy"])
def test_persistent_change_found_within_a_week(change: str) -> None:
    kwh = _household(200)
    start = 120
    kwh[start:] = persistent_change(kwh[start:], change, np.random.default_rng(1))
    res, _ = SustainedDetector().replay(kwh, np.arange(16000, 16200))
    alerts = np.flatnonzero(res.alert)
    assert len(alerts) and start <= alerts[0] < start + 7, (change, alerts)
    doc = res.describe(int(alerts[0]))
    assert doc is not None and doc["type"] == "sustained_change"
    assert abs((dt.date.fromisoformat(doc["start_date"]) - dt.date(1970, 1, 1)).days
               - (16000 + start)) <= 2
    assert doc["statistic"] in SUSTAINED_STATS and doc["direction"] in ("up", "down")


def test_no_alert_on_a_steady_household() -> None:
    res, _ = SustainedDetector().replay(_household(365, seed=3), np.arange(16000, 16365))
    assert not res.alert.any(), np.flatnonzero(res.alert)


def test_state_round_trips_through_json_and_update_is_pure() -> None:
    det = SustainedDetector()
    kwh = _household(40)
    _, state = det.replay(kwh[:30], np.arange(30))
    doc = json.loads(json.dumps(state.to_doc(0)))
    back = SustainedState.from_docs([doc, None])
    assert back.count.tolist() == [30, 0]
    before = back.mean.copy()
    a = det.update(kwh[30:32], np.array([30, 30]), back)
    np.testing.assert_array_equal(back.mean, before)  # input state untouched
    b = det.update(kwh[30:31], np.array([30]), state)
    np.testing.assert_allclose(a.state.mean[0], b.state.mean[0], rtol=1e-6)


def test_day_features_skip_incomplete_days() -> None:
    kwh = _household(2)
    kwh[1, :20] = np.nan
    f = day_features(kwh)
    assert np.isfinite(f[0]).all() and np.isnan(f[1]).all()


def test_far_curve_threshold_and_severity() -> None:
    rng = np.random.default_rng(0)
    scores = rng.exponential(1.0, 20000)  # P(S > s) = exp(-s)
    curve = FarCurve.fit(scores)
    for far in (0.001, 0.01, 0.1):
        assert abs(curve.threshold(far) - np.log(1 / far)) < 0.25, far
    back = FarCurve.from_dict(json.loads(json.dumps(curve.to_dict())))
    assert back.threshold(0.005) == pytest.approx(curve.threshold(0.005))
    sev = curve.severity(np.array([1.0, 4.7, 6.0, 8.0]), 0.01)
    assert sev.tolist() == ["", "low", "medium", "high"]
    with pytest.raises(ValueError, match="outside"):
        curve.threshold(0.9)


@pytest.mark.parametrize("name", ANOMALY_TYPES[1:])
def test_sweeps_grow(name: str) -> None:
    kwh = _household(30)
    day = np.arange(16000, 16030)  # weekday() of 16000 is 4 (Friday)
    diffs = []
    for m in SWEEPS[name]:
        out = inject_type(kwh, name, m, np.random.default_rng(0), day=day,
                          temp_max=np.full(30, 20.0))
        assert out.shape == kwh.shape and np.isfinite(out).all()
        diffs.append(np.abs(out - kwh).sum())
    assert diffs[-1] > diffs[0] > 0, (name, diffs)


def test_persistent_types_change_every_day() -> None:
    kwh = _household(60)
    for name in PERSISTENT_TYPES:
        out = persistent_change(kwh, name, np.random.default_rng(0))
        assert (np.abs(out - kwh).sum(axis=1) > 0).all(), name


def test_live_calibration_follows_the_recent_window() -> None:
    from meterwatch.model.calibration import LiveCalibration

    rng = np.random.default_rng(1)
    live = LiveCalibration(window_days=28, min_days=500)
    assert live.curve() is None
    for d in range(60):  # scores get twice as spread after day 30
        scale = 1.0 if d < 30 else 2.0
        live.add(np.full(100, d), rng.exponential(scale, 100), np.zeros(100, bool))
    curve = live.curve()
    assert curve is not None and curve.n_days == 2800  # the last 28 days only
    assert abs(curve.threshold(0.01) - 2 * np.log(100)) < 1.0
    rules = np.zeros(100, bool)
    rules[:1] = True  # 1 % of days alert on a data-quality rule whatever the threshold
    live.add(np.full(100, 60), rng.exponential(2.0, 100), rules)
    assert live.curve().threshold(0.01) > curve.threshold(0.01)


def test_a_rise_is_learnt_and_a_later_level_cut_is_found() -> None:
    """Only falls alert; the baseline follows a rise (seasons, a return from a holiday), so
    a later cut to 40 % of the new level is still found, as a scaled-down meter."""
    kwh = _household(260, seed=5)
    kwh[100:] *= 2.0
    kwh[200:] = persistent_change(kwh[200:], "level_40", np.random.default_rng(2))
    res, _ = SustainedDetector().replay(kwh, np.arange(16000, 16260))
    alerts = np.flatnonzero(res.alert)
    assert len(alerts) == 1 and 200 <= alerts[0] < 207, alerts
    doc = res.describe(int(alerts[0]))
    assert doc is not None and doc["signature"] == "scaled_down", doc
    assert doc["factor"] < 0.6 and doc["start_date"] == str(np.datetime64(16200, "D")), doc


def test_a_meter_reading_zero_all_day_is_no_evening_cut() -> None:
    kwh = _household(200, seed=6)
    kwh[120:] = 0.0
    res, _ = SustainedDetector().replay(kwh, np.arange(16000, 16200))
    alerts = np.flatnonzero(res.alert)
    assert len(alerts) == 1 and 120 <= alerts[0] < 127, alerts
    doc = res.describe(int(alerts[0]))
    assert doc is not None and doc["signature"] == "zeros_at_night", doc


def _heated(days: int = 200, off_from: int = 130, seed: int = 8
            ) -> tuple[np.ndarray, np.ndarray]:
    """A household with electric heating that follows the degree days (every half-hour
    up by 12 % a degree day), and the weather: a winter (about 5 °C) that turns warm
    (about 15 °C) on day ``off_from``."""
    rng = np.random.default_rng(seed + 1000)  # the weather: not the household's own noise
    temp = np.where(np.arange(days) < off_from, 5.0, 15.0) + rng.normal(0, 2.5, days)
    heating = 1.0 + 0.12 * np.maximum(15.5 - temp, 0.0)
    return (_household(days, seed) * heating[:, None]).astype(np.float32), temp


def test_heating_switched_off_in_spring_is_no_change() -> None:
    """Warmer weather and the heating off: a fall the degree days explain is the season
    (the household learns its new level, no alert); without the weather, or without the
    rule, the same days are a ``scaled_down`` change; a later real cut is still found."""
    kwh, temp = _heated()
    days = np.arange(16000, 16200)
    det = SustainedDetector()
    assert np.isfinite(det.config.heat_warming)
    res, state = det.replay(kwh, days, temp)
    assert not res.alert.any(), np.flatnonzero(res.alert)
    assert state.count[0] < 70  # learnt from scratch after the spring
    for other, t in ((det, None), (SustainedDetector(replace(det.config,
                                                             heat_warming=float("inf"))), temp)):
        alerts = np.flatnonzero(other.replay(kwh, days, t)[0].alert)
        assert len(alerts) and 130 <= alerts[0] < 140, alerts
    cut = kwh.copy()
    cut[170:] = persistent_change(cut[170:], "level_40", np.random.default_rng(3))
    alerts = np.flatnonzero(det.replay(cut, days, temp)[0].alert)
    assert len(alerts) == 1 and 170 <= alerts[0] < 177, alerts


def test_compact_storage_round_trips_and_detects_the_same() -> None:
    """The store keeps float16 / int16 / uint16 days (62 bytes); writing and reading it
    back gives ``stored``'s state, and "never alerted" survives as itself."""
    det = SustainedDetector()
    kwh, temp = _heated(120)
    _, state = det.replay(kwh, np.arange(16000, 16120), temp, rounded=False)
    cols = storage_columns(3)
    assert STATE_BYTES == 62 and cols["sustained_mean"].dtype == np.float16
    to_columns(state, cols, np.array([1]))
    back = from_columns(cols, np.array([1, 2]))
    ref = stored(state)
    for f in fields(SustainedState):
        np.testing.assert_array_equal(getattr(back, f.name)[0], getattr(ref, f.name)[0])
        np.testing.assert_allclose(getattr(back, f.name)[0], getattr(state, f.name)[0],
                                   rtol=2e-3, atol=2e-3)
    assert back.last_alert[1] == SustainedState.empty(1).last_alert[0]  # never
    # days past the uint16 range and counts past int16 are clipped, never wrapped
    big = state.take(slice(None))
    big.count[:] = 100_000
    big.start[:] = -5
    to_columns(big, cols, np.array([0]))
    assert cols["sustained_count"][0] == 32767 and (cols["sustained_start"][0] == 0).all()
    # rounding after every day (the service) against float32 throughout: same alerts
    cut = kwh.copy()
    cut[90:] = persistent_change(cut[90:], "evening_cut", np.random.default_rng(4))
    a = det.replay(cut, np.arange(16000, 16120), temp)[0]
    b = det.replay(cut, np.arange(16000, 16120), temp, rounded=False)[0]
    np.testing.assert_array_equal(a.alert, b.alert)
    assert a.alert[90:97].any()
