"""Shared pieces of the benchmarks: machine facts, result files, broker, model, data, producers.

Nothing here is timed by itself; each ``benchmarks/<name>.py`` decides what it measures.
Large generated things (checkpoints, profiles, logs) go under ``SCRATCH`` (``/tmp`` by
default, ``METERWATCH_BENCH_TMP`` to move it), never into the repository.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import shlex
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
# METERWATCH_BENCH_RESULTS: write result files elsewhere (make bench-gpu: under its $OUT)
RESULTS_DIR = Path(os.environ.get("METERWATCH_BENCH_RESULTS")
                   or Path(__file__).resolve().parent / "results")
SCRATCH = Path(os.environ.get("METERWATCH_BENCH_TMP", "/tmp/meterwatch-bench"))

# --------------------------------------------------------------------------------- results


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu_model = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "hostname": platform.node(), "platform": platform.platform(),
        "machine": platform.machine(), "cpu": cpu_model,
        "logical_cpus": psutil.cpu_count(logical=True),
        "physical_cpus": psutil.cpu_count(logical=False),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else None,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }
    with contextlib.suppress(ImportError):
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    with contextlib.suppress(ImportError):
        import aiokafka

        info["aiokafka"] = aiokafka.__version__
    return info


def code_version() -> dict[str, Any]:
    """The commit measured and whether stream/ or model/ had uncommitted changes then."""
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10, check=False).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = git("status", "--porcelain", "--", "stream", "model")
    return {"commit": git("rev-parse", "--short", "HEAD").strip(),
            "uncommitted": [line[3:] for line in dirty.splitlines() if line.strip()]}


def command() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, "-m",
                                             _module_name(), *sys.argv[1:]])


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        return str(spec.name)
    return Path(sys.argv[0]).stem


def save_result(name: str, result: dict[str, Any]) -> Path:
    """Append one run to ``benchmarks/results/<name>.json`` (a JSON list of runs)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    runs: list[Any] = []
    if path.exists():
        with contextlib.suppress(json.JSONDecodeError):
            runs = json.loads(path.read_text())
    runs.append({"benchmark": name,
                 "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                 "command": command(), "machine": machine(), "code": code_version(),
                 **result})
    path.write_text(json.dumps(runs, indent=1, default=_plain) + "\n")
    print(f"\nresults appended to {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return path


def latest_result(name: str) -> dict[str, Any] | None:
    path = RESULTS_DIR / f"{name}.json"
    if not path.exists():
        return None
    runs = json.loads(path.read_text())
    return runs[-1] if runs else None


def _plain(o: object) -> object:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain text table (also valid Markdown)."""
    if not rows:
        return "(no rows)"
    cols = list(columns or rows[0].keys())

    def fmt(v: object) -> str:
        if isinstance(v, float):
            if v != v:
                return "-"
            if abs(v) >= 100:
                return f"{v:,.0f}"
            if abs(v) >= 1:
                return f"{v:.2f}"
            return f"{v:.3g}"
        if isinstance(v, int) and not isinstance(v, bool):
            return f"{v:,}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    width = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    line = "| " + " | ".join(c.ljust(w) for c, w in zip(cols, width, strict=True)) + " |"
    sep = "| " + " | ".join("-" * w for w in width) + " |"
    body = ["| " + " | ".join(x.rjust(w) for x, w in zip(r, width, strict=True)) + " |"
            for r in cells]
    return "\n".join([line, sep, *body])


def percentiles(values: Sequence[float] | np.ndarray, qs: Sequence[float] = (50, 95, 99)
                ) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    if len(a) == 0:
        return {f"p{q:g}": float("nan") for q in qs}
    return {f"p{q:g}": float(np.percentile(a, q)) for q in qs}


# --------------------------------------------------------------------------------- broker


@contextlib.contextmanager
def broker() -> Iterator[Any]:
    """``KAFKA_BOOTSTRAP_SERVERS`` when set (an external cluster), else the embedded Tansu."""
    from meterwatch.stream.broker import Broker

    b = Broker.start()
    print(f"broker: {b.kind} at {b.bootstrap_servers}", flush=True)
    try:
        yield b
    finally:
        b.stop()


def broker_pid(b: Any) -> int | None:
    proc = getattr(b, "_proc", None)
    return proc.pid if proc is not None else None


def bench_settings(b: Any, tag: str | None = None, **overrides: Any) -> Any:
    """Service settings with topics and group of their own."""
    from meterwatch.stream.config import Settings

    tag = tag or uuid.uuid4().hex[:8]
    base: dict[str, Any] = dict(
        bootstrap_servers=b.bootstrap_servers, group_id=f"mw-bench-{tag}",
        input_topic=f"readings-{tag}", alerts_topic=f"alerts-{tag}",
        scores_topic=f"scores-{tag}", dead_letter_topic=f"dlq-{tag}",
        data_quality_topic=f"dq-{tag}", state_topic=f"state-{tag}", topic_partitions=8,
        metrics_host="127.0.0.1", metrics_port=0,
        idempotence="auto" if b.supports_idempotence else "off", device="cpu")
    base.update(overrides)
    return Settings(**base)


def workload_args(p: Any) -> None:
    """The reference workload's size options (``benchmarks.throughput`` and friends)."""
    p.add_argument("--households", type=int, default=2000)
    p.add_argument("--days", type=int, default=14)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--producers", type=int, default=2, help="producer processes")


def new_tag() -> str:
    return uuid.uuid4().hex[:8]


# --------------------------------------------------------------------------------- model


def detector_path(model: str | os.PathLike[str] | None = None, *, households: int = 200,
                  days: int = 28, epochs: int = 40) -> Path:
    """A checkpoint: ``model`` if given, else a small synthetic one trained once (cached)."""
    if model is not None:
        return Path(model)
    path = SCRATCH / f"detector-h{households}-d{days}-e{epochs}.pt"
    if path.exists():
        return path
    from meterwatch.model import SyntheticConfig, TrainConfig, generate, train_detector

    print(f"training a small detector ({households} households x {days} days, "
          f"{epochs} epochs) -> {path}", flush=True)
    t0 = time.perf_counter()
    data = generate(SyntheticConfig(n_households=households, n_days=days, anomaly_rate=0.0,
                                    seed=11))
    ids, day, kwh, _ = data.long()
    det = train_detector(kwh, day, ids, data.tables,
                         TrainConfig(device="cpu", max_epochs=epochs, seed=0))
    path.parent.mkdir(parents=True, exist_ok=True)
    det.save(path)
    print(f"  trained in {time.perf_counter() - t0:.1f} s", flush=True)
    return path


# --------------------------------------------------------------------------------- data


_EPOCH = dt.date(1970, 1, 1)


def stream_data(households: int, days: int, *, seed: int = 11, start: dt.date | None = None
                ) -> Any:
    """Synthetic households (no injected anomalies: every day is complete and scoreable)."""
    from meterwatch.model import SyntheticConfig, generate

    return generate(SyntheticConfig(n_households=households, n_days=days, anomaly_rate=0.0,
                                    seed=seed, start_day=start or dt.date(2013, 3, 1)))


def partition_of(keys: Sequence[bytes], partitions: int) -> np.ndarray:
    """The partition the default Kafka partitioner (murmur2) gives each key."""
    from aiokafka.partitioner import murmur2

    return np.array([(murmur2(k) & 0x7FFFFFFF) % partitions for k in keys], dtype=np.int32)


def _ts_strings(day: int) -> list[str]:
    base = dt.datetime(1970, 1, 1) + dt.timedelta(days=int(day))
    return [(base + dt.timedelta(minutes=30 * s)).strftime("%Y-%m-%dT%H:%M:%SZ")
            for s in range(48)]


def day_values(data: Any, d: int, *, order: str = "shuffled",
               rng: np.random.Generator | None = None) -> tuple[np.ndarray, list[bytes]]:
    """(household index per record, JSON value per record) of day index ``d``: one reading
    per record, in the format of ``stream.simulate.reading_json``.

    ``order``: ``shuffled`` (a day's readings in random order, as ``stream.simulate``),
    ``slot`` (real time: every household's 00:00 reading, then 00:30, ...: all days close
    together at the end) or ``household`` (a household's whole day, then the next: days close
    one after another at an even rate).
    """
    h_n = len(data.household_ids)
    ts = _ts_strings(int(data.days[d]))
    if order == "shuffled":
        rng = rng or np.random.default_rng(d)
        flat = rng.permutation(h_n * 48)
    elif order == "slot":
        rng = rng or np.random.default_rng(d)
        flat = (rng.permutation(h_n)[None, :] + np.zeros((48, 1), np.int64)).ravel() * 48 \
            + np.repeat(np.arange(48), h_n)
    elif order == "household":
        flat = np.arange(h_n * 48)
    else:
        raise ValueError(order)
    hh, slot = np.divmod(flat, 48)
    kwh = data.kwh[hh, d, slot]
    ok = ~np.isnan(kwh)
    hh, slot, kwh = hh[ok], slot[ok], kwh[ok]
    ids = data.household_ids
    values = [b'{"household_id":"%s","ts":"%s","kwh":%.4f}' % (ids[h].encode(),
                                                              ts[s].encode(), v)
              for h, s, v in zip(hh.tolist(), slot.tolist(), kwh.tolist(), strict=True)]
    return hh, values


@dataclass
class Workload:
    """Records grouped by partition (each household on its murmur2 partition)."""

    topic: str
    partitions: int
    keys: list[bytes]  # per household
    part_of: np.ndarray  # per household
    #: partition -> list of (key, value), in production order
    by_partition: dict[int, list[tuple[bytes, bytes]]] = field(default_factory=dict)

    @property
    def records(self) -> int:
        return sum(len(v) for v in self.by_partition.values())


def build_workload(data: Any, topic: str, partitions: int, days: range | None = None, *,
                   order: str = "shuffled", seed: int = 0) -> Workload:
    keys = [h.encode() for h in data.household_ids]
    part = partition_of(keys, partitions)
    wl = Workload(topic, partitions, keys, part, {p: [] for p in range(partitions)})
    rng = np.random.default_rng(seed)
    for d in days if days is not None else range(len(data.days)):
        hh, values = day_values(data, d, order=order, rng=rng)
        for h, v in zip(hh.tolist(), values, strict=True):
            wl.by_partition[int(part[h])].append((keys[h], v))
    return wl


# --------------------------------------------------------------------------------- producing

_FORK_PAYLOAD: dict[str, Any] = {}


async def _produce_partitions(bootstrap: str, topic: str,
                              items: dict[int, list[tuple[bytes, bytes]]],
                              client: dict[str, Any]) -> int:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                                max_batch_size=1 << 20, max_request_size=8 << 20, **client)
    await producer.start()
    sent = 0
    try:
        async def one(p: int, recs: list[tuple[bytes, bytes]]) -> int:
            n = 0
            i = 0
            while i < len(recs):
                batch = producer.create_batch()
                while i < len(recs):
                    k, v = recs[i]
                    if batch.append(key=k, value=v, timestamp=None) is None:
                        break
                    i += 1
                batch.close()
                fut = await producer.send_batch(batch, topic, partition=p)
                await fut  # one batch in flight per partition keeps the order
                n += batch.record_count()
            return n

        sent = sum(await asyncio.gather(*(one(p, r) for p, r in items.items())))
    finally:
        await producer.stop()
    return sent


