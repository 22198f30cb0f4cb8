"""From reconstruction to anomaly score: day statistics, per-household z-scores, fusion.

One number cannot describe how a day is wrong, so the detector measures four things
(``STAT_NAMES``), three from the autoencoder's reconstruction:

* ``shape``: mean squared error between the day's shape and the reconstruction's shape
  (each relative to its own mean, ``log1p`` space), log-transformed. Odd profiles,
  erratic readings, flat or missing peaks.
* ``peak``: the largest single half-hour squared error (model space), log-transformed.
  A short spike hardly moves a 48-slot mean but dominates this.
* ``level``: log ratio of the observed to the expected daily use. The encoder sees only
  the day's shape, so the expected level comes from the context (the household's recent
  level, weekday, weather): a day at 5x or 0.2x its usual use shows here. Not measured
  (NaN) on a household's first day: without a recent level the day is its own scale.

and one from the household's own history, which the autoencoder cannot know (a day shifted
by four hours is a perfectly plausible day, just not for this household):

* ``timing``: mean squared z-score of the day's share of use in its three most deviant
  two-hour blocks (of ``N_BLOCKS``, log shares) against the household's running block
  profile (``HouseholdState.profile_mean/var``), log-transformed; NaN until the household
  has ``min_profile_days``. Moved schedules and missing evening peaks show here.

Each statistic becomes a z-score against the household's own running mean and variance,
shrunk towards the population's for households with few days (``Calibration.shrink``:
empirical Bayes, a new household is judged like an unseen one), two-sided for ``level``.
Households differ widely in how predictable they are; the z-score makes "unusual for this
household" comparable.

The z-scores have different tails (holidays make ``level`` heavy-tailed), so each is
mapped to a *surprise*, ``-log P(Z >= z)`` under its distribution on the training days
(``Calibration.tail_z``), and the model score is the largest surprise: 4.6 means "as rare
as the top 1% of training days" on the most unusual statistic. A young household's
z-scores lean on the prior and run wider, so households with fewer than
``Calibration.cold_edges[-1]`` days have maps of their own, learnt on households the
network never saw, replayed from their first day (``model.training``), and an offset that
puts their false-alarm rate at the threshold on par with established households'.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from meterwatch.model.features import ModelInputs, from_model_space, to_model_space

log = logging.getLogger(__name__)

STAT_NAMES: tuple[str, ...] = ("shape", "peak", "level", "timing")
N_STATS = len(STAT_NAMES)
N_BLOCKS = 12  # two-hour blocks of the household time-of-day profile
_SHARE_EPS = 0.02  # added to block shares before the log (empty blocks are common)
_LOG_EPS = 1e-4  # added to squared errors before the log
_RATIO_KWH = 0.01  # kWh/hh added to both sides of the level ratio (empty houses are noisy)


@dataclass
class DayStats:
    """Statistics of N days (see the module docstring)."""

    slot_error: np.ndarray  # float32 (N, 48) share of raw_error per half-hour
    raw_error: np.ndarray  # float32 (N,) mean squared error over usable half-hours
    expected: np.ndarray  # float32 (N, 48) reconstruction in kWh
    stats: np.ndarray  # float32 (N, N_STATS)
    shares: np.ndarray  # float32 (N, N_BLOCKS) log share of the day's use per block


def block_shares(kwh: np.ndarray) -> np.ndarray:
    """(N, 48) kWh -> (N, N_BLOCKS) log share of the day's use in each two-hour block."""
    n = len(kwh)
    blocks = kwh.reshape(n, N_BLOCKS, 48 // N_BLOCKS).sum(axis=2)  # (N, 48) -> (N, 12)
    total = blocks.sum(axis=1, keepdims=True) + 1e-3
    return np.log(blocks / total + _SHARE_EPS).astype(np.float32)


def day_statistics(
    inp: ModelInputs,
    recon: np.ndarray,
    profile_mean: np.ndarray,
    profile_var: np.ndarray,
    profile_ready: np.ndarray,
    min_block_std: float,
    level_known: np.ndarray | None = None,
    timing_blocks: int = N_BLOCKS,
) -> DayStats:
    """Compare N days with their reconstructions (model space, (N, 48)) and with the
    households' block profiles ((N, N_BLOCKS) mean and variance; ``profile_ready`` (N,)
    says which households have one). ``level_known`` (N,): households with a recent level;
    without one the day is its own scale and the level ratio is not measured (NaN).
    ``timing_blocks``: how many of the most deviant blocks the timing statistic averages."""
    obs = inp.observed
    n_obs = np.maximum(obs.sum(axis=1), 1)
    sq = np.where(obs, (inp.x - recon) ** 2, 0.0)  # (N, 48)
    expected = from_model_space(recon, inp.scale)

    own = np.maximum(inp.filled.mean(axis=1), 1e-3)
    exp_mean = np.maximum(expected.mean(axis=1), 1e-3)
    shape_sq = np.where(obs, (to_model_space(inp.filled, own)
                              - to_model_space(expected, exp_mean)) ** 2, 0.0)
    obs_mean = np.where(obs, inp.filled, 0.0).sum(axis=1) / n_obs
    exp_obs_mean = np.where(obs, expected, 0.0).sum(axis=1) / n_obs

    shares = block_shares(inp.filled)
    bz2 = (shares - profile_mean) ** 2 / np.maximum(profile_var, min_block_std**2)
    top = np.sort(bz2, axis=1)[:, -timing_blocks:].mean(axis=1)
    timing = np.where(profile_ready, np.log(top + _LOG_EPS), np.nan)
    ratio = np.log((obs_mean + _RATIO_KWH) / (exp_obs_mean + _RATIO_KWH))
    if level_known is not None:
        ratio = np.where(level_known, ratio, np.nan)

    stats = np.stack([
        np.log(shape_sq.sum(axis=1) / n_obs + _LOG_EPS),
        np.log(sq.max(axis=1) + _LOG_EPS),
        ratio,
        timing,
    ], axis=1).astype(np.float32)  # (N, N_STATS)
    return DayStats(
        slot_error=(sq / n_obs[:, None]).astype(np.float32),
        raw_error=(sq.sum(axis=1) / n_obs).astype(np.float32),
        expected=expected,
        stats=stats,
        shares=shares,
    )


class TooFewDays(ValueError):
    """Too few days to learn a tail map (``_fit_tail``): a history too short to train on."""


def _fit_tail(z: np.ndarray, n_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Tail map of z-scores ``z`` (M, N_STATS) (NaN = not measured): (N_STATS, Q) quantiles
    at survival probabilities ``exp(-tail_s)``, and the (Q,) increasing ``tail_s``. A
    statistic measured on fewer than 20 days gets a map that is never reached (surprise 0)."""
    counts = np.isfinite(z).sum(axis=0)
    usable = counts >= 20  # a statistic measured on fewer days stays silent (surprise 0)
    if not usable.any():
        raise TooFewDays(f"the score calibration needs at least 20 days with every statistic "
                         f"measured, and this history has {int(counts.max(initial=0))}")
    m = int(counts[usable].min())
    surv = np.geomspace(1.0, 1.0 / m, n_points)
    tail_z = np.stack([np.quantile(col[np.isfinite(col)], 1.0 - surv) if ok
                       else np.full(n_points, 1e6) for col, ok in zip(z.T, usable,
                                                                     strict=True)])
    # strictly increasing for interpolation
    tail_z = np.maximum.accumulate(tail_z + 1e-6 * np.arange(n_points), axis=1)
    return tail_z.astype(np.float32), (-np.log(surv)).astype(np.float32)


def _surprise(z: np.ndarray, tail_z: np.ndarray, s: np.ndarray) -> np.ndarray:
    """(N, N_STATS) z-scores -> surprises under one tail map (see ``Calibration.surprise``)."""
    out = np.empty_like(z, dtype=np.float32)
    q = len(s)
    lo = int(np.searchsorted(s, s[-1] - np.log(10.0)))
    lo = min(lo, q - 2)
    for k in range(z.shape[1]):
        zq = tail_z[k]
        slope = (s[-1] - s[lo]) / max(float(zq[-1] - zq[lo]), 1e-6)
        inside = np.interp(z[:, k], zq, s)
        beyond = s[-1] + slope * (z[:, k] - zq[-1])
        out[:, k] = np.where(z[:, k] > zq[-1], beyond, inside)
    return np.nan_to_num(out, nan=0.0)


_ARRAYS = ("stat_mean", "stat_var", "tail_z", "tail_s", "stat_within", "cold_edges",
           "cold_tail_z", "cold_tail_s", "cold_offset")


@dataclass
class Calibration:
    """Population statistics learnt in training (saved in the checkpoint).

    Attributes
    ----------
    stat_mean, stat_var
        (N_STATS,) mean and variance of each statistic on days of households the network
        was not trained on: the prior for households with few days (a new household is
        judged like an unseen one, not like a training household).
    stat_within
        (N_STATS,) the part of ``stat_var`` within a household (its days around its own
        mean); the rest is how much households differ. Sets how fast a household's own
        days outweigh the prior (``shrink``). Empty (older checkpoints): a fixed weight.
    tail_z
        (N_STATS, Q) z-score quantiles on established households' training days at
        survival probabilities ``exp(-tail_s)``.
    tail_s
        (Q,) increasing surprises (``-log`` survival probability) of those quantiles.
    cold_edges
        (B + 1,) int: household day counts that bound the cold-start buckets; bucket b holds
        households with ``cold_edges[b] <= count < cold_edges[b + 1]``; households with at
        least ``cold_edges[-1]`` days use ``tail_z``. Empty: no cold-start maps.
    cold_tail_z, cold_tail_s
        (B, N_STATS, Q') and (B, Q'): the tail map of each cold-start bucket, learnt by
        replaying unseen households from an empty state (their z-scores lean on the
        population prior and have heavier tails than an established household's).
    cold_offset
        (B,) subtracted from the model score of a day in each cold-start bucket: how much
        higher that bucket's scores run than an established household's at the threshold,
        measured on households the bucket's maps (and prior) were not fitted on (the maps
        come from a few households; a new one is judged by how they generalise). ``inf``:
        too few households to calibrate that bucket; the model abstains (score 0).
    """

    stat_mean: np.ndarray
    stat_var: np.ndarray
    tail_z: np.ndarray
    tail_s: np.ndarray
    stat_within: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    cold_edges: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    cold_tail_z: np.ndarray = field(default_factory=lambda: np.zeros((0, N_STATS, 0), np.float32))
    cold_tail_s: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    cold_offset: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    def __post_init__(self) -> None:
        for name in _ARRAYS:
            setattr(self, name, np.asarray(getattr(self, name),
                                           np.int32 if name == "cold_edges" else np.float32))
        if len(self.cold_offset) != len(self.cold_tail_z):
            self.cold_offset = np.zeros(len(self.cold_tail_z), np.float32)

    @classmethod
    def identity(cls, stat_mean: np.ndarray, stat_var: np.ndarray,
                 stat_within: np.ndarray | None = None) -> Calibration:
        """No tail map yet: surprise == z (used while calibrating)."""
        s = np.linspace(-10.0, 10.0, 3, dtype=np.float32)
        return cls(stat_mean, stat_var, np.tile(s, (N_STATS, 1)), s,
                   stat_within=np.zeros(0) if stat_within is None else stat_within)

    @classmethod
    def fit_tails(cls, stat_mean: np.ndarray, stat_var: np.ndarray, z: np.ndarray,
                  n_points: int = 128) -> Calibration:
        """Tail maps from training-day z-scores ``z`` (M, N_STATS); NaN = not measured."""
        tail_z, tail_s = _fit_tail(z, n_points)
        return cls(stat_mean, stat_var, tail_z, tail_s)

    def with_tails(self, z: np.ndarray, n_points: int = 128) -> Calibration:
        """A copy whose established map is fitted to the z-scores ``z`` (M, N_STATS)."""
        tail_z, tail_s = _fit_tail(z, n_points)
        return replace(self, tail_z=tail_z, tail_s=tail_s)

    def with_cold_tails(self, edges: Sequence[int], z: np.ndarray, count: np.ndarray,
                        n_points: int = 128) -> Calibration:
        """A copy with cold-start tail maps: bucket b from the z-scores ``z`` (M, N_STATS)
        of the days whose household ``count`` (M,) falls in ``[edges[b], edges[b + 1])``."""
        bounds = np.asarray(edges, np.int32)
        assert len(bounds) >= 2 and bool(np.all(np.diff(bounds) > 0)), bounds
        maps = []
        for a, b in itertools.pairwise(bounds):
            rows = (count >= a) & (count < b)
            if rows.sum() < 20:  # too few days (a fold of few households): all from a on
                rows = count >= a
            maps.append(_fit_tail(z[rows], n_points))
        return replace(self, cold_edges=bounds, cold_tail_z=np.stack([m[0] for m in maps]),
                       cold_tail_s=np.stack([m[1] for m in maps]),
                       cold_offset=np.zeros(len(maps), np.float32))

    def shrink(self, counts: np.ndarray, h_mean: np.ndarray, h_var: np.ndarray,
               var_days: float) -> tuple[np.ndarray, np.ndarray]:
        """Expected mean and variance of each statistic on a household's next day, from its
        running ``h_mean``/``h_var`` over ``counts`` days (all (N, N_STATS)) and the prior.

        Empirical Bayes: the household's true mean is uncertain around the population's by
        the between-household variance ``stat_var - stat_within``, so after c days its own
        mean weighs ``c / (c + k)`` with ``k = within / between`` (statistics on which
        households differ a lot are learnt from a household's first days; those on which they
        agree lean on the population longer). Its day-to-day variance is its own, shrunk
        towards ``stat_within`` by ``var_days`` pseudo-days, plus the remaining uncertainty
        of its mean, ``within / (c + k)``. A new household (c = 0) gets the population's
        mean and total variance. Without ``stat_within``, both blend with the population
        (mean and total variance) by ``var_days`` pseudo-days."""
        c = np.asarray(counts, np.float32)
        if len(self.stat_within) == 0:
            mean = (c * h_mean + var_days * self.stat_mean) / (c + var_days)
            var = (c * h_var + var_days * self.stat_var) / (c + var_days)
            return mean, var
        within = np.maximum(self.stat_within, 1e-6)
        between = np.maximum(self.stat_var - within, 1e-3 * self.stat_var + 1e-6)
        k = within / between
        mean = (c * h_mean + k * self.stat_mean) / (c + k)
        own = (c * h_var + var_days * within) / (np.maximum(c - 1.0, 0.0) + var_days)
        var = own + within / (c + k)
        return mean, var

    def bucket(self, count: np.ndarray) -> np.ndarray:
        """(N,) cold-start bucket of households with ``count`` days; -1: established."""
        count = np.asarray(count)
        if len(self.cold_edges) == 0:
            return np.full(count.shape, -1)
        b = np.searchsorted(self.cold_edges, count, side="right") - 1
        return np.where(count >= self.cold_edges[-1], -1, b)

    def model_score(self, z: np.ndarray, count: np.ndarray | None = None) -> np.ndarray:
        """(N,) the largest surprise of each day, less its cold-start bucket's offset (at
        least 0; an infinite offset: the model abstains on that bucket)."""
        return self.stat_scores(z, count).max(axis=1)

    def stat_scores(self, z: np.ndarray, count: np.ndarray | None = None) -> np.ndarray:
        """(N, N_STATS) each statistic's own score: its surprise less the day's cold-start
        offset (as ``model_score``, whose largest it is); which of them pass the threshold
        is what an alert says is unusual."""
        score = self.surprise(z, count)
        if count is None or len(self.cold_edges) == 0:
            return score
        b = self.bucket(count)
        offset = np.where(b >= 0, self.cold_offset[np.maximum(b, 0)], 0.0)[:, None]
        with np.errstate(invalid="ignore"):
            return np.where(np.isposinf(offset), 0.0, np.maximum(score - offset, 0.0))

    def surprise(self, z: np.ndarray, count: np.ndarray | None = None) -> np.ndarray:
        """(N, N_STATS) z-scores -> surprises ``-log P(Z >= z)``: linear beyond the last
        quantile (an exponential tail fitted to the last decade of probability); NaN -> 0.
        ``count`` (N,) days the household has behind it picks its cold-start map (None:
        every household is established)."""
        out = _surprise(z, self.tail_z, self.tail_s)
        if count is None or len(self.cold_edges) == 0:
            return out
        bucket = self.bucket(count)
        for b in range(len(self.cold_tail_z)):
            rows = np.flatnonzero(bucket == b)
            if len(rows):
                out[rows] = _surprise(z[rows], self.cold_tail_z[b], self.cold_tail_s[b])
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"stat_names": list(STAT_NAMES),
                **{k: getattr(self, k).tolist() for k in _ARRAYS}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        """Inverse of ``to_dict``; older checkpoints (no ``stat_within``, no cold-start
        maps) load with the behaviour they were calibrated for."""
        if list(d["stat_names"]) != list(STAT_NAMES):
            raise ValueError(f"checkpoint statistics {d['stat_names']} != {STAT_NAMES}")
        kw = {k: d[k] for k in _ARRAYS if k in d}
        if not kw.get("cold_edges"):
            for k in ("cold_edges", "cold_tail_z", "cold_tail_s", "cold_offset"):
                kw.pop(k, None)
        return cls(**kw)
