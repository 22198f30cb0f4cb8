"""How long ``meterwatch run`` takes to start: the installed console script, launched as a user
types it, timed from the process start to (1) its settings line and (2) its first
connection attempt (the first "broker not reachable" line, against a port nothing listens
on): by then the checkpoints are loaded and validated, the context CSVs read, the probes
server and the scorer started. Each run is then stopped with SIGTERM.

    python -m benchmarks.startup_time --model-path model.pt [--shadow-model-path m2.pt]
        [--scorer thread] [--weather w.csv] [--household-info h.csv] [--runs 5]
        [--code DIR ...]

Prints the median (min-max) of each time, and of the time between the two, over ``--runs``
runs (docs/startup.md). ``--code DIR`` (repeatable): also time the code in ``DIR`` (a folder
holding ``meterwatch/stream`` and ``meterwatch/model``, e.g. an earlier commit's
``git archive HEAD stream model`` extracted under ``DIR/meterwatch``), the runs of each
interleaved so that the load of a shared machine falls on all of them alike; without it
the installed ``meterwatch``.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

METERWATCH = Path(sys.executable).parent / "meterwatch"


def command(code: str | None) -> list[str]:
    if code is None:
        return [str(METERWATCH)]
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {code!r}); from "
            "meterwatch.stream.cli import main; raise SystemExit(main())"]


def one_run(cmd: list[str], args: list[str]) -> tuple[float, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERWATCH_")}
    env.update(PYTHONUNBUFFERED="1", METERWATCH_BOOTSTRAP_SERVERS="127.0.0.1:1",
               METERWATCH_METRICS_PORT="0")
    t0 = time.monotonic()
    proc = subprocess.Popen([*cmd, "run", *args], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env=env)
    assert proc.stderr is not None
    settings = connect = float("nan")
    try:
        for line in proc.stderr:
            if " starting: " in line and settings != settings:
                settings = time.monotonic() - t0
            if "broker not reachable" in line:
                connect = time.monotonic() - t0
                break
            if "meterwatch: error:" in line or "Traceback" in line:
                raise SystemExit(line)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    return settings, connect


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-path", required=True)
    p.add_argument("--shadow-model-path")
    p.add_argument("--scorer", choices=("process", "thread"), default="process")
    p.add_argument("--weather")
    p.add_argument("--household-info")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--code", action="append", help="a folder holding meterwatch/stream and "
                   "meterwatch/model to time too (repeatable)")
    a = p.parse_args()
    args = ["--model-path", a.model_path, "--scorer", a.scorer]
    for flag, value in (("--shadow-model-path", a.shadow_model_path),
                        ("--weather", a.weather), ("--household-info", a.household_info)):
        if value:
            args += [flag, value]
    codes = a.code or [None]
    for code in codes:
        one_run(command(code), args)  # warm the page cache
    runs: dict[str | None, list[tuple[float, float]]] = {code: [] for code in codes}
    for _ in range(a.runs):
        for code in codes:
            runs[code].append(one_run(command(code), args))
    for code, rs in runs.items():
        print(code or "installed")
        for name, xs in (("settings line", [r[0] for r in rs]),
                         ("first connection attempt", [r[1] for r in rs]),
                         ("  settings -> connection", [r[1] - r[0] for r in rs])):
            print(f"  {name:26s} {statistics.median(xs):.2f} s ({min(xs):.2f}-{max(xs):.2f})")


if __name__ == "__main__":
    main()
