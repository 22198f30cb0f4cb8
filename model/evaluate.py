"""Evaluate meterwatch against baselines on real smart-meter data with injected anomalies.

``meterwatch evaluate --data PATH --out DIR`` (``main(argv)``) runs, by default, the
household-fold protocol of ``model.folds`` (the detector is only ever scored on households it
never trained on; several seeds; a magnitude sweep per anomaly type; bootstrap intervals;
the alert budget) and the sustained-change evaluation of ``model.sustained``, and writes
``RESULTS.md``, ``results.json`` and ``magnitude_sweeps.png``.

``--protocol split`` is the first round's single time split on the same households (train
Jan-Aug, calibrate Sep, test Oct-Dec on all 40): it flatters, as the network has seen every
household it is scored on; kept for comparison:

1. Load the readings and side tables (``model.loaders.load_dataset``; a directory in the
   Low Carbon London layout, or one readings file).
2. Split by time: train on days before ``--calib-start`` (default 2013-09-01), calibrate
   thresholds on ``--calib-start .. --test-start`` (September), test on the rest (Oct-Dec).
3. Inject anomalies (``model.inject``) into a random ``--rate`` share of the test days, all
   types equally likely; days the injection does not change (an outage on a vacant house)
   stay labelled normal. Natural oddities in the data stay unlabelled ("normal").
4. Score the same test days with every method; thresholds are calibrated on the
   calibration month for ``--far`` false alarms (the reference AE uses its own rule,
   mean + 2.5 sigma of its training errors):

   * ``meterwatch``: ``train_detector`` with ``TrainConfig()``, replayed day by day with
     per-household state, as the stream runs it;
   * ``profile``: per-household, per-half-hour z-score against the training period
     (day score = mean squared z);
   * ``iforest``: scikit-learn IsolationForest on the 48 readings of a day;
   * ``reference``: the case study's AE (48 + 15 -> 32 -> 8 -> 2), MSE on per-slot
     standardised kWh, no per-household normalisation.
5. Write ``RESULTS.md``, ``results.json`` and PNGs (PR curves, loss curves, an alert
   gallery) to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meterwatch.model.detector import SIGNAL_NAMES, DayScores, Detector
from meterwatch.model.features import (
    ContextTables,
    ModelInputs,
    context_features,
    load_with_context,
)
from meterwatch.model.inject import (
    ANOMALY_TYPES,
    NEW_TYPES,
    InjectionConfig,
    inject,
    random_labels,
)
from meterwatch.model.loaders import (
    Readings,
    date_to_day,
    day_to_date,
    parse_day,
)
from meterwatch.model.network import ModelConfig
from meterwatch.model.training import (
    History,
    TrainConfig,
    fit_autoencoder,
    set_seeds,
    trailing_levels,
    train_detector,
)

log = logging.getLogger(__name__)

METHODS = ("meterwatch", "profile", "iforest", "reference")


@dataclass
class Split:
    """Row indices of the three periods and the labelled, injected test readings."""

    data: Readings
    tables: ContextTables
    train: np.ndarray
    calib: np.ndarray
    test: np.ndarray
    test_kwh: np.ndarray  # float32 (T, 48) test days with anomalies injected
    labels: np.ndarray  # int8 (T,) index into ANOMALY_TYPES

    def kwh_all(self) -> np.ndarray:
        """All rows, test rows replaced by their injected version."""
        kwh = self.data.kwh.copy()
        kwh[self.test] = self.test_kwh
        return kwh


@dataclass
class MethodResult:
    name: str
    test_score: np.ndarray  # (T,) higher = more anomalous
    threshold: float
    calib_score: np.ndarray  # (C,)
    history: History | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def make_split(data: Readings, tables: ContextTables, calib_start: int, test_start: int,
               rate: float, seed: int, injection: InjectionConfig | None = None) -> Split:
    rng = np.random.default_rng(seed)
    train = np.flatnonzero(data.day < calib_start)
    calib = np.flatnonzero((data.day >= calib_start) & (data.day < test_start))
    test = np.flatnonzero(data.day >= test_start)
    assert len(train) and len(calib) and len(test), (len(train), len(calib), len(test))
    labels = random_labels(len(test), rate, rng)
    clean = data.kwh[test]
    injected = inject(clean, labels, rng, injection)
    with np.errstate(invalid="ignore"):
        changed = (np.abs(np.nan_to_num(injected) - np.nan_to_num(clean)) > 1e-3).any(axis=1)
    n_noop = int(((labels > 0) & ~changed).sum())
    if n_noop:
        log.info("%d injected days were left unchanged (e.g. outage on zeros): label 0", n_noop)
    labels = np.where(changed, labels, 0).astype(np.int8)
    return Split(data, tables, train, calib, test, injected, labels)


# ---------------------------------------------------------------------------- methods


def run_meterwatch(split: Split, config: TrainConfig, calib_start: int) -> tuple[
        MethodResult, Detector, DayScores]:
    d = split.data
    fit = np.concatenate([split.train, split.calib])
    cfg = replace(config, calibration_start_day=calib_start)
    det = train_detector(d.kwh[fit], d.day[fit], [d.household_ids[i] for i in fit],
                         split.tables, cfg)
    scores, _ = det.replay(split.kwh_all(), d.day, d.household_ids, split.tables)
    hist = History(**det.info["history"])
    return (MethodResult("meterwatch", scores.score[split.test], det.threshold,
                         scores.model_score[split.calib], hist),
            det, scores.take(split.test))


def run_profile(split: Split, far: float) -> MethodResult:
    """Per-household per-slot z-scores against the training period."""
    d = split.data
    ids = np.asarray(d.household_ids)
    train_ids = ids[split.train]
    pop_mu = np.nanmean(d.kwh[split.train], axis=0)
    pop_sd = np.nanstd(d.kwh[split.train], axis=0)
    stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for h in np.unique(ids):
        k = d.kwh[split.train[train_ids == h]]
        if len(k) >= 7:
            stats[h] = (np.nanmean(k, axis=0), np.nanstd(k, axis=0))

    def score(rows: np.ndarray, kwh: np.ndarray) -> np.ndarray:
        mu = np.stack([stats.get(h, (pop_mu, pop_sd))[0] for h in ids[rows]])
        sd = np.stack([stats.get(h, (pop_mu, pop_sd))[1] for h in ids[rows]])
        z = (kwh - mu) / np.maximum(sd, 0.01)
        with np.errstate(invalid="ignore"):
            out = np.nanmean(z**2, axis=1)
        return np.nan_to_num(out, nan=0.0)

    calib = score(split.calib, d.kwh[split.calib])
    return MethodResult("profile", score(split.test, split.test_kwh),
                        float(np.quantile(calib, 1 - far)), calib)


def run_iforest(split: Split, far: float, seed: int) -> MethodResult:
    from sklearn.ensemble import IsolationForest

    d = split.data

    def vec(kwh: np.ndarray) -> np.ndarray:
        return np.nan_to_num(kwh, nan=0.0)

    forest = IsolationForest(n_estimators=200, random_state=seed, n_jobs=1)
    forest.fit(vec(d.kwh[split.train]))
    calib = -forest.score_samples(vec(d.kwh[split.calib]))
    return MethodResult("iforest", -forest.score_samples(vec(split.test_kwh)),
                        float(np.quantile(calib, 1 - far)), calib)


def run_reference(split: Split, seed: int) -> MethodResult:
    """The case study's AE: per-slot standardised kWh + context, MSE, mean + 2.5 sigma."""
    d = split.data
    kwh_all = split.kwh_all()
    filled = np.where(np.isfinite(kwh_all), kwh_all, np.nanmean(d.kwh[split.train], axis=0))
    mu = filled[split.train].mean(axis=0)
    sd = filled[split.train].std(axis=0) + 1e-6
    x = ((filled - mu) / sd).astype(np.float32)
    level = trailing_levels(d.kwh, d.day, d.household_ids, TrainConfig().scoring)
    ctx = context_features(d.day, d.household_ids, level, split.tables)

    def inputs(rows: np.ndarray) -> ModelInputs:
        n = len(rows)
        return ModelInputs(x=x[rows], x_shape=x[rows], context=ctx[rows],
                           scale=np.ones(n, np.float32), observed=np.ones((n, 48), bool),
                           filled=filled[rows], day_mean=np.ones(n, np.float32))

    rng = np.random.default_rng(seed)
    val = rng.random(len(split.train)) < 0.1
    cfg = TrainConfig(model=ModelConfig.reference(), loss="mse", seed=seed, device="cpu")
    model, hist = fit_autoencoder(inputs(split.train[~val]), inputs(split.train[val]), cfg,
                                  torch.device("cpu"))

    def mse(rows: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            rec = model(torch.from_numpy(x[rows]), torch.from_numpy(ctx[rows])).numpy()
        return ((x[rows] - rec) ** 2).mean(axis=1)

    train_err = mse(split.train)
    threshold = float(train_err.mean() + 2.5 * train_err.std())
    return MethodResult("reference", mse(split.test), threshold, mse(split.calib), hist)


def run_cold_start(split: Split, config: TrainConfig, calib_start: int, share: float,
                   seed: int, n_days: int = 3, every: int = 7) -> dict[str, Any]:
    """meterwatch on households it has never seen, as the service meets them: a detector
    trained without a ``share`` of the households scores their first ``n_days`` in the
    service (from an empty state), the service starting on every ``every``-th test day.

    Returns the false-alarm rate on those clean days with the context tables and without
    (``tables=None``), and the recall of two gross anomalies on a household's 2nd or later
    day: the whole day at 5x and a 6-hour zero run (15:00-21:00). A 5x day on the very first
    day is not tried: without a level of its own, a uniformly scaled day has a normal shape.
    """
    d = split.data
    ids = np.asarray(d.household_ids, dtype=str)
    uniq = np.unique(ids)
    rng = np.random.default_rng(seed + 1)
    new = rng.choice(uniq, max(2, round(share * len(uniq))), replace=False)
    is_new = np.isin(ids, new)
    fit = np.concatenate([split.train, split.calib])
    fit = fit[~is_new[fit]]
    det = train_detector(d.kwh[fit], d.day[fit], list(ids[fit]), split.tables,
                         replace(config, calibration_start_day=calib_start))

    test = split.test[is_new[split.test]]  # the new households' clean test days
    days = np.unique(d.day[test])
    rows, pid = [], []
    for start in days[: max(len(days) - n_days + 1, 0): every]:
        for h in new:
            r = test[(ids[test] == h) & (d.day[test] >= start) & (d.day[test] < start + n_days)]
            if len(r) == n_days:  # the household's first n_days in the service
                rows.append(r[np.argsort(d.day[r], kind="stable")])
                pid += [f"{h}@{start}"] * n_days
    rows_a = np.concatenate(rows)
    pid_a = np.asarray(pid)
    kwh = d.kwh[rows_a]
    renamed = ContextTables(
        acorn_group={p: split.tables.acorn_group[p.split("@")[0]] for p in set(pid)
                     if p.split("@")[0] in split.tables.acorn_group},
        tariff={p: split.tables.tariff[p.split("@")[0]] for p in set(pid)
                if p.split("@")[0] in split.tables.tariff},
        weather_day=split.tables.weather_day, temp_max=split.tables.temp_max,
        temp_min=split.tables.temp_min, holidays=split.tables.holidays)
    out: dict[str, Any] = {"households": len(new), "episodes": len(rows), "days": n_days,
                           "threshold": det.threshold}
    pos = np.tile(np.arange(n_days), len(rows))
    cut = {}
    for name, tb in (("with_tables", renamed), ("without_tables", None)):
        clean, _ = det.replay(kwh, d.day[rows_a], list(pid_a), tb)
        # the score that 1% of these clean days exceed (for threshold-free recall)
        cut[name] = float(np.quantile(np.nan_to_num(clean.score[pos > 0], nan=-np.inf), 0.99))
        out[f"far_{name}"] = float(clean.is_alert.mean())
        out[f"far_{name}_by_day"] = [float(clean.is_alert[pos == k].mean())
                                     for k in range(n_days)]
        out[f"far_{name}_model_only"] = float(
            (clean.is_alert & (clean.score - clean.model_score < det.scoring.rule_bonus / 2))
            .mean())
    # gross anomalies on day 2 or later of each episode (one per episode)
    g_rng = np.random.default_rng(seed + 2)
    target = np.arange(len(rows)) * n_days + g_rng.integers(1, n_days, len(rows))
    kind = g_rng.integers(0, 2, len(rows))
    bad = kwh.copy()
    bad[target[kind == 0]] *= 5.0
    bad[target[kind == 1], 30:42] = np.where(np.isnan(bad[target[kind == 1], 30:42]),
                                             np.nan, 0.0)
    for name, tb in (("with_tables", renamed), ("without_tables", None)):
        res, _ = det.replay(bad, d.day[rows_a], list(pid_a), tb)
        out[f"recall_x5_{name}"] = float(res.is_alert[target[kind == 0]].mean())
        out[f"recall_zero_6h_{name}"] = float(res.is_alert[target[kind == 1]].mean())
        out[f"recall_x5_at_1pct_{name}"] = float((res.score[target[kind == 0]]
                                                  > cut[name]).mean())
    return out


# ---------------------------------------------------------------------------- metrics


def metrics(labels: np.ndarray, score: np.ndarray, threshold: float) -> dict[str, Any]:
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    y = labels > 0
    s = np.nan_to_num(score, nan=-np.inf)
    s = np.where(np.isfinite(s), s, np.finfo(np.float32).min)
    alert = s >= threshold
    tp, fp = int((alert & y).sum()), int((alert & ~y).sum())
    fn = int((~alert & y).sum())
    precision = tp / max(tp + fp, 1)
    recall = tp / max(tp + fn, 1)
    fpr, tpr, _ = roc_curve(y, s)
    out: dict[str, Any] = {
        "roc_auc": float(roc_auc_score(y, s)),
        "pr_auc": float(average_precision_score(y, s)),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / max(precision + recall, 1e-12),
        "false_alarm_rate": fp / max(int((~y).sum()), 1),
        "recall_at_1pct_far": float(tpr[fpr <= 0.01].max(initial=0.0)),
        "threshold": float(threshold),
        "per_type_recall": {},
        "per_type_recall_at_1pct_far": {},
    }
    cut = float(np.min(s[~y][np.argsort(-s[~y])[: max(int(0.01 * (~y).sum()), 1)]]))
    for k, name in enumerate(ANOMALY_TYPES[1:], start=1):
        m = labels == k
        if m.any():
            out["per_type_recall"][name] = float(alert[m].mean())
            out["per_type_recall_at_1pct_far"][name] = float((s[m] > cut).mean())
    return out


# ---------------------------------------------------------------------------- plots


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pr(results: Sequence[MethodResult], labels: np.ndarray, path: Path) -> None:
    from sklearn.metrics import precision_recall_curve

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 5))
    y = labels > 0
    for r in results:
        s = np.nan_to_num(r.test_score, nan=-1e30)
        p, rc, _ = precision_recall_curve(y, s)
        ax.plot(rc, p, label=r.name)
    ax.axhline(y.mean(), color="grey", linestyle=":", label="chance")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("Precision-recall on the test period (injected anomalies)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_losses(results: Sequence[MethodResult], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, r in zip(axes, [r for r in results if r.history is not None], strict=False):
        h = r.history
        assert h is not None
        ax.plot(h.epoch, h.train_loss, label="train")
        ax.plot(h.epoch, h.val_loss, label="validation")
        ax.set_yscale("log")
        ax.set_title(f"{r.name} loss")
        ax.set_xlabel("epoch")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gallery(split: Split, scores: DayScores, threshold: float, path: Path,
                 n: int = 8) -> None:
    """Observed vs expected for the top alert of each anomaly type (and top false alarm)."""
    plt = _plt()
    picks: list[tuple[str, int]] = []
    for k, name in enumerate(ANOMALY_TYPES):
        m = np.flatnonzero((split.labels == k) & scores.is_alert)
        if len(m):
            picks.append((name if k else "false alarm", int(m[np.argmax(scores.score[m])])))
    picks = picks[:n]
    cols = 2
    rows = max(1, (len(picks) + 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(12, 2.6 * rows), squeeze=False)
    hours = np.arange(48) / 2
    for ax, (name, i) in zip(axes.ravel(), picks, strict=False):
        row = split.test[i]
        obs, exp = split.test_kwh[i], scores.expected[i]
        se = scores.slot_error[i]
        flagged = se >= np.sort(se)[-4] if se.max() > 0 else np.zeros(48, bool)
        ax.step(hours, obs, where="post", label="observed", color="C0")
        ax.step(hours, exp, where="post", label="expected", color="C1", linestyle="--")
        for h in hours[flagged]:
            ax.axvspan(h, h + 0.5, color="red", alpha=0.15)
        date = day_to_date(split.data.day[row])
        ax.set_title(f"{name}: {split.data.household_ids[row]} {date}  score "
                     f"{scores.score[i]:.1f} (threshold {threshold:.1f}) "
                     f"[{', '.join(scores.signal_names(i))}]", fontsize=8)
        ax.set_ylabel("kWh")
    for ax in axes.ravel()[len(picks):]:
        ax.axis("off")
    axes.ravel()[0].legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("hour of day (red: half-hours with the largest errors)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------- report


def _fmt(v: float) -> str:
    return f"{v:.3f}"


def write_report(out: Path, summary: dict[str, Any]) -> None:
    m = summary["metrics"]
    lines = [
        "# meterwatch evaluation on real smart-meter data",
        "",
        f"- date: {summary['date']}",
        f"- command: `{summary['command']}`",
        f"- machine: {summary['machine']}",
        f"- data: {summary['data']} ({summary['households']} households, "
        f"{summary['rows']} household-days)",
        _context_line(summary["context"]),
        f"- periods: train {summary['periods']['train']}, calibrate "
        f"{summary['periods']['calib']}, test {summary['periods']['test']}",
        f"- test days: {summary['test_days']}, injected anomalies: {summary['anomalies']} "
        f"({summary['rate']:.0%} of test days, types equally likely, seed {summary['seed']})",
        f"- target false-alarm rate for calibration: {summary['far']:.1%}",
        f"- wall time: {summary['seconds']:.0f} s",
        "",
        "## Overall",
        "",
        "| method | ROC-AUC | PR-AUC | recall @ 1% FAR | precision | recall | F1 | "
        "false alarms (clean days) | threshold |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in m.items():
        lines.append(
            f"| {name} | {_fmt(r['roc_auc'])} | {_fmt(r['pr_auc'])} | "
            f"{_fmt(r['recall_at_1pct_far'])} | {_fmt(r['precision'])} | "
            f"{_fmt(r['recall'])} | {_fmt(r['f1'])} | {r['false_alarm_rate']:.2%} | "
            f"{r['threshold']:.3g} |")
    types = list(next(iter(m.values()))["per_type_recall"])
    for key, title in (("per_type_recall", "Recall per anomaly type at each method's "
                                            "calibrated threshold"),
                       ("per_type_recall_at_1pct_far", "Recall per anomaly type at 1% "
                                                       "false alarms on clean test days")):
        lines += ["", f"## {title}", "",
                  "| method | " + " | ".join(types) + " |",
                  "| --- |" + " --- |" * len(types)]
        for name, r in m.items():
            lines.append(f"| {name} | " + " | ".join(_fmt(r[key][t]) for t in types) + " |")
    lines += ["", "Anomalies per type in the test set: " + ", ".join(
        f"{t} {n}" for t, n in summary["type_counts"].items()), ""]
    lines += ["## Targets", ""] + [f"- {t}" for t in summary["targets"]]
    cs = summary.get("cold_start")
    if cs:
        lines += [
            "", "## Households new to the service (cold start)", "",
            f"A second detector, trained without {cs['households']} of the households, scores "
            f"their first {cs['days']} days in the service from an empty state ("
            f"{cs['episodes']} episodes: the service meeting each of them on every 7th test "
            "day). False alarms on those clean days, and recall of a 5x day and a 6-hour zero "
            "run (15:00-21:00) put on the 2nd or 3rd day (a 5x first day has a normal shape "
            "and no level of its own to compare with: not tried).", "",
            "| context | false alarms | by day (1st, 2nd, 3rd) | model alerts only | "
            "5x day recall | 6-hour zero run recall | 5x day recall at 1% false alarms "
            "(2nd, 3rd days) |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
        for key, label in (("with_tables", "tables"), ("without_tables", "no tables")):
            lines.append(
                f"| {label} | {cs[f'far_{key}']:.2%} | "
                + ", ".join(f"{v:.1%}" for v in cs[f"far_{key}_by_day"])
                + f" | {cs[f'far_{key}_model_only']:.2%} | {cs[f'recall_x5_{key}']:.3f} | "
                f"{cs[f'recall_zero_6h_{key}']:.3f} | {cs[f'recall_x5_at_1pct_{key}']:.3f} |")
    lines += ["", "## Figures", "", "- `pr_curves.png`: precision-recall of all methods",
              "- `loss_curves.png`: training and validation loss (meterwatch, reference)",
              "- `alert_gallery.png`: meterwatch's top alert per anomaly type and its top "
              "false alarm; observed vs expected kWh, red = the half-hours with the "
              "largest errors", ""]
    if summary.get("notes"):
        lines += ["## Notes", ""] + summary["notes"] + [""]
    (out / "RESULTS.md").write_text("\n".join(lines))


def check_targets(m: dict[str, Any]) -> list[str]:
    mw = m["meterwatch"]
    others = {k: v for k, v in m.items() if k != "meterwatch"}
    out = []

    def say(ok: bool, text: str) -> None:
        out.append(f"{'met' if ok else 'MISSED'}: {text}")

    best_pr = max(v["pr_auc"] for v in others.values())
    say(mw["pr_auc"] > best_pr, f"PR-AUC above every baseline ({mw['pr_auc']:.3f} vs best "
                                f"baseline {best_pr:.3f})")
    best_r = max(v["recall_at_1pct_far"] for v in others.values())
    say(mw["recall_at_1pct_far"] > best_r, f"recall at 1% FAR above every baseline "
        f"({mw['recall_at_1pct_far']:.3f} vs {best_r:.3f})")
    say(mw["pr_auc"] >= 0.6, f"PR-AUC >= 0.6 ({mw['pr_auc']:.3f})")
    say(mw["recall_at_1pct_far"] >= 0.6,
        f"recall >= 0.6 at <= 1% FAR ({mw['recall_at_1pct_far']:.3f})")
    low = {t: r for t, r in mw["per_type_recall_at_1pct_far"].items() if r < 0.3}
    say(not low, "no anomaly type below 0.3 recall at 1% FAR" + (f" (below: {low})"
                                                                 if low else ""))
    return out


# Why a type can stay below target; printed in the report only for types that do.
_WHY = {
    "time_shift": "a day moved by 3-5 hours has a normal level and a plausible shape; only "
                  "the household's own schedule betrays it (the `timing` statistic), and "
                  "real schedules vary day to day",
    "evening_drop": "cutting 16:00-22:00 to 20% removes a third of a typical day's use, "
                    "which real households also do when out for an evening. The `timing` "
                    "statistic ranks these days above clean ones (ROC-AUC about 0.9), but "
                    "the median such day has a timing z-score of about 1.6 while 1% of "
                    "clean days exceed 2.3 (2013 sample); the `level` drop (z about 1.2) "
                    "is within normal day-to-day variation. Neither a scan over adjacent "
                    "blocks, nor fusing the statistics by sum or log-sum-exp, nor "
                    "weekday/weekend profiles (real block shares vary only 2% less within "
                    "them) separated them further",
    "spike": "real households draw 1-3 kWh in a half-hour (showers, ovens), so a single "
             "extra 2 kWh half-hour is often within their normal peaks",
    "erratic": "some real households are as erratic as the injected noise",
    "level_down": "households away on holiday run at baseload on normal days too",
    "outage": "households that often read zero for hours (vacant, or a routine the "
              "fault-rate mute learnt) are not alerted for zero runs",
    "stuck": "households whose data-quality rules fire routinely are muted",
    "level_up": "a 5x day of a near-empty house is still small",
}


def _notes(summary: dict[str, Any]) -> list[str]:
    m = summary["metrics"].get("meterwatch")
    if m is None:
        return []
    out = [
        f"- Thresholds are calibrated on the calibration period for {summary['far']:.1%} "
        f"false alarms; on the clean test days meterwatch's threshold gives "
        f"{m['false_alarm_rate']:.2%}. A gap means the periods differ in how noisy "
        "households are (e.g. summer holidays make September noisier than Oct-Dec); "
        "the threshold-free columns (ROC-AUC, PR-AUC, recall at 1% FAR) do not depend "
        "on it.",
        "- 'Clean' test days are real, unlabelled days: natural faults and oddities on "
        "them count as false alarms for every method. meterwatch signals on clean test "
        f"days: {summary.get('clean_day_signals', {})}.",
        "- The reference AE uses its own threshold rule (mean + 2.5 sigma of training "
        "errors), as in the case study.",
    ]
    cs = summary.get("cold_start")
    if cs:
        out.append(
            "- Cold start: the detector calibrates households with few days on households "
            "it never trained on (replayed from an empty state, with and without context), "
            "for the same false-alarm rate as established ones; on a household's first day "
            "the model abstains unless 100 or more such households were available (the data-"
            "quality rules still alert). At the threshold the cold-start calibration, made "
            "on Jan-Sep (holidays included), is conservative for Oct-Dec: 5x-day recall "
            f"{cs['recall_x5_with_tables']:.2f} at {cs['far_with_tables']:.2%} false alarms; "
            "at the score that 1% of these households' clean 2nd and 3rd days exceed, "
            f"{cs['recall_x5_at_1pct_with_tables']:.2f}.")
    out.append("- The `timing` statistic averages the three most deviant two-hour blocks; "
               "averaging all twelve (earlier versions) diluted moved schedules: "
               "`time_shift` had 0.19 recall at 1% FAR on this data then.")
    for t, r in m["per_type_recall_at_1pct_far"].items():
        if r < 0.3:
            out.append(f"- {t}: recall {r:.2f} at 1% FAR, below the 0.3 target: "
                       f"{_WHY.get(t, 'see the gallery')}.")
    return out


def _machine() -> str:
    import psutil

    return (f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} CPUs, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB, torch {torch.__version__}, "
            f"threads {torch.get_num_threads()}, Python {platform.python_version()}")


def run(
    data_path: str | os.PathLike[str],
    out: Path | None,
    *,
    calib_start: int | None = None,
    test_start: int | None = None,
    rate: float = 0.1,
    far: float = 0.01,
    seed: int = 0,
    config: TrainConfig | None = None,
    methods: Sequence[str] = METHODS,
    command: str = "",
    cold_households: float = 0.2,
    side_tables: dict[str, str | os.PathLike[str] | None] | None = None,
    timezone: str = "UTC",
) -> dict[str, Any]:
    """The whole evaluation; returns the summary (also written to ``out`` when given).
    The periods default to the data's last months (``periods``)."""
    t0 = time.monotonic()
    set_seeds(seed)
    data, sides, tables = load_with_context(data_path, timezone=timezone,
                                            **(side_tables or {}))  # type: ignore[arg-type]
    calib_start, test_start = _periods(data.day, calib_start, test_start)
    split = make_split(data, tables, calib_start, test_start, rate, seed)
    config = config or TrainConfig(seed=seed, target_far=far)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        config = replace(config, plot_path=None)

    results: list[MethodResult] = []
    mw_scores: DayScores | None = None
    mw_threshold = 0.0
    for name in methods:
        t = time.monotonic()
        if name == "meterwatch":
            res, det, mw_scores = run_meterwatch(split, config, calib_start)
            mw_threshold = det.threshold
            if out is not None:
                det.save(out / "meterwatch.pt")
        elif name == "profile":
            res = run_profile(split, far)
        elif name == "iforest":
            res = run_iforest(split, far, seed)
        elif name == "reference":
            res = run_reference(split, seed)
        else:
            raise ValueError(f"unknown method {name!r}; choose from {METHODS}")
        log.info("%s done in %.1fs", name, time.monotonic() - t)
        results.append(res)

    m = {r.name: metrics(split.labels, r.test_score, r.threshold) for r in results}
    days = split.data.day

    def span(rows: np.ndarray) -> str:
        a = day_to_date(days[rows].min())
        b = day_to_date(days[rows].max())
        return f"{a} .. {b}"

    summary: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "machine": _machine(),
        "data": str(data_path),
        "context": _context(sides, timezone),
        "households": len(set(data.household_ids)),
        "rows": len(data),
        "periods": {"train": span(split.train), "calib": span(split.calib),
                    "test": span(split.test)},
        "test_days": len(split.test),
        "anomalies": int((split.labels > 0).sum()),
        "type_counts": {t: int((split.labels == k).sum())
                        for k, t in enumerate(ANOMALY_TYPES) if k},
        "rate": rate, "far": far, "seed": seed,
        "metrics": m,
        "targets": check_targets(m) if "meterwatch" in m and len(m) > 1 else [],
        "seconds": time.monotonic() - t0,
    }
    if "meterwatch" in methods and cold_households > 0:
        t = time.monotonic()
        summary["cold_start"] = run_cold_start(split, config, calib_start, cold_households,
                                               seed)
        log.info("cold start done in %.1fs: %s", time.monotonic() - t, summary["cold_start"])
    if mw_scores is not None:
        fired = mw_scores.signals[split.labels == 0]
        summary["clean_day_signals"] = {
            s: int(((fired >> b) & 1).sum()) for b, s in enumerate(SIGNAL_NAMES)}
    if out is not None:
        plot_pr(results, split.labels, out / "pr_curves.png")
        plot_losses(results, out / "loss_curves.png")
        if mw_scores is not None:
            plot_gallery(split, mw_scores, mw_threshold, out / "alert_gallery.png")
        summary["seconds"] = time.monotonic() - t0
        summary["notes"] = _notes(summary)
        (out / "results.json").write_text(json.dumps(summary, indent=2))
        write_report(out, summary)
    return summary


def periods(day: np.ndarray, calib_start: int | None = None,
            test_start: int | None = None) -> tuple[int, int]:
    """``--calib-start`` and ``--test-start`` (days since 1970), each as given or, by
    default, from the data's dates: the test period is the last quarter of its span and
    calibration the twelfth before it, on the first of the nearest month for a span of at
    least half a year (a year of 2013: calibration from 2013-09-01, test from 2013-10-01,
    as the first round measured). With one of them given, the other keeps that distance
    from it. Fixed 2013 dates used to be the defaults, and any other year was refused."""
    first, last = int(day.min()), int(day.max())
    span = last - first + 1
    gap = max(span // 12, 1)

    def snap(d: int) -> int:
        if span < 183:
            return d
        date = day_to_date(d)
        this = date_to_day(date.replace(day=1))
        following = date_to_day((date.replace(day=28) + dt.timedelta(days=4)).replace(day=1))
        return this if d - this <= following - d else following

    if test_start is None:
        test_start = snap(calib_start + gap if calib_start is not None
                          else last + 1 - span // 4)
    if calib_start is None:
        calib_start = snap(test_start - gap)
    return calib_start, test_start


def _iso(d: int) -> str:
    return day_to_date(d).isoformat()


def _periods(day: np.ndarray, calib_start: int | None,
             test_start: int | None) -> tuple[int, int]:
    """``periods``, checked (``check_periods``) and logged."""
    if not len(day):
        raise ValueError("--data: no readings in it (0 household-days); give half-hourly "
                         "readings in a layout train --data reads")
    calib_start, test_start = periods(day, calib_start, test_start)
    check_periods(day, calib_start, test_start)
    log.info("periods: training before %s, calibration %s to %s, test from %s",
             _iso(calib_start), _iso(calib_start), _iso(test_start - 1), _iso(test_start))
    return calib_start, test_start


def check_periods(day: np.ndarray, calib_start: int, test_start: int,
                  min_days: int = 40) -> None:
    """Raise ValueError (one line, naming the flags) unless the data has training days
    before ``calib_start`` and at least ``min_days`` household-days in each of the
    calibration and test periods."""
    if calib_start >= test_start:
        raise ValueError("--calib-start/--test-start: the calibration period must start "
                         "before the test period")
    counts = {"training (before --calib-start)": int((day < calib_start).sum()),
              "calibration (--calib-start to --test-start)":
                  int(((day >= calib_start) & (day < test_start)).sum()),
              "test (from --test-start)": int((day >= test_start).sum())}
    short = [f"{name}: {n}" for name, n in counts.items() if n < min_days]
    if short and len(day):
        raise ValueError(
            f"--calib-start/--test-start: the data ({_iso(day.min())} to {_iso(day.max())}) has "
            f"too few household-days in {'; '.join(short)} (at least {min_days} each); set "
            "--calib-start and --test-start inside the data's dates")


def _context(sides: dict[str, Path | None], timezone: str) -> dict[str, str | None]:
    """The side tables read and the zone the days were cut in (for the report)."""
    return {**{k: None if v is None else str(v) for k, v in sides.items()},
            "timezone": timezone}


def _context_line(context: dict[str, str | None]) -> str:
    tables = ", ".join(f"{k} {context.get(k) or 'none'}"
                       for k in ("household", "weather", "holidays"))
    return f"- context: {tables}; days in {context.get('timezone', 'UTC')}"


def _day_arg(text: str | None) -> int | None:
    return None if text is None else parse_day(text)


def run_protocol_folds(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """The fold protocol (``model.folds``) and the sustained-change evaluation; writes the
    report to ``args.out``."""
    from meterwatch.model import folds as fp
    from meterwatch.model.sustained import evaluate_sustained

    t0 = time.monotonic()
    data, sides, tables = load_with_context(args.data, timezone=args.timezone,
                                            household_info=args.household_info,
                                            weather=args.weather, holidays=args.holidays)
    holdout = tuple(t for t in args.holdout_types.split(",") if t)
    unknown = set(holdout) - set(fp.TYPES)
    if unknown:
        raise ValueError(f"--holdout-types: unknown {sorted(unknown)}; choose from "
                         f"{','.join(fp.TYPES)}")
    calib_start, test_start = _periods(data.day, _day_arg(args.calib_start),
                                       _day_arg(args.test_start))
    cfg = fp.FoldConfig(n_folds=args.folds, seeds=tuple(int(x) for x in args.seeds.split(",")),
                        calib_start=calib_start, test_start=test_start, far=args.far,
                        holdout_types=holdout, final=args.final, max_epochs=args.max_epochs,
                        n_boot=args.boot)
    try:
        _, summary = fp.run_folds(data, tables, cfg)
    except (ValueError, AssertionError, IndexError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(
            f"--protocol folds: could not evaluate on this data ({first}); the fold protocol "
            f"needs at least {2 * cfg.n_folds} households with months of history each (e.g. "
            "a year: train Jan-Aug, calibrate Sep, test Oct-Dec); use --protocol split for "
            "shorter data") from exc
    t_sus = time.monotonic()
    summary["sustained"] = evaluate_sustained(data.kwh, data.day, data.household_ids,
                                              seed=cfg.seeds[0], tables=tables)
    summary["sustained"]["seconds"] = time.monotonic() - t_sus
    summary.update({
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command, "machine": _machine(), "data": str(args.data),
        "context": _context(sides, args.timezone),
        "households": len(set(data.household_ids)), "rows": len(data),
        "periods": {"calib_start": _iso(calib_start), "test_start": _iso(test_start)},
        "seconds": time.monotonic() - t0})
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    fp.plot_sweeps(summary, out / "magnitude_sweeps.png")
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=_json_default))
    lines = ["# meterwatch evaluation on real smart-meter data: unseen households", "",
             f"- date: {summary['date']}", f"- command: `{command}`",
             f"- machine: {summary['machine']}",
             f"- data: {summary['data']} ({summary['households']} households, "
             f"{summary['rows']} household-days)",
             _context_line(summary["context"]),
             f"- periods: training before {_iso(calib_start)}, calibration "
             f"{_iso(calib_start)} to {_iso(test_start - 1)}, test from {_iso(test_start)}",
             f"- wall time: {summary['seconds']:.0f} s", "",
             "## Detection on households the model never trained on", ""]
    lines += fp.report_lines(summary)
    lines += ["", "## Sustained changes", "", *sustained_lines(summary["sustained"])]
    lines += ["", "## Figures", "", "- `magnitude_sweeps.png`: recall against magnitude per "
              "type, every method at 1 % false alarms, meterwatch's 90 % interval, and "
              "meterwatch at its calibrated threshold", ""]
    (out / "RESULTS.md").write_text("\n".join(lines))
    return summary


def sustained_lines(r: dict[str, Any]) -> list[str]:
    c = r["config"]
    lines = [
        f"One-sided CUSUMs with four signatures (``model.sustained``: k {c['k']}, h {c['h']}, "
        f"z cap {c['z_cap']}, warm-up {c['warmup_days']} days) over every household's whole "
        f"history ({r['households']} households together, "
        f"{r['household_months_clean']:.0f} household-months). The settings were chosen on "
        "half of these households (`benchmarks/evaluation/sustained.py`): the other half's "
        "numbers, the honest ones, are in `benchmarks/evaluation/sustained/sustained.md`. "
        "Injected: each persistent change from 3 random start days per "
        f"household for {r['duration']} days; detected = an alert on one of the first "
        f"{r['detected_within']} days. Wall time {r.get('seconds', 0):.1f} s.", "",
        f"- false sustained-change alerts on the clean data: {r['false_alerts_clean']} = "
        f"**{r['false_per_1000_household_months']:.0f} per 1,000 household-months**",
        f"- detected within {r['detected_within']} days, all types: "
        f"**{r['detected']:.2f}**", "",
        "| change | series | detected within 7 days | median delay (days) | median start-date "
        "error (days) |", "| --- | --- | --- | --- | --- |"]
    for t, v in r["per_type"].items():
        lines.append(f"| {t} | {v['n']} | {v['detected']:.2f} | {v['median_delay_days']} | "
                     f"{v['median_abs_start_error_days']} |")
    return lines


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


def main(argv: Sequence[str] | None = None) -> int:
    """``meterwatch evaluate --data PATH --out DIR [...]``."""
    p = argparse.ArgumentParser(prog="meterwatch evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="LCL directory or readings file")
    p.add_argument("--out", required=True, type=Path, help="directory for the report")
    p.add_argument("--protocol", choices=("folds", "split"), default="folds",
                   help="folds: households never trained on (default); split: the first "
                        "round's time split on the training households")
    p.add_argument("--folds", type=int, default=5, help="household folds (the last is final)")
    p.add_argument("--seeds", default="0,1", help="training and injection seeds")
    p.add_argument("--final", action="store_true",
                   help="score the final fold, untouched during development")
    p.add_argument("--holdout-types", default=",".join(NEW_TYPES),
                   help="anomaly types kept out of tuning, reported apart")
    p.add_argument("--max-epochs", type=int, default=25, help="training epochs per fold")
    p.add_argument("--boot", type=int, default=300, help="bootstrap resamples for intervals")
    p.add_argument("--calib-start", help="first calibration day (default: a twelfth of the "
                                         "data's span before --test-start)")
    p.add_argument("--test-start", help="first test day (default: the last quarter of the "
                                        "data's span, e.g. 2013-10-01 for a year of 2013)")
    p.add_argument("--rate", type=float, default=0.1, help="share of test days injected")
    p.add_argument("--far", type=float, default=0.01, help="target false-alarm rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--cold-households", type=float, default=0.2,
                   help="share of households kept from a second detector to measure how "
                        "households new to the service are scored (0: skip)")
    for side in ("household-info", "weather", "holidays"):
        p.add_argument(f"--{side}", type=Path, help="side table (default: found in --data)")
    p.add_argument("--timezone", default="UTC", help="time zone of the days (IANA name)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                                                   "%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "meterwatch evaluate " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.protocol == "folds":
        run_protocol_folds(args, command)
        print(f"report: {args.out / 'RESULTS.md'}")
        return 0
    summary = run(args.data, args.out, calib_start=_day_arg(args.calib_start),
                  test_start=_day_arg(args.test_start), rate=args.rate, far=args.far,
                  seed=args.seed, methods=args.methods.split(","), command=command,
                  cold_households=args.cold_households,
                  side_tables={"household_info": args.household_info, "weather": args.weather,
                               "holidays": args.holidays}, timezone=args.timezone)
    for line in summary["targets"]:
        print(line)
    print(f"report: {args.out / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
