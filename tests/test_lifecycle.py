"""Model lifecycle and the alert budget at run time (docs/serving.md).

Unit parts: the candidate validation, the file watcher, the shadow comparison, the scorer's
rolling threshold. Stream parts, through ``meterwatch run`` (a subprocess, default settings
but for the setting under test) and the real broker: a model swapped mid-stream with every
day scored exactly once and labelled with the version that scored it, broken checkpoints
refused without loss, ``--target-far`` reaching the scorer process, shadow scoring.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from prometheus_client import CollectorRegistry

from benchmarks.state_precision import replay as stored_replay
from meterwatch.model import ContextTables, Detector, HouseholdState, SyntheticConfig, generate
from meterwatch.model.calibration import SEVERITIES
from meterwatch.model.state import STORAGE_DTYPES
from meterwatch.stream.config import Settings
from meterwatch.stream.lifecycle import (
    ModelLifecycle,
    ModelRejected,
    ModelWatcher,
    ShadowComparison,
    validate,
)
from meterwatch.stream.metrics import create_metrics
from meterwatch.stream.preflight import check_inputs
from meterwatch.stream.scorer import STATE_FIELDS, Scorer
from meterwatch.stream.simulate import produce_synthetic
from meterwatch.stream.testing import ServiceProcess
from tests.cli_helpers import clean_env, meterwatch
from tests.conftest import (
    HISTORY_DAYS,
    assert_unique,
    inject_gross,
    metric,
    read_topic,
    unique_settings,
    wait_until,
)

N_HOUSEHOLDS = 30


def _day_scorer(scorer: Scorer, synthetic):  # type: ignore[no-untyped-def]
    """``day(d, state)``: every synthetic household's day ``d`` scored by ``scorer``."""
    n = len(synthetic.household_ids)
    keys = np.arange(n, dtype=np.int64)

    async def day(d: int, state: dict[str, np.ndarray]):  # type: ignore[no-untyped-def]
        return await scorer.score(synthetic.kwh[:, d], np.full(n, synthetic.days[d], np.int32),
                                  list(synthetic.household_ids), keys, state)
    return day


def _variant(src: Path, dst: Path, version: str, scale: float = 1.0,
             nan: bool = False) -> Detector:
    """A copy of the checkpoint at ``src`` under another version (weights scaled, or NaN),
    written atomically to ``dst`` (as ``meterwatch train --out`` does)."""
    det = Detector.load(src, device="cpu")
    with torch.no_grad():
        for p in det.model.parameters():
            p.fill_(math.nan) if nan else p.mul_(scale)
    det.version = version
    det.save(dst)
    return det


# --------------------------------------------------------------------------- unit parts


def test_validate_accepts_a_model_and_refuses_non_finite_ones(detector_path: Path,
                                                               tmp_path: Path) -> None:
    good = Detector.load(detector_path, device="cpu")
    validate(good)
    broken = _variant(detector_path, tmp_path / "nan.pt", "nan-weights", nan=True)
    with pytest.raises(ModelRejected, match="non-finite"):
        validate(broken, good)


