"""What fencing costs: meterwatch with transactions against the same service without them.

With ``--idempotence auto`` on a broker that has transactions (genuine Kafka), every owned
input partition has a transactional producer and each batch's outputs of a partition are one
transaction (``stream.outputs``); ``--idempotence off`` writes the same records with one
plain producer (no fencing). Both read the same pre-produced input, each with a fresh group
and fresh output topics, alternating, in one run; the time is from the moment the
partitions are recovered (fetching starts) to the last day's outputs acknowledged
(``meterwatch_end_to_end_latency_seconds`` observed for every day).

    eval "$(../shared/kafka/kafka.sh start)"
    KAFKA_BOOTSTRAP_SERVERS=$KAFKA_BOOTSTRAP_SERVERS python -m benchmarks.fencing

On the embedded Tansu broker both modes are the plain producer (no transactions there); the
script says so and measures nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

from benchmarks import common


async def run_once(b: Any, topic: str, total: int, days: int, model_path: Path,
                   idempotence: str) -> dict[str, Any]:
    from meterwatch.model import Detector
    from meterwatch.stream.service import Service

    settings = common.bench_settings(b, input_topic=topic, idempotence=idempotence)
    service = Service(settings, detector=Detector.load(model_path, device="cpu"))
    reg = service.metrics.registry
    await service.start()
    try:
        # the clock starts when the partitions are recovered and fetching begins (the
        # source resumes them right after), not at the first record seen: by then a
        # fetch may have consumed much of the input
        t_first = None
        deadline = time.monotonic() + 600
        while common.sample(reg, "meterwatch_end_to_end_latency_seconds_count") < days:
            if t_first is None and service.readiness()["partitions_assigned"]:
                t_first = time.perf_counter()
            if service.failed is not None:
                raise RuntimeError(f"service failed: {service.failed!r}")
            if time.monotonic() > deadline:
                raise TimeoutError("not every day's outputs acknowledged in 600 s")
            await asyncio.sleep(0.005)
        seconds = time.perf_counter() - (t_first or time.perf_counter())
        readings = common.sample(reg, "meterwatch_readings_total")
        assert readings == total, (readings, total)
        return {"idempotence": idempotence, "transactional": service.publisher.transactional,
                "seconds": round(seconds, 3), "readings_per_s": round(total / seconds),
                "batches": common.sample(reg, "meterwatch_executions_total"),
                "commits": common.sample(reg, "meterwatch_commit_latency_seconds_count")}
    finally:
        await service.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--households", type=int, default=2000)
    p.add_argument("--days", type=int, default=14)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--model")
    args = p.parse_args()
    model_path = common.detector_path(args.model)
    with common.broker() as b:
        if not b.supports_idempotence:
            print("this broker has no transactions: nothing to compare (run it against "
                  "genuine Kafka, KAFKA_BOOTSTRAP_SERVERS)")
            return
        data = common.stream_data(args.households, args.days)
        topic = f"readings-fencing-{common.new_tag()}"
        wl = common.build_workload(data, topic, args.partitions)
        produced = common.produce_bulk(b.bootstrap_servers, wl)
        total = args.households * args.days * 48
        n_days = args.households * args.days
        rows = []
        for _ in range(args.repeats):
            for mode in ("off", "auto"):
                row = asyncio.run(run_once(b, topic, total, n_days, model_path, mode))
                print(row, flush=True)
                rows.append(row)
        plain = [r["readings_per_s"] for r in rows if not r["transactional"]]
        txn = [r["readings_per_s"] for r in rows if r["transactional"]]
        ratio = (sum(txn) / len(txn)) / (sum(plain) / len(plain))
        print(common.table(rows))
        print(f"transactions / plain throughput: {ratio:.3f} (cost {100 * (1 - ratio):.1f} %)")
        common.save_result("fencing", {
            "machine": common.machine(), "code": common.code_version(),
            "command": common.command(), "broker": b.kind,
            "workload": {"households": args.households, "days": args.days,
                         "partitions": args.partitions, "readings": total,
                         "produced": produced},
            "runs": rows, "throughput_ratio_transactional_over_plain": ratio})


if __name__ == "__main__":
    main()
