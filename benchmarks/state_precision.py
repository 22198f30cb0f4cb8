"""What storing the household state compactly does to scores, on real households.

The stream's household table keeps ``HouseholdState`` in ``model.state.STORAGE_DTYPES``
(float16 statistics and profile, uint16 count and day); ``HouseholdState`` computes in
float32. This replays every household-day of a data set in date order twice, with the state
kept in float32 throughout and with it rounded to storage (``model.state.to_storage``) after
every day, and reports how far the scores move and how many alert decisions change.

    python -m benchmarks.state_precision --model lcl.pt --data /path/to/lcl-2013-sample \\
        --from 2013-09-01

``--from`` only restricts which days are compared (the replay starts at each household's
first day, so the state has its history); ``--storage`` also runs the previous storage
(``profile``: only the profile and the last level z-score in float16) for comparison.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from dataclasses import fields

import numpy as np

from meterwatch.model import Detector, HouseholdState
from meterwatch.model.state import STORAGE_DTYPES, to_storage

#: storage layouts compared: field -> rounded to storage or not
LAYOUTS = {
    "current": set(STORAGE_DTYPES),
    "profile": {"profile_mean", "profile_var", "ratio_z_last"},  # the layout before
}


def stored(state: HouseholdState, which: set[str]) -> HouseholdState:
    """``state`` after a round trip through storage for the fields in ``which``."""
    return HouseholdState(**{f.name: (to_storage(f.name, getattr(state, f.name))
                                      if f.name in which else getattr(state, f.name))
                             for f in fields(HouseholdState)})


def replay(det: Detector, ids: list[str], day: np.ndarray, kwh: np.ndarray, tables,
           which: set[str] | None) -> tuple[np.ndarray, np.ndarray, HouseholdState]:
    """Scores and alert decisions of every row (household-days), one call per date;
    ``tables`` may be a function of the date (the context tables a service had then)."""
    tables_of = tables if callable(tables) else (lambda _day: tables)
    names = sorted(set(ids))
    pos = {h: i for i, h in enumerate(names)}
    hi = np.array([pos[h] for h in ids])
    state = HouseholdState.empty(len(names))
    score = np.full(len(day), np.nan, np.float32)
    alert = np.zeros(len(day), bool)
    for d in np.unique(day):
        rows = np.flatnonzero(day == d)
        rows = rows[np.unique(hi[rows], return_index=True)[1]]  # one row per household
        h = hi[rows]
        out = det.score(kwh[rows], day[rows], [ids[r] for r in rows], state.take(h),
                        tables_of(int(d)))
        score[rows], alert[rows] = out.score, out.is_alert
        new = out.state if which is None else stored(out.state, which)
        state.put(h, new)
    return score, alert, state


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="checkpoint (meterwatch train)")
    p.add_argument("--data", required=True, help="readings folder or file (model.loaders)")
    p.add_argument("--from", dest="start", default=None, help="compare days from (YYYY-MM-DD)")
    p.add_argument("--storage", action="store_true", help="also the previous layout")
    p.add_argument("--json", default=None, help="append the result to this JSON list file")
    args = p.parse_args(argv)

    from meterwatch.model.features import ContextTables
    from meterwatch.model.loaders import load_dataset

    det = Detector.load(args.model, device="cpu")
    readings, sides = load_dataset(args.data)
    tables = ContextTables.from_files(household_csv=sides["household"],
                                      weather_csv=sides["weather"],
                                      holidays_csv=sides["holidays"])
    ids, day, kwh = readings.household_ids, readings.day, readings.kwh
    start = ((dt.date.fromisoformat(args.start) - dt.date(1970, 1, 1)).days
             if args.start else int(day.min()))
    t0 = time.perf_counter()
    ref, ref_alert, _ = replay(det, ids, day, kwh, tables, None)
    results = []
    for name in ["current", *(["profile"] if args.storage else [])]:
        got, got_alert, _ = replay(det, ids, day, kwh, tables, LAYOUTS[name])
        cmp = (day >= start) & np.isfinite(ref)
        assert (np.isfinite(got) == np.isfinite(ref)).all()
        diff = np.abs(got[cmp] - ref[cmp])
        flips = int((got_alert[cmp] != ref_alert[cmp]).sum())
        thr = float(det.threshold)
        near = (ref[cmp] >= 0.5 * thr) & (ref[cmp] <= 2 * thr)  # where a decision could flip
        r = {"layout": name, "days": int(cmp.sum()), "households": len(set(ids)),
             "median": float(np.median(diff)), "p99": float(np.quantile(diff, 0.99)),
             "max": float(diff.max()), "alert_flips": flips,
             "near_threshold_days": int(near.sum()),
             "near_threshold_max": float(diff[near].max()) if near.any() else 0.0,
             "alerts": int(ref_alert[cmp].sum()), "threshold": float(det.threshold)}
        results.append(r)
        print(f"{name:8s} {r['households']} households, {r['days']} days scored: score change "
              f"median {r['median']:.2e}, p99 {r['p99']:.2e}, max {r['max']:.3f} "
              f"({r['near_threshold_max']:.3f} on the {r['near_threshold_days']} days scored "
              f"within 0.5-2x the threshold); "
              f"alert decisions changed {flips} of {r['days']} ({r['alerts']} alerts; "
              f"threshold {r['threshold']:.3g})")
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.json:
        from pathlib import Path

        path = Path(args.json)
        prior = json.loads(path.read_text()) if path.exists() else []
        prior.append({"when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                      "data": str(args.data), "from": args.start, "results": results})
        path.write_text(json.dumps(prior, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
