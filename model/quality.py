"""Data-quality rules that need no model: outages, stuck registers, impossible readings.

A meter that reports exact zeros for hours, repeats one non-zero value for hours, or reports
a value no domestic supply can deliver is wrong whatever the household usually does; these
rules fire on such days and are fused with the model's score in ``model.detector``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


def run_lengths(mask: np.ndarray) -> np.ndarray:
    """Length of the run of True that contains each position, along axis 1 (0 where False):
    the distance between the nearest False on either side, from two running extrema (no
    loop over positions).

    >>> run_lengths(np.array([[1, 1, 0, 1, 1, 1]], dtype=bool)).tolist()
    [[2, 2, 0, 3, 3, 3]]
    """
    mask = np.asarray(mask, dtype=bool)
    n, s = mask.shape
    idx = np.broadcast_to(np.arange(s, dtype=np.int32), (n, s))
    last_false = np.maximum.accumulate(np.where(mask, -1, idx), axis=1)
    next_false = np.minimum.accumulate(np.where(mask, s, idx)[:, ::-1], axis=1)[:, ::-1]
    return np.where(mask, next_false - last_false - 1, 0).astype(np.int32)


@dataclass
class QualityFlags:
    """Which rule fired on each of N days, and the half-hours that made it fire."""

    zero_run: np.ndarray  # bool (N,)
    flat_run: np.ndarray  # bool (N,)
    impossible: np.ndarray  # bool (N,)
    missing: np.ndarray  # bool (N,) some half-hours missing (imputed); informational
    slots: np.ndarray  # bool (N, 48) half-hours inside a fired rule

    @property
    def any_fault(self) -> np.ndarray:
        """Days with a fault that is an alert on its own (missing data is not)."""
        return self.zero_run | self.flat_run | self.impossible


def check(
    kwh: np.ndarray,
    observed: np.ndarray,
    level: np.ndarray,
    *,
    max_kwh: float,
    zero_run_slots: int,
    zero_min_level: float,
    flat_run_slots: int,
    flat_min_kwh: float,
) -> QualityFlags:
    """Run the rules on raw readings ``kwh`` (N, 48) (NaN = missing).

    * ``zero_run``: at least ``zero_run_slots`` consecutive readings of exactly 0, in a
      household whose recent level is at least ``zero_min_level`` (or unknown);
    * ``flat_run``: at least ``flat_run_slots`` consecutive identical readings of at least
      ``flat_min_kwh`` (a live household's load always moves);
    * ``impossible``: a reading that is infinite, negative or above ``max_kwh``.
    """
    kwh = np.asarray(kwh, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        impossible_slot = ~np.isnan(kwh) & ~observed
        zero = observed & (kwh == 0.0)
    zero_slots = run_lengths(zero) >= zero_run_slots
    lvl = np.asarray(level, dtype=np.float32)
    live = ~(lvl < zero_min_level)  # NaN (unknown) counts as live
    zero_run = zero_slots.any(axis=1) & live

    same = observed[:, 1:] & observed[:, :-1] & (kwh[:, 1:] == kwh[:, :-1])
    with np.errstate(invalid="ignore"):
        same &= kwh[:, 1:] >= flat_min_kwh
    steps = run_lengths(same) >= flat_run_slots - 1  # k equal steps cover k + 1 slots
    flat_slots = np.zeros_like(observed)
    flat_slots[:, 1:] |= steps
    flat_slots[:, :-1] |= steps
    flat_run = np.asarray(flat_slots.any(axis=1))

    return QualityFlags(
        zero_run=zero_run,
        flat_run=flat_run,
        impossible=impossible_slot.any(axis=1),
        missing=np.isnan(kwh).any(axis=1),
        slots=(zero_slots & zero_run[:, None]) | flat_slots | impossible_slot,
    )
