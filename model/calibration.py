"""The alert budget: a calibration curve from false-alarm rate to score threshold.

A ``FarCurve`` holds, for a grid of false-alarm rates (alerts per normal household-day),
the score that that share of normal household-days exceeds. It is fitted on the scores of
days known to be normal (``FarCurve.fit``; beyond the few largest scores the tail is
modelled as exponential, as ``model.training.tail_quantile`` does), saved in the checkpoint
(``Detector.checkpoint()["far_curve"]``), and turns an operator's budget into a threshold at
load or run time (``Detector.set_target_far``). Read the other way, it says how rare a
score is (``far_of``): the severity of an alert is how far past the threshold it is in
those terms (``severity``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Severity levels, from the false-alarm rate a score corresponds to relative to the target:
#: ``high`` at most a tenth of the target (e.g. 1 in 1,000 normal days at a 1 % budget),
#: ``medium`` at most a third, ``low`` otherwise (just past the threshold).
SEVERITIES: tuple[str, ...] = ("low", "medium", "high")
HIGH_RATIO = 0.1
MEDIUM_RATIO = 1 / 3

#: The default grid: 1e-5 .. 0.3 false alarms per normal household-day.
_GRID = np.geomspace(0.3, 1e-5, 81)


def _tail_quantile(x: np.ndarray, p: float, min_exceed: int) -> float:
    """The 1 - p quantile of sorted ``x``; an exponential tail above the value that
    ``min_exceed`` values exceed where fewer lie above the quantile."""
    n = len(x)
    if p * n >= min_exceed or n <= min_exceed:
        return float(np.quantile(x, 1.0 - p))
    u = float(x[n - min_exceed - 1])
    rate = 1.0 / max(float((x[n - min_exceed:] - u).mean()), 1e-6)
    return u + float(np.log(min_exceed / (n * p))) / rate


@dataclass
class FarCurve:
    """False-alarm rate -> threshold, from the scores of normal household-days.

    Attributes
    ----------
    far
        (K,) decreasing false-alarm rates per normal household-day.
    score
        (K,) non-decreasing thresholds: the score that a share ``far[k]`` of normal days
        reaches or exceeds.
    n_days
        How many normal days the curve was fitted on (below ``1 / far`` the tail is a model).
    """

    far: np.ndarray
    score: np.ndarray
    n_days: int = 0

    def __post_init__(self) -> None:
        self.far = np.asarray(self.far, np.float64)
        self.score = np.asarray(self.score, np.float64)
        assert self.far.shape == self.score.shape and len(self.far) >= 2, (
            self.far.shape, self.score.shape)
        assert bool(np.all(np.diff(self.far) < 0)), "far must decrease"
        self.score = np.maximum.accumulate(self.score)

    @classmethod
    def fit(cls, scores: np.ndarray, always: np.ndarray | None = None,
            grid: np.ndarray | None = None, min_exceed: int = 20) -> FarCurve:
        """From the model scores of normal household-days (NaN ignored). ``always`` (bool,
        same length): days that alert whatever the threshold (a data-quality rule fired);
        they use up part of every budget, so the model's share is what is left (at least a
        quarter of the target: a budget below the rules' own rate cannot be met)."""
        s = np.asarray(scores, np.float64)
        ok = np.isfinite(s)
        rule = np.zeros(len(s), bool) if always is None else np.asarray(always, bool)
        n = int(ok.sum())
        x = np.sort(s[ok & ~rule])
        assert len(x) >= 2 * min_exceed, f"need at least {2 * min_exceed} days, got {len(x)}"
        rule_rate = float(rule[ok].sum()) / max(n, 1)
        far = _GRID if grid is None else np.asarray(grid, np.float64)
        left = np.maximum(far - rule_rate, far / 4) * n / len(x)
        return cls(far, np.array([_tail_quantile(x, float(min(p, 0.5)), min_exceed)
                                  for p in left]), n)

    def threshold(self, target_far: float) -> float:
        """The score threshold for ``target_far`` false alarms per normal household-day."""
        if not self.far[-1] <= target_far <= self.far[0]:
            raise ValueError(f"target false-alarm rate {target_far:g} outside the "
                             f"calibrated range {self.far[-1]:g} .. {self.far[0]:g}")
        return float(np.interp(np.log(target_far), np.log(self.far[::-1]), self.score[::-1]))

    def far_of(self, score: np.ndarray | float) -> np.ndarray:
        """The false-alarm rate at which ``score`` would be the threshold (clipped to the
        curve's range; NaN stays NaN)."""
        s = np.asarray(score, np.float64)
        # score is non-decreasing along decreasing far: interpolate log far on score
        sc, idx = np.unique(self.score, return_index=True)
        lf = np.log(self.far)[idx]
        out = np.exp(np.interp(s, sc, lf))
        return np.where(np.isfinite(s), out, np.nan)

    def severity(self, score: np.ndarray, target_far: float) -> np.ndarray:
        """(N,) str: ``""`` below the threshold for ``target_far``, else ``SEVERITIES``
        by the false-alarm rate the score corresponds to (``HIGH_RATIO``, ``MEDIUM_RATIO``
        of the target)."""
        s = np.asarray(score, np.float64)
        thr = self.threshold(target_far)
        ratio = self.far_of(s) / target_far
        out = np.full(s.shape, "", dtype=object)
        alert = np.isfinite(s) & (s >= thr)
        out[alert] = "low"
        out[alert & (ratio <= MEDIUM_RATIO)] = "medium"
        out[alert & (ratio <= HIGH_RATIO)] = "high"
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"far": self.far.tolist(), "score": self.score.tolist(), "n_days": self.n_days}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FarCurve:
        return cls(np.asarray(d["far"]), np.asarray(d["score"]), int(d.get("n_days", 0)))


class LiveCalibration:
    """A rolling calibration curve from the scores the service itself produces.

    Score distributions move with the season and the mix of households (the 2013 sample:
    the 99th percentile of September's scores is half again October's), so a curve fitted
    once in training misses a budget by more than x1.5 on later months. Keeping the model
    scores of the last ``window_days`` days (``add``; anomalies are rare enough not to move
    the quantiles that matter) and refitting gives thresholds for the traffic at hand.
    """

    def __init__(self, window_days: int = 28, min_days: int = 500) -> None:
        self.window_days = window_days
        self.min_days = min_days
        self._days: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def add(self, day: np.ndarray, model_score: np.ndarray, rule: np.ndarray) -> None:
        """Scores of household-days (any days; stored by day, the window trimmed)."""
        day = np.asarray(day)
        for d in np.unique(day):
            m = day == d
            old = self._days.get(int(d), (np.zeros(0), np.zeros(0, bool)))
            self._days[int(d)] = (np.concatenate([old[0], np.asarray(model_score)[m]]),
                                  np.concatenate([old[1], np.asarray(rule, bool)[m]]))
        latest = max(self._days)
        for d in [d for d in self._days if d <= latest - self.window_days]:
            del self._days[d]

    def curve(self, before: int | None = None) -> FarCurve | None:
        """The curve of the window (of days before ``before``); None with too few days."""
        keep = [v for d, v in self._days.items() if before is None or d < before]
        if not keep or sum(len(v[0]) for v in keep) < self.min_days:
            return None
        return FarCurve.fit(np.concatenate([v[0] for v in keep]),
                            np.concatenate([v[1] for v in keep]))
