"""A long run of the service as it is deployed, watched for what grows: memory, lag, latency.

Three processes, as an operator would run them:

* a broker: the embedded Tansu, or ``KAFKA_BOOTSTRAP_SERVERS`` when set;
* ``meterwatch run``, the console script, with its default settings but for what a
  deployment must name (topics, group, ``--model-path``, the metrics port);
* ``meterwatch simulate``: ``--households`` synthetic households at ``--rate`` readings per
  second for ``--duration-s`` (day after day, in time order; anomalies injected and one
  malformed record every ``--malformed-every``).

Every ``--every-s`` seconds: the resident memory of the service and of its scorer process,
their CPU, and the service's /metrics (readings, days completed and scored, dead letters,
consumer lag, open days, the end-to-end latency histogram). When the producer is done, the
service gets up to ``--drain-s`` to catch up, then SIGTERM.

Checked at the end (each is a line of the report, and a failed one makes the exit status 1):
every record read, every valid reading produced accepted, every completed (or imputed) day
scored, every malformed record dead-lettered and nothing else, the service exited 0.
Reported: memory over time and its growth over the second half of the run (a linear fit, MB
per hour), lag and latency per interval.

    python -m benchmarks.soak [--duration-s 1800 --households 2000 --rate 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from benchmarks import common

METERWATCH = Path(sys.executable).parent / "meterwatch"
PARTITIONS = 8
LATENCY = "meterwatch_end_to_end_latency_seconds_bucket"
_LE = re.compile(r'le="([^"]+)"')


def buckets(m: dict[str, float]) -> dict[float, float]:
    """The latency histogram's cumulative buckets (upper bound -> count)."""
    out = {}
    for key, v in m.items():
        if key.startswith(LATENCY + "{"):
            le = _LE.search(key)
            if le:
                out[float(le.group(1))] = v
    return out


