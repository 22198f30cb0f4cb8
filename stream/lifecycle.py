"""Model lifecycle: swapping the checkpoint of a running service, and shadow scoring.

``ModelLifecycle`` is what the service (``stream.service``, the data path) calls: it loads
the models at start, watches their files, validates candidates, swaps them into the scorer
between two batches, accounts for refusals and turns the shadow's results into metrics.

**Swap without a restart.** ``ModelWatcher`` watches ``--model-path``: every
``--model-poll-s`` seconds (default 5) it compares the file's modification time, size and
inode with the checkpoint being served, and ``SIGHUP`` makes it look at once. A changed file
is taken only once it has stayed the same for one more look (a checkpoint copied in place
with ``cp`` is not read half-written; ``meterwatch train --out`` writes a temporary file and
renames it, which is atomic). The candidate is then validated (``validate``) before anything
changes:

1. it loads (``Detector.load``: format, feature names, weights) and, with ``--target-far``,
   has a calibration curve that covers the budget;
2. it has the same input contract as this code and the model being served (48 half-hours, the
   same context features and signals);
3. its network reconstructs, and it scores, a small synthetic history (8 households x 6
   days, ``model.synthetic``) to finite values: in the service, and with a scorer process
   again on that process's own device (``stream.scorer.Scorer.swap``). A worker thread
   scores the very object the service validated, on the device it was validated on, so it
   is validated once.

A candidate that fails any step is refused: one log line with the reason,
``meterwatch_model_reload_failures_total`` counts it, and the old model keeps serving (the
same file is not tried again until it changes). An accepted one replaces the model in the
scorer between two batches (the scorer takes one request at a time, so the swap waits for
the batch being scored and the next batch is the new model's): no day is lost or scored
twice, and every day score and alert carries the ``model_version`` that scored it. The
household state carries over (the new model continues each household's statistics); with
``--calibration rolling`` the new model's live window starts empty (its checkpoint's curve
stands until it has 500 household-days).

**Shadow mode.** With ``--shadow-model-path`` the scorer also scores every batch with a
second model, from the same household state as the live one (the state it would inherit if
it were swapped in), and sends its scores and alert decisions back; they are never
published. ``ShadowComparison`` turns them into agreement metrics.

**The context files follow their files too.** ``--household-info``, ``--weather`` and
``--holidays`` are watched the same way (one watcher for the three); when one changes, all
three are read again (off the event loop) and the scorer takes what changed between two
batches (``Scorer.update_tables``: the live model and the shadow). A file that cannot be
read is refused (log line, ``meterwatch_context_reload_failures_total``) and the tables read
before go on. They used to be read once at start: a service that outran its weather file
scored every later day without weather, new households as unknown ones and a new year's bank
holidays as ordinary days, until it was restarted. The service counts the days scored
without their weather or household row, or past the holidays file's last year
(``meterwatch_days_without_context_total``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from meterwatch.model import ContextTables, Detector, SyntheticConfig, generate
from meterwatch.model.features import (
    FEATURE_NAMES,
    N_SLOTS,
    describe_unknown,
    encode,
    model_inputs,
    unknown_values,
)
from meterwatch.model.loaders import day_to_date, zone_key
from meterwatch.stream.config import Settings
from meterwatch.stream.errors import ConfigurationError, first_line, problem_of
from meterwatch.stream.metrics import Metrics

if TYPE_CHECKING:  # stream.scorer and stream.preflight import this module (validate)
    from meterwatch.stream.preflight import Checked
    from meterwatch.stream.scorer import Scored, Scorer

log = logging.getLogger(__name__)

#: The synthetic history a candidate model must score to finite values.
VALIDATION_HOUSEHOLDS = 8
VALIDATION_DAYS = 6


class ModelRejected(ValueError):
    """A candidate checkpoint that must not serve; the message says why (one line)."""


def other_zone(det: Detector, timezone: str) -> str | None:
    """The time zone ``det`` was trained in (``meterwatch train --timezone``, kept in its
    ``info``) when it is not ``timezone``; None when they agree or the checkpoint does not
    say (synthetic training, older checkpoints)."""
    trained = det.info.get("timezone")
    if trained is None or zone_key(str(trained)) == zone_key(timezone):
        return None
    return str(trained)


def validate(det: Detector, current: Detector | None = None,
             tables: ContextTables | None = None, timezone: str | None = None) -> None:
    """Raise ``ModelRejected`` unless ``det`` can take over from ``current`` (steps 2-3 of
    the module docstring; step 1 is loading it); ``timezone``: the service's, which the
    model's training days must have been cut in too (``other_zone``)."""
    trained = None if timezone is None else other_zone(det, timezone)
    if trained is not None:
        raise ModelRejected(f"{det.version}: trained on days in {trained}, but this service "
                            f"cuts days in {timezone} (--timezone)")
    cfg = det.config
    if cfg.n_slots != N_SLOTS or cfg.n_context != len(FEATURE_NAMES):
        raise ModelRejected(f"{det.version}: input contract {cfg.n_slots} readings + "
                            f"{cfg.n_context} context features, this code feeds {N_SLOTS} + "
                            f"{len(FEATURE_NAMES)}")
    if current is not None and (current.config.n_slots, current.config.n_context) != (
            cfg.n_slots, cfg.n_context):
        raise ModelRejected(f"{det.version}: input contract differs from the model serving "
                            f"({current.version})")
    data = generate(SyntheticConfig(n_households=VALIDATION_HOUSEHOLDS,
                                    n_days=VALIDATION_DAYS, anomaly_rate=0.0, seed=7))
    ids, day, kwh, _ = data.long(slice(0, VALIDATION_DAYS))
    try:
        scores, _ = det.replay(kwh, day, ids, tables)
    except Exception as exc:  # a broken network, a mismatched state dict, anything
        raise ModelRejected(f"{det.version}: scoring a synthetic batch failed "
                            f"({type(exc).__name__}: {str(exc)[:200]})") from exc
    # the network itself (scoring would hide a NaN reconstruction behind its own guards)
    inp = model_inputs(kwh, day, ids, np.full(len(day), np.nan, np.float32),
                       encode(tables, det.vocabulary), det.scoring.max_kwh)
    recon = det.reconstruct(inp.x_shape if cfg.shape_input else inp.x, inp.context)
    if not np.isfinite(recon).all():
        raise ModelRejected(f"{det.version}: the network reconstructs synthetic days to "
                            "non-finite values")
    bad = ~np.isfinite(scores.score) | ~np.isfinite(scores.model_score)
    if bad.any():
        raise ModelRejected(f"{det.version}: {int(bad.sum())} of {len(bad)} synthetic "
                            "household-days scored to non-finite values")
    if not np.isfinite(det.threshold):
        raise ModelRejected(f"{det.version}: threshold {det.threshold} is not finite")


