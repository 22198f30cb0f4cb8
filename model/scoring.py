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
  level, weekday, weather): a day at 5x or 0.2x its usual use shows here.

and one from the household's own history, which the autoencoder cannot know (a day shifted
by four hours is a perfectly plausible day, just not for this household):

* ``timing``: mean squared z-score of the day's share of use in each two-hour block
  (``N_BLOCKS``, log shares) against the household's running block profile
  (``HouseholdState.profile_mean/var``), log-transformed; NaN until the household has
  ``min_profile_days``. Moved schedules and missing evening peaks show here.

Each statistic becomes a z-score against the household's own running mean and variance
(shrunk towards the training population's for households with few days: a new household
is judged like an average one), two-sided for ``level``. Households differ widely in
how predictable they are; the z-score makes "unusual for this household" comparable.

The z-scores have different tails (holidays make ``level`` heavy-tailed), so each is
mapped to a *surprise*, ``-log P(Z >= z)`` under its distribution on the training days
(``Calibration.tail_z``), and the model score is the largest surprise: 4.6 means "as rare
as the top 1% of training days" on the most unusual statistic.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from model.features import ModelInputs, from_model_space, to_model_space

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
) -> DayStats:
    """Compare N days with their reconstructions (model space, (N, 48)) and with the
    households' block profiles ((N, N_BLOCKS) mean and variance; ``profile_ready`` (N,)
    says which households have one)."""
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
    timing = np.where(profile_ready, np.log(bz2.mean(axis=1) + _LOG_EPS), np.nan)

    stats = np.stack([
        np.log(shape_sq.sum(axis=1) / n_obs + _LOG_EPS),
        np.log(sq.max(axis=1) + _LOG_EPS),
        np.log((obs_mean + _RATIO_KWH) / (exp_obs_mean + _RATIO_KWH)),
        timing,
    ], axis=1).astype(np.float32)  # (N, N_STATS)
    return DayStats(
        slot_error=(sq / n_obs[:, None]).astype(np.float32),
        raw_error=(sq.sum(axis=1) / n_obs).astype(np.float32),
        expected=expected,
        stats=stats,
        shares=shares,
    )


@dataclass
class Calibration:
    """Population statistics learnt in training (saved in the checkpoint).

    Attributes
    ----------
    stat_mean, stat_var
        (N_STATS,) mean and variance of each statistic on training days: the prior that
        household statistics are shrunk towards.
    tail_z
        (N_STATS, Q) z-score quantiles on training days at survival probabilities
        ``exp(-tail_s)``.
    tail_s
        (Q,) increasing surprises (``-log`` survival probability) of those quantiles.
    """

    stat_mean: np.ndarray
    stat_var: np.ndarray
    tail_z: np.ndarray
    tail_s: np.ndarray

    @classmethod
    def identity(cls, stat_mean: np.ndarray, stat_var: np.ndarray) -> Calibration:
        """No tail map yet: surprise == z (used while calibrating)."""
        s = np.linspace(-10.0, 10.0, 3, dtype=np.float32)
        return cls(np.asarray(stat_mean, np.float32), np.asarray(stat_var, np.float32),
                   np.tile(s, (N_STATS, 1)), s)

    @classmethod
    def fit_tails(cls, stat_mean: np.ndarray, stat_var: np.ndarray, z: np.ndarray,
                  n_points: int = 128) -> Calibration:
        """Tail maps from training-day z-scores ``z`` (M, N_STATS); NaN = not measured."""
        m = int(np.isfinite(z).sum(axis=0).min())
        assert m >= 20, f"need training days to calibrate tails, got {m}"
        surv = np.geomspace(1.0, 1.0 / m, n_points)
        tail_z = np.stack([np.quantile(col[np.isfinite(col)], 1.0 - surv)
                           for col in z.T])  # (N_STATS, Q)
        # strictly increasing for interpolation
        tail_z = np.maximum.accumulate(tail_z + 1e-6 * np.arange(n_points), axis=1)
        return cls(np.asarray(stat_mean, np.float32), np.asarray(stat_var, np.float32),
                   tail_z.astype(np.float32), (-np.log(surv)).astype(np.float32))

    def surprise(self, z: np.ndarray) -> np.ndarray:
        """(N, N_STATS) z-scores -> surprises; linear beyond the last quantile (an
        exponential tail fitted to the last decade of probability); NaN -> 0."""
        out = np.empty_like(z, dtype=np.float32)
        s = self.tail_s
        q = len(s)
        lo = int(np.searchsorted(s, s[-1] - np.log(10.0)))
        lo = min(lo, q - 2)
        for k in range(z.shape[1]):
            zq = self.tail_z[k]
            slope = (s[-1] - s[lo]) / max(float(zq[-1] - zq[lo]), 1e-6)
            inside = np.interp(z[:, k], zq, s)
            beyond = s[-1] + slope * (z[:, k] - zq[-1])
            out[:, k] = np.where(z[:, k] > zq[-1], beyond, inside)
        return np.nan_to_num(out, nan=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"stat_names": list(STAT_NAMES), "stat_mean": self.stat_mean.tolist(),
                "stat_var": self.stat_var.tolist(), "tail_z": self.tail_z.tolist(),
                "tail_s": self.tail_s.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        if list(d["stat_names"]) != list(STAT_NAMES):
            raise ValueError(f"checkpoint statistics {d['stat_names']} != {STAT_NAMES}")
        return cls(*(np.asarray(d[k], np.float32)
                     for k in ("stat_mean", "stat_var", "tail_z", "tail_s")))
