"""PNG plots of the latest run of each benchmark (``benchmarks/results/*.json``).

    python -m benchmarks.plots
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from benchmarks import common

OUT = common.RESULTS_DIR


def _save(fig: Any, name: str) -> Path:
    path = OUT / name
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path.relative_to(common.ROOT)}")
    return path


def throughput(r: dict[str, Any]) -> None:
    wall: dict[str, list[float]] = defaultdict(list)
    cpu: dict[str, list[float]] = defaultdict(list)
    for run in r["runs"]:
        wall[run["name"].partition("#")[0]].append(run["ratio_to_bare"])
        cpu[run["name"].partition("#")[0]].append(run.get("cpu_ratio_to_bare", float("nan")))
    names = list(wall)
    x = np.arange(len(names))
    w_vals = [statistics.median(wall[n]) for n in names]
    c_vals = [statistics.median(cpu[n]) for n in names]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    b1 = ax.bar(x - 0.2, w_vals, 0.4, color="#4c72b0", label="records/s (wall clock)")
    b2 = ax.bar(x + 0.2, c_vals, 0.4, color="#8fb0d8", label="records per CPU-second")
    for bars, vals, src in ((b1, w_vals, wall), (b2, c_vals, cpu)):
        for b, v, n in zip(bars, vals, names, strict=True):
            if v == v:
                each = "/".join(f"{y:.2f}" for y in src[n])
                ax.text(b.get_x() + b.get_width() / 2, v + 0.02, f"{v:.2f}\n({each})",
                        ha="center", fontsize=6.5)
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.axhline(0.6, color="red", ls="--", lw=1)
    ax.text(len(names) - 0.5, 0.62, "target 0.6x", color="red", ha="right", fontsize=8)
    p = r["params"]
    ax.set_ylabel("relative to the bare consumer (same repetition)")
    ax.set_title(f"{p['records']:,} readings, {p['partitions']} partitions: median of "
                 f"{p['repeats']} runs (each run in brackets)", fontsize=10)
    top = max(v for v in w_vals + c_vals if v == v)
    ax.set_ylim(0, max(1.3, top + 0.3))
    ax.legend(fontsize=8, loc="upper right")
    _save(fig, "throughput_ratios.png")


def latency(r: dict[str, Any]) -> None:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for run in r["runs"]:
        s = np.asarray(run["latency_sample_ms"])
        if len(s) == 0:
            continue
        a1.plot(np.sort(s), np.linspace(0, 1, len(s)), label=f"{run['name']} "
                f"({run['offered_rate']:,.0f}/s)")
    a1.axvline(50, color="red", ls="--", lw=1)
    a1.text(52, 0.05, "50 ms", color="red", fontsize=8)
    a1.set_xscale("log")
    a1.set_xlabel("end-to-end latency, ms (log)")
    a1.set_ylabel("share of days")
    a1.legend(fontsize=8)
    a1.set_title("latency distribution per run", fontsize=10)
    steady = sorted((x for x in r["runs"] if x["name"].startswith("steady")),
                    key=lambda x: x["offered_rate"])
    if steady:
        load = [x["offered_rate"] for x in steady]
        for q, m in (("p50_ms", "o-"), ("p95_ms", "s-"), ("p99_ms", "^-")):
            a2.plot(load, [x[q] for x in steady], m, label=q.replace("_ms", ""))
        a2.axhline(50, color="red", ls="--", lw=1)
        a2.set_yscale("log")
        a2.set_xlabel("offered load, readings/s")
        a2.set_ylabel("latency, ms (log)")
        a2.legend(fontsize=8)
        a2.set_title("steady stream: latency against load", fontsize=10)
    _save(fig, "latency.png")


def scorer(r: dict[str, Any]) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    default = r["params"]["torch_threads"]
    for dtype, m in (("float32", "o-"), ("bfloat16", "s-")):
        rows = [x for x in r["rows"] if x["dtype"] == dtype and "days_per_s" in x
                and x.get("threads", default) == default]
        if not rows:
            continue
        ax.plot([x["batch"] for x in rows], [x["days_per_s"] for x in rows], m,
                label=f"Detector.score {dtype}")
        ax.plot([x["batch"] for x in rows], [x["network_days_per_s"] for x in rows],
                m.replace("-", ":"), alpha=0.6, label=f"network alone {dtype}")
    one = [x for x in r["rows"] if x.get("threads", default) != default and "days_per_s" in x]
    if one:
        ax.plot([x["batch"] for x in one], [x["days_per_s"] for x in one], "^-", color="k",
                label=f"Detector.score float32, {one[0]['threads']} torch thread")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size, household-days")
    ax.set_ylabel("household-days/s")
    ax.set_title(f"scoring on {r['params']['device']} ({r['machine']['cpu'][:40]}, "
                 f"{r['params']['torch_threads']} threads)", fontsize=9)
    ax.legend(fontsize=8)
    _save(fig, "scorer.png")


def memory(r: dict[str, Any]) -> None:
    parts = r["breakdown"]
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    labels = [f"{x['group']}: {x['part']}" for x in parts]
    vals = [x["bytes_per_household_day"] for x in parts]
    colors = ["#4c72b0" if x["group"] == "day rows" else "#dd8452" for x in parts]
    ax.barh(labels, vals, color=colors)
    ax.invert_yaxis()
    for i, v in enumerate(vals):
        ax.text(v + 1, i, f"{v:.0f}", va="center", fontsize=7)
    ax.set_xlabel("bytes per open household-day")
    ax.set_title(f"{r['params']['households']:,} households: RSS growth "
                 f"{r['bytes_per_household_day']:.0f} B/household-day (target "
                 f"{r['target_bytes']})", fontsize=10)
    ax.tick_params(axis="y", labelsize=7)
    _save(fig, "memory.png")


def scaleout(r: dict[str, Any]) -> None:
    rows = r["summary"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    n = [x["processes"] for x in rows]
    v = [x["steady_readings_per_s"] for x in rows]
    ax.bar([str(x) for x in n], v, color="#4c72b0", label="measured (median)")
    ax.plot([str(x) for x in n], [v[0] * k / n[0] for k in n], "k--", lw=1, label="linear")
    for x in rows:
        for y in x["runs"]:
            ax.plot(str(x["processes"]), y, "k.", ms=4)
    ax.set_xlabel("service processes in the group")
    ax.set_ylabel("readings/s (10-90 % of days)")
    ax.set_title(f"scale-out on {r['machine']['logical_cpus']} CPUs", fontsize=10)
    ax.legend(fontsize=8)
    _save(fig, "scaleout.png")


def backfill(r: dict[str, Any]) -> None:
    s = np.asarray(r["series"])
    if len(s) == 0:
        return
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(s[:, 0], s[:, 2], label="household-days scored")
    ax.set_xlabel("seconds since the processes started")
    ax.set_ylabel("household-days scored")
    p = r["params"]
    ax.set_title(f"backfill {p['households']:,} households x {p['days']} days, "
                 f"{p['processes']} process(es)", fontsize=10)
    _save(fig, "backfill.png")


def main() -> int:
    for name, fn in (("throughput", throughput), ("latency", latency), ("scorer", scorer),
                     ("memory", memory), ("scaleout", scaleout), ("backfill", backfill)):
        r = common.latest_result(name)
        if r is None:
            print(f"no {name} results")
            continue
        fn(r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
