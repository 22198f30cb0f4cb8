"""Throughput of the reference workload, as ratios to a bare aiokafka consumer on the same topic.

Workload: ``--households`` x ``--days`` synthetic readings (default 2,000 x 14 = 1,344,000),
one JSON reading per record, keyed by household, ``--partitions`` partitions (8), produced
once, in parallel (forked producers, one task per partition), and counted back from the
fetch-response highwaters. Then, in one run, on that topic, each with a consumer group of
its own and the same fetch sizes as the service:

a.  ``bare``: aiokafka ``getmany`` that only iterates the records (the reference, 1.00x);
a1. ``bare-gc``: the same with the garbage-collector settings the service runs with
    (``stream.service._GcTuning``: gen-0 threshold 50,000, start-up objects frozen), to show
    how much of meterwatch's margin is that setting;
a2. ``bare-async-for``: the same through ``async for msg in consumer`` (per-record API);
o.  ``orjson``: ``getmany`` + ``orjson.loads`` of every value;
b.  ``per-record``: ``async for`` + ``orjson`` + a dict-of-lists day assembly (the usual
    hand-written baseline);
c.  ``meterwatch-process``: ``stream.service.Service`` in-process until every day is scored,
    the model in its scorer process (``scorer="process"``, the default);
c1. ``meterwatch-thread``: the same with ``scorer="thread"`` (the model in a worker thread of
    the service's process).

Rates are records (= readings) per second between the first record fetched and the last one
handled (for meterwatch: the last day scored and published), so group joins are not
counted. Beside wall-clock rates, records per CPU-second of this process (all its threads,
group join included, plus the scorer process once it has exited) are given: on a shared
machine they move less than wall-clock rates.
A second meterwatch run under pyinstrument follows (not timed; ``--no-profile`` skips it).

    python -m benchmarks.throughput [--households 2000 --days 14 --partitions 8]

The broker is ``stream.broker``'s choice: with ``KAFKA_BOOTSTRAP_SERVERS`` set, that cluster
(for example the genuine Apache Kafka 4.0 of ``../shared/kafka``; its ``KAFKA_PID``, when
exported, gives the broker's CPU time), otherwise the embedded Tansu. Runs against an
external cluster are appended to ``benchmarks/results/throughput_kafka.json`` and judged
against the 0.9x target; Tansu runs to ``throughput.json`` (0.6x target).

    eval "$(../shared/kafka/kafka.sh start)"
    KAFKA_BOOTSTRAP_SERVERS=$KAFKA_BOOTSTRAP_SERVERS KAFKA_PID=$KAFKA_PID \
        python -m benchmarks.throughput --no-profile
    ../shared/kafka/kafka.sh stop "$KAFKA_DIR"
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer

from benchmarks import common
from meterwatch.stream.metrics import ALERT_KINDS

FETCH = dict(fetch_max_bytes=64 << 20, max_partition_fetch_bytes=16 << 20,
             isolation_level="read_committed")
MAX_RECORDS = 5000  # the service's fetch_max_records default
DEVICE = {"device": "cpu"}  # --device
RUNS = ("bare", "bare-gc", "bare-async-for", "orjson", "per-record", "meterwatch-process",
        "meterwatch-thread")
#: Not in the default runs: the scorer process on the CPU whatever ``--device`` says, so that
#: a GPU machine's run compares its GPU scorer with its CPU one in the same repetition.
EXTRA_RUNS = ("meterwatch-process-cpu",)


def _consumer(bootstrap: str, topic: str, **kw: Any) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(topic, bootstrap_servers=bootstrap,
                            group_id=f"bench-{common.new_tag()}", enable_auto_commit=False,
                            auto_offset_reset="earliest", max_poll_records=MAX_RECORDS,
                            **FETCH, **kw)


async def run_bare(bootstrap: str, topic: str, total: int, *,
                   gc_tuned: bool = False) -> dict[str, float]:
    from meterwatch.stream.service import _GC

    c = _consumer(bootstrap, topic)
    await c.start()
    n = 0
    t_first = None
    if gc_tuned:
        _GC.acquire(50_000)
    try:
        while n < total:
            data = await c.getmany(timeout_ms=200, max_records=MAX_RECORDS)
            for recs in data.values():
                if t_first is None and recs:
                    t_first = time.perf_counter()
                for _r in recs:
                    n += 1
        t_end = time.perf_counter()
    finally:
        if gc_tuned:
            _GC.release()
        await c.stop()
    assert t_first is not None
    return {"records": n, "seconds": t_end - t_first}


async def run_bare_async_for(bootstrap: str, topic: str, total: int) -> dict[str, float]:
    c = _consumer(bootstrap, topic)
    await c.start()
    n = 0
    t_first = None
    try:
        async for _msg in c:
            if t_first is None:
                t_first = time.perf_counter()
            n += 1
            if n >= total:
                break
        t_end = time.perf_counter()
    finally:
        await c.stop()
    assert t_first is not None
    return {"records": n, "seconds": t_end - t_first}


async def run_orjson(bootstrap: str, topic: str, total: int) -> dict[str, float]:
    c = _consumer(bootstrap, topic)
    await c.start()
    n = 0
    t_first = None
    loads = orjson.loads
    try:
        while n < total:
            data = await c.getmany(timeout_ms=200, max_records=MAX_RECORDS)
            for recs in data.values():
                if t_first is None and recs:
                    t_first = time.perf_counter()
                for r in recs:
                    loads(r.value)
                    n += 1
        t_end = time.perf_counter()
    finally:
        await c.stop()
    assert t_first is not None
    return {"records": n, "seconds": t_end - t_first}


async def run_per_record(bootstrap: str, topic: str, total: int) -> dict[str, float]:
    """The hand-written baseline: one record at a time, a dict of lists per household-day."""
    c = _consumer(bootstrap, topic)
    await c.start()
    n = 0
    closed = 0
    t_first = None
    open_days: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    loads = orjson.loads
    try:
        async for msg in c:
            if t_first is None:
                t_first = time.perf_counter()
            doc = loads(msg.value)
            ts = doc["ts"]
            key = (doc["household_id"], ts[:10])
            slot = int(ts[11:13]) * 2 + (ts[14:16] == "30")
            readings = open_days[key]
            readings.append((slot, float(doc["kwh"])))
            if len(readings) == 48:
                del open_days[key]
                closed += 1
            n += 1
            if n >= total:
                break
        t_end = time.perf_counter()
    finally:
        await c.stop()
    assert t_first is not None
    return {"records": n, "seconds": t_end - t_first, "days_closed": closed}


async def run_service(b: Any, topic: str, total: int, days: int, model_path: Path, *,
                      profile: bool = False, **overrides: Any) -> dict[str, Any]:
    """meterwatch in-process, fresh group and output topics, until every day is scored."""
    from meterwatch.model import Detector
    from meterwatch.stream.service import Service

    settings = common.bench_settings(b, input_topic=topic,
                                     **{"device": DEVICE["device"], **overrides})
    # a scorer process puts its own copy on settings.device; the service's stays on the CPU
    detector = Detector.load(model_path, device="cpu" if settings.scorer == "process"
                             else DEVICE["device"])
    service = Service(settings, detector=detector)
    reg = service.metrics.registry
    await service.start()
    profiler = None
    try:
        await service.wait_ready(120)
        if profile:
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.001, async_mode="disabled")
            profiler.start()
        t_first = None
        deadline = time.monotonic() + 600
        while True:
            if t_first is None and common.sample(reg, "meterwatch_records_total") > 0:
                t_first = time.perf_counter()
            if common.sample(reg, "meterwatch_days_scored_total") >= days:
                break
            if service.failed is not None:
                raise RuntimeError(f"service failed: {service.failed!r}")
            if time.monotonic() > deadline:
                raise TimeoutError("service did not score every day in 600 s")
            await asyncio.sleep(0.005)
        t_end = time.perf_counter()
        if profiler is not None:
            profiler.stop()
        out: dict[str, Any] = {
            "records": common.sample(reg, "meterwatch_records_total"),
            "readings": common.sample(reg, "meterwatch_readings_total"),
            "days_scored": common.sample(reg, "meterwatch_days_scored_total"),
            "seconds": t_end - (t_first or t_end),
            "model_seconds": common.sample(reg, "meterwatch_inference_seconds_sum"),
            "batches": common.sample(reg, "meterwatch_executions_total"),
            "mean_batch_days": common.sample(reg, "meterwatch_batch_size_days_sum")
            / max(1.0, common.sample(reg, "meterwatch_batch_size_days_count")),
            "alerts": sum(common.sample(reg, "meterwatch_alerts_total", {"unusual": kind})
                          for kind in ALERT_KINDS),
        }
        assert out["readings"] == total, (out, total)
    finally:
        await service.stop()
    if profiler is not None:
        out["profile"] = profiler
    return out


def top_frames(profiler: Any, n: int = 20) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(by self time, by inclusive time of meterwatch's own functions) from a pyinstrument run."""
    session = profiler.last_session
    root = session.root_frame()
    total = root.time if root is not None else 0.0
    self_t: dict[str, float] = defaultdict(float)
    incl: dict[str, float] = defaultdict(float)

    def name(f: Any) -> str:
        return f"{f.function} ({f.file_path_short}:{f.line_no})"

    def walk(f: Any, stack: frozenset[str]) -> None:
        k = name(f)
        self_t[k] += f.total_self_time
        if k not in stack and ("stream/" in (f.file_path or "") or
                               "model/" in (f.file_path or "")):
            incl[k] += f.time
        for c in f.children:
            walk(c, stack | {k})

    if root is not None:
        walk(root, frozenset())
    by_self = sorted(self_t.items(), key=lambda kv: -kv[1])[:n]
    by_incl = sorted(incl.items(), key=lambda kv: -kv[1])[:n]
    return ([{"frame": k, "seconds": v, "share": v / total} for k, v in by_self],
            [{"frame": k, "seconds": v, "share": v / total} for k, v in by_incl])


