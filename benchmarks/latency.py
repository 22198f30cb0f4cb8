"""End-to-end latency at a steady offered load, and the gain from dynamic batching.

Latency is what the service records per scored day (``Service.latencies``): from the Kafka
timestamp of the day's last reading (the producer's append time) to the acknowledgement of
the day's outputs. The service runs in this process; a paced producer runs in a spawned
process (so it does not share the event loop) and streams readings day by day at
``--rate`` readings/s: by default half the meterwatch throughput that the latest
``benchmarks.throughput`` run measured. The first ``--warmup-s`` seconds are left out.

Runs (each with a fresh topic and group, the same offered load):

1. ``steady``: default settings (``batch_max_delay_ms`` 10); readings in household order
   within a day, so days close one after another at an even rate;
2. ``midnight``: default settings, readings in real-time order (every household's 00:00,
   then 00:30, ...), so a whole day's households close together at the end of each day;
3. ``batch-1``: ``Settings(batch_max_size=1)`` on the steady stream; compared with run 1,
   it is the "batching gain": throughput (days scored per second while the producer runs)
   and p95 latency of both. Batch size 1 cannot keep up at this load (that is the point),
   so it is stopped when the producer stops, and its latency is that of a growing queue;

4. ``sweep``: shorter steady runs at lower loads (``--sweep``, shares of the maximum), for
   the latency-against-load curve;
5. ``steady-process`` and ``steady-thread``: run 1 (shorter) with the model in a scorer
   process and in a worker thread of the service (run 1 uses the default, ``auto``);
6. ``kafka`` and ``kafka-500``: the transport alone, for reference: the same paced stream
   to a bare aiokafka consumer that notes (fetch time - Kafka timestamp) of every record,
   with the service's ``fetch_max_wait_ms`` and with aiokafka's default (500 ms; Tansu
   does not answer a waiting fetch when data arrives, so this wait shows in latency).

    python -m benchmarks.latency [--max-rate 130000] [--load 0.5] [--duration-s 30]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing as mp
import statistics
import time
from typing import Any

import numpy as np

from benchmarks import common

RUNS = ("steady", "midnight", "batch-1", "sweep", "steady-process", "steady-thread", "kafka",
        "kafka-500")


# ------------------------------------------------------------------ paced producer (child)


def _paced_producer(bootstrap: str, topic: str, partitions: int, households: int, days: int,
                    order: str, rate: float, duration_s: float, ready: Any, go: Any,
                    out: Any) -> None:
    import asyncio as aio

    data = common.stream_data(households, days, seed=21)
    seq = paced_sequence(data, partitions, order, int(rate * duration_s))
    del data
    out.put({"prepared": len(seq)})
    ready.set()
    go.wait()
    out.put(aio.run(_pace(bootstrap, topic, seq, rate, len(seq))))


def paced_sequence(data: Any, partitions: int, order: str, need: int
                   ) -> list[tuple[int, bytes, bytes]]:
    """(partition, key, value) in production order: about ``need`` readings, cut so that
    every household-day in it is complete (a multiple of 48 readings in household order,
    whole days otherwise)."""
    keys = [h.encode() for h in data.household_ids]
    part = common.partition_of(keys, partitions)
    per_day = len(keys) * 48
    need = -(-need // 48) * 48 if order == "household" else -(-need // per_day) * per_day
    seq: list[tuple[int, bytes, bytes]] = []
    for d in range(len(data.days)):
        hh, values = common.day_values(data, d, order=order, rng=np.random.default_rng(d))
        seq += [(int(part[h]), keys[h], v) for h, v in zip(hh.tolist(), values, strict=True)]
        if len(seq) >= need:
            break
    if len(seq) < need:
        raise ValueError(f"only {len(seq)} readings for {need}: generate more days")
    return seq[:need]


async def _pace(bootstrap: str, topic: str, seq: list[tuple[int, bytes, bytes]], rate: float,
                need: int) -> dict[str, Any]:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0,
                                max_batch_size=1 << 20, max_request_size=8 << 20)
    await producer.start()
    sent = 0
    behind_max = 0.0
    pending: list[Any] = []
    t0 = time.perf_counter()
    try:
        n = min(need, len(seq))
        while sent < n:
            now = time.perf_counter()
            due = min(n, int((now - t0) * rate) + 1)
            if due > sent:
                behind_max = max(behind_max, (due - sent) / rate)
                batches: dict[int, Any] = {}
                for p, k, v in seq[sent:due]:
                    b = batches.get(p)
                    if b is None:
                        b = batches[p] = producer.create_batch()
                    if b.append(key=k, value=v, timestamp=None) is None:
                        b.close()
                        pending.append(await producer.send_batch(b, topic, partition=p))
                        b = batches[p] = producer.create_batch()
                        b.append(key=k, value=v, timestamp=None)
                for p, b in batches.items():
                    b.close()
                    pending.append(await producer.send_batch(b, topic, partition=p))
                sent = due
                if len(pending) > 2000:
                    await asyncio.gather(*pending)
                    pending.clear()
            await asyncio.sleep(0.002)
        await asyncio.gather(*pending)
        seconds = time.perf_counter() - t0
    finally:
        await producer.stop()
    return {"sent": sent, "seconds": seconds, "achieved_rate": sent / seconds,
            "max_behind_s": behind_max}


# ------------------------------------------------------------------ one run (service here)


async def one_run(b: Any, model_path: Any, name: str, *, order: str, rate: float,
                  duration_s: float, warmup_s: float, households: int,
                  partitions: int, drain: bool, **overrides: Any) -> dict[str, Any]:
    from meterwatch.model import Detector
    from meterwatch.stream.broker import create_topics
    from meterwatch.stream.service import Service

    settings = common.bench_settings(b, topic_partitions=partitions, **overrides)
    # the service never creates its input topic (its preflight stops on a missing one)
    await create_topics(b.bootstrap_servers, {settings.input_topic: partitions})
    # a scorer process puts its own copy on settings.device; the service's stays on the CPU
    service = Service(settings, detector=Detector.load(
        model_path, device="cpu" if settings.scorer == "process" else settings.device))
    reg = service.metrics.registry
    days = int(np.ceil(rate * duration_s / (households * 48))) + 1
    ctx = mp.get_context("spawn")
    ready, go, out = ctx.Event(), ctx.Event(), ctx.Queue()
    prod = ctx.Process(target=_paced_producer, args=(
        b.bootstrap_servers, settings.input_topic, partitions, households, days, order, rate,
        duration_s, ready, go, out))
    prod.start()
    try:
        await service.start()
        import torch

        threads_in_run = torch.get_num_threads()  # as the service left it
        await service.wait_ready(120)
        await asyncio.to_thread(ready.wait, 120)
        prepared = (await asyncio.to_thread(out.get, True, 60))["prepared"]
        go.set()
        t_go = time.perf_counter()
        t_first = None
        lat_start = None
        stats = None
        while True:
            now = time.perf_counter()
            if t_first is None and common.sample(reg, "meterwatch_records_total") > 0:
                t_first = now
            if lat_start is None and t_first is not None and now - t_first >= warmup_s:
                lat_start = len(service.latencies)
                scored_at_warm = common.sample(reg, "meterwatch_days_scored_total")
                t_warm = now
            if stats is None and not prod.is_alive():
                stats = await asyncio.to_thread(out.get, True, 30)
                t_prod_end = now
                scored_at_prod_end = common.sample(reg, "meterwatch_days_scored_total")
                if not drain:
                    break
            if stats is not None:
                complete = prepared // 48  # every produced household-day is complete
                if common.sample(reg, "meterwatch_days_scored_total") >= complete:
                    break
                if now - t_prod_end > 60:
                    raise TimeoutError(f"{name}: days still unscored 60 s after the producer")
            if service.failed is not None:
                raise RuntimeError(f"service failed: {service.failed!r}")
            if now - t_go > duration_s + 120:
                raise TimeoutError(f"{name}: producer did not finish")
            await asyncio.sleep(0.005)
        t_end = time.perf_counter()
        lat = np.array(list(service.latencies)[lat_start or 0:])
        scored = common.sample(reg, "meterwatch_days_scored_total")
        # throughput while the load was offered: days scored between warm-up and the end of
        # production (for a service that keeps up, that is the offered load)
        window = t_prod_end - t_warm
        res: dict[str, Any] = {
            "name": name, "order": order, "offered_rate": rate, "torch_threads": threads_in_run,
            "producer": stats, "records": prepared,
            "days_scored": scored,
            "days_per_s": (scored_at_prod_end - scored_at_warm) / window,
            "readings_per_s": 48 * (scored_at_prod_end - scored_at_warm) / window,
            "drain_seconds": t_end - t_prod_end if drain else None,
            "latencies": len(lat), **percentiles_ms(lat),
            "mean_ms": float(lat.mean() * 1e3) if len(lat) else float("nan"),
            "max_ms": float(lat.max() * 1e3) if len(lat) else float("nan"),
            "mean_batch_days": common.sample(reg, "meterwatch_batch_size_days_sum")
            / max(1.0, common.sample(reg, "meterwatch_batch_size_days_count")),
            "batches": common.sample(reg, "meterwatch_executions_total"),
            **{f"{label}_mean_ms": 1e3 * common.sample(reg, f"meterwatch_{metric}_sum")
               / max(1.0, common.sample(reg, f"meterwatch_{metric}_count"))
               for label, metric in (("queue_wait", "queue_wait_seconds"),
                                     ("inference", "inference_seconds"),
                                     ("commit", "commit_latency_seconds"))},
            "settings": {k: getattr(settings, k, None) for k in
                         ("batch_max_size", "batch_max_delay_ms", "fetch_max_records",
                          "fetch_max_wait_ms", "commit_interval_s")},
            "latency_sample_ms": sample_ms(lat),
        }
    finally:
        if prod.is_alive():
            prod.terminate()
        prod.join(10)
        await service.stop()
    return res


async def kafka_run(b: Any, name: str, *, rate: float, duration_s: float, warmup_s: float,
                    households: int, partitions: int, **consumer_kw: Any) -> dict[str, Any]:
    """The transport alone: the same paced stream to a bare aiokafka consumer that notes
    (now - Kafka timestamp) of every record as it is fetched."""
    from aiokafka import AIOKafkaConsumer

    from meterwatch.stream.broker import create_topics

    topic = f"kafka-latency-{common.new_tag()}"
    await create_topics(b.bootstrap_servers, {topic: partitions})
    days = int(np.ceil(rate * duration_s / (households * 48))) + 1
    ctx = mp.get_context("spawn")
    ready, go, out = ctx.Event(), ctx.Event(), ctx.Queue()
    prod = ctx.Process(target=_paced_producer, args=(
        b.bootstrap_servers, topic, partitions, households, days, "household", rate,
        duration_s, ready, go, out))
    prod.start()
    c = AIOKafkaConsumer(topic, bootstrap_servers=b.bootstrap_servers,
                         group_id=f"bench-{common.new_tag()}", enable_auto_commit=False,
                         auto_offset_reset="earliest", isolation_level="read_committed",
                         fetch_max_bytes=64 << 20, max_partition_fetch_bytes=16 << 20,
                         **consumer_kw)
    await c.start()
    lat: list[float] = []
    try:
        while not c.assignment():
            await c.getmany(timeout_ms=100)
        await asyncio.to_thread(ready.wait, 120)
        n = (await asyncio.to_thread(out.get, True, 60))["prepared"]
        go.set()
        t_first = None
        skip = 0
        while len(lat) < n:
            data = await c.getmany(timeout_ms=200, max_records=5000)
            now_ms = time.time() * 1000
            for recs in data.values():
                if t_first is None and recs:
                    t_first = time.perf_counter()
                if t_first is not None and time.perf_counter() - t_first < warmup_s:
                    skip += len(recs)
                lat += [(now_ms - r.timestamp) / 1000 for r in recs]
        stats = await asyncio.to_thread(out.get, True, 30)
    finally:
        await c.stop()
        prod.join(10)
    a = np.array(lat[skip:])
    return {"name": name, "order": "household", "offered_rate": rate, "producer": stats,
            "records": n, "days_scored": None, "days_per_s": float("nan"),
            "readings_per_s": float("nan"), "consumer": consumer_kw,
            "latencies": len(a), **percentiles_ms(a),
            "mean_ms": float(a.mean() * 1e3), "max_ms": float(a.max() * 1e3),
            "mean_batch_days": float("nan"), "batches": None, "settings": {},
            "latency_sample_ms": sample_ms(a)}


def service_fetch_wait_ms() -> int:
    """The service's consumer fetch wait (aiokafka's 500 ms where it has no setting)."""
    from meterwatch.stream.config import Settings

    return int(getattr(Settings(), "fetch_max_wait_ms", 500))


def sample_ms(lat: np.ndarray, n: int = 400) -> list[float]:
    """Up to ``n`` evenly spaced order statistics (ms, 0.01 ms steps), for CDF plots."""
    if len(lat) == 0:
        return []
    idx = np.unique(np.linspace(0, len(lat) - 1, min(n, len(lat))).astype(int))
    return [round(float(x) * 1e3, 2) for x in np.sort(lat)[idx]]


def percentiles_ms(lat: np.ndarray) -> dict[str, float]:
    return {k + "_ms": v * 1e3 for k, v in common.percentiles(lat, (50, 95, 99)).items()}


def default_rate() -> tuple[float, str]:
    last = common.latest_result("throughput")
    if last:
        by_kind: dict[str, list[float]] = {}
        for r in last["runs"]:
            kind = r["name"].partition("#")[0]
            if kind.startswith("meterwatch"):
                by_kind.setdefault(kind, []).append(r["records_per_s"])
        if by_kind:  # the best scorer kind's median: the maximum sustained throughput
            kind, rates = max(by_kind.items(), key=lambda kv: statistics.median(kv[1]))
            return statistics.median(rates), f"{kind} in the latest throughput run ({last['date']})"
    return 100_000.0, "no throughput result found: assumed 100,000 readings/s"


async def measure(b: Any, args: argparse.Namespace, max_rate: float) -> list[dict[str, Any]]:
    path = common.detector_path(args.model)
    runs = []
    base = dict(warmup_s=args.warmup_s, households=args.households, partitions=args.partitions)
    rate = args.load * max_rate
    plan: list[tuple[str, float, float, dict[str, Any]]] = []
    for name in args.runs:
        if name == "steady":
            plan.append((name, rate, args.duration_s, dict(order="household", drain=True)))
        elif name == "midnight":
            plan.append((name, rate, args.duration_s, dict(order="slot", drain=True)))
        elif name == "batch-1":
            plan.append((name, rate, args.duration_s / 2,
                         dict(order="household", drain=False, batch_max_size=1,
                              shutdown_timeout_s=5.0)))
        elif name in ("steady-process", "steady-thread"):
            plan.append((name, rate, args.duration_s / 2, dict(order="household", drain=True,
                                                               scorer=name.split("-")[1])))
        elif name in ("kafka", "kafka-500"):
            wait = 500 if name == "kafka-500" else service_fetch_wait_ms()
            plan.append((name, rate, args.duration_s / 2, dict(kafka=True,
                                                               fetch_max_wait_ms=wait)))
        elif name == "sweep":
            for f in args.sweep:
                plan.append((f"steady@{f:.0%}", f * max_rate, args.duration_s / 2,
                             dict(order="household", drain=True)))
        else:
            raise ValueError(name)
    for name, r, dur, kw in plan:
        print(f"run {name} at {r:,.0f} readings/s for {dur:.0f} s ...", flush=True)
        threads = kw.pop("torch_threads", None)
        if kw.pop("kafka", False):
            res = await kafka_run(b, name, rate=r, duration_s=dur, **base, **kw)
        else:
            import torch

            before = torch.get_num_threads()
            if threads:
                torch.set_num_threads(threads)
            try:
                res = await one_run(b, path, name, rate=r, duration_s=dur, device=args.device,
                                    **base, **kw)
            finally:
                torch.set_num_threads(before)
            res["torch_threads_set_by_benchmark"] = threads
        res["load_fraction"] = r / max_rate
        runs.append(res)
        print(f"  {res['days_per_s']:,.0f} days/s ({res['readings_per_s']:,.0f} readings/s), "
              f"p50 {res['p50_ms']:.1f} ms, p95 {res['p95_ms']:.1f} ms, "
              f"p99 {res['p99_ms']:.1f} ms, mean batch {res['mean_batch_days']:.1f} days; "
              f"producer {res['producer']['achieved_rate']:,.0f}/s", flush=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-rate", type=float,
                   help="the maximum sustained readings/s (default: the latest throughput run)")
    p.add_argument("--load", type=float, default=0.5, help="offered load, share of --max-rate")
    p.add_argument("--sweep", default="0.1,0.25", type=lambda s: [float(x) for x in s.split(",")],
                   help="further (shorter) steady runs at these shares of --max-rate")
    p.add_argument("--duration-s", type=float, default=30.0,
                   help="seconds of the main runs (batch-1 and sweep runs: half)")
    p.add_argument("--warmup-s", type=float, default=3.0)
    p.add_argument("--households", type=int, default=2000)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--runs", default=",".join(RUNS), type=lambda s: s.split(","))
    p.add_argument("--model", help="detector checkpoint (default: train a small one)")
    p.add_argument("--device", default="cpu", help="the detector's device: cpu | cuda")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    np.seterr(all="ignore")
    max_rate, why = (args.max_rate, "--max-rate") if args.max_rate else default_rate()
    rate = args.load * max_rate
    print(f"maximum sustained throughput: {max_rate:,.0f} readings/s ({why}); offered load "
          f"{args.load:.0%} of it: {rate:,.0f} readings/s")
    common.detector_path(args.model)
    with common.broker() as b:
        runs = asyncio.run(measure(b, args, max_rate))
    print()
    print(common.table([{"run": r["name"], "offered/s": r["offered_rate"],
                         "readings/s": r["readings_per_s"], "days/s": r["days_per_s"],
                         "p50 ms": r["p50_ms"], "p95 ms": r["p95_ms"], "p99 ms": r["p99_ms"],
                         "max ms": r["max_ms"], "mean batch": r["mean_batch_days"],
                         "queue wait ms": r.get("queue_wait_mean_ms"),
                         "model ms/batch": r.get("inference_mean_ms")}
                        for r in runs]))
    by = {r["name"]: r for r in runs}
    gain = None
    if "steady" in by:
        s = by["steady"]
        print(f"\np99 at the default batch_max_delay_ms: {s['p99_ms']:.1f} ms (target <= 50 ms: "
              f"{'met' if s['p99_ms'] <= 50 else 'NOT met'})")
    if "steady" in by and "batch-1" in by:
        s, one = by["steady"], by["batch-1"]
        gain = {"throughput_ratio": s["days_per_s"] / one["days_per_s"],
                "p95_dynamic_ms": s["p95_ms"], "p95_batch1_ms": one["p95_ms"],
                "batch1_kept_up": one["days_per_s"] >= 0.95 * s["days_per_s"]}
        ok = gain["throughput_ratio"] >= 3 and s["p95_ms"] <= one["p95_ms"]
        print(f"batching gain: {gain['throughput_ratio']:.1f}x the days/s of batch size 1, p95 "
              f"{s['p95_ms']:.1f} ms vs {one['p95_ms']:.1f} ms (target >= 3x at equal or lower "
              f"p95: {'met' if ok else 'NOT met'})")
        gain["met"] = ok
    common.save_result("latency", {"params": {"rate": rate, "max_rate": max_rate,
                                              "load": args.load, "rate_source": why,
                                              "duration_s": args.duration_s,
                                              "warmup_s": args.warmup_s,
                                              "households": args.households,
                                              "partitions": args.partitions},
                                   "runs": runs, "batching_gain": gain})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
