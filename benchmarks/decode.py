"""What it costs aiokafka to hand out records, and what meterwatch changes about it.

On the reference topic (``benchmarks.throughput``'s workload, produced once), a bare
``getmany`` loop that only counts records runs four ways, alternating, ``--repeats`` times:

- ``plain``: aiokafka as shipped (``ConsumerRecord`` objects, CPython's default GC);
- ``raw``: ``stream.consumer.raw_records`` (aiokafka's decoded records, no ``ConsumerRecord``);
- ``plain-gc`` and ``raw-gc``: the same with the service's garbage-collector settings
  (``stream.service._GcTuning``: gen-0 threshold 50,000, start-up objects frozen).

For each: wall seconds from the first record to the last, and the seconds spent inside
``FetchResult.getall`` (where aiokafka unpacks the records), timed with a wrapper.
torch and the model are imported first, as in the service, so the heap that full
collections walk has the service's size.

    python -m benchmarks.decode [--households 2000 --days 14 --partitions 8 --repeats 2]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from typing import Any

from benchmarks import common
from benchmarks.throughput import _consumer, prepare

KINDS = ("plain", "raw", "plain-gc", "raw-gc")


async def _count(bootstrap: str, topic: str, total: int, kind: str) -> dict[str, float]:
    from aiokafka.consumer import fetcher

    from meterwatch.stream.consumer import raw_records
    from meterwatch.stream.service import _GC

    spent = [0.0]
    original = fetcher.FetchResult.getall

    def timed_getall(self: Any, *a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        try:
            return original(self, *a, **k)
        finally:
            spent[0] += time.perf_counter() - t

    c = _consumer(bootstrap, topic)
    await c.start()
    if kind.startswith("raw"):
        assert raw_records(c)
    if kind.endswith("-gc"):
        _GC.acquire(50_000)
    fetcher.FetchResult.getall = timed_getall  # type: ignore[method-assign]
    n, t_first = 0, None
    try:
        while n < total:
            data = await c.getmany(timeout_ms=1000, max_records=5000)
            if t_first is None and data:
                t_first = time.perf_counter()
            for recs in data.values():
                n += len(recs)
        seconds = time.perf_counter() - (t_first or time.perf_counter())
    finally:
        fetcher.FetchResult.getall = original  # type: ignore[method-assign]
        if kind.endswith("-gc"):
            _GC.release()
        await c.stop()
    return {"kind": kind, "records": n, "seconds": seconds, "getall_seconds": spent[0],
            "records_per_s": n / seconds, "getall_us_per_record": spent[0] / n * 1e6}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.workload_args(p)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import meterwatch.model  # noqa: F401  (the service's heap: torch, numpy, the model code)

    total = args.households * args.days * 48
    runs = []
    with common.broker() as b:
        topic, _, _ = prepare(b, args)
        for rep in range(args.repeats):
            for kind in KINDS:
                r = asyncio.run(_count(b.bootstrap_servers, topic, total, kind))
                r["repeat"] = rep + 1
                runs.append(r)
                print(f"  {kind:9s} #{rep + 1}: {r['records_per_s']:>10,.0f} records/s, "
                      f"getall {r['getall_us_per_record']:.2f} us/record", flush=True)
    print(common.table([{"run": f"{r['kind']}#{r['repeat']}", "records/s": r["records_per_s"],
                         "seconds": r["seconds"], "getall s": r["getall_seconds"],
                         "getall us/record": r["getall_us_per_record"]} for r in runs]))
    common.save_result("decode", {"params": {**vars(args), "records": total,
                                              "broker": b.kind}, "runs": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
