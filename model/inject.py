"""Anomaly injection into days of half-hourly readings (synthetic or real), for evaluation.

``ANOMALY_TYPES[k]`` names label ``k``; 0 is a normal day. Every type has one *magnitude*
in a natural unit (``MAGNITUDE_UNITS``), a default (``InjectionConfig``) and a sweep from
barely visible to gross (``SWEEPS``), so an evaluation can report recall against size:

==================  ======================================================================
``spike``           one half-hour gets ``m`` kWh added (a fault, an unmetered appliance)
``outage``          ``m`` hours in a row read exactly 0
``stuck``           ``m`` hours in a row repeat the first one's reading (at least
                    ``stuck_min_kwh``): a frozen register
``level_up``        the whole day times ``m``
``level_down``      the whole day times ``1 - m`` (``m`` = the share of use that vanishes)
``time_shift``      the day's schedule moved by ``m`` hours, earlier or later (wrapping
                    around midnight): a clock or timezone fault
``evening_drop``    16:00-22:00 times ``1 - m`` (a bypass of the evening load)
``erratic``         every half-hour times an independent log-normal factor, sigma ``m``
``partial_level``   a random 4-8 hour window times ``m`` (up) or ``1 / m`` (down, half of
                    the days): a level change of part of the day
``weekend_extra``   a weekend day gets ``m`` kWh per half-hour more over a random 6 hours
                    (a weekend-only load; on a weekday, the next Saturday's pattern is not
                    known, so weekday rows are left normal and not counted)
``heating_mild``    ``m`` kWh per half-hour more 06:00-09:00 and 17:00-23:00 on a day with a
                    maximum above ``mild_temp`` (°C): heating that ignores the weather (days
                    without weather count as mild)
==================  ======================================================================

The last three are the shapes the first evaluation's injector never made; an evaluation can
hold any types out of tuning (``model.evaluate``). Multi-day (persistent) changes are in
``persistent_change``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

ANOMALY_TYPES: tuple[str, ...] = (
    "normal", "spike", "outage", "stuck", "level_up", "level_down", "time_shift",
    "evening_drop", "erratic", "partial_level", "weekend_extra", "heating_mild",
)
#: The shapes added in the second round (never seen by the first evaluation's tuning).
NEW_TYPES: tuple[str, ...] = ("partial_level", "weekend_extra", "heating_mild")
N_SLOTS = 48

MAGNITUDE_UNITS: dict[str, str] = {
    "spike": "kWh added to one half-hour", "outage": "hours at zero",
    "stuck": "hours frozen", "level_up": "factor", "level_down": "share removed",
    "time_shift": "hours moved", "evening_drop": "share of 16-22h removed",
    "erratic": "log-normal sigma", "partial_level": "factor over 4-8 h",
    "weekend_extra": "kWh/hh added over 6 h", "heating_mild": "kWh/hh added 9 h",
}

#: Magnitudes of each sweep, from subtle to gross (recall should rise along them).
SWEEPS: dict[str, tuple[float, ...]] = {
    "spike": (0.5, 1.0, 1.5, 2.0, 3.0, 5.0),
    "outage": (1.0, 2.0, 3.0, 4.0, 6.0),
    "stuck": (1.0, 2.0, 3.0, 5.0, 8.0),
    "level_up": (1.25, 1.5, 2.0, 3.0, 5.0),
    "level_down": (0.2, 0.4, 0.6, 0.8, 0.9),
    "time_shift": (1.0, 2.0, 3.0, 4.0, 5.0),
    "evening_drop": (0.2, 0.4, 0.6, 0.8, 1.0),
    "erratic": (0.25, 0.5, 0.75, 1.0, 1.5),
    "partial_level": (1.5, 2.0, 3.0, 5.0, 8.0),
    "weekend_extra": (0.1, 0.2, 0.4, 0.8, 1.5),
    "heating_mild": (0.1, 0.2, 0.4, 0.8, 1.5),
}


@dataclass(frozen=True)
class InjectionConfig:
    """Default strength of each type, as ``inject`` puts it into labelled days (the first
    eight as in the first evaluation: a spike adds ``max(spike_min_kwh, spike_factor * day
    mean)``, a time shift is ``shift_min_slots..shift_max_slots`` half-hours)."""

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
    partial_level_factor: float = 3.0
    weekend_extra_kwh: float = 0.5
    heating_kwh: float = 0.5
    mild_temp: float = 14.0

    def magnitudes(self, name: str, kwh: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(N,) the magnitude (``MAGNITUDE_UNITS``) of type ``name`` for the days ``kwh``."""
        n = len(kwh)
        if name == "spike":
            obs = np.isfinite(kwh)
            mean = np.where(obs, kwh, 0.0).sum(axis=1) / np.maximum(obs.sum(axis=1), 1)
            return np.maximum(self.spike_min_kwh, self.spike_factor * mean)
        if name == "time_shift":
            return rng.integers(self.shift_min_slots, self.shift_max_slots + 1, n) / 2.0
        value = {"outage": self.outage_slots / 2, "stuck": self.stuck_slots / 2,
                 "level_up": self.level_up_factor, "level_down": 1 - self.level_down_factor,
                 "evening_drop": 1 - self.evening_factor, "erratic": self.erratic_sigma,
                 "partial_level": self.partial_level_factor,
                 "weekend_extra": self.weekend_extra_kwh,
                 "heating_mild": self.heating_kwh}[name]
        return np.full(n, value, np.float32)


