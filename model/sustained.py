"""Sustained changes: a one-sided CUSUM per statistic over each household's recent days.

The day scorer (``model.detector``) asks "is this day unusual for this household?"; it
learns each household's level as it goes, so a change that persists (a bypass that cuts the
evening peak every day, a level that drops to 40 %, a meter that reads zero every night, a
vacant house) is alerted on its first days at best and then becomes the new normal. This
module asks the other question: "has this household's use dropped, or its meter started to
fail, and since when?"

Each complete day is reduced to four statistics (``SUSTAINED_STATS``):

* ``total``: log of the day's mean kWh per half-hour (+ 0.02);
* ``evening``: log of the share of the day's use in 16:00-22:00 (+ 0.02);
* ``night_min``: log of the smallest reading in 00:00-06:00 (+ 0.01);
* ``zero_night``: the share of 00:00-06:00 half-hours that read exactly 0.

Each is watched in one direction only, the one that loses revenue or signals a fault
(``DIRECTION``: the first three down, zeros at night up); a household using more is not a
sustained change here. Against each household's baseline (exponentially weighted mean and
variance over about two months of in-control days) a day's statistic becomes a z-score,
capped at ``z_cap`` so that no single day can raise an alert. A CUSUM accumulates
``z - k``; past ``h`` it is a candidate, and the candidate becomes a ``sustained_change``
only when it matches a signature (``SIGNATURES``) and its estimated size (the mean
deviation from the baseline over the run, uncapped) passes that signature's minimum:

* ``evening_cut``: the evening share falls, the daily total does not rise (a bypass of the
  evening load);
* ``zeros_at_night``: night-time readings of exactly zero appear (a meter fault, a bypass);
* ``scaled_down``: the daily total and the night-time base fall together (their CUSUMs
  add up), by about the same factor, and the evening share stays (every reading scaled: a
  tampered meter);
* ``vacant``: the daily total falls while the night base stays (only the base load is
  left); a holiday away looks exactly like it, so it needs a longer run (``h_vacant``).

A record carries the signature, the estimated start day (the first day of the run that
crossed), the statistic, its direction and the size of the shift (in the statistic's units
and in z). After an alert the household learns its new regime from scratch (a new warm-up)
and stays quiet for ``cooldown_days``.

Heating switched off in spring is no change: with the day's temperature (``update``'s
``temperature``, from the service's weather), each household learns how much its daily
total follows the heating degree days; a ``scaled_down`` or ``vacant`` candidate that came
with weather that much warmer, in a household that heats with electricity, is the season:
the household learns its new level without an alert (``SustainedConfig.heat_warming``).

State per household: ``SustainedState`` (float32/int32 while updating), serialisable with
``to_doc``/``from_docs``; a store of many households keeps it in 62 bytes of float16,
int16 and uint16 columns (``storage_columns``, ``STORAGE_DTYPES``). ``update`` is pure,
like ``Detector.score``: it returns the new state and never modifies its inputs.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from meterwatch.model.features import ContextTables
from meterwatch.model.loaders import day_to_date
from meterwatch.model.state import clip_to

SUSTAINED_STATS: tuple[str, ...] = ("total", "evening", "night_min", "zero_night")
N_SUSTAINED = len(SUSTAINED_STATS)
#: The direction each statistic is watched in (-1: a fall, +1: a rise).
DIRECTION = np.array([-1.0, -1.0, -1.0, 1.0], np.float32)
#: What a sustained change can be (``SustainedResult.describe``'s ``signature``).
SIGNATURES: tuple[str, ...] = ("evening_cut", "zeros_at_night", "scaled_down", "vacant")
_TOT, _EVE, _NMIN, _ZERO = range(N_SUSTAINED)
# The statistic each signature is reported by.
_SIGNATURE_STAT = (_EVE, _ZERO, _TOT, _TOT)
_NIGHT = slice(0, 12)  # 00:00-06:00
_EVENING = slice(32, 44)  # 16:00-22:00

# What each signature means, for the alert text.
_WHAT = {
    "evening_cut": "the evening peak (16:00-22:00) shrank",
    "zeros_at_night": "zero readings at night (00:00-06:00)",
    "scaled_down": "every reading fell by about the same factor",
    "vacant": "only the base load is left (vacant, or away)",
}


def day_features(kwh: np.ndarray, min_observed: int = 40) -> np.ndarray:
    """(N, 48) kWh -> (N, N_SUSTAINED) float32 statistics; NaN rows for days with fewer than
    ``min_observed`` usable readings (or a night or evening without any)."""
    kwh = np.asarray(kwh, np.float32)
    obs = np.isfinite(kwh) & (kwh >= 0)
    x = np.where(obs, kwh, np.nan)
    n_obs = obs.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(x, axis=1)
        evening = np.nanmean(x[:, _EVENING], axis=1) * 12 / np.maximum(mean * 48, 1e-3)
        night = x[:, _NIGHT]
        night_min = np.nanmin(night, axis=1)
        zero = np.nansum(night == 0, axis=1) / np.maximum(np.isfinite(night).sum(axis=1), 1)
    f = np.stack([np.log(mean + 0.02), np.log(np.clip(evening, 0, 1) + 0.02),
                  np.log(night_min + 0.01), zero], axis=1).astype(np.float32)
    f[n_obs < min_observed] = np.nan
    return f


@dataclass(frozen=True)
class SustainedConfig:
    """CUSUM settings (see the module docstring); chosen on half of the 2013 sample and
    measured on the other half (``benchmarks/evaluation/sustained.py``, docs/sustained.md)."""

    # Allowance: a shift smaller than k standard deviations is not accumulated.
    k: float = 0.75
    # Decision threshold on a CUSUM (standard deviations x days).
    h: float = 8.0
    # The same for the ``vacant`` signature (a holiday away looks the same for a while).
    h_vacant: float = 8.0
    # Per-day z-scores are capped at this: one wild day adds at most z_cap - k.
    z_cap: float = 4.0
    # Days a household needs before it can alert (the baseline is learnt first).
    warmup_days: int = 21
    # Weight of the newest in-control day in the baseline mean and variance.
    alpha: float = 1 / 28
    # Floors of each statistic's standard deviation (SUSTAINED_STATS order).
    min_std: tuple[float, ...] = (0.12, 0.12, 0.15, 0.08)
    # Shifts (in each statistic's units) that are not worth accumulating: days within half
    # of it of the baseline add nothing to the CUSUM.
    min_shift: tuple[float, ...] = (0.5, 0.5, 0.7, 0.4)
    # The smallest estimated size of a change that alerts, per signature (SIGNATURES order,
    # in the units of the statistic it is reported by: log ratios, a share for zeros).
    min_size: tuple[float, ...] = (0.6, 0.0, 0.5, 1.0)
    # scaled_down: the night base must have fallen by at least this share of the total's
    # (log) fall, and by at most this much more (log units).
    scaled_night_share: float = 0.5
    scaled_tolerance: float = 0.5
    # scaled_down: alert when the total's and the night base's CUSUMs together pass
    # scaled_joint x h (each past h / 3); 0: the total's alone past h, the night's past h / 2.
    scaled_joint: float = 0.0
    # evening_cut: over the evening share's run, the daily total may have fallen by at most
    # evening_total_max (log units; a cut of the evening alone takes at most ~0.7 of the
    # day; beyond, the whole day collapsed: a meter reading zero, reported by
    # zeros_at_night), and risen by at most -evening_total_min (a share that fell because
    # the rest of the day rose, autumn's heating, is no cut).
    evening_total_max: float = 1.0
    evening_total_min: float = -0.2
    # A day is in control (teaches the baseline) when its z towards the watched direction
    # is below this, on a statistic whose CUSUM is below h / 2 (``freeze``) or on any
    # statistic (not ``freeze``); its deviation is clipped at this many standard deviations.
    learn_z: float = 3.0
    # Days without a new alert for the household after one.
    cooldown_days: int = 28
    # Statistics whose baseline stops learning while a change builds up (CUSUM past h / 2);
    # the others keep learning from days within learn_z (seasons move the daily total and
    # the night base slowly; a frozen baseline would turn that into a change).
    freeze: tuple[bool, ...] = (False, False, False, False)
    # Heating. A day's heating degree days: hdd_base - its mean temperature, at least 0.
    # How much a household's daily total follows them: the slope of a regression learnt
    # online from its in-control days with weather (EW covariance of the log total with
    # the degree days / (their EW variance + temp_ridge), at least 0).
    hdd_base: float = 15.5
    # Weight of the newest day in the regression's mean, variance and covariance.
    temp_alpha: float = 1 / 56
    # Shrinks the slope when the degree days hardly varied (in degree-days squared).
    temp_ridge: float = 10.0
    # Heating switched off: a scaled_down or vacant candidate whose run came with warmer
    # weather (the run's degree days on average at least heat_warming below the
    # baseline's) in a household whose daily total follows the degree days (slope at
    # least heat_slope, log units per degree day) is the season, not a change: the
    # household learns its new level from scratch (a warm-up) without an alert. Days
    # without weather add nothing to the run's warming. inf: off.
    heat_warming: float = 6.0
    heat_slope: float = 0.005

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in _TUPLE_FIELDS:
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SustainedConfig:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        for key in _TUPLE_FIELDS:
            if key in kw:
                kw[key] = tuple(kw[key])
        return cls(**kw)


_TUPLE_FIELDS = ("min_std", "min_shift", "min_size", "freeze")
_NEVER = -(2**30)


@dataclass
class SustainedState:
    """CUSUM state of N households (arrays of length N; (N, N_SUSTAINED) where noted)."""

    count: np.ndarray  # int32: days learnt
    mean: np.ndarray  # float32 (N, S): baseline mean of each statistic
    var: np.ndarray  # float32 (N, S): baseline variance
    cusum: np.ndarray  # float32 (N, S): one-sided CUSUM in the statistic's DIRECTION
    start: np.ndarray  # int32 (N, S): first day of the current run
    run_len: np.ndarray  # int16 (N, S): days in the current run (at most 32,767)
    run_sum: np.ndarray  # float32 (N, S): sum of the run's deviations from the baseline
    evening_total: np.ndarray  # float32: sum of the daily total's fall over the evening run
    last_alert: np.ndarray  # int32: day of the household's last alert
    hdd_mean: np.ndarray  # float32: EW mean of the heating degree days of the learnt days
    hdd_var: np.ndarray  # float32: their EW variance
    hdd_cov: np.ndarray  # float32: EW covariance of the daily total (log) with them
    hdd_run: np.ndarray  # float32: sum of the degree days' fall over the total's run

    @classmethod
    def empty(cls, n: int) -> SustainedState:
        z = np.zeros((n, N_SUSTAINED), np.float32)
        return cls(np.zeros(n, np.int32), z.copy(), z.copy(), z.copy(),
                   np.zeros((n, N_SUSTAINED), np.int32), np.zeros((n, N_SUSTAINED), np.int16),
                   z.copy(), np.zeros(n, np.float32), np.full(n, _NEVER, np.int32),
                   np.zeros(n, np.float32), np.zeros(n, np.float32), np.zeros(n, np.float32),
                   np.zeros(n, np.float32))

    def __len__(self) -> int:
        return len(self.count)

    def take(self, idx: Sequence[int] | np.ndarray | slice) -> SustainedState:
        return SustainedState(**{f.name: np.array(getattr(self, f.name)[idx])
                                 for f in fields(self)})

    def put(self, idx: Sequence[int] | np.ndarray, rows: SustainedState) -> None:
        for f in fields(self):
            getattr(self, f.name)[idx] = getattr(rows, f.name)

    def to_doc(self, i: int) -> dict[str, Any]:
        """Household ``i`` as a JSON-able dict (the state topic's value)."""
        return {f.name: getattr(self, f.name)[i].tolist() for f in fields(self)}

    @classmethod
    def from_docs(cls, docs: Sequence[Mapping[str, Any] | None]) -> SustainedState:
        """Inverse of ``to_doc`` for N households (None: a household never seen)."""
        out = cls.empty(len(docs))
        for i, doc in enumerate(docs):
            if doc is None:
                continue
            for f in fields(out):
                if f.name in doc:  # (older documents have no hdd_*: no regression yet)
                    getattr(out, f.name)[i] = np.asarray(doc[f.name])
        return out


#: Prefix of the sustained state's columns in a store of many households (the stream's
#: household table, the day score's ``state``): ``sustained_count``, ``sustained_mean`` ...
COLUMN_PREFIX = "sustained_"


#: How each field is stored (``storage_columns``): the update computes in float32/int32,
#: a store keeps float16 (about 3 significant digits: a log level to 0.002, against
#: standard deviations of at least 0.08), int16 day counts and uint16 days since
#: 1970-01-01 (valid to 2149-06-06; 0 for "never" in ``last_alert``, whose update cannot
#: alert on day 0). ``STATE_BYTES`` a household.
STORAGE_DTYPES: dict[str, np.dtype] = {
    "count": np.dtype(np.int16), "mean": np.dtype(np.float16), "var": np.dtype(np.float16),
    "cusum": np.dtype(np.float16), "start": np.dtype(np.uint16),
    "run_len": np.dtype(np.int16), "run_sum": np.dtype(np.float16),
    "evening_total": np.dtype(np.float16), "last_alert": np.dtype(np.uint16),
    "hdd_mean": np.dtype(np.float16), "hdd_var": np.dtype(np.float16),
    "hdd_cov": np.dtype(np.float16), "hdd_run": np.dtype(np.float16)}


def to_storage(name: str, values: np.ndarray) -> np.ndarray:
    """Field ``name``'s values as stored (``STORAGE_DTYPES``): integers clipped to the
    type's range (never wrapped), floats to float16's (never infinite); ``clip_to``."""
    return clip_to(values, STORAGE_DTYPES[name])


def from_storage(name: str, values: np.ndarray, like: np.ndarray) -> np.ndarray:
    """Inverse of ``to_storage`` into the dtype of ``like`` (the update's)."""
    out = np.asarray(values).astype(like.dtype)
    if name == "last_alert":
        out[out == 0] = _NEVER
    return out


def storage_columns(n: int) -> dict[str, np.ndarray]:
    """The sustained state of ``n`` new households as named columns (``COLUMN_PREFIX``,
    ``STORAGE_DTYPES``), ``STATE_BYTES`` a household."""
    fresh = SustainedState.empty(n)
    return {COLUMN_PREFIX + f.name: to_storage(f.name, getattr(fresh, f.name))
            for f in fields(SustainedState)}


#: Bytes of one household's sustained state in a store (``storage_columns``).
STATE_BYTES = sum(a.itemsize * int(np.prod(a.shape[1:])) for a in storage_columns(1).values())
_EMPTY = SustainedState.empty(1)


def from_columns(columns: Mapping[str, np.ndarray], idx: np.ndarray) -> SustainedState:
    """Rows ``idx`` of a store's columns (``storage_columns``) as a ``SustainedState``."""
    return SustainedState(**{f.name: from_storage(f.name, columns[COLUMN_PREFIX + f.name][idx],
                                                  getattr(_EMPTY, f.name))
                             for f in fields(SustainedState)})


def to_columns(state: SustainedState, columns: Mapping[str, np.ndarray], idx: np.ndarray
               ) -> None:
    """Write ``state`` into rows ``idx`` of a store's columns (in place, ``to_storage``)."""
    for f in fields(SustainedState):
        columns[COLUMN_PREFIX + f.name][idx] = to_storage(f.name, getattr(state, f.name))


def stored(state: SustainedState) -> SustainedState:
    """``state`` as a store gives it back (rounded to ``STORAGE_DTYPES``)."""
    return SustainedState(**{
        f.name: from_storage(f.name, to_storage(f.name, getattr(state, f.name)),
                             getattr(_EMPTY, f.name))
        for f in fields(SustainedState)})


@dataclass
class SustainedResult:
    """What ``SustainedDetector.update`` found on N days (arrays of length N)."""

    alert: np.ndarray  # bool: a sustained change was detected on this day
    signature: np.ndarray  # int: index into SIGNATURES (-1: none)
    stat: np.ndarray  # int: index into SUSTAINED_STATS of the statistic it is reported by
    start_day: np.ndarray  # int32: estimated first day of the change (days since 1970-01-01)
    shift: np.ndarray  # float32: estimated size, in the statistic's units (log for 3 of 4)
    shift_z: np.ndarray  # float32: the same in baseline standard deviations
    changed: np.ndarray  # bool (N, S): every statistic whose CUSUM passed h
    state: SustainedState

    def describe(self, i: int) -> dict[str, Any] | None:
        """The ``sustained_change`` content of day ``i`` (None without an alert)."""
        if not self.alert[i]:
            return None
        sig = SIGNATURES[int(self.signature[i])]
        name = SUSTAINED_STATS[int(self.stat[i])]
        shift = float(self.shift[i])
        start = day_to_date(self.start_day[i])
        out: dict[str, Any] = {
            "type": "sustained_change", "signature": sig, "start_date": start.isoformat(),
            "statistic": name, "direction": "up" if shift > 0 else "down",
            "what": _WHAT[sig], "shift": round(shift, 4),
            "shift_sd": round(float(self.shift_z[i]), 2),
            "changed": [s for k, s in enumerate(SUSTAINED_STATS) if self.changed[i, k]],
            "factor": None if name == "zero_night" else round(float(np.exp(shift)), 3),
        }
        return out


class SustainedDetector:
    """One-sided CUSUMs on per-day statistics of each household (module docstring)."""

    def __init__(self, config: SustainedConfig | None = None) -> None:
        self.config = config or SustainedConfig()

    def allowance(self, std: np.ndarray) -> np.ndarray:
        """(N, S) CUSUM allowance in z units: ``k``, or half of ``min_shift`` if larger."""
        half = 0.5 * np.asarray(self.config.min_shift, np.float32)
        return np.maximum(self.config.k, half / std).astype(np.float32)

    def update(self, kwh: np.ndarray, day: np.ndarray, state: SustainedState,
               temperature: np.ndarray | None = None) -> SustainedResult:
        """One day of N households (each at most once): (N, 48) kWh, (N,) days, their
        state before the day, and optionally (N,) the day's mean temperature in °C (NaN:
        unknown). Days with too few readings leave the state unchanged."""
        cfg = self.config
        day = np.asarray(day, np.int32)
        n = len(day)
        assert np.shape(kwh) == (n, 48) and len(state) == n, (np.shape(kwh), len(state))
        f = day_features(kwh)
        s = state.take(slice(None))
        ok = np.isfinite(f).all(axis=1)
        first = ok & (s.count == 0)
        s.mean[first] = f[first]
        s.var[first] = 0.0
        std = np.sqrt(np.maximum(s.var, np.asarray(cfg.min_std, np.float32) ** 2))
        # heating: the day's degree days against the household's learnt ones; the slope
        # of its daily total on them
        hdd = (np.maximum(cfg.hdd_base - np.asarray(temperature, np.float32), 0.0)
               if temperature is not None else np.full(n, np.nan, np.float32))
        warm = ok & np.isfinite(hdd)
        hdd = np.where(warm, hdd, 0.0).astype(np.float32)
        fresh_t = warm & (s.count == 0)
        s.hdd_mean[fresh_t] = hdd[fresh_t]
        s.hdd_var[fresh_t] = 0.0
        s.hdd_cov[fresh_t] = 0.0
        dx = np.where(warm, hdd - s.hdd_mean, 0.0).astype(np.float32)
        slope = np.maximum(s.hdd_cov / (s.hdd_var + cfg.temp_ridge), 0.0)
        # z towards each statistic's watched direction
        z = np.clip((f - s.mean) / std, -cfg.z_cap, cfg.z_cap) * DIRECTION
        z = np.where(ok[:, None], z, 0.0).astype(np.float32)
        armed = ok & (s.count >= cfg.warmup_days)
        a2 = armed[:, None]
        allow = self.allowance(std)
        new = np.maximum(s.cusum + z - allow, 0.0)
        started = (s.cusum <= 0) & (new > 0)
        s.start = np.where(a2 & started, day[:, None], s.start).astype(np.int32)
        s.run_len = np.where(a2, np.where(new > 0, np.minimum(s.run_len.astype(np.int32) + 1,
                                                              32767), 0),
                             s.run_len).astype(np.int16)
        dev_dir = np.where(ok[:, None], (f - s.mean) * DIRECTION, 0.0)  # not capped
        s.run_sum = np.where(a2, np.where(new > 0, np.where(started, 0.0, s.run_sum) + dev_dir,
                                          0.0), s.run_sum).astype(np.float32)
        # the total's fall over the evening share's run (an evening cut is less use, not a
        # share that fell because the rest of the day rose)
        s.evening_total = np.where(armed, np.where(
            new[:, _EVE] > 0, np.where(started[:, _EVE], 0.0, s.evening_total)
            + dev_dir[:, _TOT], 0.0), s.evening_total).astype(np.float32)
        # the weather's warming over the total's run (degree days below the baseline's)
        s.hdd_run = np.where(armed, np.where(
            new[:, _TOT] > 0, np.where(started[:, _TOT], 0.0, s.hdd_run) - dx, 0.0),
            s.hdd_run).astype(np.float32)
        s.cusum = np.where(a2, new, s.cusum).astype(np.float32)

        # learn the baseline from in-control days only
        # (a move away from the watched direction is always learnt, clipped: seasons and a
        # return from a holiday raise the baseline again)
        quiet = (z < cfg.learn_z) & (~np.asarray(cfg.freeze, bool) | (s.cusum < cfg.h / 2))
        learn = ok[:, None] & (quiet | (s.count < cfg.warmup_days)[:, None])
        w = np.maximum(cfg.alpha, 1.0 / (s.count + 1.0))[:, None]
        dev = np.where(np.isfinite(f), f - s.mean, 0.0)
        dev_c = np.clip(dev, -cfg.learn_z * std, cfg.learn_z * std)
        # the regression: degree days of the learnt days (any statistic learnt) and the
        # daily total's covariance with them (its deviation, clipped, when it is learnt)
        wt = np.maximum(cfg.temp_alpha, 1.0 / (s.count + 1.0))
        learn_t = learn[:, _TOT] & warm
        dy = np.clip(dev[:, _TOT], -cfg.learn_z * std[:, _TOT] - slope * np.abs(dx),
                     cfg.learn_z * std[:, _TOT] + slope * np.abs(dx))
        s.hdd_cov = np.where(learn_t, (1 - wt) * (s.hdd_cov + wt * dx * dy),
                             s.hdd_cov).astype(np.float32)
        learn_x = (learn & warm[:, None]).any(axis=1)
        s.hdd_var = np.where(learn_x, (1 - wt) * (s.hdd_var + wt * dx**2), s.hdd_var
                             ).astype(np.float32)
        s.hdd_mean = np.where(learn_x, s.hdd_mean + wt * dx, s.hdd_mean).astype(np.float32)
        s.var = np.where(learn, (1 - w) * (s.var + w * dev_c**2), s.var).astype(np.float32)
        s.mean = np.where(learn, s.mean + w * dev_c, s.mean).astype(np.float32)
        s.count = np.where(ok, s.count + 1, s.count).astype(np.int32)

        # candidates, their estimated size, the signatures
        run = np.maximum(s.run_len.astype(np.float32), 1.0)
        size = np.where(s.cusum > 0, s.run_sum / run, 0.0)  # mean deviation of the run,
        size_z = size / std  # in the statistic's units and in z, towards DIRECTION
        over = (s.cusum > cfg.h) & a2
        min_size = np.asarray(cfg.min_size, np.float32)
        tot, nmin = size[:, _TOT], size[:, _NMIN]
        evening_quiet = s.cusum[:, _EVE] <= cfg.h / 2
        # total and night base together: their CUSUMs add up (a noisy total or a small
        # night base alone would not reach h within a week), each past h / 3
        joint = ((s.cusum[:, _TOT] + s.cusum[:, _NMIN] > cfg.scaled_joint * cfg.h)
                 & (s.cusum[:, _TOT] > cfg.h / 3) & (s.cusum[:, _NMIN] > cfg.h / 3) & armed
                 if cfg.scaled_joint > 0
                 else over[:, _TOT] & (s.cusum[:, _NMIN] > cfg.h / 2))
        scaled = (joint & evening_quiet
                  & (nmin >= cfg.scaled_night_share * tot)
                  & (nmin <= tot + cfg.scaled_tolerance) & (tot >= min_size[2]))
        vacant = ((s.cusum[:, _TOT] > cfg.h_vacant) & armed & ~scaled
                  & (s.cusum[:, _NMIN] <= cfg.h / 2) & (tot >= min_size[3]))
        # heating switched off with the season: no change, a new regime to learn
        heat_off = ((scaled | vacant) & (slope >= cfg.heat_slope)
                    & (s.hdd_run / run[:, _TOT] >= cfg.heat_warming))
        scaled &= ~heat_off
        vacant &= ~heat_off
        # an evening cut: less use in the evening, the rest of the day left as it was
        eve_tot = s.evening_total / run[:, _EVE]
        evening = (over[:, _EVE] & (size[:, _EVE] >= min_size[0])
                   & (eve_tot >= cfg.evening_total_min) & (eve_tot <= cfg.evening_total_max)
                   & (s.cusum[:, _ZERO] <= cfg.h / 2))
        sig_hit = np.stack([evening,
                            over[:, _ZERO] & (size[:, _ZERO] >= min_size[1]),
                            scaled, vacant], axis=1)
        cooled = day - s.last_alert >= cfg.cooldown_days
        alert = sig_hit.any(axis=1) & cooled
        signature = np.where(alert, np.argmax(sig_hit, axis=1), -1)
        stat = np.where(alert, np.asarray(_SIGNATURE_STAT)[np.maximum(signature, 0)], -1)
        r = np.arange(n)
        k = np.maximum(stat, 0)
        changed = (s.cusum > cfg.h / 2) & a2
        changed[r, k] |= alert

        # an alerting household learns its new regime from scratch (a warm-up, within the
        # cooldown); its runs end
        moved = changed & alert[:, None]
        start = s.start[r, k]
        again = alert | (heat_off & ~sig_hit.any(axis=1))
        s.count[again] = 0
        s.cusum[again] = 0.0
        s.run_len[again] = 0
        s.run_sum[again] = 0.0
        s.evening_total[again] = 0.0
        s.hdd_run[again] = 0.0
        s.last_alert = np.where(alert, day, s.last_alert).astype(np.int32)
        return SustainedResult(alert=alert, signature=signature, stat=stat,
                               start_day=np.where(alert, start, 0).astype(np.int32),
                               shift=np.where(alert, size[r, k] * DIRECTION[k], 0.0
                                              ).astype(np.float32),
                               shift_z=np.where(alert, size_z[r, k] * DIRECTION[k], 0.0
                                                ).astype(np.float32),
                               changed=moved, state=s)

    def replay(self, kwh: np.ndarray, day: np.ndarray, temperature: np.ndarray | None = None,
               *, rounded: bool = True) -> tuple[SustainedResult, SustainedState]:
        """One household's days (D, 48), (D,) in increasing order (and their (D,) mean
        temperatures, NaN: unknown), from an empty state; with ``rounded``, the state is
        rounded to its storage after every day, as in the service (``stored``). Returns the
        stacked per-day results (their ``state`` is the final one) and it."""
        kwh = np.asarray(kwh, np.float32)
        day = np.asarray(day, np.int32)
        assert len(day) < 2 or bool(np.all(np.diff(day) > 0)), "days must increase"
        state = SustainedState.empty(1)
        parts: list[SustainedResult] = []
        for i in range(len(day)):
            res = self.update(kwh[i:i + 1], day[i:i + 1], state,
                              None if temperature is None else temperature[i:i + 1])
            state = stored(res.state) if rounded else res.state
            parts.append(res)
        cat = {f.name: np.concatenate([getattr(p, f.name) for p in parts])
               for f in fields(SustainedResult) if f.name != "state"}
        return SustainedResult(**cat, state=state), state

    def replay_many(self, kwh: np.ndarray, days: np.ndarray,
                    temperature: np.ndarray | None = None, *, rounded: bool = True
                    ) -> np.ndarray:
        """S series of the same days, (S, D, 48) kWh (NaN = missing) and (D,) increasing
        days (and their (D,) mean temperatures), each from an empty state (``rounded``:
        as ``replay``). Returns int32
        (S, D, 4): per day, the alert flag, the statistic (-1: none), the estimated start
        day and the signature (-1: none)."""
        kwh = np.asarray(kwh, np.float32)
        n, d = kwh.shape[:2]
        out = np.zeros((n, d, 4), np.int32)
        state = SustainedState.empty(n)
        for j in range(d):
            res = self.update(kwh[:, j], np.full(n, days[j], np.int32), state,
                              None if temperature is None
                              else np.full(n, temperature[j], np.float32))
            state = stored(res.state) if rounded else res.state
            out[:, j, 0] = res.alert
            out[:, j, 1] = res.stat
            out[:, j, 2] = res.start_day
            out[:, j, 3] = res.signature
        return out


def daily_temperature(tables: ContextTables | None, day: np.ndarray) -> np.ndarray:
    """(N,) float32 mean of each day's highest and lowest temperature (°C) from the weather
    of ``tables`` (``model.features.ContextTables``); NaN where the day has none."""
    day = np.asarray(day, np.int32)
    out = np.full(len(day), np.nan, np.float32)
    if tables is None or not len(tables.weather_day):
        return out
    i = np.clip(np.searchsorted(tables.weather_day, day), 0, len(tables.weather_day) - 1)
    hit = tables.weather_day[i] == day
    out[hit] = (tables.temp_max[i[hit]] + tables.temp_min[i[hit]]) / 2
    return out


# ---------------------------------------------------------------------------- evaluation


def household_grid(kwh: np.ndarray, day: np.ndarray, household_ids: Sequence[str]
                   ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Long rows -> (H, D, 48) kWh on the full day grid (NaN where a day is absent), the
    (D,) days and the H household ids."""
    ids = np.asarray(household_ids, dtype=str)
    uniq, hh = np.unique(ids, return_inverse=True)
    days = np.arange(int(np.min(day)), int(np.max(day)) + 1, dtype=np.int32)
    grid = np.full((len(uniq), len(days), 48), np.nan, np.float32)
    grid[hh, np.asarray(day) - days[0]] = kwh
    return grid, days, [str(u) for u in uniq]


def evaluate_sustained(
    kwh: np.ndarray,
    day: np.ndarray,
    household_ids: Sequence[str],
    config: SustainedConfig | None = None,
    *,
    starts_per_household: int = 3,
    duration: int = 56,
    within: int = 7,
    seed: int = 0,
    tables: ContextTables | None = None,
    rounded: bool = True,
) -> dict[str, Any]:
    """Detection of injected persistent changes and false alerts on clean data.

    Clean: every household's whole history replayed; alerts after the warm-up are false
    (real households do change: holidays away count here). Injected: for each household,
    type and ``starts_per_household`` random start days (after two months, leaving room
    for the change), ``model.inject.persistent_change`` from the start day for
    ``duration`` days; detected when an alert falls on one of the first ``within`` days
    (start day included). Alerts before the start day are counted with the clean ones.
    ``tables``: the weather (``daily_temperature``); without it no day has a temperature.
    ``rounded``: the state rounded to its storage after every day, as in the service.
    """
    from meterwatch.model.inject import PERSISTENT_TYPES, persistent_change

    det = SustainedDetector(config)
    cfg = det.config
    grid, days, _ = household_grid(kwh, day, household_ids)
    n_h, n_d = grid.shape[:2]
    temp = daily_temperature(tables, days)
    clean = det.replay_many(grid, days, temp, rounded=rounded)
    observed = np.isfinite(grid).sum(axis=2) >= 40
    months = float(observed.sum()) / 30.44
    false = int(clean[:, :, 0].sum())
    false_by = {sig: int(((clean[:, :, 0] > 0) & (clean[:, :, 3] == k)).sum())
                for k, sig in enumerate(SIGNATURES)}
    rng = np.random.default_rng(seed)
    lo, hi = max(cfg.warmup_days + 30, 60), n_d - duration
    assert hi > lo, f"need at least {lo + duration} days, got {n_d}"
    series, meta = [], []
    for t in PERSISTENT_TYPES:
        for h in range(n_h):
            for s0 in rng.integers(lo, hi, starts_per_household):
                g = grid[h].copy()
                g[s0:s0 + duration] = persistent_change(g[s0:s0 + duration], t, rng)
                series.append(g)
                meta.append((t, h, int(s0)))
    res = det.replay_many(np.stack(series), days, temp, rounded=rounded)
    per_type: dict[str, dict[str, Any]] = {}
    delays: dict[str, list[int]] = {t: [] for t in PERSISTENT_TYPES}
    start_err: dict[str, list[int]] = {t: [] for t in PERSISTENT_TYPES}
    hits: dict[str, list[bool]] = {t: [] for t in PERSISTENT_TYPES}
    pre_false = 0
    pre_months = 0.0
    for r, (t, h, s0) in zip(res, meta, strict=True):
        if not observed[h, s0:s0 + within].any():
            continue  # the household has no data then
        alerts = np.flatnonzero(r[:, 0])
        pre_false += int((alerts < s0).sum())
        pre_months += float(observed[h, :s0].sum()) / 30.44
        after = alerts[(alerts >= s0) & (alerts < s0 + within)]
        hits[t].append(len(after) > 0)
        if len(after):
            delays[t].append(int(after[0] - s0))
            start_err[t].append(int(r[after[0], 2] - days[s0]))
    for t in PERSISTENT_TYPES:
        n = len(hits[t])
        per_type[t] = {"n": n, "detected": float(np.mean(hits[t])) if n else float("nan"),
                       "median_delay_days": float(np.median(delays[t])) if delays[t] else None,
                       "median_abs_start_error_days": float(np.median(np.abs(start_err[t])))
                       if start_err[t] else None}
    all_hits = [x for t in PERSISTENT_TYPES for x in hits[t]]
    return {
        "config": cfg.to_dict(), "households": n_h, "days": n_d,
        "household_months_clean": months, "false_alerts_clean": false,
        "false_per_1000_household_months": 1000 * false / max(months, 1e-9),
        "false_by_signature": false_by,
        "false_before_start": pre_false,
        "false_before_start_per_1000_household_months": 1000 * pre_false / max(pre_months,
                                                                               1e-9),
        "detected_within": within, "duration": duration,
        "detected": float(np.mean(all_hits)) if all_hits else float("nan"),
        "per_type": per_type,
    }
