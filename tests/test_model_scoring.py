"""Anomaly injection, scoring statistics, household state and data-quality rules."""

import numpy as np

from meterwatch.model import ANOMALY_TYPES, HouseholdState
from meterwatch.model.inject import InjectionConfig, inject
from meterwatch.model.quality import check, run_lengths
from meterwatch.model.scoring import N_STATS, Calibration
from meterwatch.model.state import absorb


def _days(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (0.2 + 0.1 * rng.random((n, 48))).astype(np.float32)


def test_each_injection_does_what_it_says() -> None:
    cfg = InjectionConfig()
    kwh = _days(len(ANOMALY_TYPES))
    kwh[:, 0] = np.nan
    out = inject(kwh, np.arange(len(ANOMALY_TYPES)), np.random.default_rng(1), cfg)
    name = dict(zip(ANOMALY_TYPES, range(len(ANOMALY_TYPES)), strict=True))
    assert out.shape == kwh.shape and np.isnan(out[:, 0]).all()
    np.testing.assert_array_equal(out[0], kwh[0])
    assert np.nanmax(out[name["spike"]] - kwh[name["spike"]]) >= cfg.spike_min_kwh - 1e-6
    assert (run_lengths(out[[name["outage"]]] == 0).max()) == cfg.outage_slots
    stuck = out[name["stuck"], 1:]
    assert run_lengths(stuck[None, 1:] == stuck[None, :-1]).max() + 1 >= cfg.stuck_slots - 1
    np.testing.assert_allclose(out[name["level_up"]], 5 * kwh[name["level_up"]], rtol=1e-6)
    np.testing.assert_allclose(out[name["level_down"]], 0.2 * kwh[name["level_down"]],
                               rtol=1e-6)
    shifted, orig = out[name["time_shift"]], kwh[name["time_shift"]]
    assert any(np.allclose(shifted[1:], np.roll(orig, k)[1:], equal_nan=True)
               for k in [*range(6, 11), *range(-10, -5)])
    lo, hi = cfg.evening_slots
    np.testing.assert_allclose(out[name["evening_drop"], lo:hi],
                               0.2 * kwh[name["evening_drop"], lo:hi], rtol=1e-6)
    assert not np.allclose(out[name["erratic"], 1:], kwh[name["erratic"], 1:])
    np.testing.assert_array_equal(kwh[:, 0], np.full(len(kwh), np.nan, np.float32))


def test_surprise_is_monotone_and_round_trips() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2000, N_STATS)).astype(np.float32)
    cal = Calibration.fit_tails(np.zeros(N_STATS), np.ones(N_STATS), z)
    grid = np.linspace(-3, 8, 200, dtype=np.float32)
    s = cal.surprise(np.repeat(grid[:, None], N_STATS, axis=1))
    assert (np.diff(s, axis=0) >= 0).all() and s[-1, 0] > cal.tail_s[-1]
    np.testing.assert_allclose(cal.surprise(np.full((1, N_STATS), 2.326, np.float32)),
                               -np.log(0.01), atol=0.3)  # the 99th percentile of N(0, 1)
    back = Calibration.from_dict(cal.to_dict())
    np.testing.assert_array_equal(back.tail_z, cal.tail_z)


def test_state_defaults_and_absorb() -> None:
    old = HouseholdState(level=[np.nan, 0.2], err_mean=[0, 0], err_var=[0, 0], count=[0, 5])
    assert old.fault_rate.tolist() == [0, 0] and old.peak_var.dtype == np.float32
    stats = np.ones((2, N_STATS), np.float32)
    shares = np.full((2, 12), -2.5, np.float32)
    new = absorb(old, np.array([0.3, 2.0], np.float32), stats, shares,
                 np.array([True, True]), np.array([True, False]), np.array([True, False]),
                 1 / 14, 1 / 30, 1 / 60, level_clip=1.25)
    assert new.level[0] == np.float32(0.3)  # first day sets the level
    np.testing.assert_allclose(new.level[1], 0.2 + (0.25 - 0.2) / 6, rtol=1e-5)  # clipped
    assert new.count.tolist() == [1, 5] and new.fault_rate[0] == 1.0
    assert np.isnan(old.level[0])  # not modified
    assert (new.profile_mean[0] == -2.5).all() and (new.profile_mean[1] == 0).all()
    rows = [new.row(0), new.row(1)]
    assert "profile_mean_11" in rows[0] and all(isinstance(v, float) for v in rows[0].values())
    back = HouseholdState.from_rows(rows)
    for f in ("level", "count", "profile_mean", "fault_rate"):
        np.testing.assert_array_equal(getattr(back, f), getattr(new, f))


def test_quality_rules() -> None:
    kwh = np.full((4, 48), 0.3, np.float32)
    kwh[:, ::2] = 0.31  # live load moves
    kwh[0, 5:15] = 0.0
    kwh[1, 20:31] = 0.7
    kwh[2, 3] = -1.0
    kwh[3, 3] = np.nan
    obs = np.isfinite(kwh) & (kwh >= 0) & (kwh <= 12)
    f = check(kwh, obs, np.full(4, 0.3, np.float32), max_kwh=12, zero_run_slots=8,
              zero_min_level=0.03, flat_run_slots=10, flat_min_kwh=0.02)
    assert f.zero_run.tolist() == [True, False, False, False]
    assert f.flat_run.tolist() == [False, True, False, False]
    assert f.impossible.tolist() == [False, False, True, False]
    assert f.missing.tolist() == [False, False, False, True]
    assert f.slots[0, 5:15].all() and f.slots[1, 20:31].all() and f.slots[2, 3]
