"""Scoring closed days with the detector, off the event loop.

The detector (``model.Detector``) is loaded once and stays resident on its device (GPU when
CUDA is available, else CPU). Batches run in one dedicated worker, so the event loop keeps
fetching and heartbeating while the model works (aiokafka issue #678: CPU work on the loop
starves heartbeats). The worker is

- a **process** (``scorer="process"``, the default): the detector is rebuilt there from its
  checkpoint (it alone touches the GPU) and batches travel as numpy arrays through a pipe.
  The event loop keeps its interpreter to itself: with a worker thread, the Python parts of
  scoring (feature building, waves, state) take the GIL from parsing and fetching. At low
  load on 2 vCPUs it gave p99 64-81 ms against 156-177 ms for the thread (model call 4 ms
  against 12-13 ms); at high load the two were within noise (benchmarks/RESULTS.md);
- or a **thread** (``scorer="thread"``): no start-up cost (~2-4 s to spawn and load) and no
  second process. Torch releases the GIL inside its kernels.

A household that has two days in one batch is scored in date order: its second day sees
the household state updated by its first, exactly as if the days had come in separate
batches (``model.torch_scoring.score_batch``: one call, a scan over each household's days on
the device). Scores therefore do not depend on how days were grouped into batches.

An allocation failure on the device (``torch.cuda.OutOfMemoryError``, or a ``RuntimeError``
from cuBLAS or the pinned-memory allocator that says it ran out of memory) is handled after
the ``except`` block has been left (its traceback holds the failed batch's activations),
the cache is emptied, the batch is split in two (each household's days stay in date order
across the halves) and retried, and the lowered cap is kept and handed to the batcher
(``Scorer.on_memory_cap``). From a scorer process only the rows that need ``expected`` and
``slot_error`` (alert days) travel back; the others are zero.

Supervision (scorer process): ``supervise()`` (a task the service owns) checks the process
every 0.2 s. When it has died, ``up`` turns false at once (``/readyz`` answers 503, gauge
``meterwatch_scorer_up`` 0), and the process is restarted, at most ``max_restarts`` times in
``restart_window_s`` (3 in 5 minutes); one more death raises ``ScorerFailed`` and the service
stops with exit status 1. A batch whose scoring was cut short by the death is scored again by
the new process: scoring has no side effect until its results are published, so nothing is
lost and nothing is scored twice.

The alert budget and the model lifecycle live here too, because the worker owns the detector
that decides ``is_alert``: each ``Scored`` says which threshold and ``model_version`` scored
it and each alert's ``severity`` (``Detector.severity``, from the checkpoint's calibration
curve); with ``rolling`` calibration the worker feeds each batch to ``Detector.observe_scores``
(the threshold follows the last 28 days of live scores, for the budget given); ``swap``
replaces the model between two batches after validating it on the worker's own device
(``stream.lifecycle``); a shadow detector scores every batch too, its results only sent back
for comparison.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any

import numpy as np
import psutil
import torch

from meterwatch.model import ContextTables, Detector, HouseholdState, torch_scoring
from meterwatch.model.calibration import SEVERITIES
from meterwatch.model.detector import DtypeName
from meterwatch.stream.lifecycle import ModelRejected, validate
from meterwatch.stream.timegrid import SLOTS

log = logging.getLogger(__name__)

STATE_FIELDS = tuple(f.name for f in dataclasses.fields(HouseholdState))
#: Rough bytes of device memory one household-day needs during inference (inputs, context,
#: activations, outputs, in float32), with headroom; used to cap batch sizes.
_BYTES_PER_DAY = 16 * 1024
#: Days scored once at start (CUDA context, cuBLAS handles, kernels) and the batch the pinned
#: staging buffer is sized for at start.
WARM_UP_DAYS = 65536
#: Texts of ``RuntimeError``s that are allocation failures on the device or of pinned memory
#: (cuBLAS workspaces, ``cudaHostAlloc``), handled like ``torch.cuda.OutOfMemoryError``.
ALLOCATION_ERRORS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED",
                     "cudaErrorMemoryAllocation", "CUDA_ERROR_OUT_OF_MEMORY",
                     "CUDNN_STATUS_ALLOC_FAILED", "failed to allocate")


def is_allocation_error(exc: BaseException) -> bool:
    """A device (or pinned host) allocation failure: split the batch rather than fail."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in ALLOCATION_ERRORS)


