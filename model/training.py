"""Fit a ``Detector`` on historical household-days.

``train_detector`` does, in order:

1. Split by time: the last ``calib_fraction`` of the days are held out for calibration.
   Split by household: a ``holdout_households`` share of the households is never trained
   on; their days are the validation set for early stopping and stand for the households
   the service will meet that the network has never seen.
2. Give every day the level its household had *before* it (as the stream would), hiding it
   for a random ``level_dropout`` share so the network also learns the new-household case,
   and hide the household info (ACORN, tariff) and, independently, the weather of a
   ``context_dropout`` share (context dropout), so that a household absent from the
   tables, or a service run without them, is in-distribution.
3. Train the autoencoder: Adam, ReduceLROnPlateau and early stopping on the validation
   loss, mixed precision on CUDA, a checkpoint each epoch (resumed when present), a guard
   against NaN/Inf losses, fixed seeds.
4. The prior for households with few days: mean, variance and within-household variance of
   the error statistics of the unseen households (``model.scoring.Calibration.shrink``).
5. Replay the training period in order through the detector (per-household state and all)
   to learn the tails of established households' z-scores.
6. Cold start: replay the unseen households as if the service met them first on each of
   their days (from an empty state; with all, some or none of the context), each fold of
   them against the prior of the other folds, and learn a tail map per bucket of day counts.
7. Replay all days and set the threshold at the ``1 - target_far`` quantile of the model
   scores of every established household-day of the history, less household-months in a
   lasting unusual state (``calibration_days``; rule alerts excluded; ``tail_quantile``);
   then offset each cold-start bucket so that new households alert at that rate too (an
   upper confidence bound over the unseen households). The calibration curve
   (``FarCurve``, false-alarm rate -> threshold, ``budget_curve``) is fitted the same way
   at every rate of its grid and saved with the checkpoint, so the service can take an
   alert budget at run time (``--target-far``).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import random
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

from meterwatch.model.calibration import FarCurve
from meterwatch.model.detector import DayScores, Detector, ScoringConfig
from meterwatch.model.features import (
    ContextTables,
    ModelInputs,
    describe_unknown,
    encode,
    learn_vocabulary,
    mask_context,
    model_inputs,
    unknown_values,
)
from meterwatch.model.network import ConditionalAutoencoder, ModelConfig
from meterwatch.model.scoring import N_BLOCKS, N_STATS, Calibration, TooFewDays
from meterwatch.model.state import HouseholdState, absorb

log = logging.getLogger(__name__)


class TrainingDataError(ValueError):
    """The history given to ``train_detector`` is too small to train and calibrate on."""


#: What trains, measured with complete synthetic days (a history with gaps needs more).
SMALLEST_HISTORY = "8 households x 8 days, 4 x 10, 3 x 20 or 1 x 80 complete days"


def _too_little(ids: Sequence[str], day: np.ndarray, why: str) -> str:
    n_days = int(day.max() - day.min() + 1) if len(day) else 0
    return (f"too little history to train: {len(set(ids))} households over {n_days} days "
            f"({len(ids)} household-days); {why}. Give more households or more days "
            f"(the smallest that trains: {SMALLEST_HISTORY})")


@dataclass(frozen=True)
class TrainConfig:
    """Training and calibration settings."""

    model: ModelConfig = field(default_factory=ModelConfig.default)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    # Upper bound on epochs; early stopping usually ends training well before.
    max_epochs: int = 150
    # Rows per step; None derives it from free (GPU or host) memory and the data size.
    batch_size: int | None = None
    lr: float = 3e-3
    weight_decay: float = 1e-5
    # Epochs without a better validation loss before stopping.
    patience: int = 12
    # ReduceLROnPlateau: epochs without improvement before the rate is cut by lr_factor.
    lr_patience: int = 4
    lr_factor: float = 0.3
    # Share of households the network never trains on (at least 2, when there are 10 or
    # more households): their days are the validation set for early stopping and teach the
    # detector what a household it has never seen looks like (the population prior and the
    # cold-start tail maps). With fewer households, a random val_fraction of the rows is the
    # validation set and the training households stand in for unseen ones.
    holdout_households: float = 0.2
    # Share of training-period rows used for early stopping when no households are held out.
    val_fraction: float = 0.1
    # Share of the (latest) days held out to calibrate the threshold ...
    calib_fraction: float = 0.25
    # ... or: days from this one on (days since 1970-01-01) are the calibration set.
    calibration_start_day: int | None = None
    # Target false-alarm rate of the model score on held-out days.
    target_far: float = 0.01
    # Share of training days whose level is hidden (teaches the new-household case).
    level_dropout: float = 0.1
    # Share of training days whose household info (ACORN, tariff) reads "unknown", and,
    # drawn independently, whose weather does (context dropout): a household absent from the
    # tables, or a service run without them, must look like something the network has seen.
    context_dropout: float = 0.2
    # Reconstruction loss: Huber is robust to the anomalies hidden in "mostly normal" data.
    loss: Literal["mse", "huber"] = "huber"
    huber_delta: float = 0.5
    seed: int = 0
    device: str = "auto"
    # Mixed precision: "auto" = bf16 autocast on CUDA when supported, else fp16 + GradScaler;
    # off on CPU.
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    # DataLoader workers (only when the data is not resident); None = 0 for in-memory sets
    # below 1M rows, else from psutil.
    num_workers: int | None = None
    # Keep the training set on the device and index batches there (one randperm per epoch,
    # no DataLoader, one host synchronisation per epoch); None = when it fits in a quarter of
    # the device's free memory.
    resident: bool | None = None
    # Directory for per-epoch training checkpoints (resumed when resume=True).
    checkpoint_dir: str | None = None
    resume: bool = True
    # Write the loss curves here (PNG; needs matplotlib).
    plot_path: str | None = None
    # Threshold (z units) used while replaying to learn the tails of the z-scores.
    provisional_threshold: float = 3.0
    # Cold-start buckets of household day counts, each with its own tail map (learnt by
    # replaying held-out households from an empty state, restarted every
    # cold_restart_every days); households with at least cold_edges[-1] days use the map
    # of established households.
    cold_edges: tuple[int, ...] = (0, 1, 2, 3, 5, 7, 10, 14)
    cold_restart_every: int = 1
    # Folds of the unseen households for checking the cold-start calibration on households
    # it was not fitted on (sets each bucket's offset; fewer than 2: no check).
    cold_folds: int = 4
    # Each bucket's threshold is an upper confidence bound (this level, bootstrap over the
    # unseen households) on the score its new households exceed at target_far; None: the
    # plain estimate.
    cold_confidence: float | None = 0.75
    # A household's first day has nothing of its own to compare with: how unusual it may
    # look depends on how households differ, and calibrating that at target_far takes many
    # households. With fewer unseen households than this, the model abstains on first days
    # (the data-quality rules still alert).
    first_day_households: int = 100


@dataclass
class History:
    epoch: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)


def set_seeds(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def trailing_levels(kwh: np.ndarray, day: np.ndarray, household_ids: Sequence[str],
                    scoring: ScoringConfig) -> np.ndarray:
    """Each row's household level from its *earlier* days (NaN on its first day), updated
    exactly as ``Detector.score`` does but from every day with enough readings."""
    day = np.asarray(day)
    _, hh = np.unique(np.asarray(household_ids, dtype=str), return_inverse=True)
    state = HouseholdState.empty(int(hh.max(initial=-1)) + 1)
    out = np.full(len(day), np.nan, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(kwh) & (kwh >= 0) & (kwh <= scoring.max_kwh)
    n_obs = ok.sum(axis=1)
    mean = (np.where(ok, kwh, 0.0).sum(axis=1) / np.maximum(n_obs, 1)).astype(np.float32)
    order = np.argsort(day, kind="stable")
    for idx in np.split(order, np.flatnonzero(np.diff(day[order])) + 1):
        h = hh[idx]
        out[idx] = state.level[h]
        enough = n_obs[idx] >= scoring.min_observed
        new = absorb(state.take(h), mean[idx], np.zeros((len(idx), N_STATS), np.float32),
                     np.zeros((len(idx), N_BLOCKS), np.float32), enough, enough,
                     np.zeros(len(idx), bool), scoring.level_alpha, 1.0, 1.0)
        state.put(h, new)
    return out


def _warn_unusable(kwh: np.ndarray, max_kwh: float) -> None:
    """Say how many readings training takes as missing, as the service does: negative ones
    (a meter that nets off solar export; the stream dead-letters them, ``bad_kwh``) and
    ones above ``max_kwh``. Nothing used to say so: a summer of solar households trained on
    imputed afternoons."""
    with np.errstate(invalid="ignore"):
        for what, n in (("negative (export netted off? meterwatch models the energy a "
                         "household takes from the grid, and the service dead-letters them "
                         "as bad_kwh)", int((kwh < 0).sum())),
                        (f"above {max_kwh:g} kWh in a half-hour", int((kwh > max_kwh).sum()))):
            if n:
                share = n / max(int(np.isfinite(kwh).sum()), 1)
                many = n != 1
                log.warning("%d reading%s (%.2g %%) %s %s: training takes %s as missing", n,
                            "s" if many else "", 100 * share, "are" if many else "is", what,
                            "them" if many else "it")


def _auto_batch_size(n_rows: int, config: ModelConfig, device: torch.device) -> int:
    """Largest power of two that fits a small share of free memory, keeping >= 8 steps per
    epoch, within [64, 65536]."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        import psutil

        free = psutil.virtual_memory().available
    widths = [config.n_slots + config.n_context, *config.hidden, config.latent]
    per_row = 4 * 6 * (2 * sum(widths) + 3 * config.n_slots)  # activations, grads, inputs
    fit = int(0.05 * free // per_row)
    cap = max(64, min(fit, n_rows // 8, 65536))
    return 2 ** int(math.log2(cap))


def _num_workers(n_rows: int, config: TrainConfig) -> int:
    if config.num_workers is not None:
        return config.num_workers
    if n_rows < 1_000_000:
        return 0  # batches are slices of in-memory tensors: workers only add copies
    import psutil

    return max(0, min(8, (psutil.cpu_count(logical=False) or 1) - 1))


def _masked_loss(pred: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                 config: TrainConfig) -> torch.Tensor:
    """Mean loss over observed half-hours (w = 1), imputed ones ignored."""
    if config.loss == "huber":
        per = torch.nn.functional.huber_loss(pred, x, reduction="none", delta=config.huber_delta)
    else:
        per = (pred - x) ** 2
    return (per * w).sum() / w.sum().clamp_min(1.0)


def _amp(device: torch.device, config: TrainConfig) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use GradScaler)."""
    if device.type != "cuda" or config.amp == "off":
        return None, False
    if config.amp == "bf16" or (config.amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16, False
    return torch.float16, True


def _fits_resident(n_rows: int, config: ModelConfig, device: torch.device) -> bool:
    """The four training tensors take at most a quarter of the device's free memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        import psutil

        free = psutil.virtual_memory().available
    row = 4 * (2 * config.n_slots + config.n_context + config.n_slots)
    return n_rows * row <= 0.25 * free


class _Resident:
    """Batches indexed on the device: one ``randperm`` per epoch, no copies from the host."""

    def __init__(self, tensors: tuple[torch.Tensor, ...], batch: int, device: torch.device,
                 gen: torch.Generator) -> None:
        self.tensors = tuple(t.to(device) for t in tensors)
        self.batch, self.device, self.gen = batch, device, gen
        self.n = len(self.tensors[0])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        perm = torch.randperm(self.n, device=self.device, generator=self.gen)
        for lo in range(0, self.n, self.batch):
            idx = perm[lo:lo + self.batch]
            yield tuple(t[idx] for t in self.tensors)


class _SkipNonFinite:
    """Skip an optimiser step whose loss is not finite without asking the host: gradients of
    such a step are zeroed, and afterwards the parameters and optimiser state are put back
    to what they were (``torch.where`` on a device flag), so the step leaves no trace."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = opt

    def _state(self) -> list[torch.Tensor]:
        return [v for p in self.params for v in self.opt.state.get(p, {}).values()
                if torch.is_tensor(v)]

    def before(self, finite: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        for p in self.params:
            if p.grad is not None:
                p.grad.nan_to_num_(0.0, 0.0, 0.0).mul_(finite)
        params = [p.detach().clone() for p in self.params]
        state = [v.clone() for v in self._state()]
        return params, state

    def after(self, finite: torch.Tensor,
              saved: tuple[list[torch.Tensor], list[torch.Tensor]]) -> None:
        params, state = saved
        with torch.no_grad():
            for p, old in zip(self.params, params, strict=True):
                p.copy_(torch.where(finite, p, old))
            now = self._state()
            if len(state) == len(now):
                for v, old in zip(now, state, strict=True):
                    v.copy_(torch.where(finite.to(v.device), v, old))
            else:  # the optimiser's state was created by this step: back to empty (zeros)
                for v in now:
                    v.copy_(torch.where(finite.to(v.device), v, torch.zeros_like(v)))


def _load_scaler(scaler: Any, state: dict[str, Any] | None, use_scaler: bool) -> None:
    """Resume the fp16 loss scale; a checkpoint written without a scaler (on the CPU, or with
    bf16) has an empty state, which ``GradScaler.load_state_dict`` rejects: start afresh."""
    if use_scaler and state:
        scaler.load_state_dict(state)
    elif use_scaler:
        log.info("checkpoint has no fp16 loss scale (written on another device or precision):"
                 " starting from the default scale")


def _tensors(inp: ModelInputs, config: ModelConfig) -> tuple[torch.Tensor, ...]:
    """(encoder input, context, target, observed mask) as CPU tensors."""
    return (torch.from_numpy(inp.x_shape if config.shape_input else inp.x),
            torch.from_numpy(inp.context), torch.from_numpy(inp.x),
            torch.from_numpy(inp.observed.astype(np.float32)))


def fit_autoencoder(
    train: ModelInputs,
    val: ModelInputs,
    config: TrainConfig,
    device: torch.device,
) -> tuple[ConditionalAutoencoder, History]:
    """Train the network with early stopping; returns the best model (on CPU) and history."""
    set_seeds(config.seed)
    model = ConditionalAutoencoder(config.model).to(device)
    # capturable: Adam's step counter lives on the device too, so skipping a non-finite step
    # needs no host synchronisation
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                           capturable=device.type == "cuda")
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=config.lr_factor, patience=config.lr_patience)
    amp_dtype, use_scaler = _amp(device, config)
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    n = len(train.x)
    batch = config.batch_size or _auto_batch_size(n, config.model, device)
    resident = (config.resident if config.resident is not None
                else _fits_resident(n, config.model, device))
    batches: Any
    if resident:
        workers = 0
        gen = torch.Generator(device=device).manual_seed(config.seed)
        batches = _Resident(_tensors(train, config.model), batch, device, gen)
    else:
        workers = _num_workers(n, config)
        ds = TensorDataset(*_tensors(train, config.model))
        gen = torch.Generator().manual_seed(config.seed)
        sampler = BatchSampler(RandomSampler(ds, generator=gen), batch, drop_last=False)
        batches = DataLoader(ds, sampler=sampler, batch_size=None, num_workers=workers,
                             pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    vx, vc, vy, vw = (t.to(device) for t in _tensors(val, config.model))
    guard = _SkipNonFinite(model, opt)
    log.info("training %s (%d params) on %d days (val %d), batch %d, %s, %s%s",
             config.model, model.n_params(), n, len(val.x), batch,
             "resident on the device" if resident else f"DataLoader, {workers} workers",
             device, f", autocast {amp_dtype}" if amp_dtype else "")

    history = History()
    best_val, best_state, bad_epochs, start_epoch = math.inf, None, 0, 0
    ckpt_path = Path(config.checkpoint_dir) / "train_state.pt" if config.checkpoint_dir else None
    if ckpt_path is not None and config.resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ck["model_config"] == config.model.to_dict():
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            _load_scaler(scaler, ck.get("scaler"), use_scaler)
            try:
                gen.set_state(ck["generator"])
            except (RuntimeError, TypeError) as exc:  # written on another device
                log.warning("batch order not resumed (%s): the shuffle restarts", exc)
            history = History(**ck["history"])
            best_val, best_state = ck["best_val"], ck["best_state"]
            bad_epochs, start_epoch = ck["bad_epochs"], ck["epoch"] + 1
            log.info("resumed from %s at epoch %d", ckpt_path, start_epoch)
        else:
            log.warning("ignoring %s: it was written for another model config", ckpt_path)

    t0 = time.monotonic()
    for epoch in range(start_epoch, config.max_epochs):
        if bad_epochs >= config.patience:
            break
        model.train()
        # loss sum, rows and skipped batches stay on the device until the epoch ends
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        for x, c, y, w in batches:
            x, c, y, w = (t.to(device, non_blocking=True) for t in (x, c, y, w))
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                loss = _masked_loss(model(x, c).float(), y, w, config)
            # NaN/Inf guard: the step is skipped and the weights kept, decided on the device
            finite = torch.isfinite(loss)
            opt.zero_grad(set_to_none=True)
            scaler.scale(torch.where(finite, loss, 0.0)).backward()
            scaler.unscale_(opt)
            saved = guard.before(finite)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            scaler.step(opt)
            scaler.update()
            guard.after(finite, saved)
            rows = finite.double() * len(x)
            sums += torch.stack([torch.where(finite, loss.detach().double(), 0.0) * len(x),
                                 rows, (~finite).double()])

        model.eval()
        with torch.inference_mode(), torch.autocast(
                device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            val_t = _masked_loss(model(vx, vc).float(), vy, vw, config)
        # the epoch's one host synchronisation
        loss_sum, count, skipped, val_loss = torch.cat([sums, val_t.double().view(1)]).tolist()
        if count == 0:
            raise FloatingPointError(f"epoch {epoch}: every batch had a non-finite loss")
        if skipped:
            log.warning("epoch %d: skipped %d batches with non-finite loss", epoch, skipped)
        total = loss_sum
        sched.step(val_loss)
        lr = opt.param_groups[0]["lr"]
        history.epoch.append(epoch)
        history.train_loss.append(total / count)
        history.val_loss.append(val_loss)
        history.lr.append(lr)
        if val_loss < best_val - 1e-6:
            best_val, bad_epochs = val_loss, 0
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in
                          model.state_dict().items()}
        else:
            bad_epochs += 1
        if epoch % 10 == 0 or bad_epochs == config.patience:
            log.info("epoch %3d  train %.5f  val %.5f  best %.5f  lr %.1e  %.1fs", epoch,
                     total / count, val_loss, best_val, lr, time.monotonic() - t0)
        if ckpt_path is not None:
            ckpt_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save({
                "model_config": config.model.to_dict(), "model": model.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(), "generator": gen.get_state(),
                "history": asdict(history), "best_val": best_val, "best_state": best_state,
                "bad_epochs": bad_epochs, "epoch": epoch,
            }, tmp)
            os.replace(tmp, ckpt_path)

    assert best_state is not None, "no epoch finished"
    model.load_state_dict(best_state)
    log.info("trained %d epochs in %.1fs, best val loss %.5f", len(history.epoch),
             time.monotonic() - t0, best_val)
    return model.cpu().eval(), history


def plot_history(history: History, path: str | os.PathLike[str], title: str = "") -> None:
    """Loss curves (train, validation) and learning rate as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(history.epoch, history.train_loss, label="train")
    ax.plot(history.epoch, history.val_loss, label="validation")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(history.epoch, history.lr, color="grey", linestyle=":", label="learning rate")
    ax2.set_yscale("log")
    ax2.set_ylabel("learning rate")
    ax.legend(loc="upper right")
    ax.set_title(title or "training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train_detector(
    kwh: np.ndarray,
    day: np.ndarray,
    household_ids: Sequence[str],
    tables: ContextTables | None,
    config: TrainConfig | None = None,
) -> Detector:
    """Fit and calibrate a detector on M historical household-days (mostly normal).

    Parameters
    ----------
    kwh
        float (M, 48) kWh per half-hour (NaN = missing).
    day
        (M,) int days since 1970-01-01.
    household_ids
        M household ids (each household at most once per day).
    tables
        Context side information (or None).
    config
        Settings; ``TrainConfig()`` by default.

    Returns
    -------
    Detector
        On ``config.device``; ``detector.info`` holds the training history.

    Raises
    ------
    TrainingDataError
        A history too small to train and calibrate on (``SMALLEST_HISTORY``).
    """
    cfg = config or TrainConfig()
    kwh = np.asarray(kwh, dtype=np.float32)
    day = np.asarray(day).astype(np.int32)
    ids = [str(h) for h in household_ids]
    m = len(kwh)
    assert kwh.shape == (m, 48) and day.shape == (m,) and len(ids) == m, (
        kwh.shape, day.shape, len(ids))
    assert cfg.model.n_context == 15, cfg.model
    if m == 0:
        raise TrainingDataError(_too_little(ids, day, "there are no days"))
    _warn_unusable(kwh, cfg.scoring.max_kwh)
    # a utility's own household groups and tariffs take the context's columns (the Low
    # Carbon London names keep theirs); everything below sees them as the model will
    vocabulary = learn_vocabulary(tables, ids)
    if vocabulary is not None:
        log.info("household values learnt: %s", "; ".join(
            f"{part} " + ", ".join(f"{v!r} -> {n}" for v, n in names.items())
            for part, names in vocabulary.items()))
    unknown = describe_unknown(unknown_values(tables, vocabulary))
    if unknown:
        log.warning("household file: %s; they are scored as unknown", unknown)
    tables = encode(tables, vocabulary)
    set_seeds(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if cfg.device == "auto" else cfg.device))

    # Step 1: split by time, and hold some households out of training altogether.
    days = np.unique(day)
    n_cal = round(cfg.calib_fraction * len(days)) if len(days) >= 4 else 0
    cutoff = days[-n_cal] if n_cal else days[-1] + 1
    if cfg.calibration_start_day is not None:
        cutoff = cfg.calibration_start_day
    uniq, hh = np.unique(np.asarray(ids, dtype=str), return_inverse=True)
    n_out = round(cfg.holdout_households * len(uniq)) if len(uniq) >= 10 else 0
    n_out = max(n_out, 2) if n_out else 0
    unseen = np.zeros(len(uniq), bool)
    unseen[rng.choice(len(uniq), n_out, replace=False)] = True
    unseen_row = unseen[hh]
    fit_rows = np.flatnonzero(day < cutoff)
    cal_rows = np.flatnonzero(day >= cutoff)
    if n_out:
        train_rows = fit_rows[~unseen_row[fit_rows]]
        val_rows = fit_rows[unseen_row[fit_rows]]
        new_rows = np.flatnonzero(unseen_row)  # every day of the unseen households
    else:
        is_val = rng.random(len(fit_rows)) < cfg.val_fraction
        train_rows, val_rows = fit_rows[~is_val], fit_rows[is_val]
        new_rows = np.arange(m)
    if len(train_rows) == 0 or len(val_rows) == 0:
        raise TrainingDataError(_too_little(ids, day, "nothing is left to train or validate on"))

    # Step 2: levels as the stream would know them, some hidden; some context hidden.
    level = trailing_levels(kwh, day, ids, cfg.scoring)
    hidden = rng.random(m) < cfg.level_dropout
    level_train = np.where(hidden, np.nan, level).astype(np.float32)
    no_household = rng.random(m) < cfg.context_dropout
    no_weather = rng.random(m) < cfg.context_dropout

    def prep(rows: np.ndarray) -> ModelInputs:
        inp = model_inputs(kwh[rows], day[rows], [ids[i] for i in rows], level_train[rows],
                           tables, cfg.scoring.max_kwh)
        inp.context = mask_context(inp.context, no_household[rows], no_weather[rows])
        return inp

    # Step 3: train.
    model, history = fit_autoencoder(prep(train_rows), prep(val_rows), cfg, device)
    if cfg.plot_path:
        plot_history(history, cfg.plot_path)

    # Step 4: the population prior for households with few days: statistics of the
    # households replayed as the stream would (per-household state); of the unseen ones for
    # the statistics that compare the day with the network's reconstruction (it knows its
    # training households' shapes), of all for the others (steadier).
    det = Detector(model, threshold=cfg.provisional_threshold, calibration=Calibration.identity(
        np.zeros(N_STATS), np.ones(N_STATS)), scoring=cfg.scoring, device=device)
    det.vocabulary = vocabulary
    everyone = np.arange(m)
    det.calibration = _prior(det, kwh, day, ids, tables, everyone, unseen_row)

    # Step 5: the tail map of established households: replay the training period and learn
    # the tails of their z-scores. A short history has few established days: then the map
    # also learns from younger households (at least half of the training days).
    fit_ids = [ids[i] for i in fit_rows]
    scores, _ = det.replay(kwh[fit_rows], day[fit_rows], fit_ids, tables)
    count = _count_before(scores, cfg.scoring)
    limit = cfg.cold_edges[-1] if cfg.cold_edges else 0  # established: this many days
    warm_from = limit
    while warm_from > 0 and (count >= warm_from).mean() < 0.5:
        warm_from = max(e for e in [0, *cfg.cold_edges] if e < warm_from)
    prior = det.calibration
    try:
        det.calibration = prior.with_tails(scores.stat_z[count >= warm_from])
    except TooFewDays as exc:
        raise TrainingDataError(_too_little(ids, day, str(exc))) from None
    del scores, count  # a replay holds ~0.6 KB per day: never two of them at once

    # Step 6: new households. Replay the unseen households as if the service met them
    # first on each of their days (from an empty state; with all, some or none of the
    # context), each fold of them with the prior of all other households: a new household
    # is judged by a network and a prior it did not shape. One tail map per bucket of day
    # counts that these replays cover well.
    new_hh = np.unique(hh[new_rows])
    folds = max(min(cfg.cold_folds, len(new_hh)), 1) if limit else 0
    fold = np.full(len(uniq), -1)
    fold[new_hh] = rng.permutation(len(new_hh)) % max(folds, 1)
    cross: list[tuple[np.ndarray, ...]] = []
    for f in range(folds):
        rows = new_rows[fold[hh[new_rows]] == f]
        rest = everyone[fold[hh] != f] if folds > 1 else everyone
        det.calibration = replace(_prior(det, kwh, day, ids, tables, rest, unseen_row),
                                  tail_z=det.calibration.tail_z, tail_s=det.calibration.tail_s)
        cross.append(cold_start_replay(det, kwh[rows], day[rows], [ids[i] for i in rows],
                                       tables, limit, cfg.cold_restart_every,
                                       np.random.default_rng(cfg.seed + 100 + f)))
    det.calibration = replace(prior, tail_z=det.calibration.tail_z,
                              tail_s=det.calibration.tail_s)
    cold_z, cold_count, cold_who, cold_rule = (
        (np.concatenate(v) for v in zip(*cross, strict=True)) if cross
        else (np.zeros((0, N_STATS)), np.zeros(0, int), np.zeros(0, str), np.zeros(0, bool)))
    edges = list(cfg.cold_edges)
    while len(edges) >= 2 and ((cold_count >= edges[-2]) & (cold_count < edges[-1])).sum() < 50:
        edges.pop()
    if len(edges) >= 2:
        det.calibration = det.calibration.with_cold_tails(edges, cold_z, cold_count)
        limit = edges[-1]
    else:
        edges, limit = [], 0

    # Step 7: replay everything and set the threshold on the held-out days of established
    # households. Then each cold-start bucket's offset: its days alert at the target rate
    # too (an upper confidence bound of the rate over the unseen households).
    det.threshold = float(det.calibration.tail_s[-1])  # provisional: rarest training day
    scores, _ = det.replay(kwh, day, ids, tables)
    final_score, model_score = scores.score, scores.model_score
    established = _count_before(scores, cfg.scoring) >= limit
    del scores
    rule_free = final_score - model_score < cfg.scoring.rule_bonus / 2
    ok = np.isfinite(model_score) & rule_free
    usable = ok & established if (ok & established).sum() >= 100 else ok
    sel = calibration_days(model_score, hh, day, usable, cfg.target_far)
    det.threshold = tail_quantile(model_score[sel], cfg.target_far)
    offsets = np.zeros(max(len(edges) - 1, 0), np.float32)
    if len(offsets):
        cold_score = det.calibration.model_score(cold_z, cold_count)
        b = det.calibration.bucket(cold_count)
        for k in range(len(offsets)):
            sel_k = (b == k) & ~cold_rule & np.isfinite(cold_score)
            if sel_k.sum() < 20:
                continue
            offsets[k] = tail_quantile(cold_score[sel_k], cfg.target_far,
                                       groups=cold_who[sel_k],
                                       confidence=cfg.cold_confidence,
                                       seed=cfg.seed + k) - det.threshold
    if len(offsets) and len(new_hh) < cfg.first_day_households and edges[:2] == [0, 1]:
        offsets[0] = np.inf  # first days: too few households to calibrate, abstain
    det.calibration.cold_offset = offsets
    # The checkpoint's calibration curve (false-alarm rate -> threshold, for
    # ``--target-far``): at each rate of its grid, fitted on the rule-free days that would
    # set the threshold for that rate (``budget_curve``); fewer than 200 established days:
    # every day with a model score.
    finite = np.isfinite(model_score)
    with np.errstate(invalid="ignore"):
        rule = final_score - model_score >= cfg.scoring.rule_bonus / 2
    usable = finite & established if (finite & established).sum() >= 200 else finite
    if (usable & ~rule).sum() >= 40:
        det.far_curve = budget_curve(model_score, rule, hh, day, usable)
    else:
        log.warning("too few days (%d) for a calibration curve: this checkpoint cannot take "
                    "a target false-alarm rate", int(usable.sum()))
        det.far_curve = None
    det.info = {
        "train_days": len(train_rows), "validation_days": len(val_rows),
        "calibration_days": len(cal_rows), "unseen_households": int(n_out),
        "cold_edges": [int(e) for e in edges], "cold_offset": offsets.tolist(),
        "target_far": cfg.target_far, "epochs": len(history.epoch),
        "history": asdict(history), "train_config": _plain(asdict(replace(cfg))),
    }
    log.info("calibrated threshold %.3f for %.1f%% false alarms on %d held-out days, "
             "cold-start offsets %s; %r", det.threshold, 100 * cfg.target_far, len(sel),
             np.round(offsets, 2).tolist(), det)
    return det


def calibration_days(score: np.ndarray, household: np.ndarray, day: np.ndarray,
                     usable: np.ndarray, target_far: float, alpha: float = 0.01,
                     ) -> np.ndarray:
    """Rows whose scores set the threshold: every ``usable`` day, less the household-months
    spent in a lasting unusual state: more of their days above the pooled ``1 - target_far``
    quantile than chance allows (binomial tail probability below ``alpha``; at a 1 % target,
    three days of a month).

    Measured on the real sample (``docs/detection.md``): two of 24 training households
    spent all of September 2013 far from their usual selves, and a threshold set on
    September alone (the first design) gave 0.07 % false alarms in October-December for
    a 1 % target. Every usable day of the whole history, with such household-months left
    out, is the steadiest estimate of a normal month there is. Scores of the days the
    network trained on run like those of unseen households (the z-scores are per
    household), so they count too.
    """
    sel = np.flatnonzero(usable)
    if len(sel) < 100:
        return sel
    months = _HouseholdMonths(np.asarray(household)[sel], np.asarray(day)[sel])
    return sel[months.keep(np.asarray(score)[sel], target_far, alpha)]


class _HouseholdMonths:
    """The household-month of each of M days, for ``calibration_days`` at many rates."""

    def __init__(self, household: np.ndarray, day: np.ndarray) -> None:
        month = day.astype("datetime64[D]").astype("datetime64[M]").astype(np.int64)
        key = household.astype(np.int64) * 100_000 + month
        _, self.inv = np.unique(key, return_inverse=True)
        self.n = np.bincount(self.inv)

    def keep(self, score: np.ndarray, target_far: float, alpha: float = 0.01,
             sorted_score: np.ndarray | None = None) -> np.ndarray:
        """(M,) bool: the days outside household-months in a lasting unusual state
        (all of them where fewer than 100 would be left). ``sorted_score``: ``score``
        sorted, when the caller has it (the quantile is then cheaper to read off)."""
        q = float(np.quantile(score if sorted_score is None else sorted_score,
                              1.0 - target_far))
        above = np.bincount(self.inv, score > q).astype(np.int64)
        odd = above >= _least_unlikely_count(int(self.n.max()), target_far, alpha)[self.n]
        keep = ~odd[self.inv]
        return keep if keep.sum() >= 100 else np.ones(len(score), bool)


@functools.lru_cache(maxsize=1024)
def _least_unlikely_count(n_max: int, p: float, alpha: float) -> np.ndarray:
    """(n_max + 1,): for each month of n days, the least count k of days with
    P(Binomial(n, p) >= k) < alpha (n + 1, never, where there is none)."""
    out = np.empty(n_max + 1, np.int64)
    for n in range(n_max + 1):
        out[n] = next((k for k in range(n + 1) if _binomial_tail(k, n, p) < alpha), n + 1)
    out.flags.writeable = False  # shared by every caller (cached)
    return out


def budget_curve(score: np.ndarray, rule: np.ndarray, household: np.ndarray,
                 day: np.ndarray, usable: np.ndarray,
                 grid: np.ndarray | None = None) -> FarCurve:
    """The checkpoint's calibration curve: at each false-alarm rate of ``grid`` (default:
    ``FarCurve``'s), the threshold fitted on that rate's ``calibration_days`` (which
    household-months count as lasting unusual states depends on the rate), as the
    default threshold is (``train_detector`` step 7). Days on which a data-quality rule
    fired (``rule``) are left out: the budget is the model's. Rule alerts come on top, at
    a rate that belongs to a few households and does not carry over (0.2-0.4 % of the
    training households' days against 0-0.2 % of unseen households' in the evaluation);
    counted in the budget they took most of a 0.5 % target and the model alerted on 0.2 %
    of normal days."""
    far = np.geomspace(0.3, 1e-5, 81) if grid is None else np.asarray(grid, np.float64)
    sel = np.flatnonzero(usable & ~rule)
    s = np.asarray(score, np.float64)[sel]
    order = np.argsort(s, kind="stable")
    s_sorted = s[order]
    months = _HouseholdMonths(np.asarray(household)[sel], np.asarray(day)[sel])
    cut = []
    for f in far:
        keep = months.keep(s, float(f), sorted_score=s_sorted) if len(sel) >= 100 \
            else np.ones(len(sel), bool)
        # the kept scores, still sorted; the threshold as ``FarCurve.fit`` reads it
        cut.append(tail_quantile(s_sorted[keep[order]], min(float(f), 0.5)))
    return FarCurve(far, np.asarray(cut), n_days=int(usable.sum()))


@functools.lru_cache(maxsize=65536)
def _binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    if k <= 0:
        return 1.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
            + i * math.log(p) + (n - i) * math.log1p(-p) for i in range(k, n + 1)]
    top = max(logs)
    return float(math.exp(top) * sum(math.exp(v - top) for v in logs))


