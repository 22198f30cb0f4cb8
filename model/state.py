"""Per-household running state the stream carries between days.

Anomalies must not become the household's new normal, yet a lasting change (a new heater,
new occupants) must not alert forever, and learning only from non-alert days would do both
wrong: it censors the error distribution (shrinking variance, ever more alerts) and never
learns a level first seen on an alert day. So every day with enough readings is learnt,
winsorised: error statistics at a few standard deviations, and on alert days the level
clipped near the current level and the time-of-day profile down-weighted.
Every field is one float or int per household, so a row fits the stream's
``DayScore.state: dict[str, float]`` (``row``/``from_rows``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np

from meterwatch.model.scoring import N_BLOCKS

log = logging.getLogger(__name__)

# (mean, variance) fields of each statistic, in model.scoring.STAT_NAMES order.
_STAT_FIELDS = (("err_mean", "err_var"), ("peak_mean", "peak_var"),
                ("ratio_mean", "ratio_var"), ("timing_mean", "timing_var"))
_PROFILE_FIELDS = ("profile_mean", "profile_var")
_INT_FIELDS = ("count", "last_day")


def _shape(name: str, n: int) -> tuple[int, ...]:
    return (n, N_BLOCKS) if name in _PROFILE_FIELDS else (n,)


#: How a store of many households keeps each field between days (the stream's household
#: table), 26 bytes a household besides the profile: every statistic (level, the error
#: moments, fault rate, the last level z-score) and the (N, 12) time-of-day profile in
#: float16 (3 significant digits; the winsorised statistics and the log shares need no
#: more), ``count`` as uint16 (saturating at 65,535 days) and ``last_day`` as uint16 days
#: since 1970 (valid to 2149; 0 = none, as in the sustained-change state).
#: ``HouseholdState`` itself always computes in float32/int32: a store's columns are
#: converted when they are read into one and rounded when written back (``to_storage``:
#: clipped into range, never overflowed or wrapped). The effect on scores is bounded by
#: ``tests/test_assembler.py`` and measured on real households by ``benchmarks/state_precision.py``.
STORAGE_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(np.uint16 if name in _INT_FIELDS else np.float16)
    for name in ("level", "err_mean", "err_var", "count", "peak_mean", "peak_var",
                 "ratio_mean", "ratio_var", "fault_rate", "timing_mean", "timing_var",
                 *_PROFILE_FIELDS, "ratio_z_last", "last_day")}


def clip_to(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``values`` as ``dtype`` (a compact storage column's): integers clipped to its range
    (NaN as 0; never wrapped), floats to its finite range (NaN stays NaN, a finite value
    never becomes inf)."""
    a = np.asarray(values)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if a.dtype.kind == "f":
            a = np.nan_to_num(a)
        return np.clip(a, info.min, info.max).astype(dtype)
    big = float(np.finfo(dtype).max)
    return np.clip(a, -big, big).astype(dtype)


def to_storage(name: str, values: np.ndarray) -> np.ndarray:
    """``values`` of field ``name`` rounded to ``STORAGE_DTYPES[name]`` (``clip_to``)."""
    return clip_to(values, STORAGE_DTYPES[name])


def storage_columns(n: int) -> dict[str, np.ndarray]:
    """The state of ``n`` new households as storage columns (``STORAGE_DTYPES``)."""
    fresh = HouseholdState.empty(n)
    return {f.name: to_storage(f.name, getattr(fresh, f.name)) for f in fields(HouseholdState)}