def apply_budget(det: Detector, far: float | None, flag: str, *,
                 optional: bool = False) -> bool:
    """``--target-far`` (``far``) on ``det``; returns whether it was applied. Raises
    ``ConfigurationError`` naming ``flag`` (exit status 2 at start) for a rate outside the
    checkpoint's curve, and for a checkpoint without a curve unless ``optional`` (the
    shadow, which then keeps its own threshold: False)."""
    if far is None:
        return False
    if det.far_curve is None:
        if optional:
            return False
        raise ConfigurationError(
            flag, f"the checkpoint {det.version} has no calibration curve, so it cannot "
            f"take --target-far {far:g}", "retrain it with this version of meterwatch "
            "train, or leave --target-far out (the checkpoint's own threshold)")
    try:
        det.set_target_far(far)
    except ValueError as exc:
        raise ConfigurationError(flag, problem_of(exc),
                                 "choose a --target-far inside that range") from None
    return True


#: ``ContextTables.changed``'s fields, as the log names them
_PART_NAMES = {"acorn_group": "household information", "tariff": "household information",
               "weather_day": "weather", "temp_max": "weather", "temp_min": "weather",
               "holidays": "bank holidays"}


def describe_tables(tables: ContextTables | None, detector: Detector | None = None) -> str:
    """What the context tables hold, for the log: how many households, the last day of
    the weather and of the bank holidays (what a service running past them lacks), and the
    households whose group or tariff ``detector`` does not know (scored as unknown)."""
    if tables is None:
        return "none"

    def last(days: np.ndarray) -> str:
        return day_to_date(days[-1]).isoformat() \
            if len(days) else "none"

    households = len(set(tables.tariff) | set(tables.acorn_group))
    unknown = "" if detector is None else describe_unknown(
        unknown_values(tables, detector.vocabulary))
    return (f"{households:,} households, weather to {last(tables.weather_day)}, "
            f"bank holidays to {last(tables.holidays)}" + (f"; {unknown}" if unknown else ""))


