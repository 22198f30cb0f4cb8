"""Memory of day assembly: RSS growth of a ``DayAssembler`` holding N households (1 M), each
with one open household-day, and where the bytes go.

Parsed columns are fed directly (``stream.parse.ParsedBatch`` built here, a few readings per
household, in chunks), so nothing but the assembler's own state stays alive: the household
id strings are created chunk by chunk and only the assembler keeps them. RSS (psutil) is
read after a garbage collection before and after; the breakdown adds up the assembler's
arrays (``nbytes``) and Python containers (``sys.getsizeof``), split into:

* **day rows**: 48 float32 slots + slot bitmap + household + day + count + first offset +
  latest timestamp per open day, at the capacity the row arrays have grown to;
* **household table**: id strings and their list, the id -> index dict (and its int
  values), open row / closed-day bitmap / seq columns, and the model state columns
  (``model.HouseholdState``: 13 fields, two of them (N, 12));

    python -m benchmarks.memory [--households 1000000 --readings 3]
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import time
from typing import Any

import numpy as np
import psutil

from benchmarks import common

TARGET_BYTES = 300


def rss() -> int:
    gc.collect()
    return int(psutil.Process().memory_info().rss)


def deep_list_bytes(items: list[Any]) -> int:
    return sys.getsizeof(items) + sum(sys.getsizeof(x) for x in items)


def breakdown(asm: Any, n: int) -> list[dict[str, Any]]:
    hh = asm.households
    rows: list[dict[str, Any]] = []

    def add(group: str, part: str, nbytes: int, note: str = "") -> None:
        rows.append({"group": group, "part": part, "bytes": int(nbytes),
                     "bytes_per_household_day": nbytes / n, "note": note})

    cap = len(asm.row_hh)
    add("day rows", "kwh (48 x float32)", asm.kwh.nbytes, f"capacity {cap:,} rows")
    add("day rows", "seen bitmap (uint64)", asm.seen.nbytes)
    add("day rows", "row_hh/row_day (int32)", asm.row_hh.nbytes + asm.row_day.nbytes)
    add("day rows", "row_n (int16)", asm.row_n.nbytes)
    add("day rows", "row_first/row_last_ts (int64)",
        asm.row_first.nbytes + asm.row_last_ts.nbytes)
    add("day rows", "free-row list", deep_list_bytes(asm._free),
        f"{len(asm._free):,} free rows")
    add("day rows", "_extra/_repeats dicts",
        sys.getsizeof(asm._extra) + sys.getsizeof(asm._repeats))
    hcap = len(hh.open_row)
    add("household table", "id strings", sum(sys.getsizeof(s) for s in hh.ids),
        f"{len(hh.ids):,} str objects")
    add("household table", "ids list (pointers)", sys.getsizeof(hh.ids))
    add("household table", "index dict", sys.getsizeof(hh.index), "hash table only")
    add("household table", "index values (int objects)",
        sum(sys.getsizeof(v) for v in hh.index.values() if v > 256))
    add("household table", "open_row/closed_max (int32)",
        hh.open_row.nbytes + hh.closed_max.nbytes, f"capacity {hcap:,}")
    add("household table", "closed_mask/seq (int64)", hh.closed_mask.nbytes + hh.seq.nbytes)
    scal = {k: v for k, v in hh.state.items() if v.ndim == 1}
    vec = {k: v for k, v in hh.state.items() if v.ndim > 1}
    add("household table", f"model state: {len(scal)} scalar columns",
        sum(v.nbytes for v in scal.values()), ", ".join(scal))
    add("household table", f"model state: {len(vec)} (N, 12) columns",
        sum(v.nbytes for v in vec.values()), ", ".join(vec))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--households", type=int, default=1_000_000)
    p.add_argument("--readings", type=int, default=3, help="readings per household")
    p.add_argument("--chunk", type=int, default=50_000, help="households per ParsedBatch")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from meterwatch.stream.assembler import DayAssembler
    from meterwatch.stream.parse import ParsedBatch
    from meterwatch.stream.timegrid import TimeGrid

    n, k = args.households, args.readings
    day0 = 15_765  # 2013-03-01
    base_ts = day0 * 86_400
    before = rss()
    asm = DayAssembler(TimeGrid("UTC"))
    empty = rss()
    t0 = time.perf_counter()
    closed = 0
    for lo in range(0, n, args.chunk):
        m = min(args.chunk, n - lo)
        ids = [f"SYN{i:08d}" for i in range(lo, lo + m)]
        household = [h for h in ids for _ in range(k)]
        slots = np.tile(np.arange(k), m)
        batch = ParsedBatch.of(household=household, ts=base_ts + slots.astype(np.int64) * 1800,
                            kwh=np.full(m * k, 0.25, np.float32),
                            record=np.arange(m * k, dtype=np.int32))
        offsets = np.arange(lo * k, lo * k + m * k, dtype=np.int64)
        stamps = np.full(m * k, base_ts * 1000, dtype=np.int64)
        res = asm.add(batch, offsets, stamps)
        closed += len(res.closed)
        del ids, household, batch, res
    seconds = time.perf_counter() - t0
    after = rss()
    assert asm.open_days == n, (asm.open_days, n)
    assert closed == 0
    growth = after - empty
    per_day = growth / n
    parts = breakdown(asm, n)
    accounted = sum(r["bytes"] for r in parts)
    groups: dict[str, int] = {}
    for r in parts:
        groups[r["group"]] = groups.get(r["group"], 0) + r["bytes"]

    print(f"{n:,} households, one open day each ({k} readings), fed in "
          f"{seconds:.1f} s ({n * k / seconds:,.0f} readings/s)")
    print(f"RSS: {before / 2**20:,.0f} MiB before, {empty / 2**20:,.0f} MiB with an empty "
          f"assembler, {after / 2**20:,.0f} MiB after: growth {growth / 2**20:,.0f} MiB = "
          f"{per_day:,.0f} bytes per open household-day (target <= {TARGET_BYTES}: "
          f"{'met' if per_day <= TARGET_BYTES else 'NOT met'})")
    print(f"accounted for: {accounted / 2**20:,.0f} MiB ({accounted / growth:.0%} of the "
          f"growth); DayAssembler.memory_bytes() reports {asm.memory_bytes() / 2**20:,.0f} MiB")
    print()
    print(common.table([{"group": r["group"], "part": r["part"], "MiB": r["bytes"] / 2**20,
                         "bytes/household-day": r["bytes_per_household_day"],
                         "note": r["note"]} for r in parts]))
    print()
    print(common.table([{"group": g, "MiB": v / 2**20, "bytes/household-day": v / n,
                         "share of accounted": v / accounted} for g, v in groups.items()]))
    common.save_result("memory", {
        "params": {"households": n, "readings_per_household": k, "chunk": args.chunk},
        "rss_before": before, "rss_empty_assembler": empty, "rss_after": after,
        "rss_growth": growth, "bytes_per_household_day": per_day,
        "target_bytes": TARGET_BYTES, "met": per_day <= TARGET_BYTES,
        "feed_seconds": seconds, "accounted_bytes": accounted,
        "assembler_memory_bytes": asm.memory_bytes(), "groups": groups, "breakdown": parts})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
