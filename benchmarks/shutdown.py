"""Graceful shutdown under load, and nothing lost or doubled across the restart.

1. start a service process (``python -m meterwatch.stream.cli run``, configured by METERWATCH_*
   variables, as a deployment would) and wait until it is ready;
2. stream readings at a steady ``--rate`` from a paced producer process (household order:
   every produced household-day is complete);
3. at evenly spread moments (``--restarts``, 3 by default), send SIGTERM and time how long
   the process takes to exit (it stops fetching, scores and publishes what is pending,
   commits, leaves the group), then start the next process at once (the producer keeps
   going) and time until it is ready;
4. when the producer is done and the last process has caught up, read the scores and alerts
   topics back: every complete household-day exactly once, none missing, every alert that a
   day score carries exactly once; count the recoveries that had to republish alerts
   (``recovery: republishing`` in the logs: a day score published without its alert);
5. SIGTERM the last process (an idle shutdown, for comparison).

    python -m benchmarks.shutdown [--rate 20000 --duration-s 40 --restarts 3]
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
import orjson
from aiokafka import AIOKafkaConsumer

from benchmarks import common
from benchmarks.latency import _paced_producer
from meterwatch.stream.testing import ServiceProcess


async def read_keys(bootstrap: str, topic: str, expected: int, timeout_s: float
                    ) -> list[tuple[str, str]]:
    """(household, date) of every record of ``topic``, once ``expected`` are there or the
    partitions have been read to their highwater with nothing new for 2 s."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                max_partition_fetch_bytes=16 << 20)
    await consumer.start()
    keys: list[tuple[str, str]] = []
    try:
        deadline = time.monotonic() + timeout_s
        quiet = time.monotonic()
        while time.monotonic() < deadline:
            data = await consumer.getmany(timeout_ms=300, max_records=50_000)
            for recs in data.values():
                for r in recs:
                    d = orjson.loads(r.value)
                    keys.append((d["household_id"], d["date"]))
            if any(data.values()):
                quiet = time.monotonic()
            elif time.monotonic() - quiet > 2.0 and len(keys) >= expected:
                ends = [(consumer.highwater(tp), await consumer.position(tp))
                        for tp in consumer.assignment()]
                if all(hw is not None and pos >= hw for hw, pos in ends):
                    break
    finally:
        await consumer.stop()
    return keys