def weekday(day: np.ndarray) -> np.ndarray:
    """Monday = 0 for days since 1970-01-01 (a Thursday)."""
    return (np.asarray(day) + 3) % 7


def applicable(name: str, day: np.ndarray | None) -> np.ndarray | None:
    """bool (N,): rows a type can be put into (weekend days for ``weekend_extra``); None: all."""
    if name == "weekend_extra" and day is not None:
        return weekday(day) >= 5
    return None


def inject_type(
    kwh: np.ndarray,
    name: str,
    magnitude: float | np.ndarray,
    rng: np.random.Generator,
    *,
    day: np.ndarray | None = None,
    temp_max: np.ndarray | None = None,
    config: InjectionConfig | None = None,
) -> np.ndarray:
    """A copy of every row of ``kwh`` (N, 48) with anomaly ``name`` of size ``magnitude``
    (a scalar or (N,)); ``day`` (N,) and ``temp_max`` (N,) (°C, NaN = unknown) for the types
    that depend on the calendar or the weather. NaN (missing) readings stay NaN."""
    cfg = config or InjectionConfig()
    kwh = np.asarray(kwh, dtype=np.float32)
    n = len(kwh)
    assert kwh.shape == (n, N_SLOTS), kwh.shape
    assert name in ANOMALY_TYPES[1:], name
    m = np.broadcast_to(np.asarray(magnitude, np.float32), (n,)).copy()
    obs = np.isfinite(kwh)
    out = kwh.copy()
    slots = np.arange(N_SLOTS)

    def window(length: np.ndarray) -> np.ndarray:
        """bool (N, 48): a random run of ``length`` (N,) slots per row."""
        length = np.clip(length.astype(np.int64), 1, N_SLOTS)
        start = (rng.random(n) * (N_SLOTS - length + 1)).astype(np.int64)
        return (slots >= start[:, None]) & (slots < (start + length)[:, None])

    if name == "spike":
        out = np.where(window(np.full(n, cfg.spike_slots)), out + m[:, None], out)
    elif name == "outage":
        out = np.where(window(np.round(2 * m)), 0.0, out)
    elif name == "stuck":
        w = window(np.round(2 * m))
        first = out[np.arange(n), np.argmax(w, axis=1)]
        value = np.maximum(np.nan_to_num(first, nan=cfg.stuck_min_kwh), cfg.stuck_min_kwh)
        out = np.where(w, value[:, None], out)
    elif name == "level_up":
        out = out * m[:, None]
    elif name == "level_down":
        out = out * (1.0 - m[:, None])
    elif name == "time_shift":
        shift = np.round(2 * m).astype(np.int64) * rng.choice([-1, 1], size=n)
        src = (slots[None, :] - shift[:, None]) % N_SLOTS  # (N, 48) slot each value comes from
        out = np.take_along_axis(out, src, axis=1)
    elif name == "evening_drop":
        lo, hi = cfg.evening_slots
        out[:, lo:hi] *= 1.0 - m[:, None]
    elif name == "erratic":
        out = out * np.exp(rng.normal(0.0, 1.0, size=(n, N_SLOTS)) * m[:, None])
    elif name == "partial_level":
        w = window(rng.integers(8, 17, size=n))
        factor = np.where(rng.random(n) < 0.5, m, 1.0 / np.maximum(m, 1e-3))
        out = np.where(w, out * factor[:, None], out)
    elif name == "weekend_extra":
        out = np.where(window(np.full(n, 12)), out + m[:, None], out)
    elif name == "heating_mild":
        mild = np.ones(n, bool)
        if temp_max is not None:
            t = np.asarray(temp_max, np.float32)
            mild = ~np.isfinite(t) | (t >= cfg.mild_temp)
        hours = ((slots >= 12) & (slots < 18)) | ((slots >= 34) & (slots < 46))
        out = np.where(hours[None, :] & mild[:, None], out + m[:, None], out)
    out = out.astype(np.float32)
    out[~obs] = np.nan  # a missing reading stays missing
    return out