def tail_quantile(x: np.ndarray, p: float, min_exceed: int = 20,
                  groups: np.ndarray | None = None, confidence: float | None = None,
                  n_boot: int = 200, seed: int = 0) -> float:
    """The ``1 - p`` quantile of ``x``. Where fewer than ``min_exceed`` values lie above it,
    the tail is modelled instead: exponential above the quantile that ``min_exceed`` values
    exceed (scores are -log probabilities, so their tails are close to exponential), its
    rate from the mean excess. Far steadier than the few largest values on small sets.

    With ``groups`` (one label per value, e.g. the household) and ``confidence``: an upper
    confidence bound instead, the ``confidence`` quantile of the estimate over bootstrap
    resamples of whole groups (values of one household are not independent)."""
    if groups is not None and confidence is not None:
        labels, inv = np.unique(groups, return_inverse=True)
        by_group = np.asarray(x)[np.argsort(inv, kind="stable")]  # each group's values
        size = np.bincount(inv, minlength=len(labels))
        first = np.cumsum(size) - size
        rng = np.random.default_rng(seed)
        est = [tail_quantile(x, p, min_exceed)]
        for _ in range(n_boot):
            pick = rng.integers(0, len(labels), len(labels))
            est.append(tail_quantile(by_group[_runs(first[pick], size[pick])], p, min_exceed))
        return float(np.quantile(est, confidence))
    # no full sort: a quantile needs a partition, the tail its largest values (the full
    # sorts of the bootstrap above were a quarter of a training on 3.5 M household-days,
    # under the profiler)
    x = np.asarray(x, np.float64)
    n = len(x)
    assert n > 0, "no values"
    if p * n >= min_exceed or n <= min_exceed:
        return float(np.quantile(x, 1.0 - p))
    top = np.sort(np.partition(x, n - min_exceed - 1)[n - min_exceed - 1:])
    u = float(top[0])
    mean_excess = float((top[1:] - u).mean())
    rate = 1.0 / max(mean_excess, 1e-6)
    return u + float(np.log(min_exceed / (n * p))) / rate


