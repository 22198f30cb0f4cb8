"""How far can one day go? Detectors told the anomaly type, on the development folds.

    python -m benchmarks.evaluation.ceilings [--data DIR] [--out DIR]

``meterwatch evaluate`` leaves five types below 0.3 recall at 1 % false alarms (time shift,
evening drop, partial level, weekend extra, heating on mild days). This asks whether any
detector judging one day at a time could do much better on them, by giving one every
advantage a real detector lacks:

* it is **told the type** of anomaly it is looking for, and its fixed hours where the
  injector fixes them (16:00-22:00 for the evening drop; 06:00-09:00 and 17:00-23:00 for
  heating on mild days), so it tests one statistic made for that type and pays no price
  for watching for the other ten;
* each household's reference is its **own clean October-December days** (leave-one-out
  mean and standard deviation): the same season as the test day, which no running
  statistic in the service has.

The days and injections are those of ``meterwatch evaluate``'s development folds
(``model.folds``: the same households, test period, seeds, injector and default
magnitudes; the random draws differ, as only the default magnitude is injected here).
A detector's false alarms are counted on the fold's clean test days (weekend days only for
``weekend_extra``, which the injector only puts on weekends), and its cut is the score
that 1 % of them exceed, per fold and seed, as for meterwatch. The statistics
(each a leave-one-out z-score of the household's own days):

* ``evening_drop``: minus the log of the kWh used 16:00-22:00;
* ``heating_mild``: the log of the kWh used in the injector's heating hours;
* ``weekend_extra``: the largest 6-hour log kWh (the window is random), against weekends;
* ``partial_level``: the largest absolute z of the log kWh in any 4, 6 or 8-hour window
  (the window and the direction are random);
* ``time_shift``: how much better the day's profile correlates with the household's mean
  profile when moved 4 hours either way than where it is.

Writes ``ceilings.json`` into ``--out`` (default ``benchmarks/evaluation``) and prints the
table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
from pathlib import Path
from typing import Any

import numpy as np

from meterwatch.model.features import ContextTables
from meterwatch.model.folds import (
    FoldConfig,
    _cut,
    _default_magnitude,
    household_folds,
)
from meterwatch.model.inject import InjectionConfig, applicable, inject_type
from meterwatch.model.loaders import load_dataset

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "lcl-2013-sample"
CEILING_TYPES = ("time_shift", "evening_drop", "partial_level", "weekend_extra", "heating_mild")
_EPS = 0.05  # kWh added before every log (empty houses read zero for hours)
_SLOTS = np.arange(48)
_HEATING = ((_SLOTS >= 12) & (_SLOTS < 18)) | ((_SLOTS >= 34) & (_SLOTS < 46))


def _clean(kwh: np.ndarray) -> np.ndarray:
    return np.nan_to_num(kwh).clip(0.0, 50.0)


def _windows(kwh: np.ndarray, length: int) -> np.ndarray:
    """(N, 48) -> (N, 49 - length) sums of every run of ``length`` half-hours."""
    c = np.concatenate([np.zeros((len(kwh), 1)), np.cumsum(_clean(kwh), axis=1)], axis=1)
    return c[:, length:] - c[:, :-length]


def _loo(v: np.ndarray, hh: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out mean and standard deviation of ``v`` (N, ...) per household, over its
    rows where ``ref`` (a row is never its own reference)."""
    mu = np.zeros_like(v)
    sd = np.ones_like(v)
    for h in np.unique(hh):
        rows = np.flatnonzero(hh == h)
        own = rows[ref[rows]]
        s1, s2, n = v[own].sum(axis=0), (v[own] ** 2).sum(axis=0), len(own)
        inside = ref[rows].astype(np.float64).reshape((-1,) + (1,) * (v.ndim - 1))
        m1 = (s1 - v[rows] * inside) / np.maximum(n - inside, 1)
        m2 = (s2 - v[rows] ** 2 * inside) / np.maximum(n - inside, 1)
        mu[rows], sd[rows] = m1, np.sqrt(np.maximum(m2 - m1 * m1, 1e-3))
    return mu, sd


def _z(vc: np.ndarray, vi: np.ndarray, hh: np.ndarray, rows: np.ndarray,
       ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu, sd = _loo(vc, hh, ref)
    return (vc - mu) / sd, (vi - mu[rows]) / sd[rows]


def _corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    return (a * b).sum(axis=1) / np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1) + 1e-9)


