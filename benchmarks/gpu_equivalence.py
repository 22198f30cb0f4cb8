"""The torch scoring path against the numpy reference on real days (Low Carbon London).

``Detector.replay`` over every household-day of the sample, once with
``model.torch_scoring`` and once with the numpy reference, on the same detector (the
benchmarks' small synthetic-trained one unless ``--model``): largest score difference,
alert flips (and how close to the threshold the flipped days were), largest relative
difference of the final household state, and the time of each replay.

    python -m benchmarks.gpu_equivalence [--data ../shared/data/lcl-2013-sample] [--device cpu]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import common


def _default_data() -> str:
    for base in (common.ROOT.parent, common.ROOT.parent.parent):
        p = base / "shared" / "data" / "lcl-2013-sample"
        if p.exists():
            return str(p)
    return "../shared/data/lcl-2013-sample"


def main(argv: list[str] | None = None) -> int:
    from meterwatch.model import ContextTables, Detector, HouseholdState
    from meterwatch.model.loaders import load_dataset

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=_default_data())
    p.add_argument("--model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    readings, sides = load_dataset(Path(args.data))
    tables = ContextTables.from_files(sides["household"], sides["weather"], sides["holidays"])
    print(f"{len(readings):,} household-days of {len(set(readings.household_ids))} households "
          f"from {args.data} in {time.perf_counter() - t0:.1f} s", flush=True)
    det = Detector.load(common.detector_path(args.model), device=args.device)
    from meterwatch.model import torch_scoring

    # every step through torch, however few households (on the CPU, steps below
    # CPU_MIN_ROWS days would otherwise take the numpy reference)
    torch_scoring.CPU_MIN_ROWS = 0
    out: dict[str, Any] = {}
    for flag in (False, True):
        det.torch_scoring = flag
        t0 = time.perf_counter()
        out[flag] = det.replay(readings.kwh, readings.day, readings.household_ids, tables)
        out[f"sec{flag}"] = time.perf_counter() - t0
    (ref, ref_final), (got, got_final) = out[False], out[True]
    both = np.isfinite(ref.score) & np.isfinite(got.score)
    assert (np.isfinite(ref.score) == np.isfinite(got.score)).all()
    diff = np.abs(ref.score[both] - got.score[both])
    flips = np.flatnonzero(ref.is_alert != got.is_alert)
    state_rel = 0.0
    for f in dataclasses.fields(HouseholdState):
        a = np.stack([getattr(ref_final[h], f.name)[0] for h in ref_final]).astype(np.float64)
        b = np.stack([getattr(got_final[h], f.name)[0] for h in ref_final]).astype(np.float64)
        ok = np.isfinite(a) & np.isfinite(b)
        assert (np.isfinite(a) == np.isfinite(b)).all(), f.name
        rel = np.abs(a[ok] - b[ok]) / np.maximum(np.abs(a[ok]), 1e-3)
        state_rel = max(state_rel, float(rel.max(initial=0.0)))
    res = {"days": len(readings), "device": str(det.device), "threshold": det.threshold,
           "max_abs_score_diff": float(diff.max(initial=0.0)),
           "p99_abs_score_diff": float(np.quantile(diff, 0.99)) if len(diff) else 0.0,
           "alerts_numpy": int(ref.is_alert.sum()), "alerts_torch": int(got.is_alert.sum()),
           "alert_flips": len(flips),
           "flip_distance_to_threshold": [float(abs(ref.score[i] - det.threshold))
                                          for i in flips[:20]],
           "max_rel_final_state_diff": state_rel,
           "numpy_replay_s": out["secFalse"], "torch_replay_s": out["secTrue"]}
    for k, v in res.items():
        print(f"  {k}: {v}")
    common.save_result("gpu_equivalence", {"params": vars(args), "result": res})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
