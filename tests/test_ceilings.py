"""The told-the-type detectors of benchmarks/evaluation/ceilings.py: each finds the anomaly it
is made for, judged against the household's own days; an untouched copy scores as the day."""

import numpy as np
import pytest

from benchmarks.evaluation.ceilings import CEILING_TYPES, told_the_type
from meterwatch.model.inject import InjectionConfig, inject_type


@pytest.mark.parametrize("name", CEILING_TYPES)
def test_told_the_type_detectors_rank_their_anomaly_first(name: str) -> None:
    rng = np.random.default_rng(3)
    n = 70  # ten weeks of one household: a morning and an evening peak, mild noise
    slots = np.arange(48)
    evening, morning = np.exp(-((slots - 38) / 3.0) ** 2), np.exp(-((slots - 15) / 2.0) ** 2)
    base = 0.15 + 0.5 * evening + 0.3 * morning
    clean = (base[None] * np.exp(rng.normal(0.0, 0.08, (n, 48)))).astype(np.float32)
    hh = np.full(n, "H1")
    day = 15979 + np.arange(n)
    weekend = ((day + 3) % 7) >= 5
    target = np.flatnonzero(weekend)[3]
    rows = np.array([target, target])
    magnitude = {"time_shift": 4.0, "evening_drop": 0.8, "partial_level": 3.0,
                 "weekend_extra": 0.4, "heating_mild": 0.4}[name]
    hit = inject_type(clean[rows[:1]], name, magnitude, rng, day=day[rows[:1]],
                      temp_max=np.array([20.0], np.float32), config=InjectionConfig())
    injected = np.concatenate([hit, clean[rows[1:]]])  # the anomaly, then an untouched copy
    sc, si = told_the_type(name, clean, injected, hh, rows, weekend)
    judged = sc[np.isfinite(sc)]
    assert si[0] > judged.max(), (name, si[0], np.sort(judged)[-3:])
    assert si[1] == pytest.approx(sc[target], abs=1e-5)  # an untouched copy scores as the day
