"""The deployable detector: a trained autoencoder plus everything needed to score a day.

Scoring one batch of N household-days (``Detector.score``), step by step:

1. Usable readings are finite and within ``[0, max_kwh]``; the rest are imputed by linear
   interpolation within the day and reported (``DayScores.imputed``, signal ``missing``).
2. Readings are divided by the household's recent level (``HouseholdState.level``; the
   day's own mean for a new household) and compressed with ``log1p``; the context vector
   is built by ``model.features.context_features``.
3. The autoencoder reconstructs the day from its shape and context; ``slot_error`` is the
   squared error of each usable half-hour divided by the number of usable half-hours,
   ``raw_error`` their sum.
4. Four statistics (shape error, largest half-hour error, level ratio, deviation from the
   household's time-of-day profile; ``model.scoring``) become per-household z-scores
   (shrunk towards the population for households with few days), then tail surprises
   (households with few days have maps of their own); ``model_score`` is the largest
   surprise, less the cold-start offset of a young household.
5. Data-quality rules (``model.quality``) add ``rule_bonus`` to the score when they fire,
   unless the household's recent ``fault_rate`` says such days are routine for it.
6. ``is_alert = score >= threshold`` (calibrated for a target false-alarm rate in training).
7. Days with enough readings update the household's level, error statistics (winsorised at
   ``winsor_z``), block profile and fault rate; an alert day's mean is clipped near the
   level and it counts less in the profile (``model.state.absorb``).

The detector is pure: ``score`` never modifies its inputs and returns the updated state.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np
import torch

from meterwatch.model.calibration import FarCurve, LiveCalibration
from meterwatch.model.features import (
    FEATURE_NAMES,
    N_SLOTS,
    ContextTables,
    ModelInputs,
    Vocabulary,
    encode,
    model_inputs,
)
from meterwatch.model.network import ConditionalAutoencoder, ModelConfig
from meterwatch.model.quality import QualityFlags, check
from meterwatch.model.scoring import N_STATS, STAT_NAMES, Calibration, DayStats, day_statistics
from meterwatch.model.state import HouseholdState, StatesByHousehold, absorb

log = logging.getLogger(__name__)

#: Bit i of ``DayScores.signals`` is set when ``SIGNAL_NAMES[i]`` fired on that day.
SIGNAL_NAMES: tuple[str, ...] = ("model", "zero_run", "flat_run", "impossible", "missing")
#: Bits of the data-quality rules that are alerts on their own.
FAULT_BITS = sum(1 << SIGNAL_NAMES.index(n) for n in ("zero_run", "flat_run", "impossible"))
CHECKPOINT_FORMAT = 1


def unusual_bits(passed: np.ndarray, scorable: np.ndarray) -> np.ndarray:
    """uint8 (N,) bitmask of ``passed`` (N, N_STATS) on ``scorable`` (N,) days
    (``DayScores.unusual``)."""
    weights = (1 << np.arange(N_STATS)).astype(np.uint8)
    return ((passed & scorable[:, None]).astype(np.uint8) * weights).sum(axis=1).astype(np.uint8)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file."""


