"""The synthetic data generator."""

import datetime as dt
import time

import numpy as np

from meterwatch.model import ANOMALY_TYPES, SyntheticConfig, generate


def test_shapes_and_types() -> None:
    d = generate(SyntheticConfig(n_households=10, n_days=14, start_day=dt.date(2013, 3, 1)))
    assert len(d.household_ids) == 10 and d.household_ids[0] == "SYN000001"
    assert d.days.dtype == np.int32
    assert d.days[0] == (dt.date(2013, 3, 1) - dt.date(1970, 1, 1)).days
    assert d.kwh.shape == (10, 14, 48) and d.kwh.dtype == np.float32
    assert d.labels.shape == (10, 14) and d.labels.dtype == np.int8
    assert np.isfinite(d.kwh).all() and (d.kwh >= 0).all()
    assert ANOMALY_TYPES[0] == "normal" and len(ANOMALY_TYPES) >= 9
    ids, day, kwh, labels = d.long()
    assert len(ids) == len(day) == len(kwh) == len(labels) == 140
    assert set(d.tables.acorn_group) == set(d.household_ids)


def test_deterministic_and_fast() -> None:
    cfg = SyntheticConfig(n_households=200, n_days=60, anomaly_rate=0.1, seed=3)
    t = time.perf_counter()
    a = generate(cfg)
    assert time.perf_counter() - t < 1.0
    b = generate(cfg)
    np.testing.assert_array_equal(a.kwh, b.kwh)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert set(np.unique(a.labels)) == set(range(len(ANOMALY_TYPES)))


def test_realistic_profile() -> None:
    d = generate(SyntheticConfig(n_households=300, n_days=28, anomaly_rate=0.0))
    mean = d.kwh.mean(axis=(0, 1))  # (48,) population profile
    assert mean[36] > 1.5 * mean[8]  # evening peak above night
    assert mean[15] > mean[8]  # morning peak above night
    level = d.kwh.mean(axis=(1, 2))
    p5, p95 = np.percentile(level, [5, 95])
    assert 5 < p95 / p5 < 20  # ~10x spread between households
