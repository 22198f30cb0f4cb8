"""Cost of validation in ``parse_records``: valid records with and without the key check, in
Schema Registry framing, as Kafka Connect's JsonConverter writes a JDBC source's rows, JSON
arrays, and the fuzz suite's hostile records, in one run
(ratios are what to compare).

    .venv/bin/python -m benchmarks.ingest [--reps 60]

Each case parses batches of 5,000 records (the service's default fetch) and reports the
median CPU time per batch (``time.process_time``, less disturbed than wall time on a shared
machine) as records/s and readings/s.
"""

from __future__ import annotations

import argparse
import gc
import random
import time
from collections.abc import Callable, Sequence

import numpy as np
import orjson

from meterwatch.model import SyntheticConfig, generate
from meterwatch.stream.parse import parse_records
from meterwatch.stream.simulate import day_records, ts_text
from meterwatch.stream.validation import check_ts

BATCH = 5000


def _median_cpu(f: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.process_time()
        f()
        times.append(time.process_time() - t0)
    return float(np.median(times))


def _case(name: str, values: Sequence[bytes | None], keys: Sequence[bytes | None] | None,
          reps: int, base: float | None) -> float:
    now = time.time()
    readings = len(parse_records(values, now_s=now, keys=keys))
    t = _median_cpu(lambda: parse_records(values, now_s=now, keys=keys), reps)
    ratio = f"  x{base / t:.2f} of the first case" if base else ""
    print(f"{name:<42} {len(values) / t / 1e3:8.0f} k records/s  "
          f"{readings / t / 1e3:8.0f} k readings/s{ratio}")
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=60)
    args = ap.parse_args()
    data = generate(SyntheticConfig(n_households=200, n_days=2, seed=1))
    rng = np.random.default_rng(0)
    compact = list(day_records(data, 0, rng, array_fraction=0.0))[:BATCH]
    mixed = list(day_records(data, 1, rng, array_fraction=0.1))[:BATCH]

    from tests.test_fuzz import hostile_record  # the fuzz suite's generator

    prng = random.Random(15)
    day0 = int(data.days[0])
    hostile = [hostile_record(prng, i, list(data.household_ids),
                              lambda: ts_text(day0 * 86400 + prng.randrange(48) * 1800))
               for i in range(BATCH) if i % 10_000 not in (4_999, 9_999)]
    gc.freeze()
    gc.set_threshold(50_000)
    print(f"batches of {BATCH} records, median CPU time of {args.reps} repetitions")
    base = _case("compact one-reading records, keys checked", [v for _, v, _ in compact],
                 [k for k, _, _ in compact], args.reps, None)
    _case("compact one-reading records, no key check", [v for _, v, _ in compact], None,
          args.reps, base)
    head = b"\x00\x00\x00\x00\x07"
    _case("the same, in Schema Registry framing", [head + v for _, v, _ in compact],
          [k for k, _, _ in compact], args.reps, base)
    _case("framed, keys framed too (JSON strings)", [head + v for _, v, _ in compact],
          [head + orjson.dumps(k.decode()) for k, _, _ in compact], args.reps, base)
    from tests.test_connect_json import connect_key, decimal, jdbc_record

    docs = [orjson.loads(v) for _, v, _ in compact]
    _case("Kafka Connect: JDBC rows in envelopes", [
        jdbc_record(d["household_id"], check_ts(d["ts"])[0] * 1000, decimal(d["kwh"]))
        for d in docs], [connect_key(k, schemas=True) for k, _, _ in compact], args.reps, base)
    _case("10% of households as 12-reading arrays", [v for _, v, _ in mixed],
          [k for k, _, _ in mixed], args.reps, base)
    _case("hostile records (fuzz suite, 35 kinds)", [h.value for h in hostile],
          [h.key for h in hostile], max(5, args.reps // 4), base)


if __name__ == "__main__":
    main()