def inject(
    kwh: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    config: InjectionConfig | None = None,
    *,
    day: np.ndarray | None = None,
    temp_max: np.ndarray | None = None,
) -> np.ndarray:
    """A copy of ``kwh`` (N, 48) with anomaly ``labels[i]`` (index into ANOMALY_TYPES), at its
    default magnitude, put into day i; label 0 leaves the day unchanged."""
    cfg = config or InjectionConfig()
    kwh = np.asarray(kwh, dtype=np.float32)
    labels = np.asarray(labels)
    n = len(kwh)
    assert kwh.shape == (n, N_SLOTS) and labels.shape == (n,), (kwh.shape, labels.shape)
    assert labels.min(initial=0) >= 0 and labels.max(initial=0) < len(ANOMALY_TYPES), labels
    out = kwh.copy()
    for k, name in enumerate(ANOMALY_TYPES[1:], start=1):
        r = np.flatnonzero(labels == k)
        if len(r):
            out[r] = inject_type(
                kwh[r], name, cfg.magnitudes(name, kwh[r], rng), rng, config=cfg,
                day=None if day is None else np.asarray(day)[r],
                temp_max=None if temp_max is None else np.asarray(temp_max)[r])
    return out


def random_labels(
    n: int, rate: float, rng: np.random.Generator, types: tuple[str, ...] | None = None,
    day: np.ndarray | None = None,
) -> np.ndarray:
    """int8 (n,) labels: each day anomalous with probability ``rate``, types uniform among
    ``types`` (default all but 'normal'); with ``day``, a type is only put on days it
    applies to (``applicable``), others get another type."""
    types = types or ANOMALY_TYPES[1:]
    codes = np.array([ANOMALY_TYPES.index(t) for t in types], dtype=np.int8)
    labels = np.zeros(n, dtype=np.int8)
    hit = np.flatnonzero(rng.random(n) < rate)
    labels[hit] = rng.choice(codes, size=len(hit))
    if day is not None:
        for t in types:
            ok = applicable(t, day)
            if ok is None:
                continue
            bad = hit[(labels[hit] == ANOMALY_TYPES.index(t)) & ~ok[hit]]
            others = codes[codes != ANOMALY_TYPES.index(t)]
            if len(bad) and len(others):
                labels[bad] = rng.choice(others, size=len(bad))
    return labels


# ---------------------------------------------------------------------------- persistent

#: Changes that persist from a start day (``persistent_change``), for the sustained-change
#: detector: what a revenue-protection team looks for.
PERSISTENT_TYPES: tuple[str, ...] = ("evening_cut", "level_40", "night_zero", "vacancy",
                                     "drift_down")


def persistent_change(
    kwh: np.ndarray,
    name: str,
    rng: np.random.Generator,
    *,
    ramp_days: int = 28,
) -> np.ndarray:
    """A copy of one household's consecutive days ``kwh`` (D, 48), changed from row 0 on:

    * ``evening_cut``: 16:00-22:00 times 0.3 every day (a bypass of the evening load);
    * ``level_40``: every reading times 0.4;
    * ``night_zero``: 00:00-06:00 reads exactly 0 every night (a meter or a bypass);
    * ``vacancy``: the household's own lowest-decile reading, with a little noise, all day;
    * ``drift_down``: readings times a factor falling linearly to 0.4 over ``ramp_days``.
    """
    kwh = np.asarray(kwh, dtype=np.float32)
    obs = np.isfinite(kwh)
    out = kwh.copy()
    d = len(out)
    if name == "evening_cut":
        out[:, 32:44] *= 0.3
    elif name == "level_40":
        out *= 0.4
    elif name == "night_zero":
        out[:, 0:12] = 0.0
    elif name == "vacancy":
        base = float(np.nanquantile(kwh, 0.1)) if obs.any() else 0.05
        out = np.maximum(base * np.exp(rng.normal(0.0, 0.15, size=out.shape)), 0.0)
    elif name == "drift_down":
        factor = 1.0 - 0.6 * np.minimum(np.arange(1, d + 1) / ramp_days, 1.0)
        out *= factor[:, None].astype(np.float32)
    else:
        raise ValueError(f"unknown persistent change {name!r}; one of {PERSISTENT_TYPES}")
    out = out.astype(np.float32)
    out[~obs] = np.nan
    return out
