"""A targeted check of graceful shutdown: can ``Service.stop()`` lose days that the score
loop has taken from the batcher but not yet published?

The service's score loop takes a batch (``DynamicBatcher.next_batch``) and then waits for
``_process_lock``; a graceful stop settles the partitions under that lock and commits right
after releasing it. A batch held by the score loop at that moment is in neither the batcher
nor ``inflight``, so the committed offset (and the mark on the state topic) can move past its
days; ``stop()`` then cancels the score loop. If the cancel lands while the batch is being
scored, nothing about those days is ever published, and the next owner does not replay them.

Each trial: a service in-process, a paced producer streaming complete household-days, a
graceful ``stop()`` half-way, a second service on the same group that runs until the stream
is consumed, then the scores topic read back. ``--delay-ms`` adds a sleep to every model
call of the *first* service (its worker thread's ``score`` wrapped here; nothing in ``stream`` is
changed) to stand for a slow or busy model: scoring a few thousand days beside a busy event
loop takes a few hundred ms on this machine (``benchmarks.scorer``), so the window is real.

    python -m benchmarks.shutdown_race [--trials 2 --delay-ms 0,150]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing as mp
import time
from collections import Counter
from typing import Any

import numpy as np

from benchmarks import common
from benchmarks.latency import _paced_producer
from benchmarks.shutdown import read_keys


async def trial(b: Any, model_path: Any, delay_s: float, args: argparse.Namespace
                ) -> dict[str, Any]:
    from meterwatch.model import Detector
    from meterwatch.stream.service import Service

    # the model in a worker thread, so that the delay below can wrap it
    settings = common.bench_settings(b, topic_partitions=args.partitions, commit_interval_s=0.5,
                                     device=args.device, scorer="thread")
    det = Detector.load(model_path, device=args.device)
    days_needed = int(np.ceil(args.rate * args.duration_s / (args.households * 48))) + 1
    ctx = mp.get_context("spawn")
    ready, go, out = ctx.Event(), ctx.Event(), ctx.Queue()
    prod = ctx.Process(target=_paced_producer, args=(
        b.bootstrap_servers, settings.input_topic, args.partitions, args.households,
        days_needed, "household", args.rate, args.duration_s, ready, go, out))
    prod.start()
    first = Service(settings, detector=det)
    await first.start()
    taken_at_stop = None
    try:
        worker = first.scorer._worker if first.scorer is not None else None
        assert worker is not None
        if delay_s:
            orig = worker.score

            def slow(*a: Any) -> Any:
                time.sleep(delay_s)
                return orig(*a)

            worker.score = slow  # type: ignore[method-assign]
        await first.wait_ready(120)
        await asyncio.to_thread(ready.wait, 120)
        expected = (await asyncio.to_thread(out.get, True, 60))["prepared"] // 48
        go.set()
        await asyncio.sleep(args.duration_s / 2)
        reg = first.metrics.registry
        scored_before = common.sample(reg, "meterwatch_days_scored_total")
        backlog = first.batcher.backlog
        taken_at_stop = scored_before
        t0 = time.perf_counter()
        await first.stop()
        stop_s = time.perf_counter() - t0
        scored_first = common.sample(reg, "meterwatch_days_scored_total")
    finally:
        await first.stop()
    second = Service(settings, detector=Detector.load(model_path, device=args.device))
    await second.start()
    try:
        await second.wait_ready(120)
        await asyncio.to_thread(prod.join, args.duration_s + 120)
        await asyncio.to_thread(out.get, True, 30)
        keys = await read_keys(b.bootstrap_servers, settings.scores_topic, expected, 60)
    finally:
        await second.stop()
        if prod.is_alive():
            prod.terminate()
    counts = Counter(keys)
    return {"delay_ms": delay_s * 1e3, "expected_days": expected, "distinct": len(counts),
            "missing": expected - len(counts),
            "duplicated": sum(1 for v in counts.values() if v > 1),
            "stop_seconds": stop_s, "scored_by_first_before_stop": taken_at_stop,
            "scored_by_first": scored_first, "backlog_at_stop": backlog}


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    path = common.detector_path(args.model)
    rows = []
    with common.broker() as b:
        for delay in args.delay_ms:
            for i in range(args.trials):
                r = await trial(b, path, delay / 1e3, args)
                r["trial"] = i + 1
                rows.append(r)
                print(f"  delay {delay:4.0f} ms, trial {i + 1}: {r['missing']:,} of "
                      f"{r['expected_days']:,} days missing, {r['duplicated']} doubled "
                      f"(stop took {r['stop_seconds']:.2f} s, {r['backlog_at_stop']} days "
                      "queued at the stop)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=2, help="graceful stops per delay")
    p.add_argument("--delay-ms", default="0,150", type=lambda s: [float(x) for x in s.split(",")])
    p.add_argument("--rate", type=float, default=20_000)
    p.add_argument("--duration-s", type=float, default=8.0)
    p.add_argument("--households", type=int, default=500)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--model", help="detector checkpoint (default: train a small one)")
    p.add_argument("--device", default="cpu", help="the detector's device: cpu | cuda")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    np.seterr(all="ignore")
    rows = asyncio.run(run(args))
    print()
    print(common.table([{k: r[k] for k in ("delay_ms", "trial", "expected_days", "distinct",
                                            "missing", "duplicated", "stop_seconds",
                                            "backlog_at_stop")} for r in rows]))
    lost = sum(r["missing"] for r in rows)
    print(f"\ndays lost across {len(rows)} graceful stops: {lost:,}")
    common.save_result("shutdown_race", {"params": vars(args), "rows": rows, "lost": lost})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
