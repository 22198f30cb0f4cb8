"""An evaluation that cannot flatter: households in folds, seeds, magnitude sweeps, intervals.

``meterwatch evaluate --protocol folds`` (``model.evaluate``) runs ``run_folds``:

1. Households are split into ``n_folds`` folds (by a fixed split seed). The last fold is
   *final*: it is never trained on, tuned on or scored until ``--final`` is given; the
   others are the development folds.
2. For each development fold and each seed, a detector is trained (``train_detector``) on
   the other development folds' households only, on days before the test period, and
   calibrated as it would be in production. The fold's households are then replayed from
   their first day (the service meets them in January, as new customers; the network has
   never seen them) and their test-period days (Oct-Dec) are scored:

   * clean, for false alarms (real days, unlabelled: natural oddities count as false);
   * with every anomaly type of ``model.inject`` at every magnitude of its sweep, put into
     every test day in turn (one at a time: each injected day is scored with the state the
     household had that morning, ``Detector.score``), so recall is measured against size.

3. Baselines score the same days: ``profile`` (per-household, per-half-hour z-scores against
   the household's own days before the test period), ``iforest`` (IsolationForest on the 48
   readings, fitted on the training households) and ``rules`` (the data-quality rules alone).
4. Recall at 1 % false alarms uses, per fold and seed, the score that 1 % of that fold's
   clean test days exceed (threshold-free), and at the calibrated threshold the detector's
   own; the alert budget thresholds come from the calibration curve
   (``model.calibration.FarCurve``) fitted on the training households only.
5. Intervals: 90 % percentile bootstrap over households (each household is scored in
   exactly one fold per seed; resampling whole households keeps their days together;
   thresholds stay fixed).
6. Types named in ``holdout_types`` are reported apart: nothing that was tuned while
   developing the detector looked at them.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from meterwatch.model.calibration import FarCurve, LiveCalibration
from meterwatch.model.features import ContextTables
from meterwatch.model.inject import (
    ANOMALY_TYPES,
    NEW_TYPES,
    SWEEPS,
    InjectionConfig,
    applicable,
    inject_type,
)
from meterwatch.model.loaders import Readings
from meterwatch.model.state import HouseholdState
from meterwatch.model.training import TrainConfig, train_detector

log = logging.getLogger(__name__)

TYPES: tuple[str, ...] = ANOMALY_TYPES[1:]
BASELINES: tuple[str, ...] = ("profile", "iforest", "rules")
BUDGETS: tuple[float, ...] = (0.001, 0.005, 0.01)


@dataclass(frozen=True)
class FoldConfig:
    n_folds: int = 5
    seeds: tuple[int, ...] = (0, 1)
    split_seed: int = 2013
    calib_start: int = 15949  # 2013-09-01
    test_start: int = 15979  # 2013-10-01
    far: float = 0.01
    budgets: tuple[float, ...] = BUDGETS
    holdout_types: tuple[str, ...] = NEW_TYPES
    final: bool = False  # score the final fold (train on all development folds)
    # Training kept small (2 shared cores): fewer epochs, and the cold-start calibration
    # restarted every 14th day in 2 folds (the test households have months of history by
    # the test period, so cold-start maps do not touch their scores).
    max_epochs: int = 25
    cold_restart_every: int = 14
    cold_folds: int = 2
    # Days before the test period that the "recent" calibration curves use.
    recent_days: int = 61
    n_boot: int = 300
    types: tuple[str, ...] = TYPES
    sweeps: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(SWEEPS))


@dataclass
class FoldScores:
    """One (fold, seed): clean test days and every injected version, scored by every method."""

    fold: int
    seed: int
    household: np.ndarray  # str (T,) household of each clean test day
    clean: dict[str, np.ndarray]  # method -> (T,) scores
    row: np.ndarray  # (R,) index into the clean test days of each injected day
    kind: np.ndarray  # (R,) index into TYPES
    magnitude: np.ndarray  # (R,)
    injected: dict[str, np.ndarray]  # method -> (R,)
    threshold: float  # the detector's calibrated threshold
    # curve name -> budget -> threshold (a number, or (T,) one per clean test day)
    budget_thresholds: dict[str, dict[float, Any]]
    seconds: float = 0.0


def household_folds(ids: Sequence[str], n_folds: int, seed: int) -> dict[str, int]:
    """Household -> fold (0 .. n_folds - 1; the last is the final fold)."""
    uniq = np.unique(np.asarray(ids, dtype=str))
    perm = np.random.default_rng(seed).permutation(len(uniq))
    return {str(uniq[i]): int(k % n_folds) for k, i in enumerate(perm)}


def _state_before(scores_state: HouseholdState, day: np.ndarray, hh: np.ndarray) -> HouseholdState:
    """The state each replayed row's household had before that row's day."""
    order = np.lexsort((day, hh))
    prev = np.full(len(day), -1)
    same = hh[order][1:] == hh[order][:-1]
    prev[order[1:][same]] = order[:-1][same]
    out = scores_state.take(np.maximum(prev, 0))
    first = np.flatnonzero(prev < 0)
    if len(first):
        out.put(first, HouseholdState.empty(len(first)))
    return out


def _profile_scorer(kwh: np.ndarray, hh: np.ndarray, history: np.ndarray) -> Any:
    """Per-household per-slot mean/std over ``history`` rows; returns score(rows_hh, kwh)."""
    stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for h in np.unique(hh[history]):
        k = kwh[history[hh[history] == h]]
        stats[str(h)] = (np.nanmean(k, axis=0), np.nanstd(k, axis=0))
    pop = (np.nanmean(kwh[history], axis=0), np.nanstd(kwh[history], axis=0))

    def score(who: np.ndarray, x: np.ndarray) -> np.ndarray:
        if len(who) == 0:
            return np.zeros(0)
        mu = np.stack([stats.get(str(h), pop)[0] for h in who])
        sd = np.stack([stats.get(str(h), pop)[1] for h in who])
        z = (x - mu) / np.maximum(sd, 0.01)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out = np.nanmean(z**2, axis=1)
        return np.nan_to_num(out, nan=0.0)

    return score


def run_fold(data: Readings, tables: ContextTables, test_hh: Sequence[str],
             train_hh: Sequence[str], fold: int, seed: int, cfg: FoldConfig) -> FoldScores:
    """Train on ``train_hh`` (days before the test period), score ``test_hh``."""
    from sklearn.ensemble import IsolationForest

    t0 = time.monotonic()
    ids = np.asarray(data.household_ids, dtype=str)
    before = data.day < cfg.test_start
    fit = np.flatnonzero(np.isin(ids, train_hh) & before)
    tc = TrainConfig(seed=seed, target_far=cfg.far, calibration_start_day=cfg.calib_start,
                     max_epochs=cfg.max_epochs, cold_restart_every=cfg.cold_restart_every,
                     cold_folds=cfg.cold_folds)
    det = train_detector(data.kwh[fit], data.day[fit], list(ids[fit]), tables, tc)

    # the fold's households, replayed from their first day, and the training households
    # (the service scores them too): the live traffic the budget curves learn from
    rows = np.flatnonzero(np.isin(ids, test_hh))
    rs, _ = det.replay(data.kwh[rows], data.day[rows], list(ids[rows]), tables)
    others = np.flatnonzero(np.isin(ids, train_hh))
    tr, _ = det.replay(data.kwh[others], data.day[others], list(ids[others]), tables)
    _, hh_code = np.unique(ids[rows], return_inverse=True)
    before_state = _state_before(rs.state, data.day[rows], hh_code)
    live_day = np.concatenate([data.day[rows], data.day[others]])
    live_ms = np.concatenate([rs.model_score, tr.model_score])
    live_rule = np.concatenate([rs.score - rs.model_score, tr.score - tr.model_score]
                               ) >= det.scoring.rule_bonus / 2
    live_est = np.concatenate([rs.state.count, tr.state.count]) > (
        det.scoring.min_profile_days + 7)
    live_fit = np.concatenate([np.zeros(len(rows), bool), np.ones(len(others), bool)])
    hist = live_est & (live_day < cfg.test_start)
    cal = hist & (live_day >= cfg.calib_start)
    curves: dict[str, Any] = {
        # what training can know: the training households' own days
        "training_households": FarCurve.fit(live_ms[hist & live_fit], live_rule[hist & live_fit]),
        "calibration_month": FarCurve.fit(live_ms[cal], live_rule[cal]),
        # the service's own history of every household it scores, up to the test period
        "history": FarCurve.fit(live_ms[hist], live_rule[hist]),
    }
    if det.far_curve is not None:
        # what a user gets with ``meterwatch run --target-far``: the checkpoint's own curve
        curves = {"checkpoint": det.far_curve, **curves}
    is_test = data.day[rows] >= cfg.test_start
    t_rows = rows[is_test]
    t_state = before_state.take(np.flatnonzero(is_test))
    t_kwh, t_day, t_ids = data.kwh[t_rows], data.day[t_rows], list(ids[t_rows])
    budget: dict[str, dict[float, Any]] = {
        name: {b: c.threshold(b) for b in cfg.budgets} for name, c in curves.items()}
    # rolling: each test day's threshold from the last 28 days of live scores
    budget["rolling_28_days"] = {b: np.zeros(len(t_rows)) for b in cfg.budgets}
    for d in np.unique(t_day):
        win = LiveCalibration(window_days=28)
        m = live_est & (live_day < d) & (live_day >= d - 28)
        if m.any():
            win.add(live_day[m], live_ms[m], live_rule[m])
        c = win.curve() or curves["history"]  # too few live days yet: the history's
        for b in cfg.budgets:
            budget["rolling_28_days"][b][t_day == d] = c.threshold(b)
    t_temp = tables.max_temperature(t_day)
    check = det.score(t_kwh, t_day, t_ids, t_state, tables)
    np.testing.assert_allclose(np.nan_to_num(check.score), np.nan_to_num(rs.score[is_test]),
                               rtol=1e-4, atol=1e-4)
    rule = (check.score - check.model_score) >= det.scoring.rule_bonus / 2

    history = np.flatnonzero(np.isin(ids, test_hh) & before)
    profile = _profile_scorer(data.kwh, ids, history)
    forest = IsolationForest(n_estimators=100, random_state=seed, n_jobs=1)
    forest.fit(np.nan_to_num(data.kwh[fit]))
    clean = {"meterwatch": check.score.astype(np.float64),
             "profile": profile(ids[t_rows], t_kwh),
             "iforest": -forest.score_samples(np.nan_to_num(t_kwh)),
             "rules": rule.astype(np.float64)}

    rng = np.random.default_rng(1000 * seed + fold)
    inj: dict[str, list[np.ndarray]] = {m: [] for m in clean}
    row_l, kind_l, mag_l = [], [], []
    for k, name in enumerate(cfg.types):
        ok = applicable(name, t_day)
        sel = np.arange(len(t_rows)) if ok is None else np.flatnonzero(ok)
        for m in cfg.sweeps[name]:
            x = inject_type(t_kwh[sel], name, m, rng, day=t_day[sel], temp_max=t_temp[sel],
                            config=InjectionConfig())
            changed = (np.abs(np.nan_to_num(x) - np.nan_to_num(t_kwh[sel])) > 1e-3).any(axis=1)
            s_rows = sel[changed]
            x = x[changed]
            out = det.score(x, t_day[s_rows], [t_ids[i] for i in s_rows],
                            t_state.take(s_rows), tables)
            inj["meterwatch"].append(out.score.astype(np.float64))
            inj["rules"].append(((out.score - out.model_score)
                                 >= det.scoring.rule_bonus / 2).astype(np.float64))
            inj["profile"].append(profile(ids[t_rows[s_rows]], x))
            inj["iforest"].append(-forest.score_samples(np.nan_to_num(x)))
            row_l.append(s_rows)
            kind_l.append(np.full(len(s_rows), k))
            mag_l.append(np.full(len(s_rows), m, np.float64))
    fs = FoldScores(fold=fold, seed=seed, household=ids[t_rows], clean=clean,
                    row=np.concatenate(row_l), kind=np.concatenate(kind_l),
                    magnitude=np.concatenate(mag_l),
                    injected={m: np.concatenate(v) for m, v in inj.items()},
                    threshold=det.threshold, budget_thresholds=budget,
                    seconds=time.monotonic() - t0)
    log.info("fold %d seed %d: %d test days, %d injected, %.0f s", fold, seed, len(t_rows),
             len(fs.row), fs.seconds)
    return fs


# ---------------------------------------------------------------------------- metrics


def _cut(clean: np.ndarray, far: float) -> float:
    """The score that a share ``far`` of clean days exceed (threshold-free comparisons)."""
    s = np.sort(np.nan_to_num(clean, nan=-np.inf))[::-1]
    k = max(int(np.floor(far * len(s))), 1)
    return float(s[k - 1])


def _alerts(fs: FoldScores, method: str, how: str) -> tuple[np.ndarray, np.ndarray]:
    """(clean alerts (T,), injected alerts (R,)) bool of one method at one operating point:
    ``at1`` the fold's 1 %-of-clean-days score (strictly above it), ``calibrated`` the
    detector's own threshold, ``budget:<curve>:<far>`` a calibration-curve threshold."""
    c = np.nan_to_num(fs.clean[method], nan=-np.inf)
    r = np.nan_to_num(fs.injected[method], nan=-np.inf)
    if how == "at1":
        cut = _cut(c, 0.01)
        return c > cut, r > cut
    if how == "calibrated":
        return c >= fs.threshold, r >= fs.threshold
    _, curve, far = how.split(":")
    thr = fs.budget_thresholds[curve][float(far)]
    thr_r = thr[fs.row] if isinstance(thr, np.ndarray) else thr
    return c >= thr, r >= thr_r