async def test_model_watcher_waits_for_a_stable_file_and_takes_sighup_at_once(
        tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(b"v1")
    seen: list[bytes] = []

    async def reload(p: Path) -> bool:
        seen.append(await asyncio.to_thread(p.read_bytes))
        return True

    w = ModelWatcher(path, 0.05, reload)
    await w.check()
    assert seen == []  # unchanged
    tmp = tmp_path / "model.pt.tmp"
    tmp.write_bytes(b"v2")
    os.replace(tmp, path)
    await w.check()
    assert seen == []  # changed since the last look: waits one more
    await w.check()
    assert seen == [b"v2"]
    await w.check()
    assert seen == [b"v2"]  # each version of the file once
    await w.check(now=True)  # SIGHUP: at once, even the same file
    assert seen == [b"v2", b"v2"]
    tmp.write_bytes(b"v3")
    os.replace(tmp, path)
    task = asyncio.create_task(w.run())
    try:
        for _ in range(100):
            if seen[-1] == b"v3":
                break
            await asyncio.sleep(0.02)
        assert seen[-1] == b"v3"
    finally:
        task.cancel()


async def test_one_watcher_of_several_files_reads_them_once_per_change(
        tmp_path: Path) -> None:
    """The context files: one watcher for the three, so a change of two of them (or a
    SIGHUP) is one reload, handed the file that changed; a file missing for a moment (a
    feed that deletes and writes it) is waited for, not reloaded without."""
    paths = [tmp_path / f"{name}.csv" for name in ("households", "weather", "holidays")]
    for p in paths:
        p.write_text("v1")
    seen: list[Path] = []

    async def reload(p: Path) -> bool:
        seen.append(p)
        return True

    w = ModelWatcher(paths, 0.05, reload, what="context")
    await w.check()
    assert seen == []
    paths[1].write_text("v2 longer")  # the weather, appended in place
    paths[2].unlink()  # the holidays, being replaced
    await w.check()
    await w.check()
    assert seen == []  # one of them is missing: wait
    paths[2].write_text("v2")
    await w.check()
    assert seen == []  # changed since the last look: one more
    await w.check()
    assert seen == [paths[1]]  # once, for both
    await w.check()
    await w.check(now=True)  # SIGHUP: once more, as they are
    assert seen == [paths[1], paths[0]]


def test_shadow_comparison_counts_agreement() -> None:
    cmp = ShadowComparison(window=4)
    live = np.array([1.0, 5.0, 9.0, np.nan, 2.0])
    cmp.add(live, live >= 5, live * 2, np.array([False, True, True, False, True]))
    assert (cmp.both, cmp.live_only, cmp.shadow_only) == (2, 0, 1)
    assert cmp.agreement == pytest.approx(2 / 3)
    assert cmp.mean_abs_diff == pytest.approx((1 + 5 + 9 + 2) / 4)
    assert cmp.rank_correlation() == pytest.approx(1.0)  # a monotone transform
    cmp.add(np.array([1.0, 2.0, 3.0, 4.0]), np.zeros(4, bool), np.array([4.0, 3.0, 2.0, 1.0]),
            np.zeros(4, bool))
    assert cmp.rank_correlation() == pytest.approx(-1.0)  # only the last 4 days count
    assert cmp.days == 9 and ShadowComparison().agreement == 1.0


async def test_scorer_threshold_follows_live_scores_only_when_rolling(
        detector_path: Path, synthetic) -> None:  # type: ignore[no-untyped-def]
    """The budget reaches the worker that decides is_alert; rolling moves the threshold
    once 500 household-days are in its window, fixed never does."""
    thresholds: dict[str, set[float]] = {}
    for mode in ("rolling", "fixed"):
        det = Detector.load(detector_path, device="cpu")
        det.set_target_far(0.05)
        scorer = Scorer(det, synthetic.tables, process=False, rolling=mode == "rolling")
        await scorer.start()
        try:
            n = len(synthetic.household_ids)
            state = {k: v for k, v in vars(HouseholdState.empty(n)).items()}
            keys = np.arange(n, dtype=np.int64)
            seen = set()
            for d in range(HISTORY_DAYS + 14):
                scored = await scorer.score(
                    synthetic.kwh[:, d], np.full(n, synthetic.days[d], np.int32),
                    list(synthetic.household_ids), keys, state)
                state = scored.state
                seen.add(scored.threshold)
                assert scored.model_version == det.version
                assert scored.severity is not None
                alert = scored.severity > 0
                assert np.array_equal(alert, scored.is_alert)
            thresholds[mode] = seen
        finally:
            await scorer.stop()
    assert len(thresholds["fixed"]) == 1
    assert len(thresholds["rolling"]) > 1
    assert set(STATE_FIELDS) == set(state)


@pytest.mark.parametrize("process", [False, True], ids=["thread", "process"])
async def test_scorer_swap_between_batches_and_refusal(detector_path: Path, tmp_path: Path,
                                                       synthetic, process: bool  # type: ignore[no-untyped-def]
                                                       ) -> None:
    a = Detector.load(detector_path, device="cpu")
    b = _variant(detector_path, tmp_path / "b.pt", "test-model-B", scale=1.01)
    nan = _variant(detector_path, tmp_path / "nan.pt", "test-model-nan", nan=True)
    scorer = Scorer(a, synthetic.tables, process=process)
    await scorer.start()
    n = len(synthetic.household_ids)
    day = _day_scorer(scorer, synthetic)

    try:
        first = await day(0, dict(vars(HouseholdState.empty(n))))
        assert first.model_version == a.version
        await scorer.swap(b)
        second = await day(1, first.state)
        assert second.model_version == b.version and scorer.detector is b
        with pytest.raises(ModelRejected, match="non-finite"):
            await scorer.swap(nan)
        third = await day(2, second.state)
        assert third.model_version == b.version and np.isfinite(third.score).all()
    finally:
        await scorer.stop()


@pytest.mark.parametrize("process", [False, True], ids=["thread", "process"])
async def test_scorer_swaps_the_shadow_between_batches_and_refuses_a_broken_one(
        detector_path: Path, tmp_path: Path, synthetic, process: bool  # type: ignore[no-untyped-def]
        ) -> None:
    live = Detector.load(detector_path, device="cpu")
    twin = _variant(detector_path, tmp_path / "twin.pt", "test-shadow-twin")
    b = _variant(detector_path, tmp_path / "b.pt", "test-shadow-B", scale=1.2)
    nan = _variant(detector_path, tmp_path / "nan.pt", "test-shadow-nan", nan=True)
    scorer = Scorer(live, synthetic.tables, process=process, shadow=twin)
    await scorer.start()
    n = len(synthetic.household_ids)
    day = _day_scorer(scorer, synthetic)

    try:
        first = await day(HISTORY_DAYS, dict(vars(HouseholdState.empty(n))))
        assert first.shadow_version == twin.version and first.shadow_score is not None
        assert np.allclose(first.shadow_score, first.score, equal_nan=True)
        await scorer.swap_shadow(b)
        second = await day(HISTORY_DAYS + 1, first.state)
        assert second.shadow_version == b.version and scorer.shadow is b
        assert second.shadow_score is not None
        assert not np.allclose(second.shadow_score, second.score, equal_nan=True)
        with pytest.raises(ModelRejected, match="non-finite"):
            await scorer.swap_shadow(nan)
        third = await day(HISTORY_DAYS + 2, second.state)
        assert third.shadow_version == b.version and third.model_version == live.version
        assert third.shadow_score is not None and np.isfinite(third.shadow_score).all()
    finally:
        await scorer.stop()


@pytest.mark.parametrize("process", [False, True], ids=["thread", "process"])
async def test_scorer_takes_new_context_tables_between_batches(
        detector_path: Path, synthetic, process: bool  # type: ignore[no-untyped-def]
        ) -> None:
    """``Scorer.update_tables``: the next batch is scored with them, by the live model and
    the shadow (context files read again: ``ModelLifecycle._reload_context``)."""
    live = Detector.load(detector_path, device="cpu")
    ids = list(synthetic.household_ids)
    n = len(ids)
    past_ids, past_day, past_kwh, _ = synthetic.long(slice(0, HISTORY_DAYS))
    _, states = live.replay(past_kwh, past_day, past_ids)
    history = HouseholdState.concat(states[h] for h in ids)
    scorer = Scorer(live, None, process=process, shadow=live)
    await scorer.start()
    day = _day_scorer(scorer, synthetic)
    try:
        state = dict(vars(history))
        bare = await day(HISTORY_DAYS, state)
        await scorer.update_tables(ContextTables.empty().changed(synthetic.tables))
        told = await day(HISTORY_DAYS, state)
        assert scorer.tables is not None and not scorer.tables.changed(synthetic.tables)
    finally:
        await scorer.stop()
    days = np.full(n, synthetic.days[HISTORY_DAYS], np.int32)
    for got, tables in ((bare, None), (told, synthetic.tables)):
        want = live.score(synthetic.kwh[:, HISTORY_DAYS], days, ids, history, tables)
        np.testing.assert_allclose(got.score, want.score, rtol=1e-4, atol=1e-4)
        assert got.shadow_score is not None
        np.testing.assert_allclose(got.shadow_score, want.score, rtol=1e-4, atol=1e-4)
    assert not np.allclose(bare.score, told.score)


async def test_lifecycle_with_the_thread_scorer_validates_once_and_still_refuses(
        detector_path: Path, tmp_path: Path) -> None:
    """With a worker thread the scorer no longer validates what the service validated (the
    same object, the same device): a broken live or shadow candidate is still refused,
    counted in its own counter, and a good one serves from the next batch."""
    path, shadow_path = tmp_path / "model.pt", tmp_path / "shadow.pt"
    _variant(detector_path, path, "test-model-A")
    _variant(detector_path, shadow_path, "test-shadow-A")
    settings = Settings(scorer="thread", device="cpu", model_path=path,
                        shadow_model_path=shadow_path, metrics_port=0)
    metrics = create_metrics(CollectorRegistry())
    models = ModelLifecycle(settings, metrics, asyncio.Lock())
    checked = check_inputs(settings)  # as the service's start does
    checked.close()  # (no probes server here)
    await models.adopt(checked)
    assert models.detector is not None and models.watching
    scorer = Scorer(models.detector, None, process=False, shadow=models.shadow)
    await scorer.start()
    models.attach(scorer)

    def count(name: str) -> float:
        return metrics.registry.get_sample_value(name) or 0.0

    try:
        for p, reload in ((path, models._reload_model), (shadow_path, models._reload_shadow)):
            _variant(detector_path, p, "test-nan", nan=True)
            assert await reload(p) is False
            _variant(detector_path, p, "test-B", scale=1.01)
            assert await reload(p) is True
        assert (scorer.detector.version, scorer.shadow.version) == ("test-B", "test-B")
        assert count("meterwatch_model_reload_failures_total") == 1
        assert count("meterwatch_shadow_reload_failures_total") == 1
        assert count("meterwatch_model_reloads_total") == 1
        assert count("meterwatch_shadow_reloads_total") == 1
        ids = ["H1", "H2"]
        state = dict(vars(HouseholdState.empty(2)))
        scored = await scorer.score(np.full((2, 48), 0.2, np.float32),
                                    np.array([16000, 16000], np.int32), ids,
                                    np.arange(2, dtype=np.int64), state)
        assert scored.model_version == "test-B" and scored.shadow_version == "test-B"
    finally:
        await scorer.stop()


def test_run_help_describes_the_new_flags() -> None:
    out = meterwatch("run", "--help").stdout
    for flag in ("--target-far", "--calibration", "--model-poll-s", "--shadow-model-path"):
        assert flag in out, flag
    assert "rolling" in out and "SIGHUP" in out


def test_target_far_misconfigured_exits_2_with_one_line(detector_path: Path,
                                                        tmp_path: Path) -> None:
    out_of_range = meterwatch("run", "--model-path", str(detector_path), "--target-far", "0.5",
                              "--metrics-port", "0")
    assert out_of_range.returncode == 2
    lines = out_of_range.stderr.strip().splitlines()
    assert lines[-1].startswith("meterwatch: error: --target-far:"), lines
    old = Detector.load(detector_path, device="cpu")
    old.far_curve = None  # a checkpoint from before the curve
    old.save(tmp_path / "old.pt")
    no_curve = meterwatch("run", "--model-path", str(tmp_path / "old.pt"), "--target-far",
                          "0.01", "--metrics-port", "0",
                          env=clean_env(METERWATCH_BOOTSTRAP_SERVERS="127.0.0.1:1"))
    assert no_curve.returncode == 2, no_curve.stderr[-2000:]
    last = no_curve.stderr.strip().splitlines()[-1]
    assert last.startswith("meterwatch: error: --target-far: the checkpoint"), last
    assert "no calibration curve" in last and "Traceback" not in no_curve.stderr


def test_a_broken_shadow_at_start_exits_2_with_one_line(detector_path: Path,
                                                         tmp_path: Path) -> None:
    """At start a shadow that cannot serve is a misconfiguration (later ones are refused)."""
    bad = tmp_path / "shadow.pt"
    bad.write_bytes(detector_path.read_bytes()[:1000])
    proc = meterwatch("run", "--model-path", str(detector_path), "--shadow-model-path",
                      str(bad), "--metrics-port", "0",
                      env=clean_env(METERWATCH_BOOTSTRAP_SERVERS="127.0.0.1:1"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("meterwatch: error: --shadow-model-path: "), last
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- in the stream


@pytest.mark.integration
def test_model_swap_mid_stream_loses_and_doubles_nothing(broker, detector_path: Path,
                                                        tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    a = _variant(detector_path, path, "test-model-A")
    settings = unique_settings(broker)  # default settings: scorer process, 5 s polling
    n_days = 9
    data = generate(SyntheticConfig(n_households=N_HOUSEHOLDS, n_days=HISTORY_DAYS + n_days,
                                    anomaly_rate=0.0, seed=11))
    truth = inject_gross(data, range(HISTORY_DAYS + 4, HISTORY_DAYS + n_days))
    svc = ServiceProcess(settings, path, log_path=tmp_path / "service.log").start()

    def produce(days: range, rate: float | None = None) -> None:
        asyncio.run(produce_synthetic(settings.bootstrap_servers, settings.input_topic, data,
                                      days=days, rate=rate))

    def scored() -> float:
        return metric(svc.port, "meterwatch_days_scored_total")

    try:
        svc.wait_ready()
        assert svc.proc is not None
        produce(range(HISTORY_DAYS, HISTORY_DAYS + 2))
        wait_until(lambda: scored() >= 2 * N_HOUSEHOLDS, what="the first two days scored")
        # a truncated checkpoint, announced by SIGHUP: refused, A keeps serving
        tmp = tmp_path / "partial.pt"
        tmp.write_bytes(path.read_bytes()[:1000])
        os.replace(tmp, path)
        svc.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: metric(svc.port, "meterwatch_model_reload_failures_total") >= 1,
                   what="the truncated checkpoint refused")
        # a checkpoint that loads but scores NaN, noticed by polling: refused too
        _variant(detector_path, path, "test-model-nan", nan=True)
        wait_until(lambda: metric(svc.port, "meterwatch_model_reload_failures_total") >= 2,
                   what="the NaN checkpoint refused")
        assert metric(svc.port, "meterwatch_model_reloads_total") == 0
        produce(range(HISTORY_DAYS + 2, HISTORY_DAYS + 3))
        wait_until(lambda: scored() >= 3 * N_HOUSEHOLDS, what="day 3 scored by A")
        # B arrives while days are streaming
        with ThreadPoolExecutor(1) as pool:  # 4 days at 1,440 readings/s: about 4 s
            job = pool.submit(produce, range(HISTORY_DAYS + 3, HISTORY_DAYS + n_days - 2),
                              N_HOUSEHOLDS * 48 * 1.0)
            time.sleep(1.5)
            b = _variant(detector_path, path, "test-model-B", scale=1.01)
            svc.proc.send_signal(signal.SIGHUP)
            job.result(120)
        wait_until(lambda: metric(svc.port, "meterwatch_model_reloads_total") >= 1,
                   what="B swapped in")
        produce(range(HISTORY_DAYS + n_days - 2, HISTORY_DAYS + n_days - 1))  # after it
        wait_until(lambda: scored() >= N_HOUSEHOLDS * (n_days - 1), what="the day after the swap")
        # a scorer process that dies after the swap comes back with the new model
        scorers = [c for c in psutil.Process(svc.proc.pid).children()
                   if any("spawn_main" in part for part in c.cmdline())]
        assert len(scorers) == 1, scorers
        scorers[0].send_signal(signal.SIGKILL)
        wait_until(lambda: metric(svc.port, "meterwatch_scorer_restarts_total") >= 1
                   and svc.ready(), what="the scorer restarted")
        produce(range(HISTORY_DAYS + n_days - 1, HISTORY_DAYS + n_days))
        total = N_HOUSEHOLDS * n_days
        wait_until(lambda: scored() >= total, what="every day scored")
        scores = asyncio.run(read_topic(settings, settings.scores_topic, min_records=total))
        alerts = asyncio.run(read_topic(settings, settings.alerts_topic,
                                        min_records=len(truth)))
        failures = metric(svc.port, "meterwatch_model_reload_failures_total")
        info = _info(svc.port)
        assert svc.terminate() == 0
    finally:
        if svc.proc is not None and svc.proc.poll() is None:
            svc.kill()
    log_text = (tmp_path / "service.log").read_text()
    assert failures == 2 and "model reload refused" in log_text
    assert 'version="test-model-B"' in info
    # every day exactly once, labelled with the model that scored it
    assert_unique([(s["household_id"], s["date"]) for s in scores])
    assert len(scores) == total
    versions = {s["model_version"] for s in scores}
    assert versions == {a.version, b.version}, versions
    dates = sorted({s["date"] for s in scores})
    by_household: dict[str, list[tuple[str, str]]] = {}
    for s in scores:
        by_household.setdefault(s["household_id"], []).append((s["date"], s["model_version"]))
        if s["date"] <= dates[2]:
            assert s["model_version"] == a.version, s  # before B existed
        if s["date"] >= dates[-2]:
            assert s["model_version"] == b.version, s  # after the swap, and the restart
    for days in by_household.values():  # A, then B: never back
        seq = [v for _, v in sorted(days)]
        assert seq == sorted(seq, key=lambda v: v == b.version), seq
    # alerts carry the version of their day score and a severity from the curve
    score_version = {(s["household_id"], s["date"]): s["model_version"] for s in scores}
    assert set(truth) <= {(x["household_id"], x["date"]) for x in alerts}
    for x in alerts:
        assert x["model_version"] == score_version[(x["household_id"], x["date"])]
        assert x["severity"] in SEVERITIES


@pytest.mark.integration
def test_target_far_and_shadow_scoring_in_the_scorer_process(broker, detector_path: Path,
                                                             tmp_path: Path) -> None:
    live = Detector.load(detector_path, device="cpu", target_far=0.05)
    twin = _variant(detector_path, tmp_path / "twin.pt", "test-model-twin")
    settings = unique_settings(broker, target_far=0.05, shadow_model_path=tmp_path / "twin.pt")
    n_days = 3
    data = generate(SyntheticConfig(n_households=N_HOUSEHOLDS, n_days=HISTORY_DAYS + n_days,
                                    anomaly_rate=0.0, seed=11))
    inject_gross(data, range(HISTORY_DAYS, HISTORY_DAYS + n_days))
    svc = ServiceProcess(settings, detector_path, log_path=tmp_path / "service.log").start()
    total = N_HOUSEHOLDS * n_days
    try:
        svc.wait_ready()
        asyncio.run(produce_synthetic(settings.bootstrap_servers, settings.input_topic, data,
                                      days=range(HISTORY_DAYS, HISTORY_DAYS + n_days)))
        wait_until(lambda: metric(svc.port, "meterwatch_shadow_days_total") >= total,
                   what="the shadow scored every day")
        scores = asyncio.run(read_topic(settings, settings.scores_topic, min_records=total))
        alerts = asyncio.run(read_topic(settings, settings.alerts_topic))
        m = {name: metric(svc.port, name) for name in (
            "meterwatch_shadow_alert_agreement_ratio", "meterwatch_shadow_score_mean_abs_diff",
            "meterwatch_shadow_score_rank_correlation", "meterwatch_alert_threshold")}
        both = metric(svc.port, "meterwatch_shadow_alerts_total", 'agreement="both"')
        only = sum(metric(svc.port, "meterwatch_shadow_alerts_total", f'agreement="{k}"')
                   for k in ("live_only", "shadow_only"))
        assert svc.terminate() == 0
    finally:
        if svc.proc is not None and svc.proc.poll() is None:
            svc.kill()
    assert_unique([(s["household_id"], s["date"]) for s in scores])
    assert len(scores) == total
    # the shadow's results are never published: every record is the live model's
    assert {s["model_version"] for s in scores} == {live.version} != {twin.version}
    # the budget's threshold, computed in the scorer process, is on every record
    assert live.threshold != pytest.approx(Detector.load(detector_path, device="cpu").threshold)
    for s in scores:
        assert s["threshold"] == pytest.approx(live.threshold, abs=1e-4)
        if s["score"] is not None:
            assert s["is_alert"] == (s["score"] >= s["threshold"]), s
    assert m["meterwatch_alert_threshold"] == pytest.approx(live.threshold)
    assert alerts and len(alerts) == sum(s["is_alert"] for s in scores)
    expected = live.severity(np.array([x["score"] for x in alerts]))
    assert [x["severity"] for x in alerts] == expected.tolist()
    # a twin of the live model agrees exactly
    assert both == len(alerts) and only == 0
    assert m["meterwatch_shadow_alert_agreement_ratio"] == 1.0
    assert m["meterwatch_shadow_score_mean_abs_diff"] == pytest.approx(0.0, abs=1e-6)
    assert m["meterwatch_shadow_score_rank_correlation"] == pytest.approx(1.0)


@pytest.mark.integration
def test_shadow_follows_its_file_mid_stream_and_never_touches_the_alerts(
        broker, detector_path: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The shadow is swapped like the live model: a broken candidate (SIGHUP) is refused and
    counted apart, a good one (found by polling, while days stream) shadows from the next
    batch, survives a scorer restart, and the agreement gauges are about it alone; the
    published records are the live model's, exactly as it scores the same days on its own."""
    live = _variant(detector_path, tmp_path / "model.pt", "test-model-live")
    shadow_path = tmp_path / "shadow.pt"
    twin = _variant(detector_path, shadow_path, "test-shadow-twin")
    settings = unique_settings(broker, shadow_model_path=shadow_path)  # else default settings
    n_days = 7
    data = generate(SyntheticConfig(n_households=N_HOUSEHOLDS, n_days=HISTORY_DAYS + n_days,
                                    anomaly_rate=0.0, seed=13))
    truth = inject_gross(data, range(HISTORY_DAYS, HISTORY_DAYS + n_days))
    svc = ServiceProcess(settings, tmp_path / "model.pt",
                         log_path=tmp_path / "service.log").start()

    def produce(days: range, rate: float | None = None) -> None:
        asyncio.run(produce_synthetic(settings.bootstrap_servers, settings.input_topic, data,
                                      days=days, rate=rate))

    def m(name: str, labels: str = "") -> float:
        return metric(svc.port, name, labels)

    total = N_HOUSEHOLDS * n_days
    try:
        svc.wait_ready()
        assert svc.proc is not None
        produce(range(HISTORY_DAYS, HISTORY_DAYS + 2))
        wait_until(lambda: m("meterwatch_shadow_days_total") >= 2 * N_HOUSEHOLDS,
                   what="the twin shadowed two days")
        twin_diff = m("meterwatch_shadow_score_mean_abs_diff")
        twin_agreement = m("meterwatch_shadow_alert_agreement_ratio")
        # a shadow that scores NaN, announced by SIGHUP: refused, counted apart, twin goes on
        _variant(detector_path, shadow_path, "test-shadow-nan", nan=True)
        svc.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: m("meterwatch_shadow_reload_failures_total") >= 1,
                   what="the NaN shadow refused")
        produce(range(HISTORY_DAYS + 2, HISTORY_DAYS + 3))
        wait_until(lambda: m("meterwatch_shadow_days_total") >= 3 * N_HOUSEHOLDS,
                   what="the twin shadowed day 3")
        assert m("meterwatch_shadow_score_mean_abs_diff") == pytest.approx(0.0, abs=1e-6)
        assert 'version="test-shadow-twin"' in _info(svc.port, "meterwatch_shadow_model_info")
        # B replaces the file while days stream; found by polling, no signal
        with ThreadPoolExecutor(1) as pool:  # 3 days at 1,440 readings/s: about 3 s
            job = pool.submit(produce, range(HISTORY_DAYS + 3, HISTORY_DAYS + n_days - 1),
                              N_HOUSEHOLDS * 48 * 1.0)
            time.sleep(1.0)
            b = _variant(detector_path, shadow_path, "test-shadow-B", scale=1.2)
            job.result(120)
        wait_until(lambda: m("meterwatch_shadow_reloads_total") >= 1, what="B shadows")
        # a scorer process that dies now comes back with B as its shadow (were it the twin,
        # the gauges would restart on the twin's exact agreement)
        scorers = [c for c in psutil.Process(svc.proc.pid).children()
                   if any("spawn_main" in part for part in c.cmdline())]
        assert len(scorers) == 1, scorers
        scorers[0].send_signal(signal.SIGKILL)
        wait_until(lambda: m("meterwatch_scorer_restarts_total") >= 1 and svc.ready(),
                   what="the scorer restarted")
        after_swap = m("meterwatch_shadow_days_total")
        produce(range(HISTORY_DAYS + n_days - 1, HISTORY_DAYS + n_days))
        wait_until(lambda: m("meterwatch_days_scored_total") >= total
                   and m("meterwatch_shadow_days_total") >= after_swap + N_HOUSEHOLDS,
                   what="every day scored, the last by B too")
        scores = asyncio.run(read_topic(settings, settings.scores_topic, min_records=total))
        alerts = asyncio.run(read_topic(settings, settings.alerts_topic,
                                        min_records=len(truth)))
        b_diff = m("meterwatch_shadow_score_mean_abs_diff")
        counts = {name: m(name) for name in (
            "meterwatch_shadow_reloads_total", "meterwatch_shadow_reload_failures_total",
            "meterwatch_model_reloads_total", "meterwatch_model_reload_failures_total",
            "meterwatch_shadow_days_total")}
        shadow_info = _info(svc.port, "meterwatch_shadow_model_info")
        assert svc.terminate() == 0
    finally:
        if svc.proc is not None and svc.proc.poll() is None:
            svc.kill()
    log_text = (tmp_path / "service.log").read_text()
    assert "shadow reload refused: test-shadow-nan" in log_text
    assert counts == {"meterwatch_shadow_reloads_total": 1,
                      "meterwatch_shadow_reload_failures_total": 1,
                      "meterwatch_model_reloads_total": 0,
                      "meterwatch_model_reload_failures_total": 0,
                      "meterwatch_shadow_days_total": total}, counts
    # the gauges follow the shadow serving: the twin agreed exactly, B does not
    assert twin_diff == pytest.approx(0.0, abs=1e-6) and twin_agreement == 1.0
    assert b_diff > 1e-3
    assert f'version="{b.version}"' in shadow_info and twin.version not in shadow_info
    # the published records are the live model's, as it scores these days on its own (with
    # the state kept as the household table keeps it: rounded to storage after every day)
    assert_unique([(s["household_id"], s["date"]) for s in scores])
    assert len(scores) == total and {s["model_version"] for s in scores} == {live.version}
    ids, day, kwh, _ = data.long(slice(HISTORY_DAYS, HISTORY_DAYS + n_days))
    alone_score, alone_alert, _ = stored_replay(live, list(ids), day, kwh, None,
                                                set(STORAGE_DTYPES))
    iso = [(dt.date(1970, 1, 1) + dt.timedelta(days=int(d))).isoformat() for d in day]
    expected = {(h, d): float(x) for h, d, x in zip(ids, iso, alone_score, strict=True)}
    for s in scores:
        want = expected[(s["household_id"], s["date"])]
        if s["score"] is None:
            assert not np.isfinite(want), s
        else:
            assert s["score"] == pytest.approx(want, rel=1e-3, abs=1e-3), s
    day_alerts = {(x["household_id"], x["date"]) for x in alerts if "type" not in x}
    assert day_alerts == {(s["household_id"], s["date"]) for s in scores if s["is_alert"]}
    want_alerts = {(h, d) for h, d, a in zip(ids, iso, alone_alert, strict=True) if a}
    assert set(truth) <= day_alerts == want_alerts


def _info(port: int, name: str = "meterwatch_model_info") -> str:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return "\n".join(line for line in text.splitlines() if line.startswith(name))
