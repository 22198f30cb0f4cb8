"""Synthetic smart-meter households with labelled anomalies, for tests and demos.

Each household has a log-normal level (about a 10x spread between small and large users),
a baseload, a morning and an evening peak at its own times, later mornings and busier
days at weekends, more use in winter and on cold days, day-to-day variation, half-hourly
noise and the odd short appliance burst. Anomalies are injected with ``model.inject``.

>>> data = generate(SyntheticConfig(n_households=3, n_days=7, seed=1))
>>> data.kwh.shape, data.labels.shape, data.household_ids[0]
((3, 7, 48), (3, 7), 'SYN000001')
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field

import numpy as np

from meterwatch.model.features import ACORN_GROUPS, ContextTables
from meterwatch.model.inject import ANOMALY_TYPES, InjectionConfig, inject, random_labels

log = logging.getLogger(__name__)

__all__ = ["ANOMALY_TYPES", "SyntheticConfig", "SyntheticData", "generate"]

_EPOCH = dt.date(1970, 1, 1)


@dataclass(frozen=True)
class SyntheticConfig:
    """What to generate."""

    n_households: int = 200
    n_days: int = 60
    # First day: a date or days since 1970-01-01 (default 2013-01-01).
    start_day: dt.date | int = dt.date(2013, 1, 1)
    # Probability that a household-day carries an injected anomaly.
    anomaly_rate: float = 0.05
    seed: int = 0
    injection: InjectionConfig = field(default_factory=InjectionConfig)


@dataclass
class SyntheticData:
    """H households over D consecutive days."""

    household_ids: list[str]
    days: np.ndarray  # int32 (D,) days since 1970-01-01
    kwh: np.ndarray  # float32 (H, D, 48)
    labels: np.ndarray  # int8 (H, D): 0 normal, else index into ANOMALY_TYPES
    acorn_group: list[str]  # (H,)
    tariff: list[str]  # (H,) "Std" or "ToU"
    tables: ContextTables  # household info, synthetic weather, no holidays

    def long(self, days: slice = slice(None)) -> tuple[list[str], np.ndarray, np.ndarray,
                                                      np.ndarray]:
        """(household_ids (M,), day int32 (M,), kwh (M, 48), labels (M,)) for ``days``,
        household-major: the layout ``train_detector`` and ``Detector.score`` take."""
        kwh = self.kwh[:, days]  # (H, D', 48)
        h, d = kwh.shape[:2]
        ids = [hid for hid in self.household_ids for _ in range(d)]
        day = np.tile(self.days[days], h).astype(np.int32)
        return ids, day, kwh.reshape(h * d, 48), self.labels[:, days].reshape(h * d)


def _bump(slots: np.ndarray, centre: np.ndarray | float, width: float) -> np.ndarray:
    return np.asarray(np.exp(-0.5 * ((slots - centre) / width) ** 2), dtype=np.float32)


def generate(config: SyntheticConfig) -> SyntheticData:
    """Generate households, days and labels (deterministic for a given config)."""
    cfg = config
    rng = np.random.default_rng(cfg.seed)
    start = cfg.start_day
    start_i = (start - _EPOCH).days if isinstance(start, dt.date) else int(start)
    H, D = cfg.n_households, cfg.n_days
    days = np.arange(start_i, start_i + D, dtype=np.int32)
    slots = np.arange(48, dtype=np.float32)

    # Households. Level: median ~0.15 kWh/hh, 5th-95th percentile ~10x apart.
    group = rng.choice(len(ACORN_GROUPS), size=H, p=[0.35, 0.3, 0.35])
    tariff = np.where(rng.random(H) < 0.15, "ToU", "Std")
    level = 0.15 * np.exp(rng.normal(0.0, 0.7, H)) * np.array([1.25, 1.0, 0.8])[group]
    base = rng.uniform(0.25, 0.6, H)  # share of the day's use that is baseload
    morning = rng.normal(15.0, 1.5, H)  # slot of the morning peak (~07:30)
    evening = rng.normal(37.0, 2.0, H)  # slot of the evening peak (~18:30)
    a_morning = rng.uniform(0.4, 1.4, H)
    a_evening = rng.uniform(1.0, 2.5, H)
    heating = rng.uniform(0.0, 0.04, H)  # extra share per °C below 15 °C
    noise = rng.uniform(0.15, 0.35, H)  # half-hourly log-normal noise

    # Days: calendar and synthetic London weather.
    dates = days.astype("datetime64[D]")
    doy = (dates - dates.astype("datetime64[Y]")).astype(np.float32)
    weekend = ((days + 3) % 7 >= 5).astype(np.float32)
    temp_mean = 11.0 - 7.0 * np.cos(2 * np.pi * (doy - 20) / 365.25) + rng.normal(0, 2.0, D)
    temp_max = (temp_mean + 4.0).astype(np.float32)
    temp_min = (temp_mean - 4.0).astype(np.float32)

    # Shapes (H, D, 48): baseload + peaks; weekends shift the morning later, fill the day.
    s = slots[None, None, :]
    m_centre = morning[:, None, None] + 2.0 * weekend[None, :, None]
    shape = (
        base[:, None, None]
        + a_morning[:, None, None] * _bump(s, m_centre, 2.0)
        + a_evening[:, None, None] * _bump(s, evening[:, None, None], 3.0)
        + 0.5 * weekend[None, :, None] * _bump(s, 27.0, 5.0)
    )
    shape /= shape.mean(axis=2, keepdims=True)
    season = 1.0 + 0.15 * np.cos(2 * np.pi * (doy - 15) / 365.25)
    cold = 1.0 + heating[:, None] * np.maximum(15.0 - temp_mean[None, :], 0.0)  # (H, D)
    day_factor = np.exp(rng.normal(0.0, 0.12, (H, D)))
    daily = level[:, None] * season[None, :] * cold * day_factor  # (H, D) kWh/hh
    kwh = daily[:, :, None] * shape * np.exp(rng.normal(0.0, 1.0, (H, D, 48))
                                              * noise[:, None, None])
    burst = rng.random((H, D, 48)) < 0.02  # kettles, showers, ovens
    kwh += burst * rng.uniform(0.1, 0.5, (H, D, 48))
    kwh = np.round(kwh, 3).astype(np.float32)  # meters report Wh resolution

    labels = random_labels(H * D, cfg.anomaly_rate, rng).reshape(H, D)
    kwh = inject(kwh.reshape(H * D, 48), labels.reshape(-1), rng, cfg.injection)
    kwh = np.round(kwh, 3).astype(np.float32).reshape(H, D, 48)

    ids = [f"SYN{i + 1:06d}" for i in range(H)]
    groups = [ACORN_GROUPS[g] for g in group]
    tariffs = [str(t) for t in tariff]
    tables = ContextTables(
        acorn_group=dict(zip(ids, groups, strict=True)),
        tariff=dict(zip(ids, tariffs, strict=True)),
        weather_day=days.copy(), temp_max=temp_max, temp_min=temp_min,
    )
    return SyntheticData(household_ids=ids, days=days, kwh=kwh, labels=labels,
                         acorn_group=groups, tariff=tariffs, tables=tables)
