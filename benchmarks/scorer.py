"""``Detector.score`` throughput: household-days per second against batch size, FP32 and bf16.

One ``Detector.score`` call per measurement, exactly as ``stream.scorer`` makes it (the
torch path, ``model.torch_scoring``; the numpy reference is timed beside it): readings
(N, 48) and the N households' state in, scores, explanations and new state out, every host
to device copy and back included (on CUDA the detector stages through pinned memory and
synchronises before returning). The network alone (``Detector.reconstruct``) is timed beside
it, to show how much of a call is the network and how much the numpy scoring around it.
Last, the service's own path (``stream.scorer.Scorer``: a worker thread) is timed with an
idle event loop and beside one that parses records, as in the service.

Inputs: synthetic household-days (a pool of real-looking days tiled to the batch size) with
the household state a first scoring pass left behind. Each size is repeated until
``--min-seconds`` have passed (at least once, after one untimed warm-up call at small sizes);
a size whose estimated time would overrun ``--budget-s`` is skipped and reported as such.

    python -m benchmarks.scorer                       # CPU, float32 and bfloat16
    python -m benchmarks.scorer --device cuda         # on a GPU machine
"""

from __future__ import annotations

import argparse
import gc
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import psutil
import torch

from benchmarks import common
from benchmarks.gpu_results import PartialResult

SIZES = (256, 1024, 4096, 16384, 65536, 262144, 1048576)


