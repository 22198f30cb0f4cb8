"""Where one day-scoring call's time goes, part by part: ``python -m benchmarks.gpu_profile``.

``benchmarks.scorer`` gives household-days/s and the network's share of a call; this gives
the rest of the breakdown, to show what to make faster. For each batch size, the torch path's
parts (``model.torch_scoring``) are timed with the device synchronised at each part's edges:
the inputs to the device (``_static``: readings and context; ``_state_tensors``), the scoring
steps (``_run_step``; without CUDA graphs also ``_step`` and the network inside it), and the
results back to the host (``_to_host``). On a GPU each kind of batch runs with the steps
replayed as CUDA graphs and without (``Detector.cuda_graphs``), and the largest difference
between the two's scores and states is reported. The number of torch operations a call
dispatches is counted too: on a GPU each is a kernel launch or at least a trip through the
dispatcher, so at small batches the count, not the size, sets the time. Last,
``torch.profiler`` lists the operations that took the most host time and device time at the
largest size.

Two kinds of batch: ``one-day`` (one day per household, as a live stream's batches mostly
are; ``Detector.score``) and ``14-days`` (fourteen days per household, as a backfill's
are: ``score_batch`` scans them in date order, one step per day).

    python -m benchmarks.gpu_profile --device cuda
    python -m benchmarks.gpu_profile --device cpu --sizes 256,4096   # anywhere
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import common
from benchmarks.scorer import make_inputs

PARTS = ("_static", "_state_tensors", "_run_step", "_to_host", "host_arrays")
#: inside the step; with CUDA graphs only a capture calls them (and must not synchronise)
EAGER_PARTS = ("_step", "_network")


class _OpCount(TorchDispatchMode):
    """Counts the torch operations dispatched while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def timed_parts(module: Any, device: torch.device, spent: dict[str, float],
                parts: tuple[str, ...] = PARTS) -> Iterator[None]:
    """Wrap the module's parts so that each call adds its synchronised wall time to
    ``spent`` (a nested part's time is also inside its caller's)."""
    sync: Callable[[], None] = ((lambda: torch.cuda.synchronize(device))
                                if device.type == "cuda" else (lambda: None))
    saved = {name: getattr(module, name) for name in parts}

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def inner(*a: Any, **k: Any) -> Any:
            sync()
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                sync()
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0
        return inner

    for name, fn in saved.items():
        setattr(module, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)


def measure(det: Any, ts: Any, call: Callable[[], Any], n: int, kind: str, mode: str,
            calls: int) -> dict[str, Any]:
    """Seconds per call (plain, then with each part synchronised) and torch operations."""
    counter = _OpCount()
    with counter:
        call()
    spent: dict[str, float] = {}
    parts = PARTS if det.cuda_graphs and det.device.type == "cuda" else PARTS + EAGER_PARTS
    with timed_parts(ts, det.device, spent, parts):
        t0 = time.perf_counter()
        for _ in range(calls):
            call()
        parted = (time.perf_counter() - t0) / calls
    t0 = time.perf_counter()
    for _ in range(calls):
        call()
    if det.device.type == "cuda":
        torch.cuda.synchronize(det.device)
    plain = (time.perf_counter() - t0) / calls
    return {"batch": n, "kind": kind, "mode": mode, "seconds_per_call": plain,
            "days_per_s": n / plain, "ops_per_call": sum(counter.ops.values()),
            "top_ops": counter.ops.most_common(12),
            "parts_ms": {k: 1e3 * v / calls for k, v in spent.items()},
            "seconds_per_call_synchronised_parts": parted}