def _produce_worker(bootstrap: str, topic: str, parts: list[int], q: Any) -> None:
    items = {p: _FORK_PAYLOAD["by_partition"][p] for p in parts}
    try:
        q.put(asyncio.run(_produce_partitions(bootstrap, topic, items, {})))
    except BaseException as exc:
        q.put(repr(exc))


def produce_bulk(bootstrap: str, wl: Workload, *, processes: int = 2) -> dict[str, float]:
    """Produce a workload as fast as possible: ``processes`` forked producers, each with one
    task (and one batch in flight) per partition it owns. Returns counts and seconds."""
    from meterwatch.stream.broker import create_topics

    asyncio.run(create_topics(bootstrap, {wl.topic: wl.partitions}))
    _FORK_PAYLOAD["by_partition"] = wl.by_partition
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    groups = [list(range(i, wl.partitions, processes)) for i in range(processes)]
    t0 = time.perf_counter()
    procs = [ctx.Process(target=_produce_worker, args=(bootstrap, wl.topic, g, q))
             for g in groups if g]
    for p in procs:
        p.start()
    got = [q.get() for _ in procs]
    for p in procs:
        p.join()
    seconds = time.perf_counter() - t0
    _FORK_PAYLOAD.clear()
    errors = [g for g in got if not isinstance(g, int)]
    if errors:
        raise RuntimeError(f"producer failed: {errors}")
    n = int(sum(got))  # type: ignore[arg-type]
    return {"records": n, "seconds": seconds, "records_per_s": n / seconds,
            "processes": len(procs)}