def _runs(start: np.ndarray, length: np.ndarray) -> np.ndarray:
    """The indices start[0] .. start[0] + length[0] - 1, then those of the next run, ..."""
    ends = np.cumsum(length)
    return np.arange(int(ends[-1]) if len(ends) else 0) + np.repeat(start - (ends - length),
                                                                     length)


#: Statistics measured against the network's reconstruction of the day's shape: it has
#: learnt its training households' shapes, so their errors understate a new household's
#: and only unseen households inform the prior of these (level and timing: everyone).
_SHAPE_STATS = np.array([True, True, False, False])


def _prior(det: Detector, kwh: np.ndarray, day: np.ndarray, ids: list[str],
           tables: ContextTables | None, rows: np.ndarray, unseen: np.ndarray) -> Calibration:
    """Population mean, variance and within-household variance of the statistics of
    ``rows``, replayed from an empty state (no tail maps yet); for ``_SHAPE_STATS`` only
    of the rows of households the network was not trained on (``unseen``, bool (M,))."""
    who = [ids[i] for i in rows]
    scores, _ = det.replay(kwh[rows], day[rows], who, tables)
    x = scores.stats.astype(np.float64)
    if unseen[rows].any():
        x[np.ix_(~unseen[rows], _SHAPE_STATS)] = np.nan
    _, hh = np.unique(np.asarray(who, dtype=str), return_inverse=True)
    ok = np.isfinite(x)
    n = np.zeros((hh.max() + 1, N_STATS))
    total = np.zeros_like(n)
    np.add.at(n, hh, ok)
    np.add.at(total, hh, np.where(ok, x, 0.0))
    h_mean = total / np.maximum(n, 1)
    sq = np.zeros_like(n)
    np.add.at(sq, hh, np.where(ok, x - h_mean[hh], 0.0) ** 2)
    within = sq.sum(axis=0) / np.maximum((n - 1).clip(min=0).sum(axis=0), 1)
    measured = ok.sum(axis=0) >= 2  # else (timing of a short history): a vague prior
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.where(measured, np.nanmean(x, axis=0), 0.0)
        var = np.where(measured, np.nanvar(x, axis=0), 1.0)
    return Calibration.identity(mean, var, np.where(measured, within, 0.5))


