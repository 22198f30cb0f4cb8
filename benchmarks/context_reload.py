"""How long scoring waits when the context files change (``Scorer.update_tables``).

The service holds the batch lock while the scorer takes the changed context tables
(``stream.lifecycle``), and the first batch after them builds the household index anew when
the household information changed. For each scorer (a worker thread, a scorer process),
with ``--households`` households in the household table: the update that sends every table
(what the first version did on every change) and the one that sends one more day of weather
(what a daily weather feed causes), each followed by the first batch of 1,000 days scored
after it; and the comparison of the tables that finds what changed (off the event loop).

    python -m benchmarks.context_reload --model-path model.pt
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import time
from collections.abc import Awaitable
from pathlib import Path

import numpy as np
import torch

from meterwatch.model import ContextTables, Detector, HouseholdState
from meterwatch.stream.scorer import Scorer

DAYS = 1_000  # in the batch scored after each update


async def _seconds(step: Awaitable[object]) -> float:
    t0 = time.perf_counter()
    await step
    return time.perf_counter() - t0


async def main(path: Path, households: int) -> None:
    torch.set_num_threads(1)
    ids = [f"MAC{i:07d}" for i in range(households)]
    weather = np.arange(15_000, 16_500, dtype=np.int32)
    tables = ContextTables(acorn_group=dict.fromkeys(ids, "Affluent"),
                           tariff=dict.fromkeys(ids, "Std"), weather_day=weather,
                           temp_max=np.full(len(weather), 12.0, np.float32),
                           temp_min=np.full(len(weather), 4.0, np.float32))
    tomorrow = dataclasses.replace(
        tables, weather_day=np.append(weather, weather[-1] + 1),
        temp_max=np.append(tables.temp_max, np.float32(13.0)),
        temp_min=np.append(tables.temp_min, np.float32(5.0)))
    rng = np.random.default_rng(0)
    kwh = rng.random((DAYS, 48)).astype(np.float32)
    day = np.full(DAYS, 15_800, np.int32)
    keys = np.arange(DAYS, dtype=np.int64)
    state = dict(vars(HouseholdState.empty(DAYS)))
    for process in (False, True):
        scorer = Scorer(Detector.load(path, device="cpu"), None, process=process,
                        torch_threads=1)
        await scorer.start()

        def batch(scorer: Scorer = scorer) -> Awaitable[object]:
            return scorer.score(kwh, day, ids[:DAYS], keys, state)

        try:
            usual = await _seconds(batch())
            every = await _seconds(scorer.update_tables(ContextTables.empty().changed(tables)))
            first = await _seconds(batch())
            assert scorer.tables is not None
            t0 = time.perf_counter()
            parts = scorer.tables.changed(tomorrow)
            compare = time.perf_counter() - t0
            assert set(parts) == {"weather_day", "temp_max", "temp_min"}, set(parts)
            weather_only = await _seconds(scorer.update_tables(parts))
            after = await _seconds(batch())
        finally:
            await scorer.stop()
        kind = "process" if process else "thread"
        print(f"{kind:7} {households:,} households: a batch {usual:.3f} s; every table: "
              f"update {every:.3f} s, next batch {first:.3f} s; one more day of weather: "
              f"update {weather_only:.3f} s, next batch {after:.3f} s (the comparison, off "
              f"the event loop: {compare:.3f} s)", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", type=Path, required=True)
    ap.add_argument("--households", type=int, default=1_000_000)
    args = ap.parse_args()
    asyncio.run(main(args.model_path, args.households))
