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
import dataclasses
import logging
import time
from typing import Any

import numpy as np
import torch


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


def run(rows: int, epochs: int, device: str, amps: list[str], modes: list[str],
        threads: int | None = None) -> list[dict[str, Any]]:
    from meterwatch.model import TrainConfig
    from meterwatch.model.training import fit_autoencoder

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    t0 = time.perf_counter()
    train, val = make_inputs(rows)
    print(f"inputs: {rows:,} training rows in {time.perf_counter() - t0:.1f} s; device {dev}, "
          f"torch threads {torch.get_num_threads()}", flush=True)
    out: list[dict[str, Any]] = []
    for amp in amps:
        for mode in modes:
            cfg = TrainConfig(max_epochs=epochs, patience=10**6, lr_patience=10**6,
                              device=device, amp=amp,  # type: ignore[arg-type]
                              resident=mode == "resident")
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
            t0 = time.perf_counter()
            _, hist = fit_autoencoder(train, val, cfg, dev)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            sec = time.perf_counter() - t0
            row = {"device": str(dev), "mode": mode, "amp": amp, "rows": rows,
                   "epochs": len(hist.epoch), "seconds": sec,
                   "rows_per_s": rows * len(hist.epoch) / sec,
                   "final_train_loss": hist.train_loss[-1], "final_val_loss": hist.val_loss[-1]}
            if dev.type == "cuda":
                row["cuda_peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
            out.append(row)
            print(f"  {mode:8s} amp={amp:4s} {len(hist.epoch)} epochs in {sec:7.1f} s  "
                  f"{row['rows_per_s']:>12,.0f} rows/s  val loss {hist.val_loss[-1]:.5f}",
                  flush=True)
    return out


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
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    amps = (args.amp or ("off,auto" if args.device.startswith("cuda") else "off")).split(",")
    rows = run(args.rows, args.epochs, args.device, amps, args.modes.split(","), args.threads)
    print()
    print(common.table([{k: r[k] for k in ("mode", "amp", "epochs", "seconds", "rows_per_s",
                                           "final_val_loss")} for r in rows]))
    by = {(r["mode"], r["amp"]): r["seconds"] for r in rows}
    for amp in amps:
        if ("loader", amp) in by and ("resident", amp) in by:
            print(f"amp={amp}: resident is {by['loader', amp] / by['resident', amp]:.2f}x "
                  "the loader's speed")
    common.save_result("gpu_training", {"params": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
