"""``Detector.score`` of this tree against an earlier commit's, in one process, in alternation.

The scorer benchmark (``benchmarks.scorer``) times this tree's torch path against its own
numpy reference; this one answers "is it faster than the code before the GPU work?" without
the noise of comparing runs made minutes apart on a shared machine. The earlier commit's
``model/`` is imported first (from ``--before``: a tree of that commit, e.g. ``git archive
3cf3052 | tar -x -C /tmp/before``), its modules are put aside, then this tree's are imported;
both detectors load the same checkpoint, score the same inputs with the household state
their own first pass left, and are called in turns (A B, B A, ...) for ``--seconds`` per
size. The largest score difference between the two is reported as a check that both ran.

    python -m benchmarks.gpu_scorer_ab --before /tmp/before --threads 1
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.gpu_results import PartialResult

#: The earlier tree's modules that the score path imports lazily: loaded before setting aside.
MODULES = ("detector", "features", "scoring", "state", "quality", "network", "loaders")


def load_before(tree: Path) -> Any:
    """The ``meterwatch.model`` package of ``tree``, imported and then removed from
    ``sys.modules`` so that the next import of ``meterwatch`` finds this tree's."""
    site = Path(tempfile.mkdtemp(prefix="scorer-ab-site-"))
    (site / "meterwatch").mkdir()
    for sub in ("stream", "model"):
        (site / "meterwatch" / sub).symlink_to(tree / sub, target_is_directory=True)
    saved = {k: v for k, v in sys.modules.items()
             if k == "meterwatch" or k.startswith("meterwatch.")}
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, str(site))
    try:
        before = importlib.import_module("meterwatch.model")
        for m in MODULES:
            importlib.import_module(f"meterwatch.model.{m}")
        if not str(before.__file__).startswith(str(site)):
            raise SystemExit(f"--before {tree}: imported {before.__file__} instead")
    finally:
        sys.path.remove(str(site))
        for k in [k for k in sys.modules if k == "meterwatch" or k.startswith("meterwatch.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    return before


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="a tree of the earlier commit")
    p.add_argument("--sizes", default="256,1024,4096,16384,65536,262144")
    p.add_argument("--seconds", type=float, default=6.0, help="per size, both together")
    p.add_argument("--threads", type=int)
    p.add_argument("--model", help="detector checkpoint (default: the benchmarks' own)")
    args = p.parse_args(argv)
    np.seterr(all="ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    before = load_before(Path(args.before).resolve())
    from benchmarks import common
    from benchmarks.scorer import make_inputs
    from meterwatch import model as current

    path = common.detector_path(args.model)
    sizes = [int(s) for s in args.sizes.split(",")]
    kwh_all, day_all, ids_all = make_inputs(max(sizes))
    pool = min(len(day_all), 28_000)
    dets = {"A": current.Detector.load(path, device="cpu"),
            "B": before.Detector.load(path, device="cpu")}
    states = {"A": current.HouseholdState, "B": before.HouseholdState}
    st0 = {k: d.score(kwh_all[:pool], day_all[:pool], ids_all[:pool],
                      states[k].empty(pool)).state for k, d in dets.items()}
    partial = PartialResult("gpu_scorer_ab", {**vars(args), "model": str(path),
                                              "torch_threads": torch.get_num_threads()})
    rows: list[dict[str, Any]] = []
    for n in sizes:
        idx = np.arange(n) % pool
        st = {k: v.take(idx) for k, v in st0.items()}
        inputs = (kwh_all[:n], day_all[:n], ids_all[:n])
        res = {k: d.score(*inputs, st[k]) for k, d in dets.items()}  # warm-up and check
        diff = float(np.nanmax(np.abs(res["A"].score - res["B"].score)))
        times: dict[str, list[float]] = {"A": [], "B": []}
        start, i = time.perf_counter(), 0
        while time.perf_counter() - start < args.seconds or len(times["A"]) < 2:
            for k in ("A", "B") if i % 2 == 0 else ("B", "A"):
                t0 = time.perf_counter()
                dets[k].score(*inputs, st[k])
                times[k].append(time.perf_counter() - t0)
            i += 1
        row = {"batch": n, "calls_each": len(times["A"]),
               "days_per_s": n / float(np.median(times["A"])),
               "before_days_per_s": n / float(np.median(times["B"])),
               "max_abs_score_diff": diff, "load_average": round(os.getloadavg()[0], 2)}
        row["ratio"] = row["days_per_s"] / row["before_days_per_s"]
        rows.append(row)
        partial.update(rows=rows)
        print(f"{n:>9,}  this tree {row['days_per_s']:>10,.0f}/s  before "
              f"{row['before_days_per_s']:>10,.0f}/s  ratio {row['ratio']:.2f}  "
              f"({len(times['A'])} calls each, max |score diff| {diff:.2g}, load "
              f"{row['load_average']:.1f})", flush=True)
    partial.finish(rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