@dataclass(frozen=True)
class FileStamp:
    """What identifies one version of a file: a different stamp is a different file."""

    mtime_ns: int
    size: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> FileStamp | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return cls(st.st_mtime_ns, st.st_size, st.st_ino)


class ModelWatcher:
    """Notices a new version of the file at ``path`` (or of any of several files: the
    context tables, read together), polling every ``poll_s``, or at once on ``trigger()``,
    which the service calls on SIGHUP, and hands the changed file to ``reload``."""

    def __init__(self, path: Path | Sequence[Path], poll_s: float,
                 reload: Callable[[Path], Awaitable[bool]], what: str = "model") -> None:
        self.what = what  # for the log: "model", "shadow" or "context"
        self.paths = [Path(path)] if isinstance(path, (str, os.PathLike)) \
            else [Path(p) for p in path]
        self.poll_s = poll_s
        self._reload = reload
        self.current = self._stamps()  # the files being served
        self._seen = self.current  # the last stamps looked at
        self._wake = asyncio.Event()
        self._now = False

    def _stamps(self) -> tuple[FileStamp | None, ...]:
        return tuple(FileStamp.of(p) for p in self.paths)

    def trigger(self) -> None:
        """Look now and take the files as they are (SIGHUP)."""
        log.info("%s reload requested: looking at %s now", self.what,
                 ", ".join(map(str, self.paths)))
        self._now = True
        self._wake.set()

    async def run(self) -> None:
        """Until cancelled."""
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(),
                                       self.poll_s if self.poll_s > 0 else None)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            now, self._now = self._now, False
            await self.check(now)

    async def check(self, now: bool = False) -> None:
        stamps = self._stamps()
        missing = [p for p, st in zip(self.paths, stamps, strict=True) if st is None]
        if missing:
            if now:
                log.warning("%s reload: %s does not exist; the current %s goes on",
                            self.what, missing[0], self.what)
            return
        if stamps == self.current and not now:
            return
        stable = stamps == self._seen
        self._seen = stamps
        if not (stable or now):
            return  # changed since the last look: wait until it stays the same
        before, self.current = self.current, stamps  # tried once per version, taken or not
        changed = [p for p, a, b in zip(self.paths, stamps, before, strict=True) if a != b]
        await self._reload(changed[0] if changed else self.paths[0])


class ShadowComparison:
    """Agreement of the shadow model with the live one, over every day both scored.

    ``add`` per batch with both models' scores and alert decisions; the totals go to the
    metrics (``stream.metrics``): alerts by both / only live / only shadow, their agreement
    ratio (alerts both raised over alerts either raised; 1 while neither has alerted), the
    mean absolute score difference, and the Spearman rank correlation of the scores over the
    last ``window`` days."""

    def __init__(self, window: int = 10_000) -> None:
        self.days = 0
        self.both = 0
        self.live_only = 0
        self.shadow_only = 0
        self.abs_diff_sum = 0.0
        self.finite_days = 0
        self._live: deque[np.ndarray] = deque()
        self._shadow: deque[np.ndarray] = deque()
        self._held = 0
        self.window = window

    def add(self, live_score: np.ndarray, live_alert: np.ndarray, shadow_score: np.ndarray,
            shadow_alert: np.ndarray) -> None:
        ls = np.asarray(live_score, np.float64)
        ss = np.asarray(shadow_score, np.float64)
        la = np.asarray(live_alert, bool)
        sa = np.asarray(shadow_alert, bool)
        self.days += len(ls)
        self.both += int((la & sa).sum())
        self.live_only += int((la & ~sa).sum())
        self.shadow_only += int((~la & sa).sum())
        ok = np.isfinite(ls) & np.isfinite(ss)
        self.abs_diff_sum += float(np.abs(ls[ok] - ss[ok]).sum())
        self.finite_days += int(ok.sum())
        self._live.append(ls[ok])
        self._shadow.append(ss[ok])
        self._held += int(ok.sum())
        while self._held - len(self._live[0]) >= self.window:
            self._held -= len(self._live.popleft())
            self._shadow.popleft()

    @property
    def agreement(self) -> float:
        either = self.both + self.live_only + self.shadow_only
        return self.both / either if either else 1.0

    @property
    def mean_abs_diff(self) -> float:
        return self.abs_diff_sum / self.finite_days if self.finite_days else 0.0

    def rank_correlation(self) -> float:
        """Spearman's rho of live and shadow scores over the recent window (NaN below 3)."""
        if self._held < 3:
            return float("nan")
        a = np.concatenate(list(self._live))[-self.window:]
        b = np.concatenate(list(self._shadow))[-self.window:]
        ra, rb = _ranks(a), _ranks(b)
        if ra.std() == 0 or rb.std() == 0:
            return float("nan")
        return float(np.corrcoef(ra, rb)[0, 1])