def told_the_type(name: str, clean: np.ndarray, injected: np.ndarray, hh: np.ndarray,
                  rows: np.ndarray, weekend: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores of the clean days (T,) and of the injected ones (R,; day ``rows``) by the
    detector made for ``name`` (module docstring); NaN = not judged."""
    every = np.ones(len(clean), bool)
    if name == "evening_drop":
        def f(k: np.ndarray) -> np.ndarray:
            return -np.log(_clean(k)[:, 32:44].sum(axis=1) + _EPS)
        return _z(f(clean), f(injected), hh, rows, every)
    if name == "heating_mild":
        def g(k: np.ndarray) -> np.ndarray:
            return np.log(_clean(k)[:, _HEATING].sum(axis=1) + _EPS)
        return _z(g(clean), g(injected), hh, rows, every)
    if name in ("weekend_extra", "partial_level"):
        lengths, ref = ((12,), weekend) if name == "weekend_extra" else ((8, 12, 16), every)
        sc, si = [], []
        for length in lengths:
            zc, zi = _z(np.log(_windows(clean, length) + _EPS),
                        np.log(_windows(injected, length) + _EPS), hh, rows, ref)
            if name == "partial_level":
                zc, zi = np.abs(zc), np.abs(zi)
            sc.append(zc.max(axis=1))
            si.append(zi.max(axis=1))
        out_c = np.max(sc, axis=0)
        return (np.where(weekend, out_c, np.nan) if name == "weekend_extra" else out_c,
                np.max(si, axis=0))
    assert name == "time_shift", name
    k = _clean(clean)
    profile = np.zeros_like(k)
    for h in np.unique(hh):
        r = np.flatnonzero(hh == h)
        profile[r] = (k[r].sum(axis=0)[None] - k[r]) / max(len(r) - 1, 1)

    def moved(x: np.ndarray, p: np.ndarray) -> np.ndarray:
        x = _clean(x)
        return np.max([_corr(np.roll(x, s, axis=1), p) for s in (-8, 8)], axis=0) - _corr(x, p)
    return moved(clean, profile), moved(injected, profile[rows])


def run(data_dir: Path) -> dict[str, Any]:
    data, sides = load_dataset(data_dir)
    tables = ContextTables.from_files(household_csv=sides.get("household"),
                                      weather_csv=sides.get("weather"),
                                      holidays_csv=sides.get("holidays"))
    cfg = FoldConfig()
    ids = np.asarray(data.household_ids, dtype=str)
    fold_of = household_folds(data.household_ids, cfg.n_folds, cfg.split_seed)
    hits = {t: [0, 0] for t in CEILING_TYPES}
    for seed in cfg.seeds:
        for fold in range(cfg.n_folds - 1):  # the development folds; the final stays untouched
            test = np.flatnonzero(np.isin(ids, [h for h, k in fold_of.items() if k == fold])
                                  & (data.day >= cfg.test_start))
            kwh, day, hh = data.kwh[test], data.day[test], ids[test]
            weekend = ((day + 3) % 7) >= 5  # 1970-01-01 was a Thursday
            temp = tables.max_temperature(day)
            rng = np.random.default_rng(1000 * seed + fold)
            for name in CEILING_TYPES:
                ok = applicable(name, day)
                sel = np.arange(len(day)) if ok is None else np.flatnonzero(ok)
                x = inject_type(kwh[sel], name, _default_magnitude(name, InjectionConfig()), rng,
                                day=day[sel], temp_max=temp[sel], config=InjectionConfig())
                changed = (np.abs(np.nan_to_num(x) - np.nan_to_num(kwh[sel])) > 1e-3).any(axis=1)
                sc, si = told_the_type(name, kwh, x[changed], hh, sel[changed], weekend)
                cut = _cut(sc[np.isfinite(sc)], cfg.far)
                hits[name][0] += int((si > cut).sum())
                hits[name][1] += len(si)
    return {
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "date": dt.date.today().isoformat(),
        "data": data_dir.name,
        "false_alarm_rate": cfg.far,
        "recall": {t: round(h / max(n, 1), 3) for t, (h, n) in hits.items()},
        "injected_days": {t: n for t, (_, n) in hits.items()},
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=SHARED)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = ap.parse_args(argv)
    out = run(args.data)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ceilings.json").write_text(json.dumps(out, indent=2) + "\n")
    print("told-the-type detector, recall at 1 % false alarms (development folds):")
    for t, r in out["recall"].items():
        print(f"  {t:14s} {r:.2f}  ({out['injected_days'][t]} injected days)")


if __name__ == "__main__":
    main()
