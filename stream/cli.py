"""The ``meterwatch`` command: run, train, simulate, demo, evaluate, config."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

log = logging.getLogger("meterwatch")


def _parser() -> argparse.ArgumentParser:
    from meterwatch.stream.config import Settings

    p = argparse.ArgumentParser(prog="meterwatch", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the service (a consumer-group member)")
    Settings.add_arguments(run)

    train = sub.add_parser("train", help="train a detector and save a checkpoint")
    train.add_argument("--out", type=Path, required=True, help="checkpoint path to write")
    src = train.add_mutually_exclusive_group(required=True)
    src.add_argument("--synthetic", action="store_true",
                     help="train on generated households")
    src.add_argument("--data", type=Path,
                     help="Low Carbon London readings: CSV, CSV.gz, tar.gz or a directory")
    train.add_argument("--households", type=int, default=200)
    train.add_argument("--days", type=int, default=28)
    train.add_argument("--household-info", type=Path)
    train.add_argument("--weather", type=Path)
    train.add_argument("--holidays", type=Path)
    train.add_argument("--until", help="train on days before this date (YYYY-MM-DD)")
    train.add_argument("--preset", choices=("default", "reference"), default="default")
    train.add_argument("--device", default="auto")
    train.add_argument("--plot", type=Path, help="write loss curves to this PNG")
    train.add_argument("--checkpoint-dir", type=Path, help="per-epoch checkpoints (resumable)")
    train.add_argument("--seed", type=int, default=0)

    sim = sub.add_parser("simulate", help="produce synthetic readings to a topic")
    sim.add_argument("--bootstrap-servers", default="127.0.0.1:9092")
    sim.add_argument("--topic", default="meterwatch.readings")
    sim.add_argument("--households", type=int, default=200)
    sim.add_argument("--days", type=int, default=14)
    sim.add_argument("--start", default="2013-03-01", help="first day (YYYY-MM-DD)")
    sim.add_argument("--anomaly-rate", type=float, default=0.04)
    sim.add_argument("--malformed-every", type=int, default=0,
                     help="mix in one malformed record every N records (0 = none)")
    sim.add_argument("--seed", type=int, default=1)

    demo = sub.add_parser("demo", help="the whole pipeline on an embedded broker")
    demo.add_argument("--households", type=int, default=200)
    demo.add_argument("--history-days", type=int, default=28)
    demo.add_argument("--stream-days", type=int, default=14)
    demo.add_argument("--metrics-port", type=int, default=0)
    demo.add_argument("--quiet-alerts", action="store_true", help="do not print each alert")

    ev = sub.add_parser("evaluate", help="evaluate against baselines on real data",
                        add_help=False)
    ev.add_argument("rest", nargs=argparse.REMAINDER)

    reset = sub.add_parser("reset", help="move an application's input position (stopped "
                           "group), keeping exactly-once; see docs/runtime.md")
    to = reset.add_mutually_exclusive_group(required=True)
    to.add_argument("--to-earliest", action="store_true")
    to.add_argument("--to-latest", action="store_true")
    to.add_argument("--to-datetime", metavar="ISO8601", help="e.g. 2013-01-01T00:00:00+00:00")
    Settings.add_arguments(reset)

    cfg = sub.add_parser("config", help="print the settings (secrets hidden)")
    cfg.add_argument("--markdown", action="store_true", help="the settings table")
    Settings.add_arguments(cfg)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["evaluate"]:
        from meterwatch.model.evaluate import main as evaluate_main

        return int(evaluate_main(argv[1:]) or 0)
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    try:
        return _dispatch(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"meterwatch: error: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from meterwatch.stream.config import Settings

    if args.command == "reset":
        from meterwatch.stream.reset import ResetTarget, reset_application

        offsets = asyncio.run(reset_application(
            Settings.from_args(args), ResetTarget.parse(args.to_earliest, args.to_latest,
                                                        args.to_datetime)))
        print(f"reset: partition -> offset {offsets}")
        return 0
    if args.command in ("run", "config"):
        try:
            settings = Settings.from_args(args)
        except ValidationError as exc:
            print(f"meterwatch: invalid settings:\n{exc}", file=sys.stderr)
            return 2
        if args.command == "config":
            if args.markdown:
                print(Settings.markdown_table())
            else:
                print(settings.model_dump_json(indent=2))
            return 0
        logging.getLogger().setLevel(settings.log_level)
        return asyncio.run(_run(settings))
    if args.command == "train":
        return _train(args)
    if args.command == "simulate":
        return asyncio.run(_simulate(args))
    if args.command == "demo":
        from meterwatch.stream.demo import DemoOptions, run_demo

        logging.getLogger().setLevel(logging.WARNING)
        return asyncio.run(run_demo(DemoOptions(
            households=args.households, history_days=args.history_days,
            stream_days=args.stream_days, metrics_port=args.metrics_port,
            quiet_alerts=args.quiet_alerts)))
    raise AssertionError(args.command)


async def _run(settings) -> int:  # type: ignore[no-untyped-def]
    from meterwatch.stream.service import run_service

    return await run_service(settings)  # 0 after a signal, 1 if a stage failed


def _train(args: argparse.Namespace) -> int:
    from meterwatch.model import (
        ContextTables,
        ModelConfig,
        SyntheticConfig,
        TrainConfig,
        generate,
        train_detector,
    )

    model_cfg = ModelConfig.reference() if args.preset == "reference" else ModelConfig.default()
    cfg = TrainConfig(model=model_cfg, device=args.device, seed=args.seed,
                      plot_path=str(args.plot) if args.plot else None,
                      checkpoint_dir=str(args.checkpoint_dir) if args.checkpoint_dir else None)
    if args.synthetic:
        data = generate(SyntheticConfig(n_households=args.households, n_days=args.days,
                                        anomaly_rate=0.0, seed=args.seed))
        ids, day, kwh, _ = data.long()
        tables = data.tables
    else:
        from meterwatch.model.loaders import load_readings

        ids, day, kwh = load_readings(args.data)
        if args.until:
            import datetime as dt

            cut = (dt.date.fromisoformat(args.until) - dt.date(1970, 1, 1)).days
            keep = day < cut
            ids = [h for h, k in zip(ids, keep, strict=True) if k]
            day, kwh = day[keep], kwh[keep]
        tables = ContextTables.from_files(household_csv=args.household_info,
                                          weather_csv=args.weather, holidays_csv=args.holidays)
    det = train_detector(kwh, day, ids, tables, cfg)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    det.save(args.out)
    print(f"saved {det.version} (threshold {det.threshold:.4f}) to {args.out}")
    return 0


async def _simulate(args: argparse.Namespace) -> int:
    import datetime as dt

    from meterwatch.model import SyntheticConfig, generate
    from meterwatch.stream.simulate import produce_synthetic

    data = generate(SyntheticConfig(n_households=args.households, n_days=args.days,
                                    start_day=dt.date.fromisoformat(args.start),
                                    anomaly_rate=args.anomaly_rate, seed=args.seed))
    stats = await produce_synthetic(args.bootstrap_servers, args.topic, data,
                                    malformed_every=args.malformed_every, seed=args.seed)
    print(f"produced {stats.readings:,} readings in {stats.records:,} records "
          f"({stats.malformed} malformed) in {stats.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