def prepare(b: Any, args: argparse.Namespace) -> tuple[str, dict[str, Any], float]:
    """Produce the reference workload once; (topic, producer stats, build seconds)."""
    total_expected = args.households * args.days * 48
    bootstrap = b.bootstrap_servers
    topic = f"reference-{common.new_tag()}"
    t0 = time.perf_counter()
    data = common.stream_data(args.households, args.days)
    wl = common.build_workload(data, topic, args.partitions, order="shuffled")
    build_s = time.perf_counter() - t0
    del data
    prod = common.produce_bulk(bootstrap, wl, processes=args.producers)
    hw = asyncio.run(common.highwaters(bootstrap, topic))
    expected = {p: len(v) for p, v in wl.by_partition.items()}
    del wl
    print(f"produced {prod['records']:,} records in {prod['seconds']:.1f} s "
          f"({prod['records_per_s']:,.0f}/s, {prod['processes']} processes); "
          f"read back: highwaters sum {sum(hw.values()):,}", flush=True)
    assert hw == expected, (hw, expected)
    assert sum(hw.values()) == total_expected
    return topic, prod, build_s


async def measure(b: Any, args: argparse.Namespace, topic: str, prod: dict[str, Any],
                  build_s: float) -> dict[str, Any]:
    model_path = common.detector_path(args.model)
    bootstrap = b.bootstrap_servers
    total = args.households * args.days * 48
    if True:
        days = args.households * args.days

        runs: list[dict[str, Any]] = []
        overrides = ({"fetch_max_records": args.fetch_max_records}
                     if args.fetch_max_records else {})
        broker_pid = common.broker_pid(b) or _external_broker_pid(b)

        async def timed(label: str, coro: Any) -> dict[str, Any]:
            if label.partition("#")[0] not in args.runs:
                coro.close()
                return {}
            cpu0 = common.cpu_times(broker_pid)
            own0 = common.cpu_times(os.getpid()) + _children_cpu()
            r = await coro
            r["broker_cpu_s"] = common.cpu_times(broker_pid) - cpu0
            # includes joining the group and waiting for the first fetch: an upper bound
            r["process_cpu_s"] = common.cpu_times(os.getpid()) + _children_cpu() - own0
            r["name"] = label
            r["cpu_per_wall"] = r["process_cpu_s"] / r["seconds"]
            r["records_per_s"] = r["records"] / r["seconds"]
            r["records_per_cpu_s"] = r["records"] / r["process_cpu_s"]
            runs.append(r)
            print(f"  {label:16s} {r['records_per_s']:>12,.0f} records/s "
                  f"({r['seconds']:.2f} s)", flush=True)
            return r

        for rep in range(args.repeats):
            suffix = f"#{rep + 1}" if args.repeats > 1 else ""
            await timed("bare" + suffix, run_bare(bootstrap, topic, total))
            await timed("bare-gc" + suffix,
                        run_bare(bootstrap, topic, total, gc_tuned=True))
            await timed("bare-async-for" + suffix, run_bare_async_for(bootstrap, topic, total))
            await timed("orjson" + suffix, run_orjson(bootstrap, topic, total))
            await timed("per-record" + suffix, run_per_record(bootstrap, topic, total))
            await timed("meterwatch-process" + suffix,
                        run_service(b, topic, total, days, model_path,
                                    **{**overrides, "scorer": "process"}))
            await timed("meterwatch-thread" + suffix,
                        run_service(b, topic, total, days, model_path,
                                    **{**overrides, "scorer": "thread"}))
            await timed("meterwatch-process-cpu" + suffix,
                        run_service(b, topic, total, days, model_path,
                                    **{**overrides, "scorer": "process", "device": "cpu"}))
        profile_rows: tuple[list[dict[str, Any]], list[dict[str, Any]]] = ([], [])
        prof_seconds = None
        if args.profile:
            print("profiling meterwatch (pyinstrument, event-loop thread) ...", flush=True)
            r = await run_service(b, topic, total, days, model_path, profile=True, **overrides)
            profiler = r.pop("profile")
            prof_seconds = r["seconds"]
            profile_rows = top_frames(profiler)
            common.SCRATCH.mkdir(parents=True, exist_ok=True)
            html = common.SCRATCH / "throughput-profile.html"
            html.write_text(profiler.output_html())
            text = profiler.output_text(unicode=False, color=False, show_all=False)
            (common.RESULTS_DIR / "throughput_profile.txt").parent.mkdir(exist_ok=True)
            (common.RESULTS_DIR / "throughput_profile.txt").write_text(text)
            print(f"  profile: {common.RESULTS_DIR / 'throughput_profile.txt'}, {html}")

    # ratios to the bare consumer of the same repetition
    ref: dict[str, float] = {}
    for r in runs:
        rep = r["name"].partition("#")[2]
        if r["name"].partition("#")[0] == "bare":
            ref[rep] = r["records_per_s"]
    ref_cpu = {r["name"].partition("#")[2]: r["records_per_cpu_s"] for r in runs
               if r["name"].partition("#")[0] == "bare"}
    for r in runs:
        bare = ref.get(r["name"].partition("#")[2])
        r["ratio_to_bare"] = r["records_per_s"] / bare if bare else float("nan")
        bare_cpu = ref_cpu.get(r["name"].partition("#")[2])
        r["cpu_ratio_to_bare"] = r["records_per_cpu_s"] / bare_cpu if bare_cpu else float("nan")
    return {"params": {"households": args.households, "days": args.days,
                       "partitions": args.partitions, "records": total,
                       "household_days": days, "producers": args.producers,
                       "fetch_max_records": MAX_RECORDS, "repeats": args.repeats,
                       "model": str(model_path), "broker": b.kind,
                       "torch_threads": torch_threads(), "service_overrides": overrides,
                       "device": DEVICE["device"]},
            "build_seconds": build_s, "produce": prod, "runs": runs,
            "profile_seconds": prof_seconds,
            "profile_self": profile_rows[0], "profile_inclusive": profile_rows[1]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.workload_args(p)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--model", help="detector checkpoint (default: train a small one)")
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument("--runs", default=",".join(RUNS), type=lambda s: s.split(","),
                   help=f"which runs (default all: {','.join(RUNS)}; also "
                   f"{','.join(EXTRA_RUNS)})")
    p.add_argument("--device", default="cpu", help="the detector's device: cpu | cuda")
    p.add_argument("--torch-threads", type=int,
                   help="torch.set_num_threads before the runs (default: torch's own choice)")
    p.add_argument("--fetch-max-records", type=int,
                   help="the service's fetch_max_records (default: its own default)")
    args = p.parse_args(argv)
    unknown = sorted(set(args.runs) - set(RUNS) - set(EXTRA_RUNS))
    if unknown:
        p.error(f"--runs: unknown {', '.join(unknown)}; the runs are "
                f"{', '.join(RUNS + EXTRA_RUNS)}")
    logging.basicConfig(level=logging.WARNING)
    DEVICE["device"] = args.device
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    np.seterr(all="ignore")
    common.detector_path(args.model)
    with common.broker() as b:
        topic, prod, build_s = prepare(b, args)
        result = asyncio.run(measure(b, args, topic, prod, build_s))
    rows = [{"run": r["name"], "records/s": r["records_per_s"], "x bare": r["ratio_to_bare"],
             "seconds": r["seconds"], "process CPU s": r["process_cpu_s"],
             "x bare (CPU)": r["cpu_ratio_to_bare"], "broker CPU s": r["broker_cpu_s"]}
            for r in result["runs"]]
    print()
    print(table_title(result))
    print(common.table(rows))
    mw = [r for r in result["runs"] if r["name"].startswith("meterwatch")]
    target = target_ratio(result["params"]["broker"])
    for r in mw:
        print(f"\n{r['name']}: {r['days_scored']:,.0f} days scored, {r['batches']:.0f} model "
              f"batches (mean {r['mean_batch_days']:.0f} days), model time "
              f"{r['model_seconds']:.2f} s of {r['seconds']:.2f} s; target >= {target}x bare: "
              f"{'met' if r['ratio_to_bare'] >= target else 'NOT met'}")
    if result["profile_self"]:
        print(f"\npyinstrument, event-loop thread, {result['profile_seconds']:.1f} s run "
              "(top self time):")
        print(common.table([{"frame": x["frame"], "self s": x["seconds"], "share": x["share"]}
                            for x in result["profile_self"][:15]]))
        print("\nmeterwatch functions by inclusive time:")
        print(common.table([{"frame": x["frame"], "s": x["seconds"], "share": x["share"]}
                            for x in result["profile_inclusive"][:15]]))
    external = result["params"]["broker"] != "tansu"
    common.save_result("throughput_kafka" if external else "throughput", result)
    return 0


def target_ratio(broker_kind: str) -> float:
    """The throughput target relative to the bare consumer: 0.9x on a genuine Kafka (issue
    11), 0.6x on the embedded broker, which shares its CPU with everything."""
    return 0.6 if broker_kind == "tansu" else 0.9


def _external_broker_pid(b: Any) -> int | None:
    """``KAFKA_PID`` (printed by ``kafka.sh start``) for an external broker on this host."""
    pid = os.environ.get("KAFKA_PID")
    return int(pid) if b.kind == "external" and pid and pid.isdigit() else None


def _children_cpu() -> float:
    """CPU seconds of this process's exited children (the scorer process after a run)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def table_title(result: dict[str, Any]) -> str:
    p = result["params"]
    return (f"{p['households']:,} households x {p['days']} days = {p['records']:,} records, "
            f"{p['partitions']} partitions, broker {p['broker']}, {dt.date.today()}")


if __name__ == "__main__":
    raise SystemExit(main())