@dataclass
class Scored:
    """Model output for a batch of days, in input order."""

    score: np.ndarray  # float32
    is_alert: np.ndarray  # bool
    expected: np.ndarray  # float32 (n, 48) kWh
    slot_error: np.ndarray  # float32 (n, 48)
    signals: np.ndarray  # uint8 bitmask, names in Detector's SIGNAL_NAMES
    state: dict[str, np.ndarray]  # household state after each day
    seconds: float  # wall time of the model calls
    memory_cap: int  # the batch cap after this call (lowered by CUDA out-of-memory splits)
    threshold: float = math.nan  # the threshold these days were scored against
    model_version: str = ""  # the model that scored them
    #: uint8 per day: 0 no alert, k = ``SEVERITIES[k - 1]`` (``Detector.severity``, from the
    #: calibration curve); None: the checkpoint has no curve (``stream.alerts.severity``)
    severity: np.ndarray | None = None
    #: uint8 bitmask per day: the statistics that pass the threshold on their own
    #: (``DayScores.unusual``, bits in ``model.scoring.STAT_NAMES`` order); None: not said
    unusual: np.ndarray | None = None
    shadow_score: np.ndarray | None = None  # the shadow model's scores (never published)
    shadow_is_alert: np.ndarray | None = None
    shadow_version: str = ""


def severity_codes(names: np.ndarray) -> np.ndarray:
    """``Detector.severity``'s strings as uint8 codes (0: no alert, k: SEVERITIES[k - 1])."""
    out = np.zeros(len(names), np.uint8)
    for k, name in enumerate(SEVERITIES, 1):
        out[names == name] = k
    return out


