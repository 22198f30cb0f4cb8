"""Memory of day assembly (issue 11 item 6, issue 15 item 5), three measurements:

1. **open days**: RSS growth of a ``DayAssembler`` holding N households (1 M), each with one
   open household-day, and where the bytes go (target: at most 300 bytes per open
   household-day, household table included);
2. **one-reading households**: N never-seen households with one reading each (a hostile or
   churning input): RSS high-water mark while their days are open, after the watermark
   closed them (reported incomplete), after the idle households were evicted, and after
   another N new households arrived (their indices and rows reuse the freed ones);
3. **pending documents**: what one closed day costs while its output documents wait for
   acknowledgement, as the service builds them (``stream.alerts.build_documents`` then
   ``stream.outputs.json_record`` for the day score and the data-quality record).

Parsed columns are fed directly (``stream.parse.ParsedBatch`` built here, in chunks), so
nothing but the assembler's own state stays alive. RSS (psutil) is read after a garbage
collection; the breakdown adds up the assembler's arrays (``nbytes``)::

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
DAY0 = 15_765  # 2013-03-01


def rss() -> int:
    gc.collect()
    return int(psutil.Process().memory_info().rss)


def peak_rss() -> int:
    """High-water mark of this process (Linux ``VmHWM``; RSS elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss()


def breakdown(asm: Any, n: int) -> list[dict[str, Any]]:
    hh = asm.households
    ix = hh.index
    rows: list[dict[str, Any]] = []

    def add(group: str, part: str, nbytes: int, note: str = "") -> None:
        rows.append({"group": group, "part": part, "bytes": int(nbytes),
                     "bytes_per_household_day": nbytes / n, "note": note})

    cap = len(asm.row_hh)
    add("day rows", "kwh (48 x uint16, 1/10,000 kWh; 65535 = missing)", asm.kwh.nbytes,
        f"capacity {cap:,} rows")
    kind = lambda c: "3-byte" if c.wide is None else str(c.wide.dtype)  # noqa: E731
    add("day rows", f"row_hh ({kind(asm.row_hh)}), row_day ({asm.row_day.values.dtype} above "
        "a base); "
        "readings counted from the slots",
        asm.row_hh.nbytes + asm.row_day.nbytes)
    kinds = "/".join(sorted({str(asm.row_first.values.dtype),
                             str(asm.row_last_ts.values.dtype)}))
    add("day rows", f"row_first/row_last_ts ({kinds} above a base)",
        asm.row_first.nbytes + asm.row_last_ts.nbytes)
    add("day rows", "free-row stack (int32)", asm._free.nbytes)
    add("day rows", "float32 rows (_wide)", sys.getsizeof(asm._wide) + 4 * 48 * len(asm._wide),
        f"{len(asm._wide):,} rows")
    hcap = ix.capacity()
    add("household ids", f"hash table ({kind(ix._table)} slots)", ix._table.nbytes,
        f"{len(ix._table):,} slots, load <= 0.7")
    add("household ids", f"hash tag (uint8), offset ({kind(ix.offset)}), "
        f"length ({ix.length.dtype})",
        ix.tag.nbytes + ix.offset.nbytes + ix.length.nbytes, f"capacity {hcap:,}")
    add("household ids", "id bytes (arena)", ix._arena.nbytes,
        f"{ix._arena_used:,} bytes used")
    add("household table", f"open_row ({kind(hh.open_row)}), closed_max/seq "
        f"({hh.closed_max.values.dtype}, {hh.seq.values.dtype}), reads (uint8)",
        hh.open_row.nbytes + hh.closed_max.nbytes + hh.seq.nbytes + hh.reads.nbytes)
    from meterwatch.model.sustained import COLUMN_PREFIX, STATE_BYTES

    day_model = {k: v for k, v in hh.state.items() if not k.startswith(COLUMN_PREFIX)}
    scal = {k: v for k, v in day_model.items() if v.ndim == 1}
    vec = {k: v for k, v in day_model.items() if v.ndim > 1}
    sus = {k: v for k, v in hh.state.items() if k.startswith(COLUMN_PREFIX)}
    kinds = "/".join(sorted({str(v.dtype) for v in scal.values()}))
    add("household table", f"model state: {len(scal)} scalar columns ({kinds})",
        sum(v.nbytes for v in scal.values()), ", ".join(scal))
    add("household table", f"model state: {len(vec)} (N, 12) columns (float16)",
        sum(v.nbytes for v in vec.values()), ", ".join(vec))
    add("household table", f"sustained state: {len(sus)} columns, {STATE_BYTES} B "
        "(float16, int16, uint16 days)", sum(v.nbytes for v in sus.values()),
        ", ".join(k.removeprefix(COLUMN_PREFIX) for k in sus))
    return rows


def feed(asm: Any, lo: int, n: int, k: int, chunk: int, day: int, prefix: str = "SYN") -> int:
    """Households ``lo .. lo+n`` with ``k`` readings each of ``day``; returns days closed."""
    from meterwatch.stream.parse import ParsedBatch

    closed = 0
    base_ts = day * 86_400
    for a in range(lo, lo + n, chunk):
        m = min(chunk, lo + n - a)
        ids = [f"{prefix}{i:08d}" for i in range(a, a + m)]
        batch = ParsedBatch(ids=ids, id_index=np.repeat(np.arange(m, dtype=np.int32), k),
                            ts=base_ts + np.tile(np.arange(k), m).astype(np.int64) * 1800,
                            kwh=np.full(m * k, 0.25, np.float32),
                            record=np.arange(m * k, dtype=np.int32))
        offsets = np.arange(a * k, a * k + m * k, dtype=np.int64)
        stamps = np.full(m * k, base_ts * 1000, dtype=np.int64)
        closed += len(asm.add(batch, offsets, stamps).closed)
        del ids, batch
    return closed


def open_days(n: int, k: int, chunk: int) -> dict[str, Any]:
    from meterwatch.stream.assembler import DayAssembler
    from meterwatch.stream.timegrid import TimeGrid

    before = rss()
    asm = DayAssembler(TimeGrid("UTC"))
    empty = rss()
    t0 = time.perf_counter()
    closed = feed(asm, 0, n, k, chunk, DAY0)
    seconds = time.perf_counter() - t0
    after = rss()
    assert asm.open_days == n and closed == 0, (asm.open_days, closed)
    growth = after - empty
    per_day = growth / n
    parts = breakdown(asm, n)
    accounted = sum(r["bytes"] for r in parts)
    groups: dict[str, int] = {}
    for r in parts:
        groups[r["group"]] = groups.get(r["group"], 0) + r["bytes"]
    print(f"1. {n:,} households, one open day each ({k} readings), fed in {seconds:.1f} s "
          f"({n * k / seconds:,.0f} readings/s)")
    print(f"   RSS: {before / 2**20:,.0f} MiB before, {empty / 2**20:,.0f} MiB with an empty "
          f"assembler, {after / 2**20:,.0f} MiB after: growth {growth / 2**20:,.0f} MiB = "
          f"{per_day:,.0f} bytes per open household-day (target <= {TARGET_BYTES}: "
          f"{'met' if per_day <= TARGET_BYTES else 'NOT met'}); peak RSS "
          f"{peak_rss() / 2**20:,.0f} MiB")
    print(f"   accounted for: {accounted / 2**20:,.0f} MiB ({accounted / growth:.0%} of the "
          f"growth); DayAssembler.memory_bytes() {asm.memory_bytes() / 2**20:,.0f} MiB")
    print()
    print(common.table([{"group": r["group"], "part": r["part"], "MiB": r["bytes"] / 2**20,
                         "bytes/household-day": r["bytes_per_household_day"],
                         "note": r["note"]} for r in parts]))
    print()
    print(common.table([{"group": g, "MiB": v / 2**20, "bytes/household-day": v / n,
                         "share of accounted": v / accounted} for g, v in groups.items()]))
    out = {"rss_before": before, "rss_empty_assembler": empty, "rss_after": after,
           "rss_growth": growth, "bytes_per_household_day": per_day,
           "target_bytes": TARGET_BYTES, "met": per_day <= TARGET_BYTES,
           "feed_seconds": seconds, "accounted_bytes": accounted,
           "assembler_memory_bytes": asm.memory_bytes(), "groups": groups, "breakdown": parts}
    del asm
    return out


def one_reading(n: int, chunk: int, idle_days: int) -> dict[str, Any]:
    """N never-seen households, one reading each; closed by the watermark, evicted, reused."""
    from meterwatch.stream.assembler import DayAssembler
    from meterwatch.stream.timegrid import TimeGrid

    base = rss()
    asm = DayAssembler(TimeGrid("UTC"), idle_evict_days=idle_days)
    t0 = time.perf_counter()
    feed(asm, 0, n, 1, chunk, DAY0, prefix="ONE")
    opened = rss()
    # three households (the watermark quorum) send a whole day idle_days + 3 days later
    # (a household counts for the watermark once it has sent 48 readings): every day closes
    later = DAY0 + idle_days + 3
    closed = feed(asm, 10 * n, 3, 48, chunk, later, prefix="NOW") - 3
    after_close = rss()
    evicted = asm.evict_idle()
    after_evict = rss()
    # churn: another N new households; their ids, rows and state reuse the freed space
    feed(asm, 20 * n, n, 1, chunk, later, prefix="NEW")
    after_churn = rss()
    seconds = time.perf_counter() - t0
    print(f"2. {n:,} never-seen households with one reading each ({seconds:.1f} s in all)")
    print(f"   RSS above the start: {(opened - base) / 2**20:,.0f} MiB with their days open "
          f"({(opened - base) / n:,.0f} B each), {(after_close - base) / 2**20:,.0f} MiB after "
          f"the watermark closed {closed:,} days (incomplete), "
          f"{(after_evict - base) / 2**20:,.0f} MiB after evicting {evicted:,} idle "
          f"households (arrays keep their capacity for reuse), "
          f"{(after_churn - base) / 2**20:,.0f} MiB after {n:,} more new households; "
          f"peak RSS of the process {peak_rss() / 2**20:,.0f} MiB")
    out = {"households": n, "rss_start": base, "rss_open": opened, "rss_closed": after_close,
           "rss_evicted": after_evict, "rss_after_churn": after_churn, "closed": closed,
           "evicted": evicted, "seconds": seconds}
    del asm
    return out


def pending_documents(n: int) -> dict[str, Any]:
    """Bytes one closed (incomplete) day holds while its documents wait for acks."""
    from meterwatch.stream.alerts import build_documents
    from meterwatch.stream.assembler import INCOMPLETE, ClosedDays
    from meterwatch.stream.outputs import json_record
    from meterwatch.stream.timegrid import SLOTS, TimeGrid

    kwh = np.full((n, SLOTS), np.nan, np.float32)
    kwh[:, 0] = 0.25
    days = ClosedDays(np.arange(n, dtype=np.int32), [f"ONE{i:08d}" for i in range(n)],
                      np.full(n, DAY0, np.int32), kwh, np.full(n, INCOMPLETE, np.uint8),
                      np.ones(n, np.int16), np.full(n, 48, np.int16), np.arange(n),
                      np.zeros(n, np.int64), np.ones(n, np.int64))
    before = rss()
    docs = build_documents(days, None, days.seq, threshold=5.0, model_version="bench",
                           signal_names=("model",), grid=TimeGrid(), top_slots=6)
    with_docs = rss()
    records = [json_record("scores", 0, d.household_id, d.day_score) for d in docs]
    records += [json_record("dq", 0, d.household_id, d.data_quality) for d in docs]
    with_records = rss()
    value_bytes = sum(len(r.value or b"") for r in records) / n
    del docs
    records_only = rss()
    # the same records with each orjson output copied to a bytes object of its own size
    # (orjson's output keeps the buffer it was written into: ~8 KiB however short)
    del records
    base2 = rss()
    exact = [type(r)(r.topic, r.partition, r.key, memoryview(r.value).tobytes())
             for d in build_documents(days, None, days.seq, threshold=5.0,
                                      model_version="bench", signal_names=("model",),
                                      grid=TimeGrid(), top_slots=6)
             for r in (json_record("scores", 0, d.household_id, d.day_score),
                       json_record("dq", 0, d.household_id, d.data_quality))]
    copied = rss()
    print(f"3. {n:,} closed incomplete days waiting for acknowledgement: documents "
          f"(dicts) {(with_docs - before) / n:,.0f} B/day, plus the encoded records "
          f"{(with_records - with_docs) / n:,.0f} B/day ({value_bytes:,.0f} B of JSON); "
          f"the records alone {(records_only - before) / n:,.0f} B/day; records copied to "
          f"their size {(copied - base2) / n:,.0f} B/day")
    out = {"days": n, "documents_per_day": (with_docs - before) / n,
           "records_per_day": (with_records - with_docs) / n,
           "json_bytes_per_day": value_bytes, "records_only_per_day": (records_only - before) / n,
           "records_copied_per_day": (copied - base2) / n}
    del exact
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--households", type=int, default=1_000_000)
    p.add_argument("--readings", type=int, default=3, help="readings per household (1.)")
    p.add_argument("--chunk", type=int, default=5_000,
                   help="households per ParsedBatch (the service fetches 5,000 records)")
    p.add_argument("--idle-days", type=int, default=60, help="eviction after (2.)")
    p.add_argument("--pending", type=int, default=100_000, help="closed days (3.)")
    p.add_argument("--only", choices=("open", "one-reading", "pending"),
                   help="one measurement (a fresh process gives a clean peak RSS)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    n = args.households
    result: dict[str, Any] = {"params": vars(args)}
    if args.only in (None, "open"):
        result.update(open_days(n, args.readings, args.chunk))
        print()
    if args.only in (None, "one-reading"):
        result["one_reading"] = one_reading(n, args.chunk, args.idle_days)
        print()
    if args.only in (None, "pending"):
        result["pending_documents"] = pending_documents(args.pending)
    common.save_result("memory", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
