"""How long scoring waits for a model swap (``Scorer.swap`` / ``Scorer.swap_shadow``).

The service holds the batch lock while the scorer takes a candidate (``stream.lifecycle``),
so this is the pause a swap adds to the live path. For each scorer (a worker thread, a
scorer process) and each swap: the median, min and max of ``--repeat`` swaps of a copy of
the checkpoint under a new version, after the service's own ``validate`` (done before the
lock, so not timed). With the thread scorer, ``validated=False`` is what the service did
before the second validation was dropped (the worker validated the same object again).

    python -m benchmarks.swap_pause --model-path model.pt
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import torch

from meterwatch.model import Detector
from meterwatch.stream.lifecycle import validate
from meterwatch.stream.scorer import Scorer


async def _time(swap: Callable[[Detector], Awaitable[None]], path: Path, live: Detector,
                repeat: int) -> str:
    times = []
    for i in range(repeat):
        cand = Detector.load(path, device="cpu")
        cand.version = f"candidate-{i}"
        validate(cand, live, None)  # the service's check, before the batch lock
        t0 = time.perf_counter()
        await swap(cand)
        times.append(time.perf_counter() - t0)
    return (f"median {statistics.median(times) * 1000:.1f} ms, min {min(times) * 1000:.1f}, "
            f"max {max(times) * 1000:.1f} (n={repeat})")


async def main(path: Path, repeat: int) -> None:
    torch.set_num_threads(1)
    for process in (False, True):
        live = Detector.load(path, device="cpu")
        shadow = Detector.load(path, device="cpu")
        scorer = Scorer(live, None, process=process, shadow=shadow, torch_threads=1)
        await scorer.start()
        kind = "process" if process else "thread"
        try:
            modes = (False, True) if not process else (True,)
            for validated in modes:
                res = await _time(lambda d, s=scorer, v=validated: s.swap(d, validated=v),
                                  path, live, repeat)
                print(f"{kind} swap        validated={validated!s:5}: {res}", flush=True)
            for validated in modes:
                res = await _time(lambda d, s=scorer, v=validated: s.swap_shadow(d, validated=v),
                                  path, live, repeat)
                print(f"{kind} swap_shadow validated={validated!s:5}: {res}", flush=True)
        finally:
            await scorer.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", type=Path, required=True)
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    asyncio.run(main(args.model_path, args.repeat))