def set_cpu_threads(n: int | None = None) -> None:
    """Intra-op threads for CPU inference: ``n``, or half the cores (at most 4).

    torch's default (a thread per core) makes inference fight the event loop for the cores:
    benchmarks/RESULTS.md measured 0.27x -> 0.39x throughput with 1 thread on 2 cores. Call
    it before the model is loaded, so no thread pool is built at the default size first.
    """
    torch.set_num_threads(n or min(4, max(1, (os.cpu_count() or 2) // 2)))


class ScorerFailed(RuntimeError):
    """The scorer process died more often than its restart budget allows."""


class Scorer:
    """Scores batches in a worker thread or process (see the module docstring).

    ``start``/``stop`` (or ``async with``); ``stop`` is safe twice.
    """

    def __init__(self, detector: Detector, tables: ContextTables | None = None, *,
                 torch_threads: int | None = None, process: bool = False,
                 device: str | None = None, dtype: DtypeName | None = None,
                 max_restarts: int = 3, restart_window_s: float = 300.0,
                 on_change: Callable[[bool, bool], None] | None = None,
                 rolling: bool = False, shadow: Detector | None = None) -> None:
        """``device``/``dtype`` (a process only): where the process puts its copy of the
        detector; default the detector's own. ``on_change(up, restarted)`` is called when
        the scorer goes down or comes back (``restarted``: after a restart). ``rolling``:
        the threshold follows the live scores (``Detector.observe_scores``; only with a
        ``target_far`` set on the detector). ``shadow``: a second detector that scores every
        batch too (``Scored.shadow_score``)."""
        self.detector = detector
        self.rolling = rolling
        self.shadow = shadow
        self.tables = tables
        self.process = process
        self.device = str(device or detector.device) if process else str(detector.device)
        self._dtype: DtypeName = dtype or detector.dtype_name
        self._torch_threads = torch_threads
        self._worker: _Worker | None = None
        self._executor: Executor | None = None
        self._pid: int | None = None
        self.memory_cap = 0
        self.up = False
        self.max_restarts = max_restarts
        self.restart_window_s = restart_window_s
        self.restarts: deque[float] = deque()  # monotonic times of recent restarts
        self._on_change = on_change or (lambda up, restarted: None)
        self._restart_lock = asyncio.Lock()
        #: Called with the new cap when an allocation failure lowered it (the service points
        #: it at its batcher).
        self.on_memory_cap: Callable[[int], None] | None = None
        self._shm: SharedBatch | None = None  # inputs on their way to a scorer process

    async def __aenter__(self) -> Scorer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _spawn(self) -> None:
        loop = asyncio.get_running_loop()
        det = self.detector
        executor = ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_process,
            initargs=(det.checkpoint(), self.device, self._dtype, self.tables,
                      self._torch_threads, os.getpid(),
                      logging.getLogger().getEffectiveLevel(), det.target_far, self.rolling,
                      None if self.shadow is None else self.shadow.checkpoint(),
                      None if self.shadow is None else self.shadow.target_far))
        self._executor = executor
        self.memory_cap, self.device, self._pid = await loop.run_in_executor(executor,
                                                                             _process_info)

    def alive(self) -> bool:
        """The scorer can take a batch (a process: it is running)."""
        if not self.process:
            return self._executor is not None
        if self._pid is None:
            return False
        try:
            proc = psutil.Process(self._pid)
            return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    async def supervise(self, interval_s: float = 0.2) -> None:
        """Watch the scorer process; restart it when it dies (raises ``ScorerFailed``
        beyond the budget). Runs until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            if self._executor is not None and not self.alive():
                await self._restart()

    async def _restart(self) -> None:
        async with self._restart_lock:
            if self.alive():
                return  # restarted by whoever held the lock
            self.up = False
            self._on_change(False, False)
            now = time.monotonic()
            while self.restarts and now - self.restarts[0] > self.restart_window_s:
                self.restarts.popleft()
            if len(self.restarts) >= self.max_restarts:
                raise ScorerFailed(f"the scorer process died {len(self.restarts) + 1} times "
                                   f"within {self.restart_window_s:.0f} s")
            self.restarts.append(now)
            log.error("the scorer process (pid %s) died; restarting it (%d of %d in %.0f s)",
                      self._pid, len(self.restarts), self.max_restarts,
                      self.restart_window_s)
            old, self._executor, self._pid = self._executor, None, None
            if old is not None:
                old.shutdown(wait=False, cancel_futures=True)
            await self._spawn()
            self.up = True
            self._on_change(True, True)

    async def start(self) -> None:
        """Start the worker (for a process: spawn it and load the model there)."""
        if self.process:
            await self._spawn()
        else:
            if self.detector.device.type == "cpu":
                set_cpu_threads(self._torch_threads)
            shadow = None if self.shadow is None else _Worker(self.shadow, self.tables,
                                                              rolling=self.rolling)
            self._worker = _Worker(self.detector, self.tables, rolling=self.rolling,
                                   shadow=shadow)
            self._executor = ThreadPoolExecutor(max_workers=1,
                                                thread_name_prefix="meterwatch-score")
            self.memory_cap = self._worker.memory_cap
        self.up = True
        self._on_change(True, False)

    async def stop(self) -> None:
        """Stop the worker (waits for a batch being scored); safe twice."""
        executor, self._executor = self._executor, None
        self.up = False
        if executor is not None:
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: executor.shutdown(wait=True, cancel_futures=True))
        if self._shm is not None:
            self._shm.close()
            self._shm = None

    def close(self) -> None:
        """``stop`` for callers without an event loop."""
        executor, self._executor = self._executor, None
        self.up = False
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        if self._shm is not None:
            self._shm.close()
            self._shm = None

    async def swap(self, detector: Detector, *, validated: bool = False) -> None:
        """Serve ``detector`` from the next batch on. The worker takes one request at a
        time, so this waits for the batch being scored; it validates the model on the
        worker's own device (``stream.lifecycle.validate``) before replacing the old one.
        Raises ``ModelRejected`` (the old model keeps serving) when that fails.

        ``validated``: the caller has run ``validate`` on this very object against the model
        serving. A worker thread then scores that object, on the device it was validated
        on, so it is not validated twice; a scorer process always validates the copy it
        builds on its own device."""
        loop = asyncio.get_running_loop()
        executor = self._executor
        assert executor is not None, "scorer not started"
        if self._worker is not None:
            worker = self._worker

            def swap_here() -> _Worker:
                if not validated:
                    validate(detector, worker.detector, worker.tables)
                return worker.with_detector(detector)

            self._worker = await loop.run_in_executor(executor, swap_here)
        else:
            try:
                await loop.run_in_executor(executor, _process_swap, detector.checkpoint(),
                                           detector.target_far)
            except BrokenProcessPool:
                await self._restart()  # with the model that was serving
                raise ModelRejected(f"{detector.version}: the scorer process died while "
                                    "loading it") from None
        self.detector = detector  # what a restarted scorer process loads

    async def swap_shadow(self, detector: Detector, *, validated: bool = False) -> None:
        """Shadow with ``detector`` from the next batch on (the scorer was started with a
        shadow), validated on the worker's own device first, as ``swap`` does (and skipped
        as there for a worker thread when ``validated``: against the live model). Raises
        ``ModelRejected`` (the old shadow goes on) when that fails; if the scorer process
        dies meanwhile it is restarted with the old shadow."""
        loop = asyncio.get_running_loop()
        executor = self._executor
        assert executor is not None, "scorer not started"
        assert self.shadow is not None, "started without a shadow"
        if self._worker is not None:
            worker = self._worker

            def swap_here() -> None:
                if not validated:
                    validate(detector, worker.detector, worker.tables)
                worker.shadow = _Worker(detector, worker.tables, rolling=worker.rolling)

            await loop.run_in_executor(executor, swap_here)
        else:
            try:
                await loop.run_in_executor(executor, _process_swap_shadow,
                                           detector.checkpoint(), detector.target_far)
            except BrokenProcessPool:
                await self._restart()  # with the shadow that was shadowing
                raise ModelRejected(f"{detector.version}: the scorer process died while "
                                    "loading it as the shadow") from None
        self.shadow = detector  # what a restarted scorer process loads

    async def update_tables(self, parts: Mapping[str, Any]) -> None:
        """Score with the context tables changed by ``parts`` (``ContextTables.changed``:
        household information, weather or holidays read again after their files changed,
        ``stream.lifecycle``) from the next batch on, the live model and the shadow alike.
        Only the changed parts travel to a scorer process, and a household index is kept
        where the household information did not change: for a million households,
        sending the whole tables took about 1 s and rebuilding the index about 2 s, while
        scoring waited (``benchmarks/context_reload.py``). A scorer process that dies
        meanwhile is restarted with them."""
        loop = asyncio.get_running_loop()
        executor = self._executor
        assert executor is not None, "scorer not started"
        self.tables = _updated(self.tables, parts)  # what a restarted process starts with
        if self._worker is not None:
            _use_tables(self._worker, self.tables)
            return
        try:
            await loop.run_in_executor(executor, _process_update_tables, parts)
        except BrokenProcessPool:
            await self._restart()

    async def score(self, kwh: np.ndarray, day: np.ndarray, household_ids: list[str],
                    keys: np.ndarray, state: dict[str, np.ndarray]) -> Scored:
        """Score days; ``keys`` identify households (equal key = same household).

        If the scorer process dies meanwhile, it is restarted and the batch scored again.
        """
        loop = asyncio.get_running_loop()
        while True:
            executor = self._executor
            assert executor is not None, "scorer not started"
            try:
                if self._worker is not None:
                    scored = await loop.run_in_executor(executor, self._worker.score, kwh,
                                                        day, household_ids, keys, state)
                else:
                    # the batch goes through shared memory (one copy in, none pickled), only
                    # a small description of it through the pool's pipe
                    if self._shm is None:
                        self._shm = SharedBatch()
                    desc = self._shm.put({"kwh": kwh, "day": day, "keys": keys,
                                          "ids": np.asarray(household_ids, dtype=str),
                                          **{f"state.{k}": v for k, v in state.items()}})
                    scored = _expand(await loop.run_in_executor(executor, _process_score_shm,
                                                                desc))
            except BrokenProcessPool:
                log.warning("the scorer process died while scoring %d days; scoring them "
                            "again after its restart", len(day))
                await self._restart()
                continue
            lowered = scored.memory_cap < self.memory_cap
            self.memory_cap = scored.memory_cap
            if lowered and self.on_memory_cap is not None:
                self.on_memory_cap(self.memory_cap)
            return scored


class _Worker:
    """The detector's side of the scorer: waves, OOM splits, the batch cap."""

    def __init__(self, detector: Detector, tables: ContextTables | None,
                 warm_up: bool = True, *, rolling: bool = False,
                 shadow: _Worker | None = None) -> None:
        self.detector = detector
        self.tables = tables
        self.rolling = rolling
        self.shadow = shadow
        self.memory_cap = self._memory_cap()
        if warm_up and detector.torch_scoring:
            t0 = time.perf_counter()
            torch_scoring.warm_up(detector, min(WARM_UP_DAYS, self.memory_cap))
            log.info("scorer warmed up on %s in %.2f s", detector.device,
                     time.perf_counter() - t0)

    def _memory_cap(self) -> int:
        """Largest batch the device's free memory allows (half of it, as a margin)."""
        if self.detector.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.detector.device)
        else:
            free = psutil.virtual_memory().available
        return max(256, int(free * 0.5 // _BYTES_PER_DAY))

    def with_detector(self, detector: Detector) -> _Worker:
        """A worker for ``detector`` with this one's tables, calibration mode and shadow."""
        return _Worker(detector, self.tables, rolling=self.rolling, shadow=self.shadow)

    def score(self, kwh: np.ndarray, day: np.ndarray, household_ids: list[str],
              keys: np.ndarray, state: dict[str, np.ndarray]) -> Scored:
        det = self.detector
        threshold = det.threshold
        scored, model_score = self._score(kwh, day, household_ids, keys, state)
        scored.threshold = threshold
        scored.model_version = det.version
        if det.far_curve is not None:
            scored.severity = severity_codes(det.severity(scored.score))
        if self.rolling and det.target_far is not None and len(day):
            # the window holds established households' days, as in the evaluation that
            # measured it (model.folds: more than min_profile_days + 7 days of history
            # after the day)
            est = np.asarray(state["count"]) + 1 > det.scoring.min_profile_days + 7
            if det.observe_scores(day[est], scored.score[est], model_score[est]):
                log.info("%s: threshold %.4f -> %.4f for %.3g false alarms per normal "
                         "household-day (the last 28 days of live scores)", det.version,
                         threshold, det.threshold, det.target_far)
        if self.shadow is not None:
            try:
                sh = self.shadow.score(kwh, day, household_ids, keys, state)
            except Exception:  # the shadow never stops the live model
                log.exception("the shadow model %s failed on a batch of %d days",
                              self.shadow.detector.version, len(day))
            else:
                scored.shadow_score = sh.score
                scored.shadow_is_alert = sh.is_alert
                scored.shadow_version = sh.model_version
        return scored

    def _score(self, kwh: np.ndarray, day: np.ndarray, household_ids: list[str],
               keys: np.ndarray, state: dict[str, np.ndarray]) -> tuple[Scored, np.ndarray]:
        """The batch's ``Scored`` and its model scores (the score without rule bonuses)."""
        if torch_scoring.enabled(self.detector, len(day)):
            t0 = time.perf_counter()
            out, new = self._split(kwh, day, household_ids, keys, state)
            return Scored(out["score"], out["is_alert"], out["expected"], out["slot_error"],
                          out["signals"], new, time.perf_counter() - t0,
                          self.memory_cap, unusual=out["unusual"]), out["model_score"]
        return self._score_waves(kwh, day, household_ids, keys, state)

    def _split(self, kwh: np.ndarray, day: np.ndarray, ids: list[str], keys: np.ndarray,
               state: dict[str, np.ndarray]
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """``score_batch``, split in two halves on an allocation failure (recursively), and
        without trying when the batch is above the (lowered) cap."""
        n = len(day)
        if n <= self.memory_cap or n <= 1:
            failed = False
            try:
                # only alert days are explained: the other rows' expected values and
                # errors stay on the device (25 MB of 65,536 days, for nothing)
                return torch_scoring.score_batch(self.detector, kwh, day, ids, keys, state,
                                                 self.tables, detail_rows="alerts")
            except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
                if not is_allocation_error(exc) or n <= 1:
                    raise
                failed = True
            # out of the except block: its traceback, and the activations it references,
            # are gone
            assert failed
            self.memory_cap = max(1, min(self.memory_cap, n // 2))
            log.warning("out of memory on %s at batch %d: splitting, cap now %d",
                        self.detector.device, n, self.memory_cap)
            if self.detector.device.type == "cuda":
                torch.cuda.empty_cache()
        half = n // 2
        # first half: the earliest days (by each household's date rank), so every household's
        # days in the second half follow its days in the first
        rank, nxt = torch_scoring.ranks(keys, day)
        order = np.argsort(rank, kind="stable")
        a, b = np.sort(order[:half]), np.sort(order[half:])
        out_a, new_a = self._split(kwh[a], day[a], [ids[i] for i in a], keys[a],
                                   {k: v[a] for k, v in state.items()})
        state_b = {k: v[b].copy() for k, v in state.items()}
        pos_b = np.full(n, -1, np.int64)
        pos_b[b] = np.arange(len(b))
        carried = pos_b[nxt[a]] if len(a) else np.zeros(0, np.int64)
        has = (nxt[a] >= 0) & (carried >= 0)
        for k in state_b:
            state_b[k][carried[has]] = new_a[k][has]
        out_b, new_b = self._split(kwh[b], day[b], [ids[i] for i in b], keys[b], state_b)
        inv = np.empty(n, np.int64)
        inv[np.concatenate([a, b])] = np.arange(n)
        out = {k: np.concatenate([out_a[k], out_b[k]])[inv] for k in out_a}
        new = {k: np.concatenate([new_a[k], new_b[k]])[inv] for k in new_a}
        return out, new

    def _score_waves(self, kwh: np.ndarray, day: np.ndarray, household_ids: list[str],
                     keys: np.ndarray, state: dict[str, np.ndarray]
                     ) -> tuple[Scored, np.ndarray]:
        """The numpy reference path (``Detector.torch_scoring`` off): one call per wave."""
        t0 = time.perf_counter()
        n = len(day)
        # wave w holds every household's w-th day by date; nxt: the same household's next
        # day, if in this batch
        rank, nxt = torch_scoring.ranks(keys, day)

        cur = {k: v.copy() for k, v in state.items()}
        out_state = {k: np.empty_like(v) for k, v in state.items()}
        score = np.empty(n, np.float32)
        model_score = np.empty(n, np.float32)
        alert = np.empty(n, bool)
        expected = np.empty((n, SLOTS), np.float32)
        slot_err = np.empty((n, SLOTS), np.float32)
        signals = np.zeros(n, np.uint8)
        unusual = np.zeros(n, np.uint8)
        for w in range(int(rank.max()) + 1 if n else 0):
            idx = np.flatnonzero(rank == w)
            st = HouseholdState(**{k: cur[k][idx] for k in STATE_FIELDS})
            res = self._score_split(kwh[idx], day[idx], [household_ids[i] for i in idx], st)
            score[idx] = res.score
            model_score[idx] = res.model_score
            alert[idx] = res.is_alert
            expected[idx] = res.expected
            slot_err[idx] = res.slot_error
            signals[idx] = res.signals
            unusual[idx] = res.unusual
            follow = nxt[idx]
            has = follow >= 0
            for k in STATE_FIELDS:
                new = getattr(res.state, k)
                out_state[k][idx] = new
                cur[k][follow[has]] = new[has]
        return Scored(score, alert, expected, slot_err, signals, out_state,
                      time.perf_counter() - t0, self.memory_cap, unusual=unusual), model_score

    def _score_split(self, kwh: np.ndarray, day: np.ndarray, ids: list[str],
                     st: HouseholdState):
        failed = False
        try:
            return self.detector.score(kwh, day, ids, st, self.tables)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
            if not is_allocation_error(exc) or len(day) <= 1:
                raise
            failed = True
        if failed:
            half = len(day) // 2
            self.memory_cap = max(1, min(self.memory_cap, half))
            log.warning("CUDA out of memory at batch %d: splitting, cap now %d", len(day),
                        self.memory_cap)
            torch.cuda.empty_cache()
            a = self._score_split(kwh[:half], day[:half], ids[:half], st.take(np.arange(half)))
            b = self._score_split(kwh[half:], day[half:], ids[half:],
                                  st.take(np.arange(half, len(day))))
            return _concat_scores(a, b)


# The worker process: one detector per process, built by the pool's initializer.
_PROCESS_WORKER: _Worker | None = None


def _init_process(checkpoint: dict, device: str, dtype: DtypeName,
                  tables: ContextTables | None,
                  torch_threads: int | None, parent: int, log_level: int,
                  target_far: float | None = None, rolling: bool = False,
                  shadow_checkpoint: dict | None = None,
                  shadow_target_far: float | None = None) -> None:
    global _PROCESS_WORKER
    _die_with(parent)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s "
                        "(scorer process): %(message)s")
    if device == "cpu" or not torch.cuda.is_available():
        set_cpu_threads(torch_threads)
    detector = Detector.from_checkpoint(checkpoint, device=device, dtype=dtype,
                                        target_far=target_far)
    shadow = None
    if shadow_checkpoint is not None:
        try:
            shadow = _Worker(Detector.from_checkpoint(shadow_checkpoint, device=device,
                                                      dtype=dtype, target_far=shadow_target_far),
                             tables, rolling=rolling)
        except Exception:  # the shadow never stops the live model (validated before, though)
            log.exception("the shadow model could not be built; scoring without it")
    _PROCESS_WORKER = _Worker(detector, tables, rolling=rolling, shadow=shadow)


def _build_checked(checkpoint: dict, target_far: float | None, worker: _Worker) -> Detector:
    """A candidate built from ``checkpoint`` on this process's device and validated against
    the model ``worker`` serves; ``ModelRejected`` if either fails."""
    device = worker.detector.device
    try:
        det = Detector.from_checkpoint(checkpoint, device=device,
                                       dtype=worker.detector.dtype_name, target_far=target_far)
    except Exception as exc:
        raise ModelRejected(f"{checkpoint.get('version')}: cannot be built on {device} "
                            f"({type(exc).__name__}: {str(exc)[:200]})") from None
    validate(det, worker.detector, worker.tables)
    return det


def _process_swap(checkpoint: dict, target_far: float | None) -> str:
    """``Scorer.swap`` in the scorer process: between two batches (one request at a time)."""
    global _PROCESS_WORKER
    old = _PROCESS_WORKER
    assert old is not None
    det = _build_checked(checkpoint, target_far, old)
    _PROCESS_WORKER = old.with_detector(det)
    log.info("now serving %s (was %s)", det.version, old.detector.version)
    return det.version


def _process_swap_shadow(checkpoint: dict, target_far: float | None) -> str:
    """``Scorer.swap_shadow`` in the scorer process (between two batches)."""
    worker = _PROCESS_WORKER
    assert worker is not None
    det = _build_checked(checkpoint, target_far, worker)
    old = worker.shadow
    worker.shadow = _Worker(det, worker.tables, rolling=worker.rolling)
    log.info("now shadowing with %s (was %s)", det.version,
             old.detector.version if old is not None else "none")
    return det.version


def _updated(tables: ContextTables | None, parts: Mapping[str, Any]) -> ContextTables:
    return ContextTables(**parts) if tables is None else tables.updated(parts)


def _use_tables(worker: _Worker, tables: ContextTables) -> None:
    worker.tables = tables
    if worker.shadow is not None:
        worker.shadow.tables = tables


def _process_update_tables(parts: Mapping[str, Any]) -> None:
    """``Scorer.update_tables`` in the scorer process (between two batches)."""
    assert _PROCESS_WORKER is not None
    _use_tables(_PROCESS_WORKER, _updated(_PROCESS_WORKER.tables, parts))


def _die_with(parent: int) -> None:
    """End this process when ``parent`` ends, however it ends (a SIGKILLed service must not
    leave its scorer behind): Linux's parent-death signal where there is one, and a thread
    that watches the parent's pid everywhere."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    if os.getppid() != parent:  # died before the signal was armed
        os._exit(1)
    threading.Thread(target=watch, name="meterwatch-parent-watch", daemon=True).start()


def _process_info() -> tuple[int, str, int]:
    assert _PROCESS_WORKER is not None
    return _PROCESS_WORKER.memory_cap, str(_PROCESS_WORKER.detector.device), os.getpid()


def _process_score(kwh: np.ndarray, day: np.ndarray, household_ids: list[str], keys: np.ndarray,
                   state: dict[str, np.ndarray]) -> Scored:
    assert _PROCESS_WORKER is not None
    return _compact(_PROCESS_WORKER.score(kwh, day, household_ids, keys, state))


#: A batch in shared memory: the block's name and (key, dtype, shape, byte offset) per array.
Layout = tuple[str, list[tuple[str, str, tuple[int, ...], int]]]


class SharedBatch:
    """One shared-memory block that batches are written into for the scorer process (grown,
    under a new name, when a batch does not fit). Owned by the service's process: closed and
    unlinked by ``Scorer.close`` (and by multiprocessing's resource tracker if the service
    dies). One batch at a time: the scorer awaits each call before the next ``put``."""

    ALIGN = 64

    def __init__(self) -> None:
        self.block: shared_memory.SharedMemory | None = None

    def put(self, arrays: dict[str, np.ndarray]) -> Layout:
        layout = []
        size = 0
        conv = {}
        for key, a in arrays.items():
            a = np.ascontiguousarray(a)
            conv[key] = a
            layout.append((key, a.dtype.str, a.shape, size))
            size += -(-max(a.nbytes, 1) // self.ALIGN) * self.ALIGN
        if self.block is None or self.block.size < size:
            self.close()
            self.block = shared_memory.SharedMemory(create=True, size=max(size, 1 << 20) * 2)
        buf = self.block.buf
        for key, dtype, shape, offset in layout:
            a = conv[key]
            np.ndarray(shape, dtype=dtype, buffer=buf, offset=offset)[...] = a
        return self.block.name, layout

    def close(self) -> None:
        if self.block is not None:
            self.block.close()
            self.block.unlink()
            self.block = None


_ATTACHED: dict[str, shared_memory.SharedMemory] = {}


def _read_shared(desc: Layout) -> dict[str, np.ndarray]:
    """Views of a ``SharedBatch`` in the scorer process (valid until the next batch)."""
    name, layout = desc
    if name not in _ATTACHED:
        for old in _ATTACHED.values():
            old.close()
        _ATTACHED.clear()
        _ATTACHED[name] = shared_memory.SharedMemory(name=name)
    buf = _ATTACHED[name].buf
    return {key: np.ndarray(shape, dtype=dtype, buffer=buf, offset=offset)
            for key, dtype, shape, offset in layout}


def _process_score_shm(desc: Layout) -> Scored:
    assert _PROCESS_WORKER is not None
    a = _read_shared(desc)
    state = {k.split(".", 1)[1]: v for k, v in a.items() if k.startswith("state.")}
    ids = a["ids"].tolist()
    return _compact(_PROCESS_WORKER.score(a["kwh"], a["day"], ids, a["keys"], state))


def _compact(scored: Scored) -> Scored:
    """For the trip back from a scorer process: ``expected``/``slot_error`` of the alert
    rows only (with their row numbers in front, as column 0 of a (k, 1 + 48) array)."""
    rows = np.flatnonzero(scored.is_alert)
    pack = [np.concatenate([rows[:, None].astype(np.float32), a[rows]], axis=1)
            for a in (scored.expected, scored.slot_error)]
    return dataclasses.replace(scored, expected=pack[0], slot_error=pack[1])


def _expand(scored: Scored) -> Scored:
    """Inverse of ``_compact``: zeros on the rows that did not come back."""
    n = len(scored.score)
    full = []
    for pack in (scored.expected, scored.slot_error):
        a = np.zeros((n, SLOTS), np.float32)
        a[pack[:, 0].astype(np.int64)] = pack[:, 1:]
        full.append(a)
    return dataclasses.replace(scored, expected=full[0], slot_error=full[1])


def _concat_scores(a, b):
    """Join two ``DayScores`` of consecutive halves."""
    fields: dict[str, object] = {}
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            fields[f.name] = np.concatenate([x, y])
        elif isinstance(x, HouseholdState):
            fields[f.name] = HouseholdState(**{k: np.concatenate([getattr(x, k), getattr(y, k)])
                                               for k in STATE_FIELDS})
        else:
            fields[f.name] = x
    return type(a)(**fields)