def quantile(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    """``histogram_quantile`` of the observations between two scrapes (linear within the
    bucket, as Prometheus does); None without observations."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank = q * counts[-1]
    lower, below = 0.0, 0.0
    for bound, c in zip(bounds, counts, strict=True):
        if c >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / max(c - below, 1e-12)
        lower, below = bound, c
    return None


def memory(proc: psutil.Process) -> tuple[float, float, float]:
    """(service RSS MB, scorer process RSS MB, CPU seconds of both)."""
    try:
        main = proc.memory_info().rss
        cpu = sum(proc.cpu_times()[:2])
        kids = proc.children(recursive=True)
    except psutil.Error:
        return math.nan, math.nan, math.nan
    child_rss = 0
    for k in kids:
        try:
            child_rss += k.memory_info().rss
            cpu += sum(k.cpu_times()[:2])
        except psutil.Error:
            pass
    return main / 2**20, child_rss / 2**20, cpu


def snapshot(t: float, proc: psutil.Process, port: int) -> dict[str, Any]:
    m = common.scrape(port)
    rss, child, cpu = memory(proc)
    return {
        "t": t, "rss_mb": rss, "scorer_rss_mb": child, "cpu_s": cpu,
        "readings": m.get("meterwatch_readings_total", 0.0),
        "records": m.get("meterwatch_records_total", 0.0),
        "days_completed": m.get("meterwatch_days_completed_total", 0.0),
        "days_scored": m.get("meterwatch_days_scored_total", 0.0),
        "days_incomplete": m.get("meterwatch_days_incomplete_total", 0.0),
        "days_imputed": m.get("meterwatch_days_imputed_total", 0.0),
        "dead_letters": m.get("meterwatch_dead_letter_records_total{*}", 0.0),
        "alerts": m.get("meterwatch_alerts_total{*}", 0.0),
        "lag": m.get("meterwatch_consumer_lag_records{*}", 0.0),
        "open_days": m.get("meterwatch_open_days", 0.0),
        "rebalances": m.get("meterwatch_rebalances_total", 0.0),
        "latency_buckets": buckets(m),
    }


def growth_mb_per_hour(samples: list[dict[str, Any]], key: str, t_from: float, t_to: float
                       ) -> float | None:
    pts = [(s["t"], s[key]) for s in samples
           if t_from <= s["t"] <= t_to and not math.isnan(s[key])]
    if len(pts) < 3:
        return None
    t, v = np.array(pts).T
    return float(np.polyfit(t, v, 1)[0] * 3600.0)


def produced(text: str) -> dict[str, int]:
    """``meterwatch simulate``'s last line: readings, records, malformed."""
    m = re.search(r"produced ([\d,]+) readings in ([\d,]+) records \((\d+) malformed\)", text)
    if not m:
        raise RuntimeError(f"meterwatch simulate printed no summary: {text[-2000:]}")
    n = [int(g.replace(",", "")) for g in m.groups()]
    return {"readings": n[0], "records": n[1], "malformed": n[2]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    model = common.detector_path(args.model)
    logs = common.SCRATCH / "soak"
    logs.mkdir(parents=True, exist_ok=True)
    from meterwatch.stream.broker import create_topics, free_port
    from meterwatch.stream.testing import cli_env, ready

    with common.broker() as b:
        tag = common.new_tag()
        port = free_port()
        # what a deployment names; everything else is the default
        env = cli_env(b, tag, METERWATCH_MODEL_PATH=str(model),
                      METERWATCH_METRICS_PORT=str(port))
        asyncio.run(create_topics(b.bootstrap_servers,
                                  {env["METERWATCH_INPUT_TOPIC"]: PARTITIONS}))
        service_log = logs / f"service-{tag}.log"
        with open(service_log, "wb") as log:
            service = subprocess.Popen([str(METERWATCH), "run"], env=env, stdout=log,
                                       stderr=subprocess.STDOUT)
        proc = psutil.Process(service.pid)
        t0 = time.monotonic()
        while not ready(port):
            if service.poll() is not None or time.monotonic() - t0 > 180:
                service.kill()
                raise RuntimeError(f"meterwatch run did not start; see {service_log}")
            time.sleep(0.5)
        days = math.ceil(args.duration_s * args.rate / (48 * args.households)) + 2
        sim_cmd = [str(METERWATCH), "simulate", "--households", str(args.households),
                   "--days", str(days), "--rate", str(args.rate),
                   "--duration", str(args.duration_s),
                   "--malformed-every", str(args.malformed_every),
                   "--labels", str(logs / f"labels-{tag}.csv")]
        sim_log = logs / f"simulate-{tag}.log"
        samples: list[dict[str, Any]] = []
        t_start = time.monotonic()

        def take() -> dict[str, Any]:
            s = snapshot(time.monotonic() - t_start, proc, port)
            samples.append(s)
            return s

        with open(sim_log, "wb") as log:
            sim = subprocess.Popen(sim_cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        print(f"soak: {args.households:,} households at {args.rate:,.0f} readings/s for "
              f"{args.duration_s:.0f} s on {b.kind}; logs in {logs}", flush=True)
        next_at = 0.0
        while sim.poll() is None:
            if service.poll() is not None:
                sim.kill()
                raise RuntimeError(f"meterwatch run exited with {service.returncode} "
                                   f"mid-run; see {service_log}")
            if time.monotonic() - t_start >= next_at:
                s = take()
                next_at += args.every_s
                print(f"  {s['t']:7.0f} s  RSS {s['rss_mb']:7.1f} + {s['scorer_rss_mb']:6.1f} MB"
                      f"  days scored {s['days_scored']:>10,.0f}  lag {s['lag']:>9,.0f}",
                      flush=True)
            time.sleep(0.2)
        t_produced = time.monotonic() - t_start
        sim_text = sim_log.read_text(errors="replace")
        if sim.returncode != 0:
            service.kill()
            raise RuntimeError(f"meterwatch simulate exited {sim.returncode}: {sim_text[-2000:]}")
        want = produced(sim_text)
        deadline = time.monotonic() + args.drain_s
        caught_up = False
        while not caught_up:  # catch up: every record read, every closed day scored
            s = take()
            caught_up = (s["records"] >= want["records"] and s["lag"] == 0
                         and s["days_scored"] >= s["days_completed"] + s["days_imputed"])
            if time.monotonic() > deadline:
                break
            time.sleep(0 if caught_up else min(args.every_s, 2.0))
        t_drained = time.monotonic() - t_start if caught_up else None
        service.send_signal(signal.SIGTERM)
        try:
            code = service.wait(120)
        except subprocess.TimeoutExpired:
            service.kill()
            code = service.wait()
    return summarise(args, b.kind, samples, want, t_produced, t_drained, code, service_log)


def summarise(args: argparse.Namespace, broker_kind: str, samples: list[dict[str, Any]],
              want: dict[str, int], t_produced: float, t_drained: float | None, code: int,
              service_log: Path) -> dict[str, Any]:
    last = samples[-1]
    complete = want["readings"] // (48 * args.households) * args.households
    checks = {
        "every record read": last["records"] == want["records"],
        "every valid reading accepted": last["readings"] == want["readings"],
        "every completed or imputed day scored":
            last["days_scored"] == last["days_completed"] + last["days_imputed"],
        "at least every fully produced day scored": last["days_scored"] >= complete,
        "every malformed record dead-lettered": last["dead_letters"] == want["malformed"],
        "no day left incomplete": last["days_incomplete"] == 0,
        "exit status 0 on SIGTERM": code == 0,
    }
    rows = []
    for a, s in itertools.pairwise(samples):
        dt_s = s["t"] - a["t"]
        if dt_s <= 0:
            continue
        p50 = quantile(a["latency_buckets"], s["latency_buckets"], 0.5)
        p99 = quantile(a["latency_buckets"], s["latency_buckets"], 0.99)
        rows.append({
            "t_s": round(s["t"]), "rss_mb": round(s["rss_mb"], 1),
            "scorer_rss_mb": round(s["scorer_rss_mb"], 1),
            "readings_per_s": round((s["readings"] - a["readings"]) / dt_s),
            "cpu_cores": round((s["cpu_s"] - a["cpu_s"]) / dt_s, 2),
            "days_scored": int(s["days_scored"]), "lag": int(s["lag"]),
            "open_days": int(s["open_days"]),
            "latency_p50_s": None if p50 is None else round(p50, 3),
            "latency_p99_s": None if p99 is None else round(p99, 3),
        })
    half = t_produced / 2
    result = {
        "params": {"households": args.households, "rate": args.rate,
                   "duration_s": args.duration_s, "malformed_every": args.malformed_every,
                   "every_s": args.every_s, "broker": broker_kind,
                   "model": str(common.detector_path(args.model))},
        "produced": want, "seconds_producing": round(t_produced, 1),
        "seconds_to_drain": None if t_drained is None else round(t_drained - t_produced, 1),
        "extra_dead_letters": int(last["dead_letters"] - want["malformed"]),
        "simulated_days": round(last["days_scored"] / args.households, 1),
        "final": {k: v for k, v in last.items() if k != "latency_buckets"},
        "growth_second_half_mb_per_hour": {
            "service": growth_mb_per_hour(samples, "rss_mb", half, t_produced),
            "scorer": growth_mb_per_hour(samples, "scorer_rss_mb", half, t_produced)},
        "checks": checks, "exit_code": code, "service_log": str(service_log),
        "intervals": rows,
    }
    return result


def report(r: dict[str, Any]) -> str:
    rows = r["intervals"]
    step = max(1, len(rows) // 16)
    shown = rows[::step] + ([rows[-1]] if rows and (len(rows) - 1) % step else [])
    g = r["growth_second_half_mb_per_hour"]

    def mb(v: float | None) -> str:
        return "n/a" if v is None else f"{v:+.1f} MB/hour"

    lines = [
        f"{r['params']['households']:,} households at {r['params']['rate']:,.0f} readings/s "
        f"for {r['seconds_producing']:.0f} s ({r['simulated_days']} simulated days), broker "
        f"{r['params']['broker']}; produced {r['produced']['readings']:,} readings, "
        f"{r['produced']['malformed']:,} malformed records; "
        + ("did not catch up" if r["seconds_to_drain"] is None else
           f"caught up {r['seconds_to_drain']:.1f} s after the producer stopped")
        + (f"; {r['extra_dead_letters']:,} dead letters beyond the malformed records "
           "(see the dead-letter topic)" if r["extra_dead_letters"] else ""), "",
        common.table(shown), "",
        f"memory growth over the second half: service {mb(g['service'])}, scorer process "
        f"{mb(g['scorer'])}", ""]
    lines += [f"- {'ok  ' if ok else 'FAIL'} {name}" for name, ok in r["checks"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration-s", type=float, default=1800.0)
    p.add_argument("--households", type=int, default=2000)
    p.add_argument("--rate", type=float, default=10000.0, help="readings per second")
    p.add_argument("--malformed-every", type=int, default=1000)
    p.add_argument("--every-s", type=float, default=15.0, help="seconds between samples")
    p.add_argument("--drain-s", type=float, default=300.0,
                   help="how long the service may take to catch up after the producer")
    p.add_argument("--model", help="detector checkpoint (default: train a small one)")
    args = p.parse_args(argv)
    r = run(args)
    text = report(r)
    print(text)
    common.save_result("soak", r)
    return 0 if all(r["checks"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