def _max_diff(a: tuple[dict[str, np.ndarray], dict[str, np.ndarray]],
              b: tuple[dict[str, np.ndarray], dict[str, np.ndarray]]) -> float:
    """Largest absolute difference of the scores and the new state (NaN where both are)."""
    worst = 0.0
    for x, y in ((a[0]["score"], b[0]["score"]), *((a[1][f], b[1][f]) for f in a[1])):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        both = np.isnan(x) & np.isnan(y)
        d = np.abs(np.where(both, 0.0, x - y))
        worst = max(worst, float(np.nanmax(d, initial=0.0)),
                    float("inf") if (np.isnan(x) != np.isnan(y)).any() else 0.0)
    return worst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--sizes", default="256,4096,65536")
    p.add_argument("--calls", type=int, default=10, help="timed calls per size and kind")
    p.add_argument("--model", help="checkpoint (default: the benchmarks' small detector)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's own)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from meterwatch.model import Detector, HouseholdState
    from meterwatch.model import torch_scoring as ts

    det = Detector.load(common.detector_path(args.model), device=args.device, dtype=args.dtype)
    det.torch_scoring = True
    sizes = [int(s) for s in args.sizes.split(",")]
    # enough households that no household-day repeats (14 days each)
    kwh_all, day_all, ids_all = make_inputs(max(sizes),
                                            pool_households=max(2000, -(-max(sizes) // 14)))
    pool = min(len(day_all), 28_000)
    st0 = det.score(kwh_all[:pool], day_all[:pool], ids_all[:pool],
                    HouseholdState.empty(pool)).state
    t0 = time.perf_counter()
    ts.warm_up(det, max(sizes))
    print(f"warm-up for {max(sizes):,} days: {time.perf_counter() - t0:.2f} s"
          + (f", graphs for {sorted(ts._GRAPHS[det].graphs)} rows, device memory reserved "
             f"{torch.cuda.memory_reserved(det.device) / 2**20:,.0f} MiB"
             if det.device.type == "cuda" and det in ts._GRAPHS else ""), flush=True)
    rows: list[dict[str, Any]] = []
    print(f"device {det.device}, dtype {args.dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    for n in sizes:
        state = st0.take(np.arange(n) % pool)
        kwh, day, ids = kwh_all[:n], day_all[:n], ids_all[:n]
        keys = np.asarray(ids)
        kinds: dict[str, Callable[[], Any]] = {
            # one day per household: every row its own household
            "one-day": lambda kwh=kwh, day=day, ids=ids, state=state:
                ts.score_batch(det, kwh, day, ids, None, state, detail_rows="alerts"),
            # the pool's households' fourteen days each, scanned in date order
            "14-days": lambda kwh=kwh, day=day, ids=ids, keys=keys, state=state:
                ts.score_batch(det, kwh, day, ids, keys, state, detail_rows="alerts"),
        }
        for kind, call in kinds.items():
            reference = None
            for mode in (("graphs", "eager") if det.device.type == "cuda" else ("eager",)):
                det.cuda_graphs = mode == "graphs"
                result = call()  # warm (on a GPU with graphs: the capture)
                if reference is None:
                    reference = result
                row = measure(det, ts, call, n, kind, mode, args.calls)
                row["max_abs_diff_vs_first_mode"] = _max_diff(result, reference)
                if mode == "graphs" and not det.cuda_graphs:
                    row["note"] = "capture failed: ran without graphs"
                rows.append(row)
                parts = ", ".join(f"{k} {v:.2f}" for k, v in row["parts_ms"].items())
                print(f"{kind:8s} {mode:6s} {n:>9,}: {1e3 * row['seconds_per_call']:8.2f} "
                      f"ms/call, {row['days_per_s']:>12,.0f} days/s, "
                      f"{row['ops_per_call']:,} torch ops; parts (ms, synchronised): {parts}; "
                      f"max diff {row['max_abs_diff_vs_first_mode']:.2g}"
                      + (f"; {row['note']}" if "note" in row else ""), flush=True)
        if det.device.type == "cuda":
            print(f"  device memory after {n:,}: allocated "
                  f"{torch.cuda.memory_allocated(det.device) / 2**20:,.0f} MiB, reserved "
                  f"{torch.cuda.memory_reserved(det.device) / 2**20:,.0f} MiB", flush=True)
    det.cuda_graphs = True

    n = sizes[-1]
    state = st0.take(np.arange(n) % pool)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if det.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            ts.score_batch(det, kwh_all[:n], day_all[:n], ids_all[:n], None, state,
                           detail_rows="alerts")
    table = {"self_cpu_time_total": prof.key_averages().table(
        sort_by="self_cpu_time_total", row_limit=25)}
    if det.device.type == "cuda":  # the key's name moved between torch versions
        for sort in ("self_device_time_total", "self_cuda_time_total"):
            with contextlib.suppress(Exception):
                table[sort] = prof.key_averages().table(sort_by=sort, row_limit=25)
                break
    for sort, text in table.items():
        print(f"\ntorch.profiler, 3 one-day calls of {n:,} days, by {sort}:\n{text}",
              flush=True)
    common.save_result("gpu_profile", {"params": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
