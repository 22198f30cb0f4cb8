"""Scale-out: 1, 2, 4 ... service processes in one consumer group on one pre-produced topic.

The topic (``--households`` x ``--days`` readings, ``--partitions`` partitions, 8 by default)
is produced once. For each process count the processes (``python -m meterwatch.stream.cli run``,
METERWATCH_* variables) start together with a fresh group and fresh output topics; their
/metrics are sampled every 0.25 s until every household-day is scored. Reported per count:

* ``steady``: readings/s between 10 % and 90 % of the household-days scored (group joins and the
  last stragglers left out; a rebalance inside that window stays in, as it would in life);
* ``wall``: readings / (first record consumed -> last day scored);
* per process: ``steady`` / processes, and the rebalances the processes saw.

A process count above the CPU count cannot scale (here: 2 cores); ``--processes 1,2,4,8``
on a larger machine.

    python -m benchmarks.scaleout [--processes 1,2] [--households 2000 --days 14]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import time
from typing import Any

import numpy as np

from benchmarks import common
from meterwatch.stream.testing import ServiceProcess


def run_group(b: Any, topic: str, model_path: Any, n: int, days: int, readings: int,
              timeout_s: float, log_dir: Any, **overrides: Any) -> dict[str, Any]:
    tag = common.new_tag()
    settings = common.bench_settings(b, tag, input_topic=topic, **overrides)
    procs = [ServiceProcess(settings, model_path, log_dir / f"p{n}-{i}.log",
                                env={"METERWATCH_CLIENT_ID": f"mw-{tag}-{i}"})
             for i in range(n)]
    t_start = time.perf_counter()
    for p in procs:
        p.start()
    series: list[tuple[float, float, float]] = []  # (t, readings, days)
    rebalances = 0.0
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            now = time.perf_counter()
            ms = [common.scrape(p.port) for p in procs]
            for p in procs:
                assert p.proc is not None
                if p.proc.poll() is not None:
                    raise RuntimeError(f"a service exited with {p.proc.returncode}: "
                                       f"{p.log_path}")
            r = sum(m.get("meterwatch_readings_total", 0.0) for m in ms)
            d = sum(m.get("meterwatch_days_scored_total", 0.0) for m in ms)
            rebalances = sum(m.get("meterwatch_rebalances_total", 0.0) for m in ms)
            series.append((now - t_start, r, d))
            if d >= days:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{n} processes: {d:,.0f} of {days:,} days after "
                                   f"{timeout_s:.0f} s")
            time.sleep(0.25)
        per_proc = [m.get("meterwatch_readings_total", 0.0) for m in ms]
    finally:
        for p in procs:  # SIGTERM all, then wait for each
            if p.proc is not None and p.proc.poll() is None:
                p.proc.send_signal(signal.SIGTERM)
        for p in procs:
            p.terminate(60)
    t = np.array([s[0] for s in series])
    rd = np.array([s[1] for s in series])
    # Progress is counted in days scored (x 48 readings): readings a new owner replays after a
    # rebalance are counted again by meterwatch_readings_total, days are scored once.
    dd = np.maximum.accumulate(np.array([s[2] for s in series]))
    first = t[np.argmax(rd > 0)]
    t10 = float(np.interp(0.1 * days, dd, t))
    t90 = float(np.interp(0.9 * days, dd, t))
    steady = 0.8 * readings / (t90 - t10)
    wall = readings / (t[-1] - first)
    return {"processes": n, "steady_readings_per_s": steady, "wall_readings_per_s": wall,
            "per_process_readings_per_s": steady / n, "seconds_first_to_done": t[-1] - first,
            "seconds_start_to_first_record": first, "rebalances": rebalances,
            "readings_consumed": float(rd[-1]), "readings_replayed": float(rd[-1]) - readings,
            "readings_per_process": per_proc, "days_scored": float(series[-1][2]),
            "series": [list(map(float, s)) for s in series]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", default="1,2", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--households", type=int, default=2000)
    p.add_argument("--days", type=int, default=14)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--producers", type=int, default=2)
    p.add_argument("--timeout-s", type=float, default=240.0, help="per process count")
    p.add_argument("--repeats", type=int, default=2, help="rounds over the process counts")
    p.add_argument("--model", help="detector checkpoint (default: train a small one)")
    p.add_argument("--device", default="cpu", help="the services' METERWATCH_DEVICE")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    model_path = common.detector_path(args.model)
    log_dir = common.SCRATCH / "scaleout"
    days = args.households * args.days
    readings = days * 48
    rows = []
    with common.broker() as b:
        topic = f"scaleout-{common.new_tag()}"
        data = common.stream_data(args.households, args.days)
        wl = common.build_workload(data, topic, args.partitions)
        del data
        prod = common.produce_bulk(b.bootstrap_servers, wl, processes=args.producers)
        hw = asyncio.run(common.highwaters(b.bootstrap_servers, topic))
        assert sum(hw.values()) == readings, (hw, readings)
        del wl
        print(f"produced {prod['records']:,} readings to {args.partitions} partitions in "
              f"{prod['seconds']:.1f} s", flush=True)
        for rep, n in [(i, n) for i in range(args.repeats) for n in args.processes]:
            r = run_group(b, topic, model_path, n, days, readings, args.timeout_s, log_dir,
                          device=args.device)
            r["repeat"] = rep + 1
            rows.append(r)
            print(f"  {n} process(es): {r['steady_readings_per_s']:,.0f} readings/s steady, "
                  f"{r['wall_readings_per_s']:,.0f} wall, {r['rebalances']:.0f} rebalances",
                  flush=True)
    summary = []
    for n in args.processes:
        mine = [r for r in rows if r["processes"] == n]
        summary.append({"processes": n,
                        "steady_readings_per_s": float(np.median(
                            [r["steady_readings_per_s"] for r in mine])),
                        "wall_readings_per_s": float(np.median(
                            [r["wall_readings_per_s"] for r in mine])),
                        "rebalances": float(np.median([r["rebalances"] for r in mine])),
                        "replayed": float(np.median([r["readings_replayed"] for r in mine])),
                        "runs": [r["steady_readings_per_s"] for r in mine]})
    for srow in summary:
        srow["per_process_readings_per_s"] = srow["steady_readings_per_s"] / srow["processes"]
        srow["speedup"] = srow["steady_readings_per_s"] / summary[0]["steady_readings_per_s"]
    print()
    print(common.table([{"processes": r["processes"], "readings/s (10-90%, median)":
                         r["steady_readings_per_s"], "readings/s (wall)": r["wall_readings_per_s"],
                         "per process": r["per_process_readings_per_s"],
                         "speedup": r["speedup"], "rebalances": r["rebalances"],
                         "readings replayed": r["replayed"],
                         "each run": ", ".join(f"{x:,.0f}" for x in r["runs"])}
                        for r in summary]))
    cpus = os.cpu_count() or 1
    if max(args.processes) >= cpus:
        print(f"\n{cpus} CPUs here (broker and services share them): no room to scale past "
              f"{max(1, cpus // 2)} process(es); run `--processes 1,2,4` on a larger machine")
    common.save_result("scaleout", {"params": {"processes": args.processes,
                                               "households": args.households,
                                               "days": args.days, "partitions": args.partitions,
                                               "readings": readings, "device": args.device,
                                               "model": str(model_path)},
                                    "produce": prod, "rows": rows, "summary": summary,
                                    "best_processes": max(
                                        summary, key=lambda r: r["steady_readings_per_s"])[
                                        "processes"]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