def package_version() -> str:
    """The installed meterwatch version (recorded in every checkpoint)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("meterwatch")
    except PackageNotFoundError:
        return "unknown"

DeviceName = Literal["auto", "cpu", "cuda"] | str
DtypeName = Literal["float32", "bfloat16", "float16"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ScoringConfig:
    """How errors become scores and alerts (saved in the checkpoint)."""

    # kWh per half-hour above which a reading is impossible: 12 kWh/hh = 24 kW, beyond a
    # 100 A single-phase domestic supply.
    max_kwh: float = 12.0
    # An outage: this many consecutive exact zeros (8 = 4 hours) ...
    zero_run_slots: int = 8
    # ... in a household whose recent level (kWh/hh) is at least this (very small users
    # legitimately read 0.000 for hours).
    zero_min_level: float = 0.03
    # A stuck register: this many consecutive identical readings (10 = 5 hours) ...
    flat_run_slots: int = 10
    # ... of at least this many kWh (a few Wh/hh of standby can repeat exactly).
    flat_min_kwh: float = 0.02
    # Added to the score when a data-quality rule fires: rule alerts rank above all others ...
    rule_bonus: float = 100.0
    # ... unless the household's recent share of such days is at least this (routine for it).
    fault_mute_rate: float = 0.05
    # Weight of the newest normal day in the household level (~2 weeks of memory).
    level_alpha: float = 1 / 14
    # An alert day's mean is clipped to within this factor of the level before it is learnt.
    alert_level_clip: float = 1.25
    # Weight of the newest day in the household error statistics (~1 month).
    err_alpha: float = 1 / 30
    # Weight of the newest day in the household's fault rate (~2 months).
    fault_alpha: float = 1 / 60
    # Pseudo-days of the population's within-household variance blended into a household's
    # own variance of each statistic (and of the population's fault rate into its own).
    prior_days: float = 7.0
    # Floors of the per-household standard deviation of each statistic (STAT_NAMES order).
    min_stat_std: tuple[float, ...] = (0.15, 0.15, 0.05, 0.15)
    # Which statistics are normalised per household (else by the population only); all, by
    # evaluation (timing, already relative to the household's profile, gains nothing).
    per_household: tuple[bool, ...] = (True, True, True, True)
    # Days a household needs before its block profile is trusted (timing statistic).
    min_profile_days: int = 7
    # Floor of the standard deviation of a block's log share in the profile.
    min_block_std: float = 0.1
    # The timing statistic averages the squared z-scores of this many most deviant blocks:
    # three (six hours), as a moved schedule or a missing evening is a few blocks far off,
    # which the other nine would dilute (checkpoints without this setting used all 12).
    timing_blocks: int = 3
    # Weight of an alert day in the block profile, relative to a normal day.
    alert_profile_weight: float = 0.25
    # Statistics are winsorised at this many standard deviations before they are absorbed.
    winsor_z: float = 3.0
    # Usable half-hours a day needs to update the household state.
    min_observed: int = 24
    # The level ratio's z-score is taken relative to this times the previous day's (when
    # the household's last scored day was yesterday), over sqrt(1 - level_ar ** 2):
    # day-to-day level residuals correlate (0.3-0.6 on the shared LCL households); 0.4 by
    # evaluation, docs/detection.md (checkpoints without this setting used 0).
    level_ar: float = 0.4

    def __post_init__(self) -> None:
        assert 1 <= self.timing_blocks <= 12, self.timing_blocks
        assert 0.0 <= self.level_ar < 1.0, self.level_ar

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScoringConfig:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw.setdefault("timing_blocks", 12)  # written before the setting existed
        kw.setdefault("level_ar", 0.0)  # likewise
        for key in ("min_stat_std", "per_household"):
            if key in kw:
                kw[key] = tuple(kw[key])
                assert len(kw[key]) == N_STATS, (key, kw[key], STAT_NAMES)
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["min_stat_std"] = list(self.min_stat_std)
        d["per_household"] = list(self.per_household)
        return d


@dataclass
class DayScores:
    """Scores of N household-days (arrays of length N unless noted).

    Attributes
    ----------
    score
        float32: the final anomaly score (``model_score``, plus ``rule_bonus`` where a
        data-quality rule fired); NaN for a day with no usable reading.
    raw_error
        float32: mean squared reconstruction error over usable half-hours (model space).
    model_score
        float32: the model's evidence alone: the largest tail surprise of the per-household
        z-scores of ``stat_z`` (``-log`` of its training-day survival probability), less
        the cold-start offset for a household with few days (``model.scoring``).
    stat_z
        float32 (N, 4): per-household z-scores of the statistics ``model.scoring.STAT_NAMES``
        (shape, peak, level, timing); says *how* a day is unusual (NaN: not measured, e.g.
        timing before a household has a profile, the level ratio on its first day).
    stats
        float32 (N, 4): the statistics themselves.
    is_alert
        bool: ``score >= threshold``.
    expected
        float32 (N, 48): the reconstruction in kWh.
    slot_error
        float32 (N, 48): each half-hour's non-negative share of ``raw_error`` (0 where imputed).
    signals
        uint8 bitmask: bit i set when ``SIGNAL_NAMES[i]`` fired.
    unusual
        uint8 bitmask: bit k set when statistic k (``model.scoring.STAT_NAMES``) passes the
        threshold on its own (``Calibration.stat_scores``): what about a model alert's day
        is unusual (at least one bit on every day the model fired).
    imputed
        bool (N, 48): half-hours without a usable reading, imputed before the model.
    state
        The households' state after these days.
    """

    score: np.ndarray
    raw_error: np.ndarray
    model_score: np.ndarray
    stat_z: np.ndarray
    stats: np.ndarray
    is_alert: np.ndarray
    expected: np.ndarray
    slot_error: np.ndarray
    signals: np.ndarray
    unusual: np.ndarray
    imputed: np.ndarray
    state: HouseholdState

    def __len__(self) -> int:
        return len(self.score)

    def signal_names(self, i: int) -> list[str]:
        """Names of the signals that fired on day ``i``."""
        return [name for b, name in enumerate(SIGNAL_NAMES) if self.signals[i] >> b & 1]

    def take(self, idx: Sequence[int] | np.ndarray | slice) -> DayScores:
        kw: dict[str, Any] = {f.name: np.array(getattr(self, f.name)[idx])
                              for f in fields(self) if f.name != "state"}
        return DayScores(**kw, state=self.state.take(idx))


def _resolve_device(device: DeviceName | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def weights_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """Short sha256 of the weights (float32, key order), for the version string."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        h.update(k.encode())
        h.update(state_dict[k].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:10]