def _count_before(scores: DayScores, scoring: ScoringConfig) -> np.ndarray:
    """Each scored day's household ``count`` before the day (replayed rows)."""
    enough = (~scores.imputed).sum(axis=1) >= scoring.min_observed
    return scores.state.count - enough.astype(np.int32)


def cold_start_replay(
    det: Detector,
    kwh: np.ndarray,
    day: np.ndarray,
    household_ids: Sequence[str],
    tables: ContextTables | None,
    horizon: int,
    every: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Replay households as if the service met them first on each of several days: from an
    empty state, for ``horizon`` days, restarting every ``every`` days. A third of the
    restarts see all of ``tables``, a third lack the household's info (absent from the
    tables) and a third run without tables, as a service may.

    Returns the z-scores (R, N_STATS), each day's household count before it (R,), its
    household id (R,) and whether a data-quality rule fired on it (R,).
    """
    day = np.asarray(day)
    ids = np.asarray(household_ids, dtype=str)
    starts = np.unique(day)[::max(every, 1)]
    parts = [np.flatnonzero((day >= d0) & (day < d0 + horizon)) for d0 in starts]
    rows = np.concatenate(parts)
    run = np.repeat(np.arange(len(parts)), [len(p) for p in parts])
    pid = np.char.add(np.char.add(ids[rows], "\x1f"), run.astype(str))
    # one context condition per restarted household: 0 all, 1 no household info, 2 none
    uniq, inv = np.unique(pid, return_inverse=True)
    cond = rng.integers(0, 3, len(uniq))[inv] if tables is not None else np.full(len(rows), 2)
    zs, counts, who, rules = [], [], [], []
    for with_tables in (True, False):
        sel = np.flatnonzero((cond < 2) if with_tables else (cond == 2))
        if not len(sel):
            continue
        tb = None
        if with_tables:
            assert tables is not None
            known = {p: h for p, h, c in zip(pid[sel], ids[rows[sel]], cond[sel], strict=True)
                     if c == 0}
            tb = replace(  # the weather, holidays and encoding of ``tables``
                tables,
                acorn_group={p: tables.acorn_group[h] for p, h in known.items()
                             if h in tables.acorn_group},
                tariff={p: tables.tariff[h] for p, h in known.items() if h in tables.tariff})
        r = rows[sel]
        out, _ = det.replay(kwh[r], day[r], list(pid[sel]), tb)
        zs.append(out.stat_z)
        counts.append(_count_before(out, det.scoring))
        who.append(ids[r])
        rules.append(out.score - out.model_score >= det.scoring.rule_bonus / 2)
    return tuple(np.concatenate(v) for v in (zs, counts, who, rules))  # type: ignore[return-value]


def _plain(obj: Any) -> Any:
    """Tuples -> lists, recursively (checkpoint content must be weights_only-safe)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj
