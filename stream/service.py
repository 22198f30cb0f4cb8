"""The meterwatch service: one consumer-group member, from readings to alerts.

Stages, one module each: ``stream.parse`` (records → columns) → ``stream.assembler`` (columns →
closed household-days) → ``stream.batcher`` (days → model batches) → ``stream.scorer`` (batches →
scores, in a scorer process or thread) → ``stream.alerts`` (scores → documents) → ``stream.outputs``
(documents → Kafka) → offsets committed here. The models they score with (loading, swaps
without a restart, the shadow) are ``stream.lifecycle``'s.

Protocols, each written out in the module that implements it: the commit protocol in
``stream.checkpoint`` (steps 1-6), recovery in ``stream.recovery``, producers, keys and
fencing in ``stream.outputs``, the fail-fast checks in ``stream.preflight``.

Exit status of ``meterwatch run`` (``run_service``): 0 after SIGTERM/SIGINT; 1 when a stage
failed (the consume loop, the scorer beyond its restarts, publishing, committing), after a
graceful stop; 2 for a ``ConfigurationError`` (one line on stderr naming the setting).

A member that loses partitions without noticing (frozen past its session timeout) is fenced
by the broker where it has transactions (``stream.outputs``); elsewhere it confirms it still
holds its generation before it publishes from a revoke (``_on_revoked``), and what remains of
the window is described in docs/runtime.md.

A partition whose producer is fenced while the group still assigns it to this member (another
process opened its transactional id: a stale instance, an operator's tool) is taken back
(``_retake``): once the offset commit confirms the generation, it is recovered exactly as on
assignment (its producer re-opened, which fences the intruder in turn) and fetched again,
after a backoff that doubles while the fencing goes on (``_retake_delay``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import operator
import signal
import time
from collections import deque
from collections.abc import Coroutine
from typing import Any

import numpy as np
import torch
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import (
    CommitFailedError,
    KafkaConnectionError,
    KafkaError,
    UnsupportedCodecError,
)
from prometheus_client import CollectorRegistry

from meterwatch.model import SIGNAL_NAMES, ContextTables, Detector
from meterwatch.model.loaders import day_to_date
from meterwatch.stream import authorization
from meterwatch.stream.alerts import build_documents
from meterwatch.stream.assembler import INCOMPLETE, ClosedDays
from meterwatch.stream.batcher import Batch, DynamicBatcher, Pending
from meterwatch.stream.checkpoint import Checkpoint, PartitionWork
from meterwatch.stream.config import Settings
from meterwatch.stream.errors import ConfigurationError, PartitionLost, StopSignals
from meterwatch.stream.gctuning import GC as _GC
from meterwatch.stream.http import HttpServer
from meterwatch.stream.lifecycle import ModelLifecycle
from meterwatch.stream.metrics import Metrics, create_metrics
from meterwatch.stream.outputs import (
    OutputPublisher,
    OutRecord,
    dead_letter_record,
    json_record,
    output_topics,
)
from meterwatch.stream.parse import parse_records
from meterwatch.stream.preflight import (
    Checked,
    check_connection,
    check_files,
    check_inputs,
    check_topics,
    record_limits,
)
from meterwatch.stream.recovery import recover
from meterwatch.stream.scorer import STATE_FIELDS, Scored, Scorer, set_cpu_threads
from meterwatch.stream.source import Source
from meterwatch.stream.sustained import SustainedTracker, change_records
from meterwatch.stream.timegrid import TimeGrid

log = logging.getLogger(__name__)

_VALUE, _OFFSET, _TIMESTAMP = (operator.attrgetter(a) for a in ("value", "offset", "timestamp"))


class Service:
    """Start with ``await start()`` (or ``async with``), stop with ``await stop()``."""

    def __init__(self, settings: Settings, *, detector: Detector | None = None,
                 registry: CollectorRegistry | None = None,
                 checked: Checked | None = None) -> None:
        """``detector``: serve this model instead of ``--model-path`` (not watched).
        ``checked``: what ``stream.preflight.check_inputs`` returned for these settings
        (``meterwatch run`` checks before its settings line); without it the start checks
        the same, before it starts anything."""
        self.settings = settings
        self._checked = checked
        self.metrics: Metrics = create_metrics(registry)
        self.grid = TimeGrid(settings.timezone)
        self.scorer: Scorer | None = None
        self._process_lock = asyncio.Lock()  # held while a batch is scored: the batch boundary
        #: the models: loading, watching, validating, swapping, shadow metrics
        self.lifecycle = ModelLifecycle(settings, self.metrics, self._process_lock, detector)
        self._gc_tuned = False
        self.batcher = DynamicBatcher(max_size=settings.batch_max_size,
                                      max_delay_s=settings.batch_max_delay_ms / 1000)
        self.publisher = OutputPublisher(settings)
        self.checkpoint = Checkpoint(settings, self.publisher, self.batcher, self.metrics)
        self.source = Source(settings, on_revoked=self._on_revoked,
                             on_assigned=self._on_assigned)
        self.parts: dict[int, PartitionWork] = {}
        # sustained changes (stream.sustained), updated after each scored batch
        self.sustained = SustainedTracker(changes=self.metrics.sustained_changes)
        self._publishing: asyncio.Task[None] | None = None  # the batch being published
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self.failed: BaseException | None = None
        self._stopped = asyncio.Event()
        self._kafka_ready = False
        self._joined = False
        #: recent end-to-end latencies in seconds (for summaries and benchmarks)
        self.latencies: deque[float] = deque(maxlen=200_000)
        self.http = HttpServer(self.metrics.registry, self.readiness, settings.metrics_host,
                               settings.metrics_port)
        #: serialises the rebalance listener and ``_retake`` (who owns which partition)
        self._ownership = asyncio.Lock()
        #: partitions lost to a fence: monotonic time their re-take is due
        self._retakes: dict[int, float] = {}
        self._retake_wake = asyncio.Event()
        #: partition -> (consecutive fences, monotonic time of the last one), for the backoff
        self._fences: dict[int, tuple[int, float]] = {}
        #: the last offset committed for a partition when it was lost (the generation check)
        self._lost_committed: dict[int, int] = {}
        #: input partitions below this have their partition in every output topic
        self._outputs_cover = 0

    # -- lifecycle -------------------------------------------------------------------------
    async def __aenter__(self) -> Service:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def metrics_port(self) -> int:
        return self.http.port

    def readiness(self) -> dict[str, bool]:
        return {"model_loaded": self.scorer is not None,
                "scorer_up": self.scorer is not None and self.scorer.up,
                "broker_reachable": self._kafka_ready, "partitions_assigned": self._joined}

    def _scorer_changed(self, up: bool, restarted: bool) -> None:
        self.metrics.scorer_up.set(1 if up else 0)
        if restarted:
            self.metrics.scorer_restarts.inc()
        if not up:
            self.metrics.ready.set(0)

    async def start(self) -> None:
        """Serve probes, load the model, connect (retrying until the broker answers).

        Raises ``ConfigurationError`` for what no retry can fix; whatever fails, everything
        started so far is stopped again.
        """
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        s = self.settings
        in_process = s.scorer == "process"
        if not in_process and (s.device == "cpu" or not torch.cuda.is_available()):
            set_cpu_threads(s.torch_threads)
        models = self.lifecycle
        # before anything starts: a misconfiguration is one ConfigurationError, nothing else
        # (each model loaded and validated once, each CSV read once: stream.preflight)
        check_files(s)
        checked, self._checked = self._checked, None
        if checked is None:
            checked = await asyncio.to_thread(check_inputs, s, models.detector)
        await self.http.start(checked.probes)  # bound by the checks: a port taken is refused
        await models.adopt(checked)
        assert models.detector is not None
        self.scorer = Scorer(models.detector, self.tables, torch_threads=s.torch_threads,
                             process=in_process, device=s.device, dtype=s.precision,
                             on_change=self._scorer_changed,
                             rolling=s.calibration == "rolling", shadow=models.shadow)
        # the scorer process spawns, loads the model and warms up (about 1.3 s) while the
        # service connects and joins its group (seconds): one after the other, a start took
        # both (docs/startup.md)
        await _together(self.scorer.start(), self._connect())
        self.batcher.cap = min(self.batcher.max_size, self.scorer.memory_cap)
        self.scorer.on_memory_cap = lambda cap: setattr(  # lowered by an out-of-memory split
            self.batcher, "cap", min(self.batcher.max_size, cap))
        models.attach(self.scorer)
        if s.gc_gen0_threshold:
            _GC.acquire(s.gc_gen0_threshold)
            self._gc_tuned = True
        self._tasks = [asyncio.create_task(self._consume_loop(), name="meterwatch-consume"),
                       asyncio.create_task(self._score_loop(), name="meterwatch-score"),
                       asyncio.create_task(self._commit_loop(), name="meterwatch-commit"),
                       asyncio.create_task(self._retake_loop(), name="meterwatch-retake")]
        if in_process:
            self._tasks.append(asyncio.create_task(self.scorer.supervise(),
                                                   name="meterwatch-scorer-supervisor"))
        if models.watching:
            self._tasks.append(asyncio.create_task(models.run(),
                                                   name="meterwatch-model-watcher"))
        for t in self._tasks:
            t.add_done_callback(self._task_done)

    def reload_model(self) -> None:
        """Look at the model files now (SIGHUP; ``stream.lifecycle``)."""
        self.lifecycle.request_reload()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        """A stage that dies takes the service down (loudly) rather than stalling it."""
        if task.cancelled() or self._stopping.is_set():
            return
        self._fail(task.exception() or RuntimeError(f"{task.get_name()} ended"),
                   task.get_name())

    def _fail(self, exc: BaseException, stage: str) -> None:
        """A stage failed: stop gracefully, then exit non-zero (``run_service``). An
        authorisation error, from whichever stage, is the setting and grant it lacks
        (``authorization.refusal``): exit 2 with one line."""
        if self.failed is not None:
            return
        exc = authorization.refusal(self.settings, exc) or exc
        if isinstance(exc, ConfigurationError):
            log.debug("%s: %s", stage, exc)  # printed once, by the CLI
        else:
            log.critical("%s failed: %r; stopping the service", stage, exc, exc_info=exc)
        self.failed = exc
        self._stopping.set()

    def _lose(self, partitions: set[int], reason: str, *, kind: str = "fenced") -> None:
        """Partitions another member owns now, or whose producer another process fenced:
        forget their pending work and fetch nothing more for them.

        ``kind`` ``fenced`` (a ``PartitionLost`` from publishing or committing, outside a
        rebalance): a re-take is scheduled; it happens only if the group still assigns
        them to this member in the same generation (``_retake``), else the new owner
        replays them from its checkpoint. Any other kind (from a revoke): they wait for
        the group to assign them again."""
        mine = partitions & set(self.parts)
        for p in mine:
            self._lost_committed[p] = self.parts.pop(p).committed
        self.batcher.drop(partitions)
        self.source.lose(partitions)
        self.metrics.partitions_assigned.set(len(self.parts))
        for p in mine:  # no stale lag for a partition nobody here fetches
            with contextlib.suppress(KeyError):
                self.metrics.consumer_lag.remove(self.settings.input_topic, str(p))
        reason = reason.split(" lost: ", 1)[-1]
        if kind != "fenced":
            for p in partitions:
                self._retakes.pop(p, None)
                self._lost_committed.pop(p, None)
            if mine:
                self.metrics.partitions_lost.labels(kind).inc(len(mine))
                log.warning("partitions %s lost (%s): their pending days are the new "
                            "owner's to replay", sorted(mine), reason)
            return
        if self._stopping.is_set():
            if mine:
                log.warning("partitions %s lost while stopping (%s): their pending days "
                            "are replayed by their next owner", sorted(mine), reason)
            return
        lost = partitions - set(self._retakes)
        if not lost:
            return
        self.metrics.partitions_lost.labels(kind).inc(len(lost))
        now = time.monotonic()
        delays = {p: self._retake_delay(p, now) for p in lost}
        for p, delay in delays.items():
            self._retakes[p] = now + delay
        self._retake_wake.set()
        log.warning("partitions %s lost (%s): pending days dropped; taking them back in "
                    "%s s if the group still assigns them to this member, else the new "
                    "owner replays them", sorted(lost), reason,
                    "/".join(sorted({f"{d:.1f}" for d in delays.values()})))

    def _retake_delay(self, partition: int, now: float) -> float:
        """Backoff before re-taking a fenced partition: 1 s, doubled for each fence that
        follows the previous one within ``_FENCE_MEMORY_S``, at most
        ``--broker-retry-max-s`` (an intruder that keeps fencing is fenced back less and
        less often, and the service stays up)."""
        count, last = self._fences.get(partition, (0, -_FENCE_MEMORY_S))
        count = count + 1 if now - last < _FENCE_MEMORY_S else 1
        self._fences[partition] = (count, now)
        return min(_RETAKE_FIRST_S * 2 ** (count - 1),
                   max(_RETAKE_FIRST_S, self.settings.broker_retry_max_s))

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until /readyz would answer 200 (group joined, partitions recovered)."""
        deadline = time.monotonic() + timeout_s
        while not all(self.readiness().values()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"not ready after {timeout_s:.0f} s: {self.readiness()}")
            await asyncio.sleep(0.05)

    async def _connect(self) -> None:
        delay = 0.2
        while True:
            try:
                await self._connect_once()
                self._kafka_ready = True
                return
            except (KafkaConnectionError, KafkaError, OSError) as exc:  # not ConfigurationError
                await self.publisher.stop()
                await self.source.stop()
                log.warning("broker not reachable (%r); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.broker_retry_max_s)

    async def _connect_once(self) -> None:
        await check_connection(self.settings)
        await self._check_topics()
        await self.publisher.start(self._outputs_cover)  # its ids: before joining
        await self.source.start()

    async def _check_topics(self) -> None:
        """``check_topics``: the input exists; every output topic exists and has at least
        as many partitions as the input (given more with ``--create-topics``), which
        ``_outputs_cover`` remembers."""
        s = self.settings
        admin = AIOKafkaAdminClient(**s.kafka_options())
        try:
            await admin.start()
            self._outputs_cover = await check_topics(
                s, admin, (*output_topics(s), s.dead_letter_topic, s.state_topic),
                compacted=(s.state_topic,))
            self.publisher.fit(await record_limits(s, admin))
        finally:
            await admin.close()

    @property
    def tables(self) -> ContextTables | None:
        """The context tables scored with (read again when their files change:
        ``stream.lifecycle``)."""
        return self.lifecycle.tables

    @property
    def consumer(self) -> AIOKafkaConsumer | None:
        return self.source.consumer

    async def stop(self) -> None:
        """Graceful: stop fetching, flush and publish pending days, commit, leave the group.

        Bounded by ``shutdown_timeout_s``; safe to call twice.
        """
        if self._stopped.is_set():
            return
        self._stopping.set()
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(self._shutdown(), self.settings.shutdown_timeout_s)
        except asyncio.TimeoutError:
            log.error("graceful shutdown exceeded %.0f s; stopping hard (replay covers it)",
                      self.settings.shutdown_timeout_s)
        finally:
            tasks = [*self._tasks, *([self._publishing] if self._publishing else [])]
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            await self.source.stop()
            try:
                await self.publisher.stop()
            except KafkaError as exc:
                log.warning("stopping the producers: %r", exc)
            if self.scorer is not None:
                await self.scorer.stop()
            await self.http.stop()
            if self._gc_tuned:
                _GC.release()
                self._gc_tuned = False
            self._stopped.set()
            log.info("stopped in %.2f s", time.monotonic() - t0)

    async def _shutdown(self) -> None:
        # Step 1: stop fetching (the consume loop checks _stopping); let it finish its batch.
        if self._tasks:
            consume = self._tasks[0]
            consume.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await consume
            # the commit loop ends after the commit it is in, not inside it (cancelled
            # there, its transactions stayed open on the broker: every read_committed
            # reader of those partitions, the next owner's recovery included, waited for
            # the broker's transaction timeout, 60 s)
            for task in self._tasks:
                if task.get_name() == "meterwatch-commit":
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
        # Step 2: flush every pending batch, publish, commit; then leaving the group (in
        # consumer.stop) triggers no second settle since nothing is left.
        if self.consumer is not None and self.parts:
            try:
                await self._settle(set(self.parts), drop=False)
            except PartitionLost as exc:  # fenced meanwhile: the new owner replays them
                self._lose(exc.partitions, str(exc))
            except Exception as exc:  # a failure: reported by the exit status (1)
                self._fail(exc, "shutdown")

    async def run_until_signalled(self) -> None:
        """Start, run until SIGTERM/SIGINT, stop gracefully; a second signal exits at once.

        The signals are handled from the first moment of the start: one that comes while
        the service is still starting (retrying a broker that is not reachable yet, which
        can last indefinitely) cancels the start, which stops what it had started (the
        scorer process joined, the probes closed), and the run ends as after any signal.
        (They were handled only once started: a SIGTERM meanwhile killed the process, exit
        status 143, and its scorer process's semaphores were left to the resource
        tracker.)"""
        loop = asyncio.get_running_loop()
        stops = StopSignals()
        starting: asyncio.Task[None] | None = None

        def on_signal() -> None:
            kind = stops.receive()
            if kind == "echo":
                return  # the same stop twice (``timeout``, a process group's Ctrl-C)
            if kind == "force":
                log.error("second signal: exiting now")
                raise SystemExit(1)
            log.info("signal received: shutting down gracefully")
            self._stopping.set()
            if starting is not None:
                starting.cancel()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        loop.add_signal_handler(signal.SIGHUP, self.reload_model)  # docs/serving.md
        starting = asyncio.create_task(self.start(), name="meterwatch-start")
        try:
            await starting
        except asyncio.CancelledError:
            this = asyncio.current_task()
            if not self._stopping.is_set() or (this is not None and this.cancelling()):
                raise  # cancelled from outside, not by a signal
            return  # stopped by the start itself
        finally:
            starting = None
        await self._stopping.wait()
        await self.stop()

    # -- consume ---------------------------------------------------------------------------
    async def _consume_loop(self) -> None:
        assert self.consumer is not None
        m = self.metrics
        s = self.settings
        while not self._stopping.is_set():
            try:
                data = await self.source.fetch()
                self._kafka_ready = True
            except UnsupportedCodecError as exc:  # no retry can read such a batch: exit 2
                self._fail(ConfigurationError(
                    "--input-topic", f"{s.input_topic} holds record batches this installation "
                    f"cannot decompress ({exc})", "install the codecs meterwatch depends on: "
                    "pip install 'cramjam>=2.8' (left out by pip install --no-deps)"), "fetch")
                return
            except KafkaError as exc:
                if authorization.refusal(s, exc) is not None:  # no retry grants an ACL
                    self._fail(exc, "fetch")
                    return
                log.warning("fetch failed: %r", exc)
                self._kafka_ready = False
                m.ready.set(0)
                await asyncio.sleep(0.5)
                continue
            m.ready.set(1 if all(self.readiness().values()) else 0)
            for tp, recs in data.items():
                work = self.parts.get(tp.partition)
                if not recs:
                    continue
                if work is None:  # not recovered (or already revoked): never drop, rewind
                    self.source.rewind(tp, recs[0].offset)
                    continue
                # a gap: a transaction marker (one offset), an aborted transaction, or
                # records deleted before they were read (the consumer skips them silently)
                if recs[0].offset > work.position + 1:
                    await self._count_deleted(tp, work, recs[0].offset)
                    if self.parts.get(tp.partition) is not work:
                        continue  # revoked meanwhile: the new owner reads these records
                await self._ingest(tp, work, recs)
            for tp in self.consumer.assignment():
                hw = self.consumer.highwater(tp)
                work = self.parts.get(tp.partition)
                if hw is not None and work is not None:
                    m.consumer_lag.labels(tp.topic, str(tp.partition)).set(
                        max(0, hw - work.position))
            m.open_days.set(sum(w.assembler.open_days for w in self.parts.values()))
            if not self.source.backpressure and self.batcher.backlog > s.queue_max_days:
                self.source.set_backpressure(True)
                m.paused_partitions.set(len(self.source.assignment()))
                log.info("backpressure: %d days queued, partitions paused", self.batcher.backlog)

    async def _count_deleted(self, tp: TopicPartition, work: PartitionWork,
                             first: int) -> None:
        """Records between ``work.position`` and ``first`` (the next offset fetched) that
        the broker deleted before they were read (the consumer then resumes at the log
        start offset, ``auto_offset_reset=earliest``, and only logs at INFO): counted in
        ``meterwatch_input_offsets_lost_total`` and logged as an error."""
        assert self.consumer is not None
        try:
            start = (await asyncio.wait_for(self.consumer.beginning_offsets([tp]),
                                            _LOG_START_TIMEOUT_S))[tp]
        except (KafkaError, asyncio.TimeoutError) as exc:
            log.warning("input partition %d: offsets %d..%d were not read and the log "
                        "start offset could not be asked for (%r): whether they were "
                        "deleted is unknown", tp.partition, work.position, first - 1, exc)
            return
        lost = min(first, start) - work.position
        if lost <= 0:  # aborted transactions or markers, not a deletion
            return
        self.metrics.input_lost.labels(tp.topic, str(tp.partition)).inc(lost)
        log.error("input partition %d: offsets %d..%d were deleted by the broker "
                  "(retention.ms, retention.bytes or DeleteRecords) before this group read "
                  "them: %d records of readings lost, their days close incomplete; keep the "
                  "input topic's retention longer than the longest outage or lag",
                  tp.partition, work.position, work.position + lost - 1, lost)

    async def _ingest(self, tp: TopicPartition, work: PartitionWork, recs: list) -> None:
        m = self.metrics
        values = list(map(_VALUE, recs))
        offsets = np.fromiter(map(_OFFSET, recs), dtype=np.int64, count=len(recs))
        stamps = np.fromiter(map(_TIMESTAMP, recs), dtype=np.int64, count=len(recs))
        parsed = parse_records(values, now_s=time.time(), max_future_s=self.settings.max_future_s,
                               keys=[r.key for r in recs])
        m.records.inc(len(recs))
        if parsed.rejections:
            dead = []
            for rej in parsed.rejections:
                r = recs[rej.index]
                for reason, count in rej.counts.items():  # readings, not records
                    m.invalid_readings.labels(reason).inc(count)
                m.dead_letters.labels(rej.reason).inc()
                dead.append(dead_letter_record(
                    self.settings, reason=rej.reason, detail=rej.detail, topic=tp.topic,
                    partition=tp.partition, offset=r.offset, key=r.key, value=r.value,
                    timestamp_ms=r.timestamp, max_bytes=self.publisher.dead_letter_bytes))
            try:  # acked before the offset can be committed
                await self.publisher.send_all(dead)
            except PartitionLost as exc:
                self._lose(exc.partitions, str(exc))
                return
            if self.parts.get(tp.partition) is not work:
                return  # revoked while we waited: the new owner replays these records
        work.snapshots.append((int(offsets[0]), self.checkpoint.ends(tp.partition)))
        if work.adoption is not None:  # households that moved here from another partition
            if work.adoption.open():
                taken = work.adoption.take(work.assembler.households, parsed.ids)
                work.dirty.update(taken)
                m.households_adopted.inc(len(taken))
            else:
                work.adoption = None
        res = work.assembler.add(parsed, offsets, stamps)
        work.position = int(offsets[-1]) + 1
        m.readings.inc(res.accepted)
        m.duplicate_readings.inc(res.duplicates)
        m.late_readings.inc(res.late)
        if len(res.closed):
            self._count_closed(res.closed)
            self.batcher.put(tp.partition, res.closed, owner=work)

    def _count_closed(self, closed: ClosedDays) -> None:
        status = closed.status
        self.metrics.days_completed.inc(int((status == 0).sum()))
        self.metrics.days_imputed.inc(int((status == 1).sum()))
        self.metrics.days_incomplete.inc(int((status == INCOMPLETE).sum()))

    # -- score and publish -----------------------------------------------------------------
    async def _score_loop(self) -> None:
        """Score batches one after another; each batch's publishing overlaps the scoring of
        the next (see ``_score``), and outputs still leave in batch order."""
        while True:
            batch = await self.batcher.next_batch()
            async with self._process_lock:
                publish = await self._score(batch)
                try:
                    await self._drain_publishing()
                except BaseException:
                    # stopping or failing: this batch stays pinned (never committed past),
                    # so its days are replayed, not lost
                    publish.close()
                    raise
                self._publishing = asyncio.create_task(publish, name="meterwatch-publish")
                self._publishing.add_done_callback(self._publish_done)
            if self.source.backpressure and \
                    self.batcher.backlog < self.settings.queue_max_days // 2:
                self.source.set_backpressure(False)
                self.metrics.paused_partitions.set(0)

    def _publish_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._task_done(task)

    async def _drain_publishing(self) -> None:
        """Wait for the batch being published (raises what its publishing raised)."""
        task, self._publishing = self._publishing, None
        if task is not None:
            await task

    async def _process(self, taken: Batch) -> None:
        """Score a batch and publish its outputs (steps 1-2 of the protocol)."""
        await self._drain_publishing()
        await (await self._score(taken))

    async def _score(self, taken: Batch) -> Coroutine[Any, Any, None]:
        """Score a batch, write back household state, build its output records; return the
        coroutine that publishes them (steps 1-2 of the protocol) and releases the batch.

        The batch's days pin their offsets in the batcher from ``take`` until that
        ``release``, after the acknowledgements: a commit never passes a day that is being
        scored or published. Callers await the previous batch's publishing before starting
        this one's, so outputs leave in batch order, and whoever settles or commits for a
        rebalance or a stop drains it first (``_drain_publishing``). A batch whose scoring or
        publishing fails or is cancelled is never released: no commit passes its days, and
        the next owner replays them.
        """
        assert self.scorer is not None
        m = self.metrics
        # days of a partition revoked since they closed are the new owner's to replay
        batch = [p for p in taken.items if self.parts.get(p.partition) is p.owner]
        now = time.monotonic()
        scoreable = [p.days.select(p.days.status != INCOMPLETE) for p in batch]
        n = sum(len(d) for d in scoreable)
        scored = None
        if n:
            for p, d in zip(batch, scoreable, strict=True):
                if len(d):
                    m.queue_wait.observe(now - p.enqueued)
            kwh = np.concatenate([d.kwh for d in scoreable])
            day = np.concatenate([d.day for d in scoreable])
            ids = [h for d in scoreable for h in d.household_ids]
            keys = np.concatenate([(np.int64(p.partition) << 32) + d.household_index
                                   for p, d in zip(batch, scoreable, strict=True)])
            state = {k: np.concatenate([
                self.parts[p.partition].assembler.households.state_column(k)[d.household_index]
                for p, d in zip(batch, scoreable, strict=True)]) for k in STATE_FIELDS}
            scored = await self.scorer.score(kwh, day, ids, keys, state)
            self.lifecycle.observe(scored)
            self._count_missing_context(day, ids)
            m.batch_size.observe(n)
            m.inferences.inc(n)
            m.executions.inc()
            m.inference_seconds.observe(scored.seconds)
        records: list[list[OutRecord]] = [[], []]  # steps 1, 2
        # per step, the Kafka timestamps (ms) of the last readings of the scored days whose
        # outputs are complete once that step is acknowledged (for the latency metric)
        complete_at: list[list[int]] = [[], []]
        row = 0
        for p, d in zip(batch, scoreable, strict=True):
            self._collect(p, d, scored, row, records, complete_at)
            row += len(d)
        owners = {p.partition: p.owner for p in batch}
        return self._publish(taken, records, complete_at, owners)

    def _count_missing_context(self, day: np.ndarray, ids: list[str]) -> None:
        """``meterwatch_days_without_context_total``: scored days that the given weather
        file has no row for, whose household the given household file lacks, or after the
        last year the given holidays file lists (the model scores them as unknown, or as no
        holiday: a weather feed that stopped, customers added since, a new year)."""
        tables, s = self.tables, self.settings
        if tables is None:
            return
        without = self.metrics.days_without_context
        if s.weather is not None:
            without.labels("weather").inc(int(np.isnan(tables.max_temperature(day)).sum()))
        if s.household_info is not None:
            tariff, group = tables.tariff, tables.acorn_group
            without.labels("household_info").inc(
                sum(h not in tariff and h not in group for h in ids))
        if s.holidays is not None:  # past the last year listed, no day is known a holiday
            without.labels("holidays").inc(int((day > _listed_until(tables)).sum()))

    async def _publish(self, taken: Batch, records: list[list[OutRecord]],
                       complete_at: list[list[int]], owners: dict[int, object]) -> None:
        """Steps 1-2; a day's end-to-end latency ends when its last output is acknowledged
        (its day score, or its alert / data-quality record). Only records of partitions
        still held by the work that built them leave: a partition lost meanwhile and taken
        back (or assigned again) is replayed from its checkpoint by its new work."""
        m = self.metrics
        if self.publisher.transactional:  # steps 1 and 2 in one transaction a partition
            records = [records[0] + records[1], []]
            complete_at = [complete_at[0] + complete_at[1], []]
        # Step 1: day scores, acknowledged; Step 2: alerts and data quality (stream.checkpoint)
        for step, last_ts in zip(records, complete_at, strict=True):
            try:  # (a partition lost meanwhile publishes nothing more)
                await self.publisher.send_all(
                    r for r in step if self.parts.get(r.partition, _NOBODY)
                    is owners.get(r.partition))
            except PartitionLost as exc:
                # the other partitions' records are acknowledged; the lost ones' days are
                # the new owner's to replay
                self._lose(exc.partitions, str(exc))
            done = time.time() * 1000
            for ts in last_ts:
                lat = max(0.0, (done - ts) / 1000)
                m.end_to_end_latency.observe(lat)
                self.latencies.append(lat)
        # only once acknowledged: a batch whose publishing failed or was cancelled stays
        # pinned, so no commit passes its days (the next owner replays them)
        self.batcher.release(taken.id)

    def _collect(self, p: Pending, scoreable: ClosedDays, scored, row: int,
                 records: list[list[OutRecord]], complete_at: list[list[int]]) -> None:
        """Write back household state and build the output records of one chunk."""
        s = self.settings
        work = self.parts.get(p.partition)
        if work is None or work is not p.owner:
            return  # lost while it was scored: the new owner replays these days
        households = work.assembler.households
        part = None
        changes: dict[int, dict] = {}
        if scored is not None and len(scoreable):
            sl = slice(row, row + len(scoreable))
            part = _slice_scored(scored, sl)
            # a household's days are in date order: its last row holds its newest state
            hi = scoreable.household_index
            last = len(hi) - 1 - np.unique(hi[::-1], return_index=True)[1]
            for k in STATE_FIELDS:
                households.state_column(k)[hi[last]] = part.state[k][last]
            sustained, changes = self.sustained.update(households.state, hi, scoreable.kwh,
                                                       scoreable.day, self.tables)
            part.state.update(sustained)  # the day scores carry it (recovery)
        # scored rows first (they align with ``part``), then the incomplete ones
        days = ClosedDays.concat([scoreable, p.days.select(p.days.status == INCOMPLETE)])
        # the model and threshold that scored these days (a swap lands between batches);
        # days scored by no model (all incomplete) carry the latest
        threshold, version = self.lifecycle.latest()
        if part is not None:
            threshold = part.threshold if np.isfinite(part.threshold) else threshold
            version = part.model_version or version
        docs = build_documents(days, part, days.seq, threshold=threshold,
                               model_version=version,
                               signal_names=SIGNAL_NAMES, grid=self.grid,
                               top_slots=s.top_slots)
        partition = p.partition
        if part is not None and changes:
            records[1].extend(change_records(changes, [doc.day_score for doc in docs],
                                             s.alerts_topic, partition,
                                             model_version=version))
        last_ts = days.last_ts_ms.tolist()
        for i, doc in enumerate(docs):
            records[0].append(json_record(s.scores_topic, partition, doc.household_id,
                                          doc.day_score))
            if doc.alert is not None:
                records[1].append(json_record(s.alerts_topic, partition, doc.household_id,
                                              doc.alert))
                self.metrics.alerts.labels(
                    (doc.alert.get("unusual") or ("rules",))[0]).inc()
            if doc.data_quality is not None:
                records[1].append(json_record(s.data_quality_topic, partition,
                                              doc.household_id, doc.data_quality))
            if i < len(scoreable):  # incomplete days have no latency to speak of
                second = doc.alert is not None or doc.data_quality is not None
                complete_at[second].append(last_ts[i])
        self.metrics.days_scored.inc(len(scoreable))
        work.dirty.update(p.days.household_index.tolist())

    # -- commit ----------------------------------------------------------------------------
    async def _commit_loop(self) -> None:
        """Steps 3-6 every ``--commit-interval-s``; returns at a stop, between commits
        (the stop commits last, in ``_shutdown``)."""
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.settings.commit_interval_s)
            if self._stopping.is_set():
                return
            try:
                await self._commit(set(self.parts))
            except PartitionLost as exc:
                self._lose(exc.partitions, str(exc))
            except KafkaError as exc:
                log.warning("commit failed (will retry): %r", exc)

    async def _commit(self, partitions: set[int]) -> None:
        """Steps 3-6 of the protocol (``stream.checkpoint``) for owned partitions."""
        assert self.consumer is not None
        await self.checkpoint.commit(self.parts, partitions, self.consumer)

    async def _holds_generation(self, partitions: set[int]) -> bool:
        """Whether this member is still in the group generation that owns ``partitions``:
        the broker checks the generation of an offset commit, so re-committing the last
        committed offsets answers it without changing anything."""
        assert self.consumer is not None
        offsets = {TopicPartition(self.settings.input_topic, p): self.parts[p].committed
                   for p in partitions if p in self.parts and self.parts[p].committed >= 0}
        if not offsets:
            return True
        try:
            await self.consumer.commit(offsets)
        except CommitFailedError:
            return False
        except KafkaError as exc:
            log.warning("could not confirm the group generation (%r)", exc)
            return False
        return True

    # -- rebalance -------------------------------------------------------------------------
    async def _settle(self, partitions: set[int], *, drop: bool = True) -> None:
        """Before partitions leave: score and publish their pending days, commit, forget."""
        mine = partitions & set(self.parts)
        if not mine:
            return
        async with self._process_lock:
            await self._drain_publishing()
            while batch := self.batcher.take(self.batcher.max_size, partitions=mine):
                await self._process(batch)
        await self._commit(mine)
        if drop:
            for p in mine:
                self.parts.pop(p, None)
            self.metrics.partitions_assigned.set(len(self.parts))

    async def _recover(self, partitions: set[int]) -> None:
        """Rebuild newly owned partitions (``stream.recovery``)."""
        assert self.consumer is not None
        new = partitions - set(self.parts)
        works = await recover(self.settings, self.publisher, self.consumer, self.grid, new)
        self.parts.update(works)
        self.metrics.partitions_assigned.set(len(self.parts))
        for p in works:  # from 0, so that the first loss is an increase (MeterwatchInputLost)
            self.metrics.input_lost.labels(self.settings.input_topic, str(p))

    async def _on_revoked(self, parts: set[int]) -> None:
        """Settle revoked partitions before the group moves on (``stream.source``)."""
        self.metrics.rebalances.inc()
        async with self._ownership:
            for p in parts:  # the group decides who owns them now
                self._retakes.pop(p, None)
                self._lost_committed.pop(p, None)
            try:
                mine = parts & set(self.parts)
                if mine and not await self._holds_generation(mine):
                    # the group moved on while this member was away (frozen, partitioned):
                    # another member may own them already, publish nothing for them
                    self._lose(parts, "the group generation changed before the revoke",
                               kind="group_moved_on")
                else:
                    await self._settle(parts)
            except PartitionLost as exc:
                self._lose(parts, str(exc), kind="settle_failed")
            except Exception:
                log.exception("settling revoked partitions failed; the new owner replays them")
                self._lose(parts, "settling failed", kind="settle_failed")
            finally:
                for p in parts:
                    await self.publisher.close_partition(p)

    async def _on_assigned(self, parts: set[int]) -> None:
        """Recover assigned partitions; the source fetches them once this returns."""
        async with self._ownership:
            for p in parts:  # recovered here, not by a re-take
                self._retakes.pop(p, None)
                self._lost_committed.pop(p, None)
            try:
                if max(parts, default=-1) >= self._outputs_cover:
                    # the input topic grew: its new partitions need theirs in every output
                    log.warning("assigned input partitions %s beyond the %d the output topics "
                                "were checked for: checking them again", sorted(parts),
                                self._outputs_cover)
                    await self._check_topics()
                await self._recover(parts)
            except PartitionLost as exc:
                self._lose(exc.partitions, str(exc))
            except Exception as exc:  # aiokafka would only log it: fail the service instead
                self._fail(exc, "recovery")
                self.source.lose(parts)
                return
        self._joined = True
        self.metrics.ready.set(1 if all(self.readiness().values()) else 0)

    # -- partitions fenced outside a rebalance ---------------------------------------------
    async def _retake_loop(self) -> None:
        """Take back fenced partitions when their backoff is over (``_retake``)."""
        while True:
            now = time.monotonic()
            due = {p for p, t in self._retakes.items() if t <= now}
            if due:
                await self._retake(due)
                continue
            self._retake_wake.clear()
            wait = min(self._retakes.values(), default=now + 3600) - now
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._retake_wake.wait(), max(0.0, wait))

    async def _retake(self, partitions: set[int]) -> None:
        """Take back ``partitions``, lost to a fence, if the group still assigns them to
        this member in its current generation: recovered exactly as on assignment
        (``stream.recovery``: the producer re-opened first, fencing whoever took the
        transactional id, then state, outputs and the input position rebuilt from the
        checkpoint), then fetched again. Otherwise the group moved on: the new owner
        replays them. Never raises (a failure is retried after the next backoff)."""
        async with self._ownership:
            due = {p for p in partitions if p in self._retakes}
            for p in due:
                del self._retakes[p]
            if self._stopping.is_set() or self.consumer is None:
                return
            assigned = {tp.partition for tp in self.source.assignment()}
            back = {p for p in due if p in assigned and p not in self.parts}
            gone = due - assigned
            if gone:
                log.info("partitions %s not taken back: no longer assigned to this member "
                         "(their new owner replays them)", sorted(gone))
            if not back:
                return
            try:
                # the generation check (as in ``_holds_generation``): the broker refuses a
                # commit from a member the group has moved on from; anything else is retried
                try:
                    await asyncio.wait_for(self._confirm_generation(back), _GENERATION_CHECK_S)
                except CommitFailedError:
                    log.info("partitions %s not taken back: the group generation changed "
                             "(their new owner replays them)", sorted(back))
                    return
                await self._recover(back)
            except PartitionLost as exc:  # fenced again meanwhile: back off further
                self._lose(exc.partitions | (back - set(self.parts)), str(exc))
                return
            except ConfigurationError as exc:  # e.g. no longer authorised: exit 2
                self._fail(exc, "recovery")
                return
            except Exception as exc:  # never fatal: retried after the next backoff
                if self._stopping.is_set():
                    return
                log.warning("taking back partitions %s failed (%r); retrying",
                            sorted(back), exc)
                self._lose(back - set(self.parts), f"taking them back failed: {exc!r}")
                return
            taken = back & set(self.parts)
            for p in taken:
                self._lost_committed.pop(p, None)
            self.source.retake(taken)
            self.metrics.partitions_retaken.inc(len(taken))
            log.warning("partitions %s taken back (the group still assigns them to this "
                        "member): recovered from their checkpoint (start offsets %s)",
                        sorted(taken), {p: self.parts[p].position for p in sorted(taken)})

    async def _confirm_generation(self, partitions: set[int]) -> None:
        """Re-commit offsets of ``partitions`` that change nothing: what was last committed
        for them (kept when they were lost), else what the group has committed for them,
        else their log start offsets (what an absent offset resumes from:
        ``auto_offset_reset=earliest``). Raises ``CommitFailedError`` when the group has
        moved on from this member's generation."""
        assert self.consumer is not None
        topic = self.settings.input_topic
        out = {TopicPartition(topic, p): c for p in partitions
               if (c := self._lost_committed.get(p, -1)) >= 0}
        for p in partitions - {tp.partition for tp in out}:
            tp = TopicPartition(topic, p)
            c = await self.consumer.committed(tp)
            if c is None or c < 0:
                c = (await self.consumer.beginning_offsets([tp]))[tp]
            out[tp] = c
        await self.consumer.commit(out)


async def _together(*steps: Coroutine[Any, Any, None]) -> None:
    """Run ``steps`` at once until all are done; the first to fail cancels the others (a
    scorer that cannot start ends a connection still retrying, and a misconfiguration found
    while connecting ends the scorer's start) and its exception is raised as it is (an
    ``asyncio.TaskGroup`` would wrap a ``ConfigurationError`` in an ``ExceptionGroup``, and
    the one-line exit 2 would become a traceback)."""
    tasks = [asyncio.create_task(step) for step in steps]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()  # the first failure, if any
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _listed_until(tables: ContextTables) -> int:
    """The last day (days since 1970) of the last year the bank holidays table lists; -1
    for an empty table."""
    if not len(tables.holidays):
        return -1
    year = day_to_date(tables.holidays[-1]).year
    return (dt.date(year, 12, 31) - dt.date(1970, 1, 1)).days


_NOBODY = object()  # the owner of a partition this member does not hold
#: longest the log start offset of an input partition may take to ask for (_count_deleted)
_LOG_START_TIMEOUT_S = 10.0
#: the first re-take of a fenced partition waits this long (doubled while fences go on)
_RETAKE_FIRST_S = 1.0
#: a fence this long after the previous one starts the backoff again
_FENCE_MEMORY_S = 120.0
#: longest the generation check of a re-take may take (retried after the next backoff)
_GENERATION_CHECK_S = 15.0


def _slice_scored(scored: Scored, sl: slice) -> Scored:
    """Rows ``sl`` of a batch's ``Scored`` (per-day arrays sliced, the rest kept)."""
    rows: dict[str, Any] = {f.name: v[sl] for f in dataclasses.fields(scored)
                            if isinstance(v := getattr(scored, f.name), np.ndarray)}
    return dataclasses.replace(scored, **rows,
                               state={k: v[sl] for k, v in scored.state.items()})


async def run_service(settings: Settings, checked: Checked | None = None) -> int:
    """``meterwatch run``: start, run until SIGTERM/SIGINT or a failure, stop gracefully.

    Returns the exit status: 0 after a signal, 1 when a stage failed. Raises
    ``ConfigurationError`` (exit status 2, printed as one line by the CLI) for what no retry
    can fix, after stopping everything it started; a misconfigured input (a checkpoint that
    cannot serve, a CSV, the probes' address) before it starts anything. ``checked``: what
    ``check_inputs`` returned for ``settings`` (else the start checks them itself).
    """
    service = Service(settings, checked=checked)
    await service.run_until_signalled()
    if isinstance(service.failed, ConfigurationError):
        raise service.failed
    return 1 if service.failed is not None else 0