def _by_household(parts: list[FoldScores], method: str, how: str) -> dict[str, Any]:
    """Per household: clean days and false alarms; per (type, magnitude): days and hits."""
    hh_all = np.unique(np.concatenate([p.household for p in parts]))
    index = {h: i for i, h in enumerate(hh_all)}
    n_h = len(hh_all)
    n_t = len(TYPES)
    n_m = max(len(v) for v in SWEEPS.values())
    clean_n = np.zeros(n_h)
    clean_fa = np.zeros(n_h)
    inj_n = np.zeros((n_h, n_t, n_m))
    inj_hit = np.zeros((n_h, n_t, n_m))
    for p in parts:
        ca, ra = _alerts(p, method, how)
        h = np.array([index[x] for x in p.household])
        np.add.at(clean_n, h, 1)
        np.add.at(clean_fa, h, ca)
        hr = h[p.row]
        mi = np.array([SWEEPS[TYPES[k]].index(m) for k, m in zip(p.kind, p.magnitude,
                                                                  strict=True)])
        np.add.at(inj_n, (hr, p.kind, mi), 1)
        np.add.at(inj_hit, (hr, p.kind, mi), ra)
    return {"households": hh_all, "clean_n": clean_n, "clean_fa": clean_fa,
            "inj_n": inj_n, "inj_hit": inj_hit}


