"""A scaled-down backfill through Kafka, and an extrapolation to a year of 5,000 households.

``--households`` x ``--days`` of history (default 1,000 x 60 = 2.88 M readings) are produced
to a topic, then scored by ``--processes`` service processes in one group (default: the best
count of the latest ``benchmarks.scaleout`` run, else 1) from a fresh group, as a backfill
would: every household's days in order, its state carried from day to day. Reported: wall
time from process start to the last day scored (start-up included), the processing time
from the first record, readings/s in all and per process; then the time 87.6 M readings
(1 year x 5,000 households x 48) would take at that rate. The last is an *extrapolation*:
linear in readings, assuming the per-reading cost does not change with more households or
days, and the broker keeps up.

    python -m benchmarks.backfill [--households 1000 --days 60] [--processes 1]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from typing import Any

from benchmarks import common
from benchmarks.scaleout import run_group

TARGET_READINGS = 365 * 5000 * 48  # 87.6 M


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--households", type=int, default=1000)
    p.add_argument("--days", type=int, default=60)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--processes", type=int, help="default: best of the latest scaleout run")
    p.add_argument("--producers", type=int, default=2)
    p.add_argument("--model", help="detector checkpoint (default: train a small one)")
    p.add_argument("--device", default="cpu", help="the services' METERWATCH_DEVICE")
    p.add_argument("--timeout-s", type=float, default=400.0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    source = "--processes"
    if args.processes is None:
        last = common.latest_result("scaleout")
        args.processes = int(last["best_processes"]) if last else 1
        source = (f"best of the scaleout run of {last['date']}" if last
                  else "no scaleout result: 1")
    model_path = common.detector_path(args.model)
    days = args.households * args.days
    readings = days * 48
    with common.broker() as b:
        topic = f"backfill-{common.new_tag()}"
        t0 = time.perf_counter()
        data = common.stream_data(args.households, args.days)
        wl = common.build_workload(data, topic, args.partitions)
        del data
        build_s = time.perf_counter() - t0
        prod = common.produce_bulk(b.bootstrap_servers, wl, processes=args.producers)
        del wl
        hw = asyncio.run(common.highwaters(b.bootstrap_servers, topic))
        assert sum(hw.values()) == readings, (sum(hw.values()), readings)
        print(f"history: {args.households:,} households x {args.days} days = {readings:,} "
              f"readings, produced in {prod['seconds']:.1f} s; scoring with "
              f"{args.processes} process(es) ({source}) ...", flush=True)
        t_start = time.perf_counter()
        r = run_group(b, topic, model_path, args.processes, days, readings, args.timeout_s,
                      common.SCRATCH / "backfill", device=args.device)
        wall = time.perf_counter() - t_start
    rate = readings / r["seconds_first_to_done"]
    wall_rate = readings / (r["seconds_start_to_first_record"] + r["seconds_first_to_done"])
    extrap_s = TARGET_READINGS / rate
    result: dict[str, Any] = {
        "params": {"households": args.households, "days": args.days,
                   "partitions": args.partitions, "processes": args.processes,
                   "processes_source": source, "readings": readings, "household_days": days,
                   "device": args.device, "model": str(model_path)},
        "build_seconds": build_s, "produce": prod,
        "seconds_start_to_done": r["seconds_start_to_first_record"]
        + r["seconds_first_to_done"],
        "seconds_first_record_to_done": r["seconds_first_to_done"],
        "seconds_including_shutdown": wall,
        "readings_per_s": rate, "readings_per_s_with_startup": wall_rate,
        "readings_per_s_per_process": rate / args.processes,
        "days_per_s": days / r["seconds_first_to_done"],
        "steady_readings_per_s": r["steady_readings_per_s"],
        "rebalances": r["rebalances"],
        "extrapolation": {"readings": TARGET_READINGS, "households": 5000, "days": 365,
                          "seconds": extrap_s, "hours": extrap_s / 3600,
                          "basis": "linear in readings at the measured rate (first record to "
                                   "last day scored), same process count"},
        "series": r["series"]}
    print()
    print(common.table([
        {"what": "readings (household-days)", "value": f"{readings:,} ({days:,})"},
        {"what": "processes", "value": str(args.processes)},
        {"what": "start -> last day scored", "value": f"{result['seconds_start_to_done']:.1f} s"},
        {"what": "first record -> last day scored",
         "value": f"{r['seconds_first_to_done']:.1f} s"},
        {"what": "readings/s (per process)",
         "value": f"{rate:,.0f} ({rate / args.processes:,.0f})"},
        {"what": "household-days/s", "value": f"{result['days_per_s']:,.0f}"},
        {"what": "EXTRAPOLATED: 87.6 M readings (1 y x 5,000 households)",
         "value": f"{extrap_s / 60:,.1f} min ({extrap_s / 3600:.2f} h)"}]))
    common.save_result("backfill", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
