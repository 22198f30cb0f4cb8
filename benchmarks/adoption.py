"""What opening an adoption window costs (``stream.adoption``): reading a state topic of N
households to its end and indexing each household's latest snapshot, and the memory the
index holds for the window.

    .venv/bin/python -m benchmarks.adoption [--households 100000] [--partitions 8]

Against the embedded broker, or genuine Kafka with ``KAFKA_BOOTSTRAP_SERVERS``. Every state
is a new household's snapshot (as ``HouseholdTable.snapshot`` writes it).
"""

from __future__ import annotations

import argparse
import asyncio
import time
import tracemalloc

import orjson
from aiokafka import AIOKafkaProducer

from benchmarks import common
from meterwatch.stream.adoption import latest_elsewhere
from meterwatch.stream.broker import create_topics
from meterwatch.stream.households import HouseholdTable
from meterwatch.stream.outputs import state_key
from meterwatch.stream.recovery import read_to_end, states_of


async def run(b: object, households: int, partitions: int) -> dict[str, float]:
    s = common.bench_settings(b, topic_partitions=partitions)
    await create_topics(s.bootstrap_servers, {s.state_topic: partitions},
                        compacted=(s.state_topic,))
    table = HouseholdTable()
    table.lookup(["X"])
    value = orjson.dumps(table.snapshot(0), option=orjson.OPT_SERIALIZE_NUMPY)
    producer = AIOKafkaProducer(bootstrap_servers=s.bootstrap_servers, linger_ms=50,
                                max_batch_size=1 << 20)
    await producer.start()
    try:
        sent = [await producer.send(s.state_topic, value, partition=i % partitions,
                                    key=state_key(s, f"MAC{i:07d}"))
                for i in range(households)]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()
    tracemalloc.start()
    t0 = time.perf_counter()
    tails = await read_to_end(s, {(s.state_topic, p): 0 for p in range(partitions)},
                              missing_ok=True)
    t1 = time.perf_counter()
    latest = {p: states_of(s, tails[(s.state_topic, p)].records)[0] for p in range(partitions)}
    del tails
    index = latest_elsewhere(latest)
    t2 = time.perf_counter()
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(index) == households
    return {"households": households, "partitions": partitions, "state_bytes": len(value),
            "read_s": t1 - t0, "index_s": t2 - t1, "held_mb": held / 1e6,
            "peak_mb": peak / 1e6, "held_bytes_per_household": held / households}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--households", type=int, default=100_000)
    p.add_argument("--partitions", type=int, default=8)
    args = p.parse_args()
    with common.broker() as b:
        r = asyncio.run(run(b, args.households, args.partitions))
        r["broker"] = b.kind
    print(common.table([r]))
    common.save_result("adoption", r)


if __name__ == "__main__":
    main()