def make_inputs(n_max: int, pool_households: int = 2000, pool_days: int = 14
                ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    data = common.stream_data(pool_households, pool_days, seed=5)
    ids, day, kwh, _ = data.long()
    reps = -(-n_max // len(day))
    kwh = np.tile(kwh, (reps, 1))[:n_max]
    day = np.tile(day, reps)[:n_max]
    ids = (ids * reps)[:n_max]
    return np.ascontiguousarray(kwh), day, ids


def time_calls(fn: Any, min_seconds: float, max_calls: int, warm: bool) -> tuple[float, int]:
    """Median seconds per call and the number of timed calls."""
    if warm:
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while not times or (time.perf_counter() - start < min_seconds and len(times) < max_calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), len(times)


def time_pair(fa: Any, fb: Any, min_seconds: float, max_calls: int, warm: bool
              ) -> tuple[float, float, int]:
    """Median seconds per call of ``fa`` and of ``fb``, called in alternation."""
    if warm:
        fa()
        fb()
    ta: list[float] = []
    tb: list[float] = []
    start = time.perf_counter()
    while not ta or (time.perf_counter() - start < 2 * min_seconds and len(ta) < max_calls):
        for f, t in ((fa, ta), (fb, tb)) if len(ta) % 2 == 0 else ((fb, tb), (fa, ta)):
            t0 = time.perf_counter()
            f()
            t.append(time.perf_counter() - t0)
    return float(np.median(ta)), float(np.median(tb)), len(ta)


def bench_dtype(path: Any, device: str, dtype: str, sizes: list[int], inputs: Any,
                args: argparse.Namespace, deadline: float,
                sink: Callable[[dict[str, Any]], None] = lambda row: None
                ) -> list[dict[str, Any]]:
    """One row per batch size; each row also goes to ``sink`` as soon as it is measured."""
    from meterwatch.model import Detector, HouseholdState

    det = Detector.load(path, device=device, dtype=dtype)
    kwh_all, day_all, ids_all = inputs
    # household state as scoring leaves it (one pass over the pool)
    pool = min(len(day_all), 28_000)
    st0 = det.score(kwh_all[:pool], day_all[:pool], ids_all[:pool],
                    HouseholdState.empty(pool)).state
    rows: list[dict[str, Any]] = []
    rate = None
    for n in sizes:
        row: dict[str, Any] = {"device": str(det.device), "dtype": dtype, "batch": n}
        remaining = deadline - time.monotonic()
        if rate is not None and 2.5 * n / rate > remaining:
            row["skipped"] = f"time budget ({remaining:.0f} s left, ~{n / rate:.0f} s a call)"
            rows.append(row)
            sink(row)
            print(f"  {dtype:9s} {n:>9,}  skipped: {row['skipped']}", flush=True)
            continue
        idx = np.arange(n) % pool
        state = st0.take(idx)
        kwh, day, ids = kwh_all[:n], day_all[:n], ids_all[:n]
        rss0 = psutil.Process().memory_info().rss
        def call(flag: bool, kwh=kwh, day=day, ids=ids, state=state) -> None:
            det.torch_scoring = flag
            det.score(kwh, day, ids, state)

        try:
            # the torch path and the numpy reference (the path before model.torch_scoring)
            # in alternation, so a busy moment of a shared machine hits both alike
            if n <= args.numpy_max:
                sec, np_sec, calls = time_pair(lambda: call(True), lambda: call(False),
                                               args.min_seconds, args.max_calls,
                                               warm=n <= 65536)
            else:
                sec, calls = time_calls(lambda: call(True), args.min_seconds, args.max_calls,
                                        warm=False)
                np_sec = float("nan")
            det.torch_scoring = True
        except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
            row["skipped"] = f"out of memory: {type(exc).__name__}"
            rows.append(row)
            sink(row)
            print(f"  {dtype:9s} {n:>9,}  {row['skipped']}", flush=True)
            break
        rate = n / sec
        copy_sec = 0.0
        if det.device.type == "cuda":  # the host<->device copies of a call, alone
            def copies(kwh=kwh, state=state) -> None:
                dk = torch.from_numpy(np.ascontiguousarray(kwh)).to(det.device)
                ds = [torch.from_numpy(np.ascontiguousarray(getattr(state, f))).to(det.device)
                      for f in ("level", "profile_mean", "profile_var")]
                dk.cpu(), [t.cpu() for t in ds]
            copy_sec, _ = time_calls(copies, args.min_seconds / 2, args.max_calls, warm=True)
        x = np.nan_to_num(kwh, nan=0.0).astype(np.float32)
        ctx = np.zeros((n, det.config.n_context), np.float32)
        net_sec, _ = time_calls(lambda x=x, ctx=ctx: det.reconstruct(x, ctx),
                                args.min_seconds / 2, args.max_calls, warm=n <= 65536)
        row.update(seconds_per_call=sec, calls=calls, days_per_s=rate,
                   numpy_seconds_per_call=np_sec, numpy_days_per_s=n / np_sec,
                   speedup_vs_numpy=np_sec / sec, copy_seconds=copy_sec,
                   network_days_per_s=n / net_sec, network_share=net_sec / sec,
                   scoring_share=max(0.0, sec - net_sec - copy_sec) / sec,
                   peak_rss_gib=max(psutil.Process().memory_info().rss, rss0) / 2**30)
        if det.device.type == "cuda":
            row["cuda_peak_gib"] = torch.cuda.max_memory_allocated(det.device) / 2**30
            torch.cuda.reset_peak_memory_stats(det.device)
        rows.append(row)
        sink(row)
        print(f"  {dtype:9s} {n:>9,}  {rate:>12,.0f} days/s  (numpy reference "
              f"{n / np_sec:>10,.0f}/s; network alone {n / net_sec:>12,.0f}/s, "
              f"{net_sec / sec:.0%} of a call; {calls} calls)", flush=True)
        gc.collect()
    return rows


async def _contention(path: Any, sizes: list[int], inputs: Any, reps: int
                      ) -> list[dict[str, Any]]:
    """``stream.scorer.Scorer.score`` (the worker thread the service uses) timed with an idle
    event loop and beside an event loop that parses records (``stream.parse.parse_records``
    on 5,000-record fetches), as the service's does while it scores."""
    import asyncio

    from meterwatch.model import Detector, HouseholdState
    from meterwatch.stream.parse import parse_records
    from meterwatch.stream.scorer import STATE_FIELDS, Scorer

    det = Detector.load(path, device="cpu")
    data = common.stream_data(200, 1)
    _, values = common.day_values(data, 0)
    values = values[:5000]
    kwh_all, day_all, ids_all = inputs

    async def busy(stop: asyncio.Event) -> None:
        while not stop.is_set():
            parse_records(values, now_s=time.time())
            await asyncio.sleep(0)

    rows = []
    for n in sizes:
        st = HouseholdState.empty(n)
        state = {k: getattr(st, k) for k in STATE_FIELDS}
        keys = np.arange(n, dtype=np.int64)
        row: dict[str, Any] = {"batch": n}
        for label in ("idle", "busy", "busy_process"):
            scorer = Scorer(det, process=label == "busy_process")
            await scorer.start()
            stop = asyncio.Event()
            task = asyncio.create_task(busy(stop)) if label != "idle" else None
            await asyncio.sleep(0.05)
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                await scorer.score(kwh_all[:n], day_all[:n], ids_all[:n], keys, state)
                times.append(time.perf_counter() - t0)
            stop.set()
            if task is not None:
                await task
            scorer.close()
            row[f"{label}_ms"] = float(np.median(times) * 1e3)
        row["slowdown"] = row["busy_ms"] / row["idle_ms"]
        row["slowdown_process"] = row["busy_process_ms"] / row["idle_ms"]
        rows.append(row)
        print(f"  Scorer.score {n:>6,} days: {row['idle_ms']:8.1f} ms idle, "
              f"{row['busy_ms']:8.1f} ms beside a parsing event loop "
              f"({row['slowdown']:.1f}x), {row['busy_process_ms']:8.1f} ms in a scorer "
              f"process ({row['slowdown_process']:.1f}x)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)))
    p.add_argument("--model", help="detector checkpoint (default: train a small one)")
    p.add_argument("--min-seconds", type=float, default=1.0)
    p.add_argument("--max-calls", type=int, default=20)
    p.add_argument("--budget-s", type=float, default=240.0,
                   help="skip sizes that would overrun this many seconds in all")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--numpy-max", type=int, default=262144,
                   help="time the numpy reference beside the torch path up to this batch")
    p.add_argument("--compare-threads", type=int, default=1,
                   help="float32 again (sizes up to 65,536) on this many torch threads; 0: no")
    p.add_argument("--no-contention", dest="contention", action="store_false",
                   help="skip the worker-thread contention check")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    np.seterr(all="ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here: run with --device cuda on a GPU machine")
        return 2
    path = common.detector_path(args.model)
    sizes = [int(s) for s in args.sizes.split(",")]
    dtypes = args.dtypes.split(",")
    avail = psutil.virtual_memory().available
    # ~3 KB of host memory per day in a call (inputs, intermediates, outputs); keep a margin
    fit = [n for n in sizes if n * 3072 * 2 < avail]
    if len(fit) < len(sizes):
        print(f"sizes above {max(fit):,} skipped: {avail / 2**30:.0f} GiB available")
    t0 = time.perf_counter()
    inputs = make_inputs(max(fit))
    print(f"inputs: {max(fit):,} household-days in {time.perf_counter() - t0:.1f} s; "
          f"torch threads {torch.get_num_threads()}, device {args.device}", flush=True)
    deadline = time.monotonic() + args.budget_s
    params = {"device": args.device, "sizes": sizes, "dtypes": dtypes, "model": str(path),
              "torch_threads": torch.get_num_threads(), "min_seconds": args.min_seconds,
              "budget_s": args.budget_s}
    # the file is rewritten after every size, so a run stopped by a time limit keeps its rows
    partial = PartialResult("scorer", params)
    measured: list[dict[str, Any]] = []

    def sink(row: dict[str, Any]) -> None:
        row.setdefault("threads", torch.get_num_threads())
        measured.append(row)
        partial.update(rows=measured)

    rows: list[dict[str, Any]] = []
    for i, dtype in enumerate(dtypes):
        share = (deadline - time.monotonic()) / (len(dtypes) - i)  # split what is left
        rows += bench_dtype(path, args.device, dtype, fit, inputs, args,
                            time.monotonic() + share, sink)
    print()
    if args.compare_threads and args.compare_threads != torch.get_num_threads():
        before = torch.get_num_threads()
        torch.set_num_threads(args.compare_threads)
        print(f"\nfloat32 again with torch.set_num_threads({args.compare_threads}):")
        small = [n for n in fit if n <= 65536]
        rows += bench_dtype(path, args.device, "float32", small, inputs, args,
                            time.monotonic() + 60, sink)
        torch.set_num_threads(before)
    for r in rows:
        r.setdefault("threads", torch.get_num_threads())
    print()
    print(common.table([{"dtype": r["dtype"], "threads": r["threads"], "batch": r["batch"],
                         "days/s": r.get("days_per_s"),
                         "numpy days/s": r.get("numpy_days_per_s"),
                         "network days/s": r.get("network_days_per_s"),
                         "network share": r.get("network_share"),
                         "scoring share": r.get("scoring_share"),
                         "copies": r.get("copy_seconds"),
                         "s/call": r.get("seconds_per_call"),
                         "note": r.get("skipped", "")} for r in rows]))
    contention: list[dict[str, Any]] = []
    if args.contention and not args.device.startswith("cuda"):
        import asyncio

        print("\nscoring in the service's worker thread, idle vs beside a busy event loop:")
        contention = asyncio.run(_contention(path, [1, 256, 4096], inputs, 10))
    default_threads = torch.get_num_threads()
    best = {d: max((r.get("days_per_s", 0) for r in rows
                    if r["dtype"] == d and r["threads"] == default_threads), default=0)
            for d in dtypes}
    for d, v in best.items():
        print(f"best {d}: {v:,.0f} household-days/s")
    if not torch.cuda.is_available():
        print("no GPU on this machine: CPU numbers only; the GPU run is "
              "`python -m benchmarks.scorer --device cuda`")
    partial.finish(rows=rows, best_days_per_s=best, contention=contention)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