class Detector:
    """A trained conditional autoencoder with its calibration, ready to score days.

    Parameters
    ----------
    model
        The trained network (any device; moved to ``device``).
    threshold
        Alert when ``score >= threshold``.
    calibration
        Population statistics and tail maps learnt in training (``model.scoring``).
    scoring
        Scoring and data-quality settings.
    version
        Model version string; by default ``meterwatch-ae-<yyyymmdd>-<weights hash>``.
    device
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    dtype
        Inference precision on the device.
    chunk_size
        Household-days per forward pass; any N is scored in chunks of this size.
    far_curve
        Calibration curve (false-alarm rate -> threshold, ``model.calibration``): lets
        ``set_target_far`` set the alert budget at load or run time and gives each alert
        its severity. None (older checkpoints): the fixed ``threshold`` only.
    """

    def __init__(
        self,
        model: ConditionalAutoencoder,
        *,
        threshold: float,
        calibration: Calibration,
        scoring: ScoringConfig | None = None,
        version: str | None = None,
        device: DeviceName | torch.device = "auto",
        dtype: DtypeName = "float32",
        chunk_size: int = 65536,
        far_curve: FarCurve | None = None,
    ) -> None:
        assert dtype in _DTYPES, f"dtype must be one of {list(_DTYPES)}, got {dtype!r}"
        assert np.isfinite(threshold), threshold
        self.device = _resolve_device(device)
        self.dtype_name: DtypeName = dtype
        self.dtype = _DTYPES[dtype]
        self.model = model.to(self.device, self.dtype).eval()
        self.config: ModelConfig = model.config
        self.threshold = float(threshold)
        self.calibration = calibration
        self.scoring = scoring or ScoringConfig()
        self.chunk_size = int(chunk_size)
        self.version = version or (
            f"meterwatch-ae-{dt.datetime.now(dt.timezone.utc):%Y%m%d}-"
            f"{weights_hash(model.state_dict())}")
        self.far_curve = far_curve
        # The alert budget the threshold was set for by ``set_target_far`` (None: the
        # threshold calibrated in training).
        self.target_far: float | None = None
        # Rolling recalibration from the scores this detector produces (``observe``).
        self.live: LiveCalibration | None = None
        self._live_day: int | None = None
        self.info: dict[str, Any] = {}  # training summary (plain types), saved with the model
        # the household group and tariff values this model was trained on, where they are
        # not the Low Carbon London names (``features.learn_vocabulary``)
        self.vocabulary: Vocabulary | None = None
        self._lock = threading.Lock()
        self._pinned: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # score/replay as batched torch operations on the device (model.torch_scoring);
        # False: the numpy reference below
        self.torch_scoring = True
        # on a GPU, each scoring step replays a captured CUDA graph (model.torch_scoring,
        # StepGraphs); False: every step launches its kernels one by one
        self.cuda_graphs = True

    def __repr__(self) -> str:
        return (f"Detector(version={self.version!r}, threshold={self.threshold:.3f}, "
                f"device={self.device}, dtype={self.dtype_name})")

    # ------------------------------------------------------------------------ persistence

    def checkpoint(self) -> dict[str, Any]:
        """The checkpoint dict: tensors, numbers, strings, lists and dicts only."""
        return {
            "format": CHECKPOINT_FORMAT,
            "version": self.version,
            "model_config": self.config.to_dict(),
            # copies, never the live weights: pickling a checkpoint for a spawned scorer
            # process moves its tensors into shared memory in place, under a concurrent
            # inference reading them (and a caller may edit the dict)
            "state_dict": {k: v.detach().to("cpu", torch.float32, copy=True)
                           for k, v in self.model.state_dict().items()},
            "threshold": self.threshold,
            "norm": self.calibration.to_dict(),
            "scoring": self.scoring.to_dict(),
            "feature_names": list(FEATURE_NAMES),
            "signal_names": list(SIGNAL_NAMES),
            "info": self.info,
            "meterwatch_version": package_version(),
            **({"far_curve": self.far_curve.to_dict()} if self.far_curve is not None else {}),
            **({"vocabulary": self.vocabulary} if self.vocabulary is not None else {}),
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the checkpoint atomically (temporary file, then rename)."""
        tmp = f"{os.fspath(path)}.tmp"
        torch.save(self.checkpoint(), tmp)
        os.replace(tmp, path)
        log.info("saved %s to %s", self.version, path)

    @classmethod
    def from_checkpoint(
        cls,
        ckpt: dict[str, Any],
        device: DeviceName | torch.device = "auto",
        dtype: DtypeName = "float32",
        target_far: float | None = None,
    ) -> Detector:
        """The detector of a checkpoint dict; ``target_far``: ``set_target_far`` on it."""
        fmt = ckpt.get("format")
        if fmt != CHECKPOINT_FORMAT:
            raise ValueError(f"unsupported checkpoint format {fmt!r}")
        if list(ckpt["feature_names"]) != list(FEATURE_NAMES):
            raise ValueError(f"checkpoint features {ckpt['feature_names']} do not match this "
                             f"code's {list(FEATURE_NAMES)}")
        model = ConditionalAutoencoder(ModelConfig.from_dict(ckpt["model_config"]))
        model.load_state_dict(ckpt["state_dict"])
        det = cls(model, threshold=ckpt["threshold"],
                  calibration=Calibration.from_dict(ckpt["norm"]),
                  scoring=ScoringConfig.from_dict(ckpt["scoring"]),
                  version=ckpt["version"], device=device, dtype=dtype,
                  far_curve=FarCurve.from_dict(ckpt["far_curve"]) if "far_curve" in ckpt
                  else None)
        det.info = dict(ckpt.get("info", {}))
        vocabulary = ckpt.get("vocabulary")
        det.vocabulary = None if vocabulary is None else {
            str(part): {str(k): str(v) for k, v in names.items()}
            for part, names in vocabulary.items()}
        if target_far is not None:
            det.set_target_far(target_far)
        return det

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        device: DeviceName | torch.device = "auto",
        dtype: DtypeName = "float32",
        target_far: float | None = None,
    ) -> Detector:
        """Load a checkpoint written by ``save`` (read with ``weights_only=True``);
        ``target_far``: the alert budget (``set_target_far``), else the trained threshold."""
        if not os.path.isfile(path):
            raise CheckpointError(f"{os.fspath(path)}: no such checkpoint file; "
                                  "train one with meterwatch train")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            det = cls.from_checkpoint(ckpt, device=device, dtype=dtype, target_far=target_far)
        except Exception as e:  # truncated, corrupt, not a checkpoint, other code version
            # the first sentence of the reason (torch's unpickling errors run to a paragraph)
            why = (str(e).splitlines() or [""])[0].split(". ")[0][:160]
            raise CheckpointError(
                f"{os.fspath(path)}: not a usable meterwatch checkpoint "
                f"({type(e).__name__}: {why}); retrain with meterwatch train") from e
        log.info("loaded %r from %s", det, path)
        return det

    # ------------------------------------------------------------------------ alert budget

    def set_target_far(self, target_far: float) -> float:
        """Alert on ``target_far`` of normal household-days (e.g. 0.005 = 1 false alarm per
        200 household-days): the threshold from the calibration curve. Returns it.

        Raises ValueError without a curve (a checkpoint older than the curve: retrain) or
        for a rate outside the curve's range."""
        if self.far_curve is None:
            raise ValueError(f"{self.version} has no calibration curve; retrain the model "
                             "with this version to set a target false-alarm rate")
        if not 0.0 < target_far < 1.0:
            raise ValueError(f"target false-alarm rate must be in (0, 1), got {target_far}")
        self.threshold = self.far_curve.threshold(target_far)
        self.target_far = float(target_far)
        log.info("%s: threshold %.3f for %.3g false alarms per normal household-day",
                 self.version, self.threshold, target_far)
        return self.threshold

    def observe(self, day: np.ndarray, scores: DayScores, window_days: int = 28) -> bool:
        """Feed scored days to the rolling calibration (``model.calibration.LiveCalibration``)
        and, when a new day starts, refit the curve from the last ``window_days`` days and
        re-apply the alert budget (``set_target_far`` must have been called). Score
        distributions move with the season: on unseen households a curve fixed in training
        missed a 1 % budget by x5 while the rolling one held it within x1.5
        (``benchmarks/evaluation/RESULTS.md``). Returns True when the threshold changed."""
        return self.observe_scores(day, scores.score, scores.model_score, window_days)

    def observe_scores(self, day: np.ndarray, score: np.ndarray, model_score: np.ndarray,
                       window_days: int = 28) -> bool:
        """``observe`` from the ``score`` and ``model_score`` arrays of scored days."""
        if self.target_far is None:
            return False
        if self.live is None:
            self.live = LiveCalibration(window_days=window_days)
        day = np.asarray(day)
        score = np.asarray(score)
        model_score = np.asarray(model_score)
        ok = np.isfinite(model_score)
        with np.errstate(invalid="ignore"):
            rule = (score - model_score) >= self.scoring.rule_bonus / 2
        if ok.any():
            self.live.add(day[ok], model_score[ok], rule[ok])
        newest = int(day.max()) if len(day) else None
        if newest is None or (self._live_day is not None and newest <= self._live_day):
            return False
        self._live_day = newest
        curve = self.live.curve(before=newest)  # complete days only
        if curve is None:
            return False
        old = self.threshold
        self.far_curve = curve
        self.set_target_far(self.target_far)
        return self.threshold != old

    def far_of(self, score: np.ndarray) -> np.ndarray:
        """(N,) the false-alarm rate each score corresponds to (how rare it is among normal
        household-days); NaN without a curve."""
        s = np.asarray(score, np.float64)
        if self.far_curve is None:
            return np.full(s.shape, np.nan)
        return self.far_curve.far_of(s)

    def severity(self, score: np.ndarray) -> np.ndarray:
        """(N,) str severity of each alert: ``""`` below the threshold; ``high`` where the
        score corresponds to at most a tenth of the alert budget's false-alarm rate,
        ``medium`` at most a third, else ``low`` (``model.calibration.SEVERITIES``). Data-
        quality rule alerts are ``high``. Without a curve every alert is ``low``."""
        s = np.asarray(score, np.float64)
        out = np.full(s.shape, "", dtype=object)
        with np.errstate(invalid="ignore"):
            alert = s >= self.threshold
        out[alert] = "low"
        if self.far_curve is not None:
            budget = self.target_far or float(self.far_curve.far_of(self.threshold))
            ratio = self.far_curve.far_of(s) / budget
            out[alert & (ratio <= 1 / 3)] = "medium"
            out[alert & (ratio <= 0.1)] = "high"
        with np.errstate(invalid="ignore"):
            out[alert & (s >= self.scoring.rule_bonus / 2)] = "high"
        return out

    # ------------------------------------------------------------------------ inference

    def _pinned_buffers(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Page-locked host staging buffers for chunks of up to ``n`` rows (grown on demand)."""
        if self._pinned is None or len(self._pinned[0]) < n:
            c = self.config
            self._pinned = (
                torch.empty((n, c.n_slots), dtype=torch.float32, pin_memory=True),
                torch.empty((n, c.n_context), dtype=torch.float32, pin_memory=True),
                torch.empty((n, c.n_slots), dtype=torch.float32, pin_memory=True),
            )
        return self._pinned

    def reconstruct(self, x: np.ndarray, context: np.ndarray) -> np.ndarray:
        """Run the network in chunks: encoder input (N, 48), context (N, C) -> (N, 48)."""
        n = len(x)
        out = np.empty((n, self.config.n_slots), dtype=np.float32)
        cuda = self.device.type == "cuda"
        with self._lock, torch.inference_mode():
            for lo in range(0, n, self.chunk_size):
                hi = min(lo + self.chunk_size, n)
                if cuda:
                    hx, hc, hy = self._pinned_buffers(min(self.chunk_size, n))
                    m = hi - lo
                    hx[:m].numpy()[:] = x[lo:hi]  # host -> pinned staging
                    hc[:m].numpy()[:] = context[lo:hi]
                    dx = hx[:m].to(self.device, non_blocking=True).to(self.dtype)
                    dc = hc[:m].to(self.device, non_blocking=True).to(self.dtype)
                    hy[:m].copy_(self.model(dx, dc).float(), non_blocking=True)
                    torch.cuda.current_stream(self.device).synchronize()  # staging reusable
                    out[lo:hi] = hy[:m].numpy()
                else:
                    tx = torch.from_numpy(np.ascontiguousarray(x[lo:hi])).to(self.dtype)
                    tc = torch.from_numpy(np.ascontiguousarray(context[lo:hi])).to(self.dtype)
                    out[lo:hi] = self.model(tx, tc).float().numpy()
        return out

    def statistics(self, inp: ModelInputs, state: HouseholdState) -> DayStats:
        """Reconstruct the days and measure them (``model.scoring.day_statistics``)."""
        recon = self.reconstruct(inp.x_shape if self.config.shape_input else inp.x,
                                 inp.context)
        ready = state.count >= self.scoring.min_profile_days
        level_known = np.isfinite(state.level) & (state.level > 0)
        return day_statistics(inp, recon, state.profile_mean, state.profile_var, ready,
                              self.scoring.min_block_std, level_known,
                              self.scoring.timing_blocks)

    def stat_counts(self, count: np.ndarray) -> np.ndarray:
        """(N, N_STATS) float32: how many days each statistic has been measured on, for
        households with ``count`` days: shape and peak on every day, the level ratio from
        the second (the first day sets the level), timing once the profile exists."""
        c = np.asarray(count, np.float32)
        return np.stack([c, c, np.maximum(c - 1.0, 0.0),
                         np.maximum(c - self.scoring.min_profile_days, 0.0)], axis=1)

    def zscores(self, stats: np.ndarray, state: HouseholdState, day: np.ndarray
                ) -> tuple[np.ndarray, ...]:
        """Per-household z-scores of ``stats`` (N, N_STATS) of ``day`` (N,), shrunk towards
        the population for households with few days (``Calibration.shrink``; a household's
        own statistics count for as many days as each was measured on, ``stat_counts``);
        the level ratio's relative to ``level_ar`` times yesterday's (``ratio_z_last``).
        Returns (z, blended mean, blended std, the level ratio's signed z before that)."""
        sc, cal = self.scoring, self.calibration
        c = self.stat_counts(state.count) * np.asarray(sc.per_household, np.float32)
        h_mean, h_var = state.stat_moments()
        mean, var = cal.shrink(c, h_mean, h_var, sc.prior_days)
        std = np.sqrt(np.maximum(var, np.asarray(sc.min_stat_std, np.float32) ** 2))
        z = (stats - mean) / std
        level_z = z[:, 2].astype(np.float32)
        if sc.level_ar:
            phi = np.float32(sc.level_ar)
            follows = (state.last_day == np.asarray(day) - 1) & (state.last_day > 0)
            z[:, 2] = np.where(follows, (level_z - phi * state.ratio_z_last)
                               / np.sqrt(1 - phi * phi), level_z)
        z[:, 2] = np.abs(z[:, 2])  # the level ratio is unusual in both directions
        return z.astype(np.float32), mean, std, level_z

    def score(
        self,
        kwh: np.ndarray,
        day: np.ndarray,
        household_ids: Sequence[str],
        state: HouseholdState,
        tables: ContextTables | None = None,
    ) -> DayScores:
        """Score N household-days.

        Parameters
        ----------
        kwh
            float (N, 48) kWh per half-hour, slot i starting i*30 min after local midnight;
            NaN = missing (imputed and reported).
        day
            (N,) int days since 1970-01-01 (local calendar date).
        household_ids
            N household ids.
        state
            The N households' state before these days (``HouseholdState.empty(N)`` for new
            households). A household must appear at most once per call.
        tables
            Side information for the context features.

        Returns
        -------
        DayScores
            Scores, explanations and the updated state; the inputs are not modified.
        """
        kwh = np.asarray(kwh)
        day = np.asarray(day)
        n = len(kwh)
        assert kwh.shape == (n, N_SLOTS), f"kwh must be (N, {N_SLOTS}), got {kwh.shape}"
        assert day.shape == (n,), f"day must be ({n},), got {day.shape}"
        assert len(household_ids) == n and len(state) == n, (n, len(household_ids), len(state))
        sc = self.scoring
        from meterwatch.model import torch_scoring

        if torch_scoring.enabled(self, n):
            return torch_scoring.score(self, kwh, day, household_ids, state, tables)

        inp = model_inputs(kwh, day, household_ids, state.level,
                           encode(tables, self.vocabulary), sc.max_kwh)
        ds = self.statistics(inp, state)
        z, mean, std, level_z = self.zscores(ds.stats, state, day)
        stat_scores = self.calibration.stat_scores(z, state.count)
        model_score = stat_scores.max(axis=1)

        flags: QualityFlags = check(
            kwh, inp.observed, state.level, max_kwh=sc.max_kwh,
            zero_run_slots=sc.zero_run_slots, zero_min_level=sc.zero_min_level,
            flat_run_slots=sc.flat_run_slots, flat_min_kwh=sc.flat_min_kwh)
        c = state.count.astype(np.float32)
        fault_rate = c * state.fault_rate / (c + sc.prior_days)
        routine = fault_rate >= sc.fault_mute_rate
        fault = flags.zero_run | flags.flat_run
        alerting = (fault & ~routine) | flags.impossible
        scorable = inp.observed.any(axis=1)
        score = np.where(scorable, model_score + sc.rule_bonus * alerting, np.nan)
        score = score.astype(np.float32)
        with np.errstate(invalid="ignore"):
            is_alert = score >= self.threshold
            model_fired = model_score >= self.threshold

        signals = np.zeros(n, dtype=np.uint8)
        for bit, fired in enumerate(
            (model_fired & scorable, flags.zero_run, flags.flat_run, flags.impossible,
             flags.missing)
        ):
            signals |= (fired.astype(np.uint8) << bit).astype(np.uint8)

        enough = inp.observed.sum(axis=1) >= sc.min_observed
        w = sc.winsor_z * std
        capped = np.clip(ds.stats, mean - w, mean + w)  # one wild day teaches only this much
        counts = self.stat_counts(state.count)
        new_state = absorb(state, inp.day_mean, capped, ds.shares, enough, enough, fault,
                           sc.level_alpha, sc.err_alpha, sc.fault_alpha, stat_counts=counts)
        alerts = np.flatnonzero(is_alert)
        if len(alerts):
            a = state.take(alerts)
            a = absorb(a, inp.day_mean[alerts], capped[alerts], ds.shares[alerts],
                       enough[alerts], enough[alerts], fault[alerts], sc.level_alpha,
                       sc.err_alpha, sc.fault_alpha, sc.alert_level_clip,
                       sc.alert_profile_weight, stat_counts=counts[alerts])
            new_state.put(alerts, a)
        # the level z-score this day leaves for the next (``level_ar``), winsorised
        measured = enough & np.isfinite(level_z)
        new_state.ratio_z_last = np.where(measured, np.clip(level_z, -sc.winsor_z, sc.winsor_z),
                                          0.0).astype(np.float32)
        new_state.last_day = np.where(measured, day, 0).astype(np.int32)
        return DayScores(
            score=score,
            raw_error=ds.raw_error,
            model_score=model_score.astype(np.float32),
            stat_z=z,
            stats=ds.stats,
            is_alert=is_alert,
            expected=ds.expected,
            slot_error=ds.slot_error,
            signals=signals,
            unusual=unusual_bits(stat_scores >= self.threshold, np.asarray(scorable)),
            imputed=~inp.observed,
            state=new_state,
        )

    def replay(
        self,
        kwh: np.ndarray,
        day: np.ndarray,
        household_ids: Sequence[str],
        tables: ContextTables | None = None,
        state: Mapping[str, HouseholdState] | None = None,
    ) -> tuple[DayScores, StatesByHousehold]:
        """Score a history day by day, as the stream would, carrying each household's state.

        Parameters
        ----------
        kwh, day, household_ids
            M household-days in any order (each household at most once per day).
        state
            Optional starting state per household id (one-row ``HouseholdState``).

        Returns
        -------
        (DayScores, StatesByHousehold)
            Scores in the input's row order (``.state`` = state after each row's day), and the
            final state per household id (a read-only mapping).
        """
        from meterwatch.model import torch_scoring

        # a step of the replay scores one day of each household: that is the batch size
        if torch_scoring.enabled(self, len(set(household_ids))):
            return torch_scoring.replay(self, kwh, day, household_ids, tables, state)
        day = np.asarray(day)
        ids = np.asarray(household_ids, dtype=object)
        uniq, hh = np.unique(ids.astype(str), return_inverse=True)
        cur = HouseholdState.starting(uniq.tolist(), state)
        parts: list[DayScores] = []
        rows: list[np.ndarray] = []
        order = np.argsort(day, kind="stable")
        bounds = np.flatnonzero(np.diff(day[order])) + 1
        for idx in np.split(order, bounds):
            h = hh[idx]
            assert len(np.unique(h)) == len(h), f"household twice on day {day[idx[0]]}"
            s = self.score(np.asarray(kwh)[idx], day[idx], list(ids[idx]), cur.take(h), tables)
            cur.put(h, s.state)
            parts.append(s)
            rows.append(idx)
        inverse = np.empty(len(day), dtype=np.int64)
        inverse[np.concatenate(rows)] = np.arange(len(day))
        allp = _concat(parts).take(inverse)
        return allp, StatesByHousehold(uniq.tolist(), cur)


def _concat(parts: list[DayScores]) -> DayScores:
    kw: dict[str, Any] = {f.name: np.concatenate([getattr(p, f.name) for p in parts])
                          for f in fields(DayScores) if f.name != "state"}
    return DayScores(**kw, state=HouseholdState.concat(p.state for p in parts))
