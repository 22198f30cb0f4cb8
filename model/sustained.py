"""Sustained changes: a CUSUM over each household's recent days.

The day scorer (``model.detector``) asks "is this day unusual for this household?"; it
learns each household's level as it goes, so a change that persists (a bypass that cuts the
evening peak every day, a level that drops to 40 %, a meter that reads zero every night, a
vacant house) is alerted on its first days at best and then becomes the new normal. This
module asks the other question: "has this household's behaviour changed, and since when?"

Each complete day is reduced to four statistics (``SUSTAINED_STATS``):

* ``total``: log of the day's mean kWh per half-hour (+ 0.02);
* ``evening``: log of the share of the day's use in 16:00-22:00 (+ 0.02);
* ``night_min``: log of the smallest reading in 00:00-06:00 (+ 0.01);
* ``zero_night``: the share of 00:00-06:00 half-hours that read exactly 0.

Against each household's baseline (exponentially weighted mean and variance over about a
month of in-control days, frozen while a change is building up) a day's statistic becomes a
z-score, capped at ``z_cap`` so that no single day can raise an alert (at least
``h / (z_cap - k)`` days must agree). Two one-sided CUSUMs per statistic accumulate
``z - k`` (upward) and ``-z - k`` (downward); a sum past ``h`` raises a ``sustained_change``
with the estimated start day (the first day of the run that crossed), the statistic, its
direction and the size of the shift (in the statistic's units and in z). After an alert the
household is re-baselined to its new regime and stays quiet for ``cooldown_days``.

State per household: a handful of float32/int32 arrays (``SustainedState``), a few hundred
bytes, serialisable with ``to_doc``/``from_docs`` for the state topic. ``update`` is pure,
like ``Detector.score``: it returns the new state and never modifies its inputs.
"""

from __future__ import annotations

import datetime as dt
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

SUSTAINED_STATS: tuple[str, ...] = ("total", "evening", "night_min", "zero_night")
N_SUSTAINED = len(SUSTAINED_STATS)
_NIGHT = slice(0, 12)  # 00:00-06:00
_EVENING = slice(32, 44)  # 16:00-22:00