async def read_alerted(bootstrap: str, topic: str) -> set[tuple[str, str]]:
    """(household, date) of the day scores that carry an alert."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                max_partition_fetch_bytes=16 << 20)
    await consumer.start()
    out: set[tuple[str, str]] = set()
    try:
        quiet = time.monotonic()
        while time.monotonic() - quiet < 2.0:
            data = await consumer.getmany(timeout_ms=300, max_records=50_000)
            for recs in data.values():
                for r in recs:
                    d = orjson.loads(r.value)
                    if d.get("alert"):
                        out.add((d["household_id"], d["date"]))
            if any(data.values()):
                quiet = time.monotonic()
    finally:
        await consumer.stop()
    return out


def wait_for(pred: Any, timeout_s: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=20_000, help="readings/s")
    p.add_argument("--duration-s", type=float, default=40.0)
    p.add_argument("--sigterm-at", type=float, default=0.5,
                   help="share of --duration-s (one restart)")
    p.add_argument("--restarts", type=int, default=3,
                   help="SIGTERM/restart cycles, evenly spread over the stream")
    p.add_argument("--households", type=int, default=1000)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--model", help="detector checkpoint (default: train a small one)")
    p.add_argument("--device", default="cpu", help="the services' METERWATCH_DEVICE")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    model_path = common.detector_path(args.model)
    logs = common.SCRATCH / "shutdown"
    days_needed = int(np.ceil(args.rate * args.duration_s / (args.households * 48))) + 1
    with common.broker() as b:
        settings = common.bench_settings(b, topic_partitions=args.partitions,
                                         device=args.device)
        first = ServiceProcess(settings, model_path, logs / "first.log").start()
        ctx = mp.get_context("spawn")
        ready, go, out = ctx.Event(), ctx.Event(), ctx.Queue()
        prod = ctx.Process(target=_paced_producer, args=(
            b.bootstrap_servers, settings.input_topic, args.partitions, args.households,
            days_needed, "household", args.rate, args.duration_s, ready, go, out))
        prod.start()
        cycles: list[dict[str, Any]] = []
        current = first
        procs = [first]
        try:
            first.wait_ready()
            ready.wait(120)
            prepared = out.get(timeout=60)["prepared"]
            expected = prepared // 48
            go.set()
            t_go = time.perf_counter()
            for i in range(args.restarts):
                at = args.duration_s * (i + 1) / (args.restarts + 1) if args.restarts > 1 \
                    else args.duration_s * args.sigterm_at
                time.sleep(max(0.0, t_go + at - time.perf_counter()))
                before = common.scrape(current.port)
                t_term = time.perf_counter()
                code = current.terminate(timeout_s=120)
                exit_s = current.exit_seconds
                print(f"SIGTERM after {t_term - t_go:.1f} s of streaming: exited with {code} "
                      f"in {exit_s:.2f} s (had consumed "
                      f"{before.get('meterwatch_records_total', 0):,.0f} records, scored "
                      f"{before.get('meterwatch_days_scored_total', 0):,.0f} days)", flush=True)
                nxt = ServiceProcess(settings, model_path, logs / f"p{i + 1}.log").start()
                procs.append(nxt)
                t_start2 = time.perf_counter()
                nxt.wait_ready()
                ready2_s = time.perf_counter() - t_start2
                gap_s = time.perf_counter() - t_term
                print(f"  next process ready in {ready2_s:.1f} s ({gap_s:.1f} s after the "
                      "SIGTERM)", flush=True)
                cycles.append({"sigterm_after_s": t_term - t_go, "exit_code": code,
                               "exit_seconds": exit_s, "next_ready_seconds": ready2_s,
                               "gap_seconds": gap_s, "metrics_before": {
                                   k: before.get(k) for k in (
                                       "meterwatch_records_total",
                                       "meterwatch_days_scored_total",
                                       "meterwatch_open_days",
                                       "meterwatch_consumer_lag_records{*}")}})
                current = nxt
            prod.join(args.duration_s + 120)
            stats = out.get(timeout=30)
            t_prod_end = time.perf_counter()
            last = current
            caught_up = wait_for(lambda: common.scrape(last.port).get(
                "meterwatch_consumer_lag_records{*}", 1) == 0 and common.scrape(last.port).get(
                "meterwatch_records_total", 0) > 0, 120, 0.25)
            catch_up_s = time.perf_counter() - t_prod_end
            keys = asyncio.run(read_keys(b.bootstrap_servers, settings.scores_topic,
                                         expected, 120))
            alert_keys = asyncio.run(read_keys(b.bootstrap_servers, settings.alerts_topic,
                                               0, 30))
            alerted = asyncio.run(read_alerted(b.bootstrap_servers, settings.scores_topic))
            code2 = current.terminate(timeout_s=120)
            exit2_s = current.exit_seconds
            print(f"last process (idle) exited with {code2} in {exit2_s:.2f} s", flush=True)
        finally:
            if prod.is_alive():
                prod.terminate()
            for sp in procs:
                sp.kill()
    republished = []
    for sp in procs:
        for line in sp.log_path.read_text(errors="replace").splitlines():
            if "republishing" in line:
                republished.append(f"{sp.log_path.name}: {line[:160]}")
    code = max((c["exit_code"] or 0 for c in cycles), default=0)
    exit_s = float(np.median([c["exit_seconds"] for c in cycles]))
    ready2_s = float(np.median([c["next_ready_seconds"] for c in cycles]))
    gap_s = float(np.median([c["gap_seconds"] for c in cycles]))
    alert_counts = Counter(alert_keys)
    alert_dupes = sum(1 for v in alert_counts.values() if v > 1)
    alerts_unpromised = len(set(alert_counts) - alerted)
    alerts_missing = len(alerted - set(alert_counts))
    counts = Counter(keys)
    dupes = sum(1 for v in counts.values() if v > 1)
    unique = len(counts)
    missing = expected - unique
    ok = dupes == 0 and missing == 0 and code == 0
    alerts_ok = alert_dupes == 0 and alerts_missing == 0 and alerts_unpromised == 0
    each = ", ".join(f"{c['exit_seconds']:.2f}" for c in cycles)
    rows = [{"what": "exit after SIGTERM under load (median)",
             "value": f"{exit_s:.2f} s (each: {each})"},
            {"what": "next process ready (median)", "value": f"{ready2_s:.1f} s "
                                                             f"({gap_s:.1f} s after SIGTERM)"},
            {"what": "restarts under load", "value": str(len(cycles))},
            {"what": "recoveries that republished alerts", "value": str(len(republished))},
            {"what": "idle exit after SIGTERM", "value": f"{exit2_s:.2f} s (code {code2})"},
            {"what": "household-days produced (all complete)", "value": f"{expected:,}"},
            {"what": "day scores read back", "value": f"{len(keys):,}"},
            {"what": "distinct household-days", "value": f"{unique:,}"},
            {"what": "duplicated / missing", "value": f"{dupes:,} / {missing:,}"},
            {"what": "alerts: records / distinct / promised by day scores",
             "value": f"{len(alert_keys):,} / {len(alert_counts):,} / {len(alerted):,}"},
            {"what": "alerts duplicated / missing", "value": f"{alert_dupes:,} / "
                                                             f"{alerts_missing:,}"},
            {"what": "producer", "value": f"{stats['sent']:,} readings at "
                                          f"{stats['achieved_rate']:,.0f}/s"}]
    print()
    print(common.table(rows))
    print(f"\nevery complete day exactly once, clean exit: {'yes' if ok else 'NO'}"
          f"{'' if caught_up else ' (last process did not report zero lag in time)'}")
    print(f"every alert exactly once: {'yes' if alerts_ok else 'NO'}")
    common.save_result("shutdown", {
        "params": {"rate": args.rate, "duration_s": args.duration_s,
                   "sigterm_at": args.sigterm_at, "households": args.households,
                   "partitions": args.partitions, "shutdown_timeout_s":
                   settings.shutdown_timeout_s, "commit_interval_s": settings.commit_interval_s},
        "restarts": len(cycles), "cycles": cycles, "republished_log_lines": republished,
        "exit_code": code, "exit_seconds": exit_s, "second_ready_seconds": ready2_s,
        "gap_seconds": gap_s, "idle_exit_code": code2,
        "idle_exit_seconds": exit2_s, "expected_days": expected, "scores_read": len(keys),
        "distinct_days": unique, "duplicated_days": dupes, "missing_days": missing,
        "catch_up_seconds": catch_up_s, "producer": stats, "ok": ok,
        "alert_records": len(alert_keys), "distinct_alerts": len(alert_counts),
        "alerts_promised": len(alerted), "duplicated_alerts": alert_dupes,
        "missing_alerts": alerts_missing, "unpromised_alerts": alerts_unpromised,
        "alerts_ok": alerts_ok})
    return 0 if ok and alerts_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