class ModelLifecycle:
    """The models of a running service: the live one, the shadow, and their files (and the
    context tables they score with, which follow their files the same way).

    What the service calls (``stream.service`` keeps only the data path):

    - ``await adopt(checked)`` at start, with what ``stream.preflight.check_inputs`` checked
      (raises ``ConfigurationError``: exit status 2), ``attach(scorer)`` once the scorer runs;
    - ``run()`` as a task while ``watching`` (the watchers of ``--model-path``,
      ``--shadow-model-path`` and the context files, until cancelled); ``request_reload()``
      on SIGHUP (all of them);
    - ``observe(scored)`` after each scored batch (the threshold gauge and the shadow's
      agreement metrics); ``latest()`` for days scored by no model.

    A candidate for either file is loaded and validated (``validate``) on a worker thread,
    then handed to the scorer under ``boundary``, the lock the service holds while it scores
    a batch: the swap lands between two batches. A refused live candidate counts in
    ``meterwatch_model_reload_failures_total``, a refused shadow candidate in
    ``meterwatch_shadow_reload_failures_total`` (not in the former: the model alert
    ``MeterwatchModelReloadRefused`` is about what serves); either way the model before it
    goes on.
    """

    def __init__(self, settings: Settings, metrics: Metrics, boundary: asyncio.Lock,
                 detector: Detector | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self._boundary = boundary
        #: the live model as this process holds it (with a scorer process: a CPU copy that
        #: answers questions only; the process holds its own on the device)
        self.detector = detector
        self.shadow: Detector | None = None
        self.tables: ContextTables | None = None
        self.scorer: Scorer | None = None
        self.comparison = ShadowComparison()
        self._compared = ""  # the shadow version ``comparison`` is about
        self._threshold: float | None = None  # of the latest scored batch
        self._watchers: list[ModelWatcher] = []

    # -- start -----------------------------------------------------------------------------
    def _load(self, path: Path) -> Detector:
        """A checkpoint as this service holds it: on the CPU with a scorer process (which
        puts its own copy on the device), else on ``--device``; raises ``CheckpointError``."""
        s = self.settings
        return Detector.load(path, device="cpu" if s.scorer == "process" else s.device,
                             dtype=s.precision)

    async def adopt(self, checked: Checked) -> None:
        """Take the models ``stream.preflight.check_inputs`` loaded and validated (on the
        CPU) as this service will hold them, and watch their files: each checkpoint is
        read and validated once. They are used as they are with a scorer process (which
        builds its own copy on its device) or a worker thread on the CPU in float32; else
        (a worker thread on a GPU, or another ``--precision``) rebuilt from their weights
        where the thread scores and validated there, as before a swap. A live model handed
        to the service (``detector``) is used as it is and not watched."""
        s = self.settings
        self.tables = checked.tables
        if self.detector is None:
            assert s.model_path is not None
            self.detector = await asyncio.to_thread(self._held, checked.detector, None)
            self._watchers.append(ModelWatcher(s.model_path, s.model_poll_s,
                                               self._reload_model))
            log.info("model %s from %s (threshold %.4f)", self.detector.version,
                     s.model_path, self.detector.threshold)
        context = [p for p in (s.household_info, s.weather, s.holidays) if p is not None]
        if context:  # one watcher: a change (or SIGHUP) reads the three once
            log.info("context tables: %s",  # (a set of every household: off the loop)
                     await asyncio.to_thread(describe_tables, self.tables, self.detector))
            self._watchers.append(ModelWatcher(context, s.model_poll_s, self._reload_context,
                                               what="context"))
        if checked.shadow is None or s.shadow_model_path is None:
            return
        shadow = await asyncio.to_thread(self._held, checked.shadow, self.detector)
        if s.target_far is not None and shadow.target_far is None:
            _warn_no_curve(shadow)
        self.shadow = shadow
        self.metrics.shadow_info.info({"version": shadow.version})
        self._watchers.append(ModelWatcher(s.shadow_model_path, s.model_poll_s,
                                           self._reload_shadow, what="shadow"))
        log.info("shadow model %s scores every batch too (never published)", shadow.version)

    def _held(self, det: Detector, live: Detector | None) -> Detector:
        """``det`` (checked on the CPU in float32) where this service holds it (``_load``):
        itself, or rebuilt there and validated (against ``live``, for the shadow)."""
        s = self.settings
        if s.scorer == "process" or (s.precision == "float32" and (
                s.device == "cpu" or not torch.cuda.is_available())):
            return det
        try:
            held = Detector.from_checkpoint(det.checkpoint(), device=s.device,
                                            dtype=s.precision, target_far=det.target_far)
            validate(held, live, self.tables)
        except Exception as exc:  # ModelRejected, a device that cannot build it
            flag = "--model-path" if live is None else "--shadow-model-path"
            raise ConfigurationError(flag, f"{det.version} on {s.device} in {s.precision}: "
                                     f"{problem_of(exc)}", "give a checkpoint written by "
                                     "meterwatch train, or another --device/--precision") \
                from None
        return held

    def attach(self, scorer: Scorer) -> None:
        """The scorer that serves ``detector`` (and ``shadow``); swaps go to it."""
        self.scorer = scorer
        self._model_info()

    def apply_budget(self, det: Detector, flag: str) -> None:
        """``--target-far`` on ``det`` (``apply_budget``)."""
        apply_budget(det, self.settings.target_far, flag)

    def _shadow_ready(self, shadow: Detector) -> Detector:
        """``shadow`` with the budget (its own threshold, with a warning, when it has no
        curve), validated against the live model (on a worker thread)."""
        far = self.settings.target_far
        if not apply_budget(shadow, far, "--shadow-model-path", optional=True) \
                and far is not None:
            _warn_no_curve(shadow)
        validate(shadow, self.detector, self.tables, self.settings.timezone)
        return shadow

    def _model_info(self) -> None:
        assert self.detector is not None and self.scorer is not None
        det = self.detector
        self.metrics.model_info.info({
            "version": det.version, "device": self.scorer.device,
            "threshold": f"{det.threshold:.6g}",
            "target_far": "" if det.target_far is None else f"{det.target_far:g}",
            "calibration": self.settings.calibration if det.target_far is not None
            else "checkpoint"})

    # -- watching and swapping -------------------------------------------------------------
    @property
    def watching(self) -> bool:
        """Whether there is a file to watch (``run`` returns at once otherwise)."""
        return bool(self._watchers)

    async def run(self) -> None:
        """Watch the files until cancelled."""
        await asyncio.gather(*(w.run() for w in self._watchers))

    def request_reload(self) -> None:
        """Look at every watched file now (SIGHUP)."""
        for w in self._watchers:
            w.trigger()

    async def _reload_model(self, path: Path) -> bool:
        """Validate the checkpoint at ``path`` and swap it in between two batches; refuse it
        (log line, ``meterwatch_model_reload_failures_total``) if anything is wrong, the old
        model serving on. Returns whether the model changed."""
        scorer, old = self.scorer, self.detector
        assert scorer is not None and old is not None
        try:
            cand = await asyncio.to_thread(self._load, path)
            self.apply_budget(cand, "--target-far")
            if cand.version == old.version:
                log.info("model reload: %s holds %s, already serving", path, cand.version)
                return False
            await asyncio.to_thread(validate, cand, old, self.tables,
                                    self.settings.timezone)
            # a worker thread scores this very object: validated above, on its device
            waited = await self._between_batches(
                lambda: scorer.swap(cand, validated=True))
        except Exception as exc:  # CheckpointError, ConfigurationError, ModelRejected, ...
            self.metrics.model_reload_failures.inc()
            log.error("model reload refused: %s; %s keeps serving", first_line(exc),
                      old.version)
            return False
        self.detector = cand
        self.metrics.model_reloads.inc()
        self._model_info()
        log.info("model swapped without a restart: %s -> %s (threshold %.4f; scoring waited "
                 "%.3f s)", old.version, cand.version, cand.threshold, waited)
        return True

    async def _between_batches(self, swap: Callable[[], Awaitable[None]]) -> float:
        """``swap`` (the scorer's ``swap``, ``swap_shadow`` or ``update_tables``) at a batch
        boundary, while none is being scored; returns how long scoring waited."""
        async with self._boundary:  # scoring waits from here
            t0 = time.perf_counter()
            await swap()
            return time.perf_counter() - t0

    async def _reload_context(self, path: Path) -> bool:
        """``--household-info``, ``--weather`` and ``--holidays`` read again after one of
        them changed (``path``); what changed in them (``ContextTables.changed``) is scored
        with from the next batch on. A file that cannot be read is refused (log line,
        ``meterwatch_context_reload_failures_total``) and the tables read before go on.
        Returns whether the tables changed.

        They were read once at start, so a service that ran past the end of its weather
        file scored every later day as one without weather, and households added to the
        household file after the start as unknown ones, until it was restarted."""
        from meterwatch.stream.preflight import context_tables

        scorer = self.scorer
        assert scorer is not None
        try:
            tables = await asyncio.to_thread(context_tables, self.settings)
            before = self.tables or ContextTables.empty()
            parts = await asyncio.to_thread(before.changed, tables or ContextTables.empty())
            if parts:
                waited = await self._between_batches(lambda: scorer.update_tables(parts))
        except Exception as exc:  # ConfigurationError (a file that cannot be used), OSError
            self.metrics.context_reload_failures.inc()
            log.error("context reload refused: %s; the tables read before go on",
                      first_line(exc))
            return False
        if not parts:
            log.info("context files read again (%s changed): the same tables", path)
            return False
        self.tables = scorer.tables
        self.metrics.context_reloads.inc()
        what = sorted({_PART_NAMES[k] for k in parts})
        held = await asyncio.to_thread(describe_tables, self.tables, self.detector)
        log.info("context tables read again (%s changed; new %s): %s (scoring waited "
                 "%.3f s)", path, ", ".join(what), held, waited)
        return True

    async def _reload_shadow(self, path: Path) -> bool:
        """The same for the shadow: refused candidates count in
        ``meterwatch_shadow_reload_failures_total`` and the old shadow goes on; the live
        model's scoring is never stopped by one (a failure in the scorer process while it
        builds the candidate restarts it with the old shadow)."""
        scorer, old = self.scorer, self.shadow
        assert scorer is not None and old is not None
        try:
            cand = await asyncio.to_thread(self._load, path)
            if cand.version == old.version:
                log.info("shadow reload: %s holds %s, already shadowing", path, cand.version)
                return False
            await asyncio.to_thread(self._shadow_ready, cand)
            waited = await self._between_batches(
                lambda: scorer.swap_shadow(cand, validated=True))
        except Exception as exc:
            self.metrics.shadow_reload_failures.inc()
            log.error("shadow reload refused: %s; %s keeps shadowing", first_line(exc),
                      old.version)
            return False
        self.shadow = cand
        self.metrics.shadow_reloads.inc()
        self.metrics.shadow_info.info({"version": cand.version})
        log.info("shadow model swapped without a restart: %s -> %s (scoring waited %.3f s)",
                 old.version, cand.version, waited)
        return True

    # -- per batch -------------------------------------------------------------------------
    def observe(self, scored: Scored) -> None:
        """Metrics of a scored batch: its threshold, and the shadow's agreement (the gauges
        since the shadow that scored it first scored; the counters since start)."""
        m = self.metrics
        self._threshold = scored.threshold
        m.alert_threshold.set(scored.threshold)
        if scored.shadow_score is None or scored.shadow_is_alert is None:
            return
        if scored.shadow_version != self._compared:  # a new shadow: compared afresh
            self.comparison = ShadowComparison()
            self._compared = scored.shadow_version
        cmp = self.comparison
        before = (cmp.both, cmp.live_only, cmp.shadow_only)
        cmp.add(scored.score, scored.is_alert, scored.shadow_score, scored.shadow_is_alert)
        m.shadow_days.inc(len(scored.score))
        for label, b, a in zip(("both", "live_only", "shadow_only"), before,
                               (cmp.both, cmp.live_only, cmp.shadow_only), strict=True):
            m.shadow_alerts.labels(label).inc(a - b)
        m.shadow_agreement.set(cmp.agreement)
        m.shadow_abs_diff.set(cmp.mean_abs_diff)
        m.shadow_rank_correlation.set(cmp.rank_correlation())

    def latest(self) -> tuple[float, str]:
        """The threshold and model version for days scored by no model (all incomplete):
        the latest batch's threshold, else the live model's."""
        assert self.detector is not None
        threshold = self._threshold if self._threshold is not None else self.detector.threshold
        return threshold, self.detector.version


def _warn_no_curve(shadow: Detector) -> None:
    log.warning("the shadow model %s has no calibration curve: it alerts at its own "
                "threshold, not at --target-far", shadow.version)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (Spearman)."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x), np.float64)
    r[order] = np.arange(len(x), dtype=np.float64)
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=r)
    return sums[inv] / counts[inv]