# What a change of each statistic means, for the alert text: (up, down).
_WHAT = {
    "total": ("daily use rose", "daily use fell"),
    "evening": ("a larger share of use in the evening (16:00-22:00)",
                "the evening peak (16:00-22:00) shrank"),
    "night_min": ("night-time base load rose", "night-time base load fell"),
    "zero_night": ("more zero readings at night", "fewer zero readings at night"),
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
    """CUSUM settings (see the module docstring); chosen on the 2013 sample
    (``benchmarks/evaluation/RESULTS.md``)."""

    # Allowance: a shift smaller than k standard deviations is not accumulated.
    k: float = 0.75
    # Decision threshold on a CUSUM (standard deviations x days).
    h: float = 8.0
    # Per-day z-scores are capped at this: one wild day adds at most z_cap - k.
    z_cap: float = 4.0
    # Days a household needs before it can alert (the baseline is learnt first).
    warmup_days: int = 21
    # Weight of the newest in-control day in the baseline mean and variance (~a month).
    alpha: float = 1 / 28
    # Floors of each statistic's standard deviation (SUSTAINED_STATS order).
    min_std: tuple[float, ...] = (0.12, 0.12, 0.15, 0.08)
    # The smallest change worth an alert, in each statistic's units: log 0.5 is a factor
    # of 1.65 (or 0.61); seasons, weather and routines move households by less. Days
    # within half of it of the baseline add nothing to the CUSUMs.
    min_shift: tuple[float, ...] = (0.5, 0.5, 0.7, 0.4)
    # A day is in control (teaches the baseline) when |z| < this on a statistic whose CUSUMs
    # are both below h / 2.
    learn_z: float = 3.0
    # Days without a new alert for the household after one.
    cooldown_days: int = 28
    # Alert at h only on the signatures of tampering and meter faults (the evening peak
    # cut, zeros at night, the whole day scaled down: total and night-time base down
    # together); other changes (a holiday away keeps the night base) need h_other.
    signatures: bool = True
    h_other: float = 40.0
    # Statistics whose baseline stops learning while a change builds up (CUSUM past h / 2);
    # the others keep learning from days within learn_z (seasons move the daily total and
    # the night base slowly; a frozen baseline would turn that into a change).
    freeze: tuple[bool, ...] = (False, False, False, False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["min_std"] = list(self.min_std)
        d["min_shift"] = list(self.min_shift)
        d["freeze"] = list(self.freeze)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SustainedConfig:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        for key in ("min_std", "min_shift", "freeze"):
            if key in kw:
                kw[key] = tuple(kw[key])
        return cls(**kw)


_NEVER = -(2**30)


@dataclass
class SustainedState:
    """CUSUM state of N households (arrays of length N; (N, N_SUSTAINED) where noted)."""

    count: np.ndarray  # int32: days learnt
    mean: np.ndarray  # float32 (N, S): baseline mean of each statistic
    var: np.ndarray  # float32 (N, S): baseline variance
    up: np.ndarray  # float32 (N, S): upward CUSUM
    down: np.ndarray  # float32 (N, S): downward CUSUM
    up_start: np.ndarray  # int32 (N, S): first day of the current upward run
    down_start: np.ndarray  # int32 (N, S)
    up_len: np.ndarray  # int32 (N, S): days in the current upward run
    down_len: np.ndarray  # int32 (N, S)
    last_alert: np.ndarray  # int32: day of the household's last alert

    @classmethod
    def empty(cls, n: int) -> SustainedState:
        z = np.zeros((n, N_SUSTAINED), np.float32)
        zi = np.zeros((n, N_SUSTAINED), np.int32)
        return cls(np.zeros(n, np.int32), z.copy(), z.copy(), z.copy(), z.copy(), zi.copy(),
                   zi.copy(), zi.copy(), zi.copy(), np.full(n, _NEVER, np.int32))

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
                getattr(out, f.name)[i] = np.asarray(doc[f.name])
        return out


#: Prefix of the sustained state's columns in a store of many households (the stream's
#: household table, the day score's ``state``): ``sustained_count``, ``sustained_mean`` ...
COLUMN_PREFIX = "sustained_"


def storage_columns(n: int) -> dict[str, np.ndarray]:
    """The sustained state of ``n`` new households as named columns (``COLUMN_PREFIX``),
    ``STATE_BYTES`` a household."""
    fresh = SustainedState.empty(n)
    return {COLUMN_PREFIX + f.name: getattr(fresh, f.name) for f in fields(SustainedState)}


#: Bytes of one household's sustained state in a store (``storage_columns``).
STATE_BYTES = sum(a.itemsize * int(np.prod(a.shape[1:])) for a in
                  (getattr(SustainedState.empty(1), f.name) for f in fields(SustainedState)))


def from_columns(columns: Mapping[str, np.ndarray], idx: np.ndarray) -> SustainedState:
    """Rows ``idx`` of a store's columns (``storage_columns``) as a ``SustainedState``."""
    return SustainedState(**{f.name: np.array(columns[COLUMN_PREFIX + f.name][idx])
                             for f in fields(SustainedState)})


def to_columns(state: SustainedState, columns: Mapping[str, np.ndarray], idx: np.ndarray
               ) -> None:
    """Write ``state`` into rows ``idx`` of a store's columns (in place)."""
    for f in fields(SustainedState):
        columns[COLUMN_PREFIX + f.name][idx] = getattr(state, f.name)


@dataclass
class SustainedResult:
    """What ``SustainedDetector.update`` found on N days (arrays of length N)."""

    alert: np.ndarray  # bool: a sustained change was detected on this day
    stat: np.ndarray  # int: index into SUSTAINED_STATS of the strongest change (-1: none)
    direction: np.ndarray  # int8: +1 up, -1 down, 0 none
    start_day: np.ndarray  # int32: estimated first day of the change (days since 1970-01-01)
    shift: np.ndarray  # float32: estimated size, in the statistic's units (log for 3 of 4)
    shift_z: np.ndarray  # float32: the same in baseline standard deviations
    changed: np.ndarray  # bool (N, S): every statistic whose CUSUM passed h
    state: SustainedState

    def describe(self, i: int) -> dict[str, Any] | None:
        """The ``sustained_change`` content of day ``i`` (None without an alert)."""
        if not self.alert[i]:
            return None
        name = SUSTAINED_STATS[int(self.stat[i])]
        up = int(self.direction[i]) > 0
        shift = float(self.shift[i])
        start = dt.date(1970, 1, 1) + dt.timedelta(days=int(self.start_day[i]))
        out: dict[str, Any] = {
            "type": "sustained_change", "start_date": start.isoformat(), "statistic": name,
            "direction": "up" if up else "down", "what": _WHAT[name][0 if up else 1],
            "shift": round(shift, 4), "shift_sd": round(float(self.shift_z[i]), 2),
            "changed": [s for k, s in enumerate(SUSTAINED_STATS) if self.changed[i, k]],
        }
        if name != "zero_night":  # log statistics: the factor is easier to read
            out["factor"] = round(float(np.exp(shift)), 3)
        return out


class SustainedDetector:
    """Two-sided CUSUMs on per-day statistics of each household (module docstring)."""

    def __init__(self, config: SustainedConfig | None = None) -> None:
        self.config = config or SustainedConfig()

    def allowance(self, std: np.ndarray) -> np.ndarray:
        """(N, S) CUSUM allowance in z units: ``k``, or half of ``min_shift`` if larger."""
        half = 0.5 * np.asarray(self.config.min_shift, np.float32)
        return np.maximum(self.config.k, half / std).astype(np.float32)

    def update(self, kwh: np.ndarray, day: np.ndarray, state: SustainedState
               ) -> SustainedResult:
        """One day of N households (each at most once): (N, 48) kWh, (N,) days, their
        state before the day. Days with too few readings leave the state unchanged."""
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
        z = np.clip((f - s.mean) / std, -cfg.z_cap, cfg.z_cap)
        z = np.where(ok[:, None], z, 0.0).astype(np.float32)
        armed = ok & (s.count >= cfg.warmup_days)
        a2 = armed[:, None]
        allow = self.allowance(std)
        new_up = np.maximum(s.up + z - allow, 0.0)
        new_down = np.maximum(s.down - z - allow, 0.0)
        started_up = (s.up <= 0) & (new_up > 0)
        started_down = (s.down <= 0) & (new_down > 0)
        s.up_start = np.where(a2 & started_up, day[:, None], s.up_start)
        s.down_start = np.where(a2 & started_down, day[:, None], s.down_start)
        s.up_len = np.where(a2, np.where(new_up > 0, s.up_len + 1, 0), s.up_len)
        s.down_len = np.where(a2, np.where(new_down > 0, s.down_len + 1, 0), s.down_len)
        s.up = np.where(a2, new_up, s.up).astype(np.float32)
        s.down = np.where(a2, new_down, s.down).astype(np.float32)

        # learn the baseline from in-control days only
        quiet = (np.abs(z) < cfg.learn_z) & (
            ~np.asarray(cfg.freeze, bool) | ((s.up < cfg.h / 2) & (s.down < cfg.h / 2)))
        learn = ok[:, None] & (quiet | (s.count < cfg.warmup_days)[:, None])
        w = np.maximum(cfg.alpha, 1.0 / (s.count + 1.0))[:, None]
        dev = np.where(np.isfinite(f), f - s.mean, 0.0)
        dev_c = np.clip(dev, -cfg.learn_z * std, cfg.learn_z * std)
        s.var = np.where(learn, (1 - w) * (s.var + w * dev_c**2), s.var).astype(np.float32)
        s.mean = np.where(learn, s.mean + w * dev_c, s.mean).astype(np.float32)
        s.count = np.where(ok, s.count + 1, s.count).astype(np.int32)

        # alerts
        cooled = day - s.last_alert >= cfg.cooldown_days
        over_up = (s.up > cfg.h) & armed[:, None]
        over_down = (s.down > cfg.h) & armed[:, None]
        if cfg.signatures:
            # the patterns of tampering and meter faults alert at h; any other change of
            # the daily total or the night-time base (a holiday away, a new appliance)
            # only once it has lasted: at h_other
            tot, eve, nmin, zero = range(N_SUSTAINED)
            scaled = over_down[:, tot] & (s.down[:, nmin] > cfg.h / 2)
            slow_up = (s.up > cfg.h_other) & armed[:, None]
            slow_down = (s.down > cfg.h_other) & armed[:, None]
            fast_up = np.zeros_like(over_up)
            fast_down = np.zeros_like(over_down)
            fast_down[:, eve] = over_down[:, eve]
            fast_up[:, zero] = over_up[:, zero]
            fast_down[:, tot] = scaled
            fast_down[:, nmin] = scaled
            over_up = fast_up | slow_up
            over_down = fast_down | slow_down
        changed = over_up | over_down
        alert = changed.any(axis=1) & cooled
        strength = np.maximum(np.where(over_up, s.up, 0), np.where(over_down, s.down, 0))
        stat = np.where(alert, np.argmax(strength, axis=1), -1)
        r = np.arange(n)
        k = np.maximum(stat, 0)
        is_up = s.up[r, k] >= s.down[r, k]
        direction = np.where(alert, np.where(is_up, 1, -1), 0).astype(np.int8)
        run_len = np.maximum(np.where(is_up, s.up_len[r, k], s.down_len[r, k]), 1)
        cusum = np.where(is_up, s.up[r, k], s.down[r, k])
        shift_z = (cusum / run_len + allow[r, k]) * direction
        shift = shift_z * std[r, k]
        start = np.where(is_up, s.up_start[r, k], s.down_start[r, k])

        # re-baseline every changed statistic to its new regime; quiet after an alert
        run_up = np.maximum(s.up_len, 1)
        run_down = np.maximum(s.down_len, 1)
        moved = (np.where(over_up, (s.up / run_up + allow), 0.0)
                 - np.where(over_down, (s.down / run_down + allow), 0.0)) * std
        s.mean = np.where(changed, s.mean + moved, s.mean).astype(np.float32)
        for arr in (s.up, s.down):
            arr[changed] = 0.0
        s.up_len[changed] = 0
        s.down_len[changed] = 0
        s.last_alert = np.where(alert, day, s.last_alert).astype(np.int32)
        return SustainedResult(alert=alert, stat=stat, direction=direction,
                               start_day=np.where(alert, start, 0).astype(np.int32),
                               shift=np.where(alert, shift, 0.0).astype(np.float32),
                               shift_z=np.where(alert, shift_z, 0.0).astype(np.float32),
                               changed=changed & alert[:, None], state=s)

    def replay(self, kwh: np.ndarray, day: np.ndarray) -> tuple[SustainedResult, SustainedState]:
        """One household's days (D, 48), (D,) in increasing order, from an empty state.
        Returns the stacked per-day results (their ``state`` is the final one) and it."""
        kwh = np.asarray(kwh, np.float32)
        day = np.asarray(day, np.int32)
        assert len(day) < 2 or bool(np.all(np.diff(day) > 0)), "days must increase"
        state = SustainedState.empty(1)
        parts: list[SustainedResult] = []
        for i in range(len(day)):
            res = self.update(kwh[i:i + 1], day[i:i + 1], state)
            state = res.state
            parts.append(res)
        cat = {f.name: np.concatenate([getattr(p, f.name) for p in parts])
               for f in fields(SustainedResult) if f.name != "state"}
        return SustainedResult(**cat, state=state), state

    def replay_many(self, kwh: np.ndarray, days: np.ndarray) -> np.ndarray:
        """S series of the same days, (S, D, 48) kWh (NaN = missing) and (D,) increasing
        days, each from an empty state. Returns int32 (S, D, 3): per day, the alert flag,
        the statistic (-1: none) and the estimated start day."""
        kwh = np.asarray(kwh, np.float32)
        n, d = kwh.shape[:2]
        out = np.zeros((n, d, 3), np.int32)
        state = SustainedState.empty(n)
        for j in range(d):
            res = self.update(kwh[:, j], np.full(n, days[j], np.int32), state)
            state = res.state
            out[:, j, 0] = res.alert
            out[:, j, 1] = res.stat
            out[:, j, 2] = res.start_day
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
) -> dict[str, Any]:
    """Detection of injected persistent changes and false alerts on clean data.

    Clean: every household's whole history replayed; alerts after the warm-up are false
    (real households do change: holidays away count here). Injected: for each household,
    type and ``starts_per_household`` random start days (after two months, leaving room
    for the change), ``model.inject.persistent_change`` from the start day for
    ``duration`` days; detected when an alert falls on one of the first ``within`` days
    (start day included). Alerts before the start day are counted with the clean ones.
    """
    from meterwatch.model.inject import PERSISTENT_TYPES, persistent_change

    det = SustainedDetector(config)
    cfg = det.config
    grid, days, _ = household_grid(kwh, day, household_ids)
    n_h, n_d = grid.shape[:2]
    clean = det.replay_many(grid, days)
    observed = np.isfinite(grid).sum(axis=2) >= 40
    months = float(observed.sum()) / 30.44
    false = int(clean[:, :, 0].sum())
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
    res = det.replay_many(np.stack(series), days)
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
        "false_before_start": pre_false,
        "false_before_start_per_1000_household_months": 1000 * pre_false / max(pre_months,
                                                                               1e-9),
        "detected_within": within, "duration": duration,
        "detected": float(np.mean(all_hits)) if all_hits else float("nan"),
        "per_type": per_type,
    }
