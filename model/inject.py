"""Anomaly injection into days of half-hourly readings (synthetic or real), for evaluation.

``ANOMALY_TYPES[k]`` names label ``k``; 0 is a normal day. Each type, with its parameters in
``InjectionConfig``:

===============  ===========================================================================
``spike``        ``spike_slots`` consecutive half-hours get ``max(spike_min_kwh,
                 spike_factor * day mean)`` kWh added (a fault or an unmetered appliance)
``outage``       ``outage_slots`` consecutive half-hours (default 12 = 6 h) read exactly 0
``stuck``        ``stuck_slots`` consecutive half-hours (default 16 = 8 h) repeat the first
                 one's reading (at least ``stuck_min_kwh``): a frozen register
``level_up``     the whole day times ``level_up_factor`` (default 5)
``level_down``   the whole day times ``level_down_factor`` (default 0.2)
``time_shift``   the day's schedule moved by ``shift_min_slots..shift_max_slots`` half-hours,
                 earlier or later (wrapping around midnight): a clock or timezone fault
``evening_drop`` half-hours ``evening_slots`` (16:00-22:00) times ``evening_factor``
``erratic``      every half-hour times an independent log-normal factor with sigma
                 ``erratic_sigma``: a noisy meter or communication fault
===============  ===========================================================================
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

ANOMALY_TYPES: tuple[str, ...] = (
    "normal", "spike", "outage", "stuck", "level_up", "level_down", "time_shift",
    "evening_drop", "erratic",
)
N_SLOTS = 48


@dataclass(frozen=True)
class InjectionConfig:
    """Strength of each injected anomaly type (see the module docstring)."""

    spike_slots: int = 1
    spike_factor: float = 10.0
    spike_min_kwh: float = 2.0
    outage_slots: int = 12
    stuck_slots: int = 16
    stuck_min_kwh: float = 0.05
    level_up_factor: float = 5.0
    level_down_factor: float = 0.2
    shift_min_slots: int = 6
    shift_max_slots: int = 10
    evening_slots: tuple[int, int] = (32, 44)
    evening_factor: float = 0.2
    erratic_sigma: float = 1.0


def inject(
    kwh: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    config: InjectionConfig | None = None,
) -> np.ndarray:
    """A copy of ``kwh`` (N, 48) with anomaly ``labels[i]`` (index into ANOMALY_TYPES) put into
    day i; label 0 leaves the day unchanged. NaN (missing) readings stay NaN."""
    cfg = config or InjectionConfig()
    kwh = np.asarray(kwh, dtype=np.float32)
    labels = np.asarray(labels)
    n = len(kwh)
    assert kwh.shape == (n, N_SLOTS) and labels.shape == (n,), (kwh.shape, labels.shape)
    assert labels.min(initial=0) >= 0 and labels.max(initial=0) < len(ANOMALY_TYPES), labels
    out = kwh.copy()
    slots = np.arange(N_SLOTS)
    obs = np.isfinite(kwh)
    day_mean = np.where(obs, kwh, 0.0).sum(axis=1) / np.maximum(obs.sum(axis=1), 1)

    def rows(name: str) -> np.ndarray:
        return np.flatnonzero(labels == ANOMALY_TYPES.index(name))

    def window(r: np.ndarray, length: int) -> np.ndarray:
        """bool (len(r), 48): a random run of ``length`` slots per row."""
        start = rng.integers(0, N_SLOTS - length + 1, size=len(r))
        return (slots >= start[:, None]) & (slots < start[:, None] + length)

    r = rows("spike")
    w = window(r, cfg.spike_slots)
    add = np.maximum(cfg.spike_min_kwh, cfg.spike_factor * day_mean[r])
    out[r] = np.where(w, out[r] + add[:, None], out[r])

    r = rows("outage")
    out[r] = np.where(window(r, cfg.outage_slots), 0.0, out[r])

    r = rows("stuck")
    w = window(r, cfg.stuck_slots)
    first = out[r, np.argmax(w, axis=1)]
    value = np.maximum(np.nan_to_num(first, nan=cfg.stuck_min_kwh), cfg.stuck_min_kwh)
    out[r] = np.where(w, value[:, None], out[r])

    r = rows("level_up")
    out[r] *= cfg.level_up_factor
    r = rows("level_down")
    out[r] *= cfg.level_down_factor

    r = rows("time_shift")
    shift = rng.integers(cfg.shift_min_slots, cfg.shift_max_slots + 1, size=len(r))
    shift *= rng.choice([-1, 1], size=len(r))
    src = (slots[None, :] - shift[:, None]) % N_SLOTS  # (R, 48) slot each value comes from
    out[r] = np.take_along_axis(out[r], src, axis=1)

    r = rows("evening_drop")
    lo, hi = cfg.evening_slots
    out[r, lo:hi] *= cfg.evening_factor

    r = rows("erratic")
    out[r] *= np.exp(rng.normal(0.0, cfg.erratic_sigma, size=(len(r), N_SLOTS))).astype(
        np.float32)
    out[~obs] = np.nan  # a missing reading stays missing
    return out


def random_labels(
    n: int, rate: float, rng: np.random.Generator, types: tuple[str, ...] | None = None
) -> np.ndarray:
    """int8 (n,) labels: each day anomalous with probability ``rate``, types uniform among
    ``types`` (default all but 'normal')."""
    types = types or ANOMALY_TYPES[1:]
    codes = np.array([ANOMALY_TYPES.index(t) for t in types], dtype=np.int8)
    labels = np.zeros(n, dtype=np.int8)
    hit = rng.random(n) < rate
    labels[hit] = rng.choice(codes, size=int(hit.sum()))
    return labels
