"""Training throughput: data resident on the device vs the DataLoader, AMP on/off.

``model.training.fit_autoencoder`` runs exactly ``--epochs`` epochs (early stopping off) over
``--rows`` synthetic household-days (a pool of synthetic households' days, through the same
``model_inputs`` as training, tiled to the row count), once with the training set resident
on the device (``TrainConfig.resident=True``: one ``randperm`` per epoch, batches indexed on
the device, one host synchronisation per epoch) and once through the ``DataLoader``
(``resident=False``, workers as the training default picks them). Batch size is the training
default (65,536 at 1 M rows). On CUDA each is also run with AMP (bf16 where supported).

    python -m benchmarks.gpu_training                        # CPU, 20 epochs x 1 M days
    python -m benchmarks.gpu_training --device cuda          # GPU, AMP off and auto
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.gpu_results import PartialResult


def make_inputs(rows: int, seed: int = 5) -> tuple[Any, Any]:
    """(train, val) ``ModelInputs``: ``rows`` training rows and 1/50 of that for validation."""
    from meterwatch.model import SyntheticConfig, generate
    from meterwatch.model.detector import ScoringConfig
    from meterwatch.model.features import ModelInputs, model_inputs
    from meterwatch.model.training import trailing_levels

    data = generate(SyntheticConfig(n_households=1000, n_days=28, anomaly_rate=0.0, seed=seed))
    ids, day, kwh, _ = data.long()
    level = trailing_levels(kwh, day, ids, ScoringConfig())
    pool = model_inputs(kwh, day, ids, level, data.tables, 12.0)

    def tile(n: int, offset: int) -> ModelInputs:
        idx = (np.arange(n) + offset) % len(pool.x)
        return ModelInputs(**{f.name: np.ascontiguousarray(getattr(pool, f.name)[idx])
                              for f in dataclasses.fields(pool)})

    return tile(rows, 0), tile(max(1024, rows // 50), 7)


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its reaped children (DataLoader workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _fit(train: Any, val: Any, dev: torch.device, mode: str, amp: str, until: int,
         ckpt: str | None) -> tuple[float, float, Any]:
    """One ``fit_autoencoder`` call up to epoch ``until`` (resumed from ``ckpt`` when it
    holds an earlier chunk of the same run): (wall seconds, CPU seconds, history)."""
    from meterwatch.model import TrainConfig
    from meterwatch.model.training import fit_autoencoder

    cfg = TrainConfig(max_epochs=until, patience=10**6, lr_patience=10**6,
                      device=str(dev), amp=amp,  # type: ignore[arg-type]
                      resident=mode == "resident", checkpoint_dir=ckpt, resume=True)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    c0, t0 = _cpu_seconds(), time.perf_counter()
    _, hist = fit_autoencoder(train, val, cfg, dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t0, _cpu_seconds() - c0, hist


def run(rows: int, epochs: int, device: str, amps: list[str], modes: list[str],
        threads: int | None = None, interleave: int = 0,
        partial: PartialResult | None = None) -> list[dict[str, Any]]:
    """One row per (amp, mode). ``interleave`` > 0: each mode's training runs in chunks of
    that many epochs, the modes taking turns (A B, B A, A B, ...; each resumed from its own
    per-epoch checkpoint), so a busy moment of a shared machine falls on both alike."""
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    t0 = time.perf_counter()
    train, val = make_inputs(rows)
    print(f"inputs: {rows:,} training rows in {time.perf_counter() - t0:.1f} s; device {dev}, "
          f"torch threads {torch.get_num_threads()}", flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="gpu-training-", dir=_scratch()))
    # untimed: one short call per mode first, so the first timed one pays no one-off
    # initialisation (thread pools, allocator, CUDA context and kernels)
    small = min(rows, 8192)
    wt, wv = make_inputs(small)
    for mode in modes:
        with contextlib.suppress(RuntimeError, MemoryError, OSError):  # recorded below
            _fit(wt, wv, dev, mode, amps[0], 1, None)
    out: list[dict[str, Any]] = []
    chunks: list[dict[str, Any]] = []
    try:
        for amp in amps:
            step = interleave if interleave > 0 and len(modes) > 1 else epochs
            done = dict.fromkeys(modes, 0)
            acc = {m: {"seconds": 0.0, "cpu_seconds": 0.0, "calls": 0} for m in modes}
            hists: dict[str, Any] = {}
            failed: dict[str, str] = {}
            peak: dict[str, float] = {}
            k = 0
            while any(d < epochs for d in done.values()):
                order = modes if k % 2 == 0 else modes[::-1]
                k += 1
                for mode in order:
                    if done[mode] >= epochs:
                        continue
                    until = min(epochs, done[mode] + step)
                    if dev.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(dev)
                    load0 = os.getloadavg()[0]
                    ckpt = str(scratch / f"{mode}-{amp}") if step < epochs else None
                    try:
                        sec, cpu, hist = _fit(train, val, dev, mode, amp, until, ckpt)
                    except (RuntimeError, MemoryError, OSError) as exc:
                        # e.g. a DataLoader worker killed by a small /dev/shm, or out of
                        # memory: recorded, and the other modes still run
                        failed[mode] = f"{type(exc).__name__}: {exc}"[:500]
                        done[mode] = epochs
                        chunks.append({"mode": mode, "amp": amp, "error": failed[mode]})
                        print(f"  {mode:8s} amp={amp:4s} FAILED: {failed[mode]}", flush=True)
                        if dev.type == "cuda":
                            torch.cuda.empty_cache()
                        continue
                    if dev.type == "cuda":
                        peak[mode] = max(peak.get(mode, 0.0),
                                         torch.cuda.max_memory_allocated(dev) / 2**30)
                    chunk = {"mode": mode, "amp": amp, "epochs": f"{done[mode]}-{until}",
                             "seconds": sec, "cpu_seconds": cpu,
                             "rows_per_s": rows * (until - done[mode]) / sec,
                             "load_average_before": round(load0, 2),
                             "load_average_after": round(os.getloadavg()[0], 2)}
                    chunks.append(chunk)
                    acc[mode]["seconds"] += sec
                    acc[mode]["cpu_seconds"] += cpu
                    acc[mode]["calls"] += 1
                    done[mode], hists[mode] = until, hist
                    print(f"  {mode:8s} amp={amp:4s} epochs {chunk['epochs']:>6s} in "
                          f"{sec:7.1f} s ({cpu:7.1f} CPU-s)  {chunk['rows_per_s']:>12,.0f} "
                          f"rows/s  load {chunk['load_average_before']:.1f}->"
                          f"{chunk['load_average_after']:.1f}", flush=True)
                    if partial is not None:
                        partial.update(chunks=chunks, rows=out)
            for mode in modes:
                if mode in failed:
                    out.append({"device": str(dev), "mode": mode, "amp": amp, "rows": rows,
                                "error": failed[mode]})
                    continue
                a, hist = acc[mode], hists[mode]
                row = {"device": str(dev), "mode": mode, "amp": amp, "rows": rows,
                       "epochs": len(hist.epoch), "seconds": a["seconds"],
                       "cpu_seconds": a["cpu_seconds"], "calls": a["calls"],
                       "rows_per_s": rows * len(hist.epoch) / a["seconds"],
                       "rows_per_cpu_s": rows * len(hist.epoch) / a["cpu_seconds"],
                       "final_train_loss": hist.train_loss[-1],
                       "final_val_loss": hist.val_loss[-1]}
                if mode in peak:
                    row["cuda_peak_gib"] = peak[mode]
                out.append(row)
                print(f"  {mode:8s} amp={amp:4s} {len(hist.epoch)} epochs in "
                      f"{a['seconds']:7.1f} s  {row['rows_per_s']:>12,.0f} rows/s  "
                      f"val loss {hist.val_loss[-1]:.5f}", flush=True)
            if partial is not None:
                partial.update(chunks=chunks, rows=out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def _scratch() -> Path:
    from benchmarks import common

    common.SCRATCH.mkdir(parents=True, exist_ok=True)
    return common.SCRATCH


def main(argv: list[str] | None = None) -> int:
    from benchmarks import common

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--amp", default=None, help="comma list of off,auto,bf16,fp16 "
                   "(default: off on the CPU, off,auto on CUDA)")
    p.add_argument("--modes", default="loader,resident")
    p.add_argument("--threads", type=int)
    p.add_argument("--interleave", type=int, default=0, metavar="EPOCHS",
                   help="run the modes in turns, this many epochs at a time (0: one after "
                   "the other)")
    p.add_argument("--result", default="gpu_training",
                   help="results/<this>.json (rewritten after every chunk)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    amps = (args.amp or ("off,auto" if args.device.startswith("cuda") else "off")).split(",")
    partial = PartialResult(args.result, vars(args))
    rows = run(args.rows, args.epochs, args.device, amps, args.modes.split(","), args.threads,
               args.interleave, partial)
    print()
    print(common.table([{k: r.get(k) for k in ("mode", "amp", "epochs", "seconds", "rows_per_s",
                                               "cpu_seconds", "final_val_loss", "error")}
                        for r in rows]))
    by = {(r["mode"], r["amp"]): r for r in rows if "error" not in r}
    ratios = {}
    for amp in amps:
        if ("loader", amp) in by and ("resident", amp) in by:
            lo, re = by["loader", amp], by["resident", amp]
            ratios[amp] = {"wall": lo["seconds"] / re["seconds"],
                           "cpu": lo["cpu_seconds"] / re["cpu_seconds"]}
            print(f"amp={amp}: resident is {ratios[amp]['wall']:.2f}x the loader's speed "
                  f"(wall), {ratios[amp]['cpu']:.2f}x per CPU-second")
    partial.finish(rows=rows, resident_over_loader=ratios)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