def _boot(stat: Any, n_h: int, n_boot: int, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    vals = [stat(rng.integers(0, n_h, n_h)) for _ in range(n_boot)]
    with np.errstate(invalid="ignore"):  # a magnitude never reached is inf: inf - inf
        lo, hi = np.nanquantile(np.asarray(vals, np.float64), [0.05, 0.95])
    return float(lo), float(hi)


def _m50(mags: Sequence[float], recall: np.ndarray) -> float:
    """The magnitude at which recall first reaches 0.5 (interpolated; log scale for
    factors); inf if it never does."""
    r = np.asarray(recall, np.float64)
    m = np.asarray(mags, np.float64)
    above = np.flatnonzero(r >= 0.5)
    if not len(above):
        return float("inf")
    i = int(above[0])
    if i == 0:
        return float(m[0])
    a, b = r[i - 1], r[i]
    t = (0.5 - a) / max(b - a, 1e-9)
    return float(m[i - 1] + t * (m[i] - m[i - 1]))


def summarise(parts: list[FoldScores], cfg: FoldConfig) -> dict[str, Any]:
    """Every number of the report, with 90 % bootstrap intervals over households."""
    defaults = InjectionConfig()
    default_mag = {t: _default_magnitude(t, defaults) for t in TYPES}
    methods = list(parts[0].clean)
    out: dict[str, Any] = {"methods": methods, "types": list(TYPES),
                           "holdout_types": list(cfg.holdout_types), "default_magnitude":
                           default_mag, "sweeps": {t: list(SWEEPS[t]) for t in TYPES}}
    points = ["at1", "calibrated"] + [f"budget:{c}:{b}" for c in
                                      parts[0].budget_thresholds for b in cfg.budgets]
    for method in methods:
        for how in points:
            if how != "at1" and method != "meterwatch":
                continue
            agg = _by_household(parts, method, how)
            n_h = len(agg["households"])
            res: dict[str, Any] = {}

            def far(idx: np.ndarray, a: dict[str, Any] = agg) -> float:
                return float(a["clean_fa"][idx].sum() / max(a["clean_n"][idx].sum(), 1))

            allh = np.arange(n_h)
            res["false_alarm_rate"] = far(allh)
            res["false_alarm_rate_ci"] = _boot(far, n_h, cfg.n_boot, 1)
            per_type: dict[str, Any] = {}
            for k, t in enumerate(TYPES):
                mags = SWEEPS[t]
                j = mags.index(default_mag[t]) if default_mag[t] in mags else None

                def rec(idx: np.ndarray, k: int = k, j: int | None = j,
                        a: dict[str, Any] = agg) -> float:
                    n = a["inj_n"][idx, k, j].sum()
                    return float(a["inj_hit"][idx, k, j].sum() / n) if n else float("nan")

                def curve(idx: np.ndarray, k: int = k, a: dict[str, Any] = agg) -> np.ndarray:
                    n = a["inj_n"][idx, k, :len(SWEEPS[TYPES[k]])].sum(axis=0)
                    hit = a["inj_hit"][idx, k, :len(SWEEPS[TYPES[k]])].sum(axis=0)
                    return hit / np.maximum(n, 1)

                sweep = curve(allh)
                rng_b = np.random.default_rng(7)
                boots = np.stack([curve(rng_b.integers(0, n_h, n_h))
                                  for _ in range(cfg.n_boot)])
                entry: dict[str, Any] = {
                    "sweep": sweep.tolist(),
                    "sweep_ci": np.nanquantile(boots, [0.05, 0.95], axis=0).tolist(),
                    "m50": _m50(mags, sweep),
                    "m50_ci": _boot(lambda i, c=curve, mags=mags: _m50(mags, c(i)), n_h,
                                    cfg.n_boot, 2),
                }
                if j is not None:
                    entry["recall"] = rec(allh)
                    entry["recall_ci"] = _boot(rec, n_h, cfg.n_boot, 3)
                per_type[t] = entry
            res["per_type"] = per_type
            tuned = [t for t in TYPES if t not in cfg.holdout_types]

            def mixed(idx: np.ndarray, types: Sequence[str] = tuned,
                      a: dict[str, Any] = agg) -> float:
                vals = []
                for t in types:
                    k = TYPES.index(t)
                    j = SWEEPS[t].index(default_mag[t])
                    n = a["inj_n"][idx, k, j].sum()
                    if n:
                        vals.append(a["inj_hit"][idx, k, j].sum() / n)
                return float(np.mean(vals)) if vals else float("nan")

            res["recall_tuned_types"] = mixed(allh)
            res["recall_tuned_types_ci"] = _boot(mixed, n_h, cfg.n_boot, 4)
            res["recall_holdout_types"] = mixed(allh, cfg.holdout_types)
            res["recall_holdout_types_ci"] = _boot(
                lambda i: mixed(i, cfg.holdout_types), n_h, cfg.n_boot, 5)
            res["recall_all_types"] = mixed(allh, TYPES)
            res["recall_all_types_ci"] = _boot(lambda i: mixed(i, TYPES), n_h, cfg.n_boot, 6)
            out.setdefault("results", {}).setdefault(method, {})[how] = res
    out["folds"] = [{"fold": p.fold, "seed": p.seed, "test_days": len(p.household),
                     "households": len(np.unique(p.household)), "injected": len(p.row),
                     "threshold": p.threshold, "budget_thresholds": {
                         c: {str(b): v for b, v in d.items()}
                         for c, d in p.budget_thresholds.items()},
                     "seconds": p.seconds} for p in parts]
    return out


def _default_magnitude(name: str, cfg: InjectionConfig) -> float:
    """The sweep point that stands for the type's default strength."""
    return {"spike": 2.0, "outage": 6.0, "stuck": 8.0, "level_up": 5.0, "level_down": 0.8,
            "time_shift": 4.0, "evening_drop": 0.8, "erratic": 1.0,
            "partial_level": cfg.partial_level_factor, "weekend_extra": 0.4,
            "heating_mild": 0.4}[name]


def run_folds(data: Readings, tables: ContextTables, cfg: FoldConfig) -> tuple[
        list[FoldScores], dict[str, Any]]:
    """Every (development fold, seed), or the final fold with ``cfg.final``."""
    fold_of = household_folds(data.household_ids, cfg.n_folds, cfg.split_seed)
    final = cfg.n_folds - 1
    dev = [f for f in range(cfg.n_folds) if f != final]
    parts = []
    for seed in cfg.seeds:
        for f in ([final] if cfg.final else dev):
            test_hh = [h for h, k in fold_of.items() if k == f]
            train_hh = [h for h, k in fold_of.items() if k != f and k != final]
            parts.append(run_fold(data, tables, test_hh, train_hh, f, seed, cfg))
    summary = summarise(parts, cfg)
    summary["fold_of"] = fold_of
    summary["final"] = cfg.final
    return parts, summary


__all__ = ["FoldConfig", "FoldScores", "household_folds", "run_fold", "run_folds",
           "summarise"]


# ---------------------------------------------------------------------------- report


def _f(x: float, nd: int = 2) -> str:
    return "—" if x is None or not np.isfinite(x) else f"{x:.{nd}f}"


def _ci(v: Sequence[float], nd: int = 2) -> str:
    return f"[{_f(v[0], nd)}, {_f(v[1], nd)}]"


def _mag(x: float) -> str:
    return "never" if not np.isfinite(x) else f"{x:.3g}"


def plot_sweeps(summary: dict[str, Any], path: Any) -> None:
    """Recall at 1 % false alarms against magnitude, one panel per type, every method;
    meterwatch with its 90 % interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = summary["types"]
    cols = 4
    rows = -(-len(types) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows))
    res = summary["results"]
    for ax, t in zip(np.ravel(axes), types, strict=False):
        mags = summary["sweeps"][t]
        for method in summary["methods"]:
            e = res[method]["at1"]["per_type"][t]
            ax.plot(mags, e["sweep"], marker="o", ms=3, label=method,
                    lw=2 if method == "meterwatch" else 1)
            if method == "meterwatch":
                lo, hi = e["sweep_ci"]
                ax.fill_between(mags, lo, hi, alpha=0.2)
            cal = res["meterwatch"]["calibrated"]["per_type"][t]["sweep"]
        ax.plot(mags, cal, ls="--", color="black", lw=1, label="meterwatch, calibrated thr.")
        ax.axhline(0.5, color="grey", lw=0.5, ls=":")
        ax.set_title(t + (" (held out)" if t in summary["holdout_types"] else ""), fontsize=9)
        ax.set_xlabel(MAGNITUDE_UNITS_SHORT.get(t, ""), fontsize=8)
        ax.set_ylim(-0.02, 1.02)
    for ax in np.ravel(axes)[len(types):]:
        ax.axis("off")
    np.ravel(axes)[0].legend(fontsize=7)
    fig.suptitle("Recall vs magnitude on unseen households (1 % false alarms per fold; "
                 "dashed: the detector's calibrated threshold)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


MAGNITUDE_UNITS_SHORT = {
    "spike": "kWh added", "outage": "hours", "stuck": "hours", "level_up": "factor",
    "level_down": "share removed", "time_shift": "hours", "evening_drop": "share removed",
    "erratic": "sigma", "partial_level": "factor", "weekend_extra": "kWh/hh",
    "heating_mild": "kWh/hh"}


#: Clean test days a (fold, seed) run needs for its 1 % cut to stand on a few false alarms
#: rather than on its single highest clean day.
MIN_CLEAN_DAYS = 500


def _too_few_clean_days(folds: list[dict[str, Any]]) -> list[str]:
    """A line for the report when a run has too few clean test days for a 1 % cut (a
    utility's pilot of a few households): the cut is then its highest clean day's score."""
    fewest = min((f["test_days"] for f in folds), default=0)
    if fewest >= MIN_CLEAN_DAYS:
        return []
    return [f"- **too few clean test days for a 1 % cut**: {fewest} in the smallest run, so "
            f"1 % of them is {fewest / 100:.1f} days; there '1 % of clean days' is the score of "
            "its highest clean day (no false alarm), and its recall a lower bound. "
            f"{MIN_CLEAN_DAYS} test days a run or more (about "
            f"{-(-MIN_CLEAN_DAYS * 5 // 92)} households over a quarter's test period, in 5 "
            "folds) measure it"]


def report_lines(summary: dict[str, Any]) -> list[str]:
    """Markdown of the fold protocol's results (``summarise``)."""
    res = summary["results"]
    mw = res["meterwatch"]
    types = summary["types"]
    hold = set(summary["holdout_types"])
    folds = summary["folds"]
    lines = [
        f"- folds: {len(folds)} (fold, seed) runs: "
        + ", ".join(f"{f['fold']}/{f['seed']}" for f in folds)
        + ("; the **final** fold (untouched until now)" if summary.get("final") else
           "; development folds only (the final fold is not in these numbers)"),
        f"- unseen-household test days: {sum(f['test_days'] for f in folds)}, injected "
        f"day versions scored: {sum(f['injected'] for f in folds)}",
        "- intervals: 90 % bootstrap over households; thresholds fixed per run",
        *_too_few_clean_days(folds),
        "", "### Recall at 1 % false alarms (threshold-free, per fold) and at the "
        "calibrated threshold, default magnitudes", "",
        "| method | operating point | false alarms | recall, tuned types | recall, held-out "
        "types | recall, all types |", "| --- | --- | --- | --- | --- | --- |"]
    for method in summary["methods"]:
        for how in ("at1", "calibrated"):
            if how not in res[method]:
                continue
            r = res[method][how]
            fci = _ci([100 * x for x in r["false_alarm_rate_ci"]], 2)
            lines.append(
                f"| {method} | {'1 % of clean days' if how == 'at1' else 'calibrated'} | "
                f"{r['false_alarm_rate']:.2%} {fci} % | "
                f"{_f(r['recall_tuned_types'])} {_ci(r['recall_tuned_types_ci'])} | "
                f"{_f(r['recall_holdout_types'])} {_ci(r['recall_holdout_types_ci'])} | "
                f"{_f(r['recall_all_types'])} {_ci(r['recall_all_types_ci'])} |")
    lines += ["", "### Per type, default magnitude: recall at 1 % false alarms "
              "(90 % interval)", "",
              "| type (default) | " + " | ".join(summary["methods"])
              + " | meterwatch, calibrated |",
              "| --- |" + " --- |" * (len(summary["methods"]) + 1)]
    for t in types:
        cells = []
        for method in summary["methods"]:
            e = res[method]["at1"]["per_type"][t]
            cells.append(f"{_f(e.get('recall'))} {_ci(e.get('recall_ci', (np.nan, np.nan)))}")
        e = mw["calibrated"]["per_type"][t]
        cells.append(f"{_f(e.get('recall'))}")
        name = f"{t}{' (held out)' if t in hold else ''} ({summary['default_magnitude'][t]:g})"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "### 50 %-detection magnitude at 1 % false alarms (90 % interval; "
              "'never': not reached within the sweep)", "",
              "| type | unit | sweep | " + " | ".join(summary["methods"]) + " |",
              "| --- | --- | --- |" + " --- |" * len(summary["methods"])]
    for t in types:
        cells = []
        for method in summary["methods"]:
            e = res[method]["at1"]["per_type"][t]
            cells.append(f"{_mag(e['m50'])} [{_mag(e['m50_ci'][0])}, {_mag(e['m50_ci'][1])}]")
        lines.append(f"| {t} | {MAGNITUDE_UNITS_SHORT[t]} | "
                     f"{', '.join(f'{m:g}' for m in summary['sweeps'][t])} | "
                     + " | ".join(cells) + " |")
    lines += ["", "### Alert budget: false alarms on unseen households' clean test days at "
              "a target, and recall (all types, default magnitudes)", "",
              "| curve | target | measured false alarms (90 % interval) | ratio | recall |",
              "| --- | --- | --- | --- | --- |"]
    for how, r in mw.items():
        if not how.startswith("budget:"):
            continue
        _, curve, far = how.split(":")
        f = float(far)
        lines.append(f"| {curve} | {f:.1%} | {r['false_alarm_rate']:.2%} "
                     f"[{r['false_alarm_rate_ci'][0]:.2%}, {r['false_alarm_rate_ci'][1]:.2%}] | "
                     f"{r['false_alarm_rate'] / f:.2f} | {_f(r['recall_all_types'])} |")
    return lines