async def highwaters(bootstrap: str, topic: str, *, timeout_s: float = 60.0) -> dict[int, int]:
    """Highwater of each partition, from fetch responses (Tansu under-reports ListOffsets)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                enable_auto_commit=False, max_partition_fetch_bytes=1024)
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: dict[int, int] = {}
        deadline = time.monotonic() + timeout_s
        while len(out) < len(tps) and time.monotonic() < deadline:
            await consumer.getmany(timeout_ms=200, max_records=1)
            for tp in tps:
                hw = consumer.highwater(tp)
                if hw is not None:
                    out[tp.partition] = hw
        return out
    finally:
        await consumer.stop()


# --------------------------------------------------------------------------------- subprocesses


def scrape(port: int) -> dict[str, float]:
    """Every unlabelled sample of /metrics, plus label-summed totals (``name`` -> value)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        with contextlib.suppress(ValueError):
            v = float(value)
            if "{" in name_labels:
                out[name_labels] = v
                out[name + "{*}"] = out.get(name + "{*}", 0.0) + v
            else:
                out[name] = v
    return out


def sample(registry: Any, name: str, labels: dict[str, str] | None = None) -> float:
    return float(registry.get_sample_value(name, labels) or 0.0)


def cpu_times(pid: int | None) -> float:
    if pid is None:
        return float("nan")
    try:
        p = psutil.Process(pid)
        t = p.cpu_times()
        return float(t.user + t.system)
    except psutil.Error:
        return float("nan")