@dataclass
class HouseholdState:
    """Running state of N households, one entry per household in each array.

    Attributes
    ----------
    level
        float32: exponentially weighted mean kWh per half-hour of recent normal days; NaN =
        unknown (a new household).
    err_mean, err_var
        float32: running mean and variance of the household's (log) reconstruction error of
        the day's shape; they turn the model's error into a per-household z-score.
    count
        int32: days absorbed into the error statistics (days with enough readings).
    peak_mean, peak_var
        float32: the same for the (log) largest half-hour error.
    ratio_mean, ratio_var
        float32: the same for the log ratio of observed to expected daily use.
    timing_mean, timing_var
        float32: the same for the (log) deviation from the household's block profile.
    profile_mean, profile_var
        float32 (N, 12): the household's time-of-day profile, running mean and variance of
        the log share of each two-hour block (``model.scoring.block_shares``).
    fault_rate
        float32: recent share of days on which a data-quality rule (zero run, flat run)
        fired; a household where that is routine is not alerted for it.
    ratio_z_last, last_day
        float32 and int32: the signed z-score of the level ratio on the household's last
        scored day (winsorised; NaN = not measured) and that day (days since 1970-01-01;
        0 = none). Day-to-day level residuals are correlated (a cold spell, guests staying):
        the next day's level z-score is taken relative to ``ScoringConfig.level_ar`` times
        this one (``Detector.zscores``).

    Fields after ``count`` have defaults, so ``HouseholdState(level, err_mean, err_var,
    count)`` works; stores should keep every field (``dataclasses.fields``; ``row`` /
    ``from_rows`` flatten the (N, 12) profile to keys ``profile_mean_0`` ...).

    Examples
    --------
    >>> s = HouseholdState.empty(3)
    >>> len(s), s.take([2]).row(0)["level"], s.row(0)["count"]
    (3, nan, 0.0)
    """

    level: np.ndarray
    err_mean: np.ndarray
    err_var: np.ndarray
    count: np.ndarray
    # Defaults of None are replaced by zeros of the right shape in __post_init__.
    peak_mean: np.ndarray = None  # type: ignore[assignment]
    peak_var: np.ndarray = None  # type: ignore[assignment]
    ratio_mean: np.ndarray = None  # type: ignore[assignment]
    ratio_var: np.ndarray = None  # type: ignore[assignment]
    fault_rate: np.ndarray = None  # type: ignore[assignment]
    timing_mean: np.ndarray = None  # type: ignore[assignment]
    timing_var: np.ndarray = None  # type: ignore[assignment]
    profile_mean: np.ndarray = None  # type: ignore[assignment]
    profile_var: np.ndarray = None  # type: ignore[assignment]
    ratio_z_last: np.ndarray = None  # type: ignore[assignment]
    last_day: np.ndarray = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        n = len(self.level)
        for f in fields(self):
            value = getattr(self, f.name)
            dtype = np.int32 if f.name in _INT_FIELDS else np.float32
            if value is None:
                value = np.zeros(_shape(f.name, n), dtype)
            setattr(self, f.name, np.asarray(value, dtype=dtype))
        shapes = {f.name: getattr(self, f.name).shape for f in fields(self)}
        assert all(s == _shape(k, n) for k, s in shapes.items()), (
            f"state arrays of unequal length: {shapes}")

    @classmethod
    def empty(cls, n: int) -> HouseholdState:
        """State of ``n`` households never seen before."""
        return cls(level=np.full(n, np.nan, np.float32), err_mean=np.zeros(n, np.float32),
                   err_var=np.zeros(n, np.float32), count=np.zeros(n, np.int32))

    @classmethod
    def starting(cls, households: Sequence[str],
                 known: Mapping[str, HouseholdState] | None) -> HouseholdState:
        """State of ``households`` (in order): ``known``'s where it has them, else new."""
        out = cls.empty(len(households))
        for i, h in enumerate(households):
            if known and h in known:
                out.put([i], known[h])
        return out

    def stat_moments(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, var) of the error statistics as (N, N_STATS) arrays (``STAT_NAMES`` order)."""
        mean = np.stack([getattr(self, m) for m, _ in _STAT_FIELDS], axis=1)
        var = np.stack([getattr(self, v) for _, v in _STAT_FIELDS], axis=1)
        return mean, var

    def __len__(self) -> int:
        return len(self.level)

    def take(self, idx: Sequence[int] | np.ndarray | slice) -> HouseholdState:
        """The rows ``idx`` (a copy)."""
        return HouseholdState(**{f.name: np.array(getattr(self, f.name)[idx])
                                 for f in fields(self)})

    def copy(self) -> HouseholdState:
        return self.take(slice(None))

    def put(self, idx: Sequence[int] | np.ndarray, rows: HouseholdState) -> None:
        """Write ``rows`` into positions ``idx`` of this state (in place)."""
        for f in fields(self):
            getattr(self, f.name)[idx] = getattr(rows, f.name)

    @classmethod
    def concat(cls, parts: Iterable[HouseholdState]) -> HouseholdState:
        parts = list(parts)
        return cls(**{f.name: np.concatenate([getattr(p, f.name) for p in parts])
                      for f in fields(cls)})

    def row(self, i: int) -> dict[str, float]:
        """Row ``i`` as plain floats (NaN level stays NaN; the profile as
        ``profile_mean_0`` .. ``profile_var_11``)."""
        out: dict[str, float] = {}
        for f in fields(self):
            v = getattr(self, f.name)[i]
            if v.ndim:
                out.update({f"{f.name}_{k}": float(x) for k, x in enumerate(v)})
            else:
                out[f.name] = float(v)
        return out

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, float] | None]) -> HouseholdState:
        """Inverse of ``row``; None or missing keys mean 'new household'."""
        out = cls.empty(len(rows))
        for i, r in enumerate(rows):
            if not r:
                continue
            for f in fields(cls):
                arr = getattr(out, f.name)
                if arr.ndim == 2:
                    for k in range(arr.shape[1]):
                        if r.get(f"{f.name}_{k}") is not None:
                            arr[i, k] = r[f"{f.name}_{k}"]
                elif r.get(f.name) is not None:
                    arr[i] = r[f.name]
        return out


class StatesByHousehold(Mapping[str, HouseholdState]):
    """Household id -> its one-row ``HouseholdState``, read from one table of ``states``
    (row i: ``households[i]``) when asked. What a replay returns: a dict of one state per
    household cost a training on 3.5 M household-days 45 s under the profiler, building
    740,000 of them (its cold-start replays meet every household many times), and most
    callers read none."""

    def __init__(self, households: Sequence[str], states: HouseholdState) -> None:
        assert len(households) == len(states), (len(households), len(states))
        self._row = {str(h): i for i, h in enumerate(households)}
        self._states = states

    def __getitem__(self, household: str) -> HouseholdState:
        return self._states.take([self._row[household]])

    def __iter__(self) -> Iterator[str]:
        return iter(self._row)

    def __len__(self) -> int:
        return len(self._row)


def absorb(
    state: HouseholdState,
    day_mean: np.ndarray,
    stats: np.ndarray,
    shares: np.ndarray,
    level_mask: np.ndarray,
    stat_mask: np.ndarray,
    fault: np.ndarray,
    level_alpha: float,
    err_alpha: float,
    fault_alpha: float,
    level_clip: float = np.inf,
    profile_weight: np.ndarray | float = 1.0,
    stat_counts: np.ndarray | None = None,
) -> HouseholdState:
    """The state after one day per household.

    ``level`` absorbs ``day_mean`` where ``level_mask``, clipped to within a factor
    ``level_clip`` of the current level (the caller passes alert days with a finite
    clip: a single anomalous day barely moves the level, a lasting change is learnt over
    weeks instead of alerting forever; an unknown level is set from the first day).
    Where ``stat_mask`` (days with enough readings): the error statistics absorb ``stats``
    (N, N_STATS; the caller winsorises them; NaN entries are skipped), the block profile
    absorbs ``shares`` (N, N_BLOCKS) with its weight times ``profile_weight``, and
    ``fault_rate`` absorbs ``fault`` (a rule fired). Learning only from non-alert days
    would censor the error distribution: shrinking variance, ever more alerts.
    Exponentially weighted updates whose weight starts at ``1 / (count + 1)`` (a plain mean
    of the first days) and settles at the ``*_alpha`` given; for the error statistics the
    count is ``stat_counts`` (N, N_STATS): how many times each statistic was measured before
    (the level ratio from the second day, timing once the profile exists; default
    ``count``). Returns new arrays; ``state`` is not modified.
    """
    new = state.copy()
    c = state.count.astype(np.float32)

    m = np.asarray(level_mask, dtype=bool) & np.isfinite(day_mean)
    a = np.maximum(1.0 / (c[m] + 1.0), level_alpha)
    old = state.level[m]
    target = day_mean[m]
    if np.isfinite(level_clip):
        with np.errstate(invalid="ignore"):
            clipped = np.clip(target, old / level_clip, old * level_clip)
        target = np.where(np.isfinite(old), clipped, target)
    new.level[m] = np.where(np.isfinite(old), old + a * (target - old), target)

    m = np.asarray(stat_mask, dtype=bool)
    cs = (np.broadcast_to(c[:, None], stats.shape) if stat_counts is None
          else np.asarray(stat_counts, np.float32))[m]  # (M, N_STATS)
    a = np.maximum(1.0 / (cs + 1.0), err_alpha)  # (M, N_STATS)
    mean, var = state.stat_moments()
    x = stats[m]
    ok = np.isfinite(x)
    delta = np.where(ok, x - mean[m], 0.0)
    # A statistic measured for the first time (the level ratio once the level is known,
    # timing once the profile exists) starts from its value; otherwise the usual update.
    first = ok & ((cs == 0) | ((var[m] == 0) & (mean[m] == 0)))
    new_mean = np.where(first, np.nan_to_num(x), mean[m] + a * delta)
    new_var = np.where(first, 0.0, (1.0 - a) * (var[m] + a * delta**2))
    new_var = np.where(ok | first, new_var, var[m])
    for k, (fm, fv) in enumerate(_STAT_FIELDS):
        getattr(new, fm)[m] = new_mean[:, k]
        getattr(new, fv)[m] = new_var[:, k]

    w = np.broadcast_to(np.asarray(profile_weight, np.float32), c.shape)[m][:, None]
    ap = np.maximum(1.0 / (c[m] + 1.0), err_alpha)[:, None] * w
    pm, pv = state.profile_mean[m], state.profile_var[m]
    d = shares[m] - pm
    fresh = (c[m] == 0)[:, None]
    new.profile_mean[m] = np.where(fresh, shares[m], pm + ap * d)
    new.profile_var[m] = np.where(fresh, 0.0, (1.0 - ap) * (pv + ap * d**2))

    a_f = np.maximum(1.0 / (c[m] + 1.0), fault_alpha)
    new.fault_rate[m] = state.fault_rate[m] + a_f * (np.asarray(fault)[m] - state.fault_rate[m])
    new.count[m] = state.count[m] + 1
    return new
