"""Fit a ``Detector`` on historical household-days.

``train_detector`` does, in order:

1. Split by time: the last ``calib_fraction`` of the days are held out for calibration; a
   random ``val_fraction`` of the rest is the validation set for early stopping.
2. Give every day the level its household had *before* it (as the stream would), hiding it
   for a random ``level_dropout`` share so the network also learns the new-household case.
3. Train the autoencoder: Adam, ReduceLROnPlateau and early stopping on the validation
   loss, mixed precision on CUDA, a checkpoint each epoch (resumed when present), a guard
   against NaN/Inf losses, fixed seeds.
4. Measure the population's mean and variance of the error statistics on the training days
   (the prior for households with few days; ``model.scoring``).
5. Replay the training days in order through the detector (per-household state and all)
   to learn the tails of the z-scores; then replay all days and set the threshold at the
   ``1 - target_far`` quantile of the held-out days' model scores (rule alerts excluded).
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

from model.detector import Detector, ScoringConfig
from model.features import ContextTables, ModelInputs, model_inputs
from model.network import ConditionalAutoencoder, ModelConfig
from model.scoring import N_BLOCKS, N_STATS, Calibration
from model.state import HouseholdState, absorb

log = logging.getLogger(__name__)


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
    # Share of training-period rows used for early stopping.
    val_fraction: float = 0.1
    # Share of the (latest) days held out to calibrate the threshold ...
    calib_fraction: float = 0.25
    # ... or: days from this one on (days since 1970-01-01) are the calibration set.
    calibration_start_day: int | None = None
    # Target false-alarm rate of the model score on held-out days.
    target_far: float = 0.01
    # Share of training days whose level is hidden (teaches the new-household case).
    level_dropout: float = 0.1
    # Reconstruction loss: Huber is robust to the anomalies hidden in "mostly normal" data.
    loss: Literal["mse", "huber"] = "huber"
    huber_delta: float = 0.5
    seed: int = 0
    device: str = "auto"
    # Mixed precision: "auto" = bf16 autocast on CUDA when supported, else fp16 + GradScaler;
    # off on CPU.
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    # DataLoader workers; None = 0 for in-memory sets below 1M rows, else from psutil.
    num_workers: int | None = None
    # Directory for per-epoch training checkpoints (resumed when resume=True).
    checkpoint_dir: str | None = None
    resume: bool = True
    # Write the loss curves here (PNG; needs matplotlib).
    plot_path: str | None = None
    # Threshold (z units) used while replaying to learn the tails of the z-scores.
    provisional_threshold: float = 3.0


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
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=config.lr_factor, patience=config.lr_patience)
    amp_dtype, use_scaler = _amp(device, config)
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    n = len(train.x)
    batch = config.batch_size or _auto_batch_size(n, config.model, device)
    workers = _num_workers(n, config)
    ds = TensorDataset(*_tensors(train, config.model))
    gen = torch.Generator().manual_seed(config.seed)
    sampler = BatchSampler(RandomSampler(ds, generator=gen), batch, drop_last=False)
    loader = DataLoader(ds, sampler=sampler, batch_size=None, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    vx, vc, vy, vw = (t.to(device) for t in _tensors(val, config.model))
    log.info("training %s (%d params) on %d days (val %d), batch %d, %d workers, %s%s",
             config.model, model.n_params(), n, len(val.x), batch, workers, device,
             f", autocast {amp_dtype}" if amp_dtype else "")

    history = History()
    best_val, best_state, bad_epochs, start_epoch = math.inf, None, 0, 0
    ckpt_path = Path(config.checkpoint_dir) / "train_state.pt" if config.checkpoint_dir else None
    if ckpt_path is not None and config.resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ck["model_config"] == config.model.to_dict():
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            scaler.load_state_dict(ck["scaler"])
            gen.set_state(ck["generator"])
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
        total, count, skipped = 0.0, 0, 0
        for x, c, y, w in loader:
            x, c, y, w = (t.to(device, non_blocking=True) for t in (x, c, y, w))
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                loss = _masked_loss(model(x, c).float(), y, w, config)
            if not torch.isfinite(loss):  # NaN/Inf guard: skip the step, keep the weights
                skipped += 1
                opt.zero_grad(set_to_none=True)
                continue
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            scaler.step(opt)
            scaler.update()
            total += loss.item() * len(x)
            count += len(x)
        if count == 0:
            raise FloatingPointError(f"epoch {epoch}: every batch had a non-finite loss")
        if skipped:
            log.warning("epoch %d: skipped %d batches with non-finite loss", epoch, skipped)

        model.eval()
        with torch.inference_mode(), torch.autocast(
                device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            val_loss = _masked_loss(model(vx, vc).float(), vy, vw, config).item()
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
    """
    cfg = config or TrainConfig()
    kwh = np.asarray(kwh, dtype=np.float32)
    day = np.asarray(day).astype(np.int32)
    ids = [str(h) for h in household_ids]
    m = len(kwh)
    assert kwh.shape == (m, 48) and day.shape == (m,) and len(ids) == m, (
        kwh.shape, day.shape, len(ids))
    assert cfg.model.n_context == 15, cfg.model
    set_seeds(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if cfg.device == "auto" else cfg.device))

    # Step 1: split by time.
    days = np.unique(day)
    n_cal = round(cfg.calib_fraction * len(days)) if len(days) >= 4 else 0
    cutoff = days[-n_cal] if n_cal else days[-1] + 1
    if cfg.calibration_start_day is not None:
        cutoff = cfg.calibration_start_day
    fit_rows = np.flatnonzero(day < cutoff)
    cal_rows = np.flatnonzero(day >= cutoff)
    is_val = rng.random(len(fit_rows)) < cfg.val_fraction
    train_rows, val_rows = fit_rows[~is_val], fit_rows[is_val]
    assert len(train_rows) > 0 and len(val_rows) > 0, (len(train_rows), len(val_rows))

    # Step 2: levels as the stream would know them, some hidden.
    level = trailing_levels(kwh, day, ids, cfg.scoring)
    hidden = rng.random(m) < cfg.level_dropout
    level_train = np.where(hidden, np.nan, level).astype(np.float32)

    def prep(rows: np.ndarray, lvl: np.ndarray) -> ModelInputs:
        return model_inputs(kwh[rows], day[rows], [ids[i] for i in rows], lvl[rows], tables,
                            cfg.scoring.max_kwh)

    # Step 3: train.
    model, history = fit_autoencoder(prep(train_rows, level_train), prep(val_rows, level_train),
                                     cfg, device)
    if cfg.plot_path:
        plot_history(history, cfg.plot_path)

    # Step 4: population statistics of the training days, as the stream would see them
    # (replayed with per-household state): the prior for households with few days.
    det = Detector(model, threshold=cfg.provisional_threshold, calibration=Calibration.identity(
        np.zeros(N_STATS), np.ones(N_STATS)), scoring=cfg.scoring, device=device)
    fit_ids = [ids[i] for i in fit_rows]
    scores, _ = det.replay(kwh[fit_rows], day[fit_rows], fit_ids, tables)
    det.calibration = Calibration.identity(np.nanmean(scores.stats, axis=0),
                                           np.nanvar(scores.stats, axis=0))

    # Step 5: replay the training days again to learn the tails of the household z-scores,
    # then everything to calibrate the threshold on the held-out days.
    scores, _ = det.replay(kwh[fit_rows], day[fit_rows], fit_ids, tables)
    det.calibration = Calibration.fit_tails(det.calibration.stat_mean,
                                            det.calibration.stat_var, scores.stat_z)
    det.threshold = float(det.calibration.tail_s[-1])  # provisional: rarest training day
    scores, _ = det.replay(kwh, day, ids, tables)
    rows = cal_rows if len(cal_rows) else fit_rows
    sel = scores.model_score[rows]
    rule_free = scores.score[rows] - scores.model_score[rows] < cfg.scoring.rule_bonus / 2
    sel = sel[np.isfinite(sel) & rule_free]
    det.threshold = float(np.quantile(sel, 1.0 - cfg.target_far))
    det.info = {
        "train_days": len(fit_rows), "calibration_days": len(cal_rows),
        "target_far": cfg.target_far, "epochs": len(history.epoch),
        "history": asdict(history), "train_config": _plain(asdict(replace(cfg))),
    }
    log.info("calibrated threshold %.3f for %.1f%% false alarms on %d held-out days; %r",
             det.threshold, 100 * cfg.target_far, len(sel), det)
    return det


def _plain(obj: Any) -> Any:
    """Tuples -> lists, recursively (checkpoint content must be weights_only-safe)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj
