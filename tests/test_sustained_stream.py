"""Sustained changes through the running service (``stream.sustained``).

A household whose evening peak is cut from some date gets one ``sustained_change`` record
on the alerts topic within 7 days, with that date as its start, and a SIGKILL of the
service while the change builds up neither loses nor repeats it: the CUSUM state travels
with the household state (day scores, state topic) and the new incarnation continues it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from meterwatch.model import SyntheticConfig, generate
from meterwatch.model.features import ContextTables
from meterwatch.model.inject import persistent_change
from meterwatch.model.sustained import SustainedDetector, daily_temperature, to_storage
from meterwatch.stream.events import DayScore, SustainedChange
from meterwatch.stream.households import HouseholdTable
from meterwatch.stream.metrics import create_metrics
from meterwatch.stream.simulate import produce_synthetic
from meterwatch.stream.sustained import SustainedTracker, change_records
from tests.conftest import ServiceProcess, assert_unique, metric, read_topic, unique_settings

_EPOCH = dt.date(1970, 1, 1)


def _iso(day: int) -> str:
    return (_EPOCH + dt.timedelta(days=int(day))).isoformat()


def _data(households: int, days: int, cut_from: int, seed: int = 7):
    data = generate(SyntheticConfig(n_households=households, n_days=days, anomaly_rate=0.0,
                                    seed=seed))
    data.kwh[0, cut_from:] = persistent_change(data.kwh[0, cut_from:], "evening_cut",
                                               np.random.default_rng(0))
    return data


@pytest.mark.parametrize("weather", [False, True])
def test_tracker_matches_the_detector_however_days_are_batched(weather: bool) -> None:
    """Days in one batch (several per household), one at a time, or in chunks: the same
    states and the same change as ``SustainedDetector.replay`` of each household, with
    the service's weather (every other day of it, the rest unknown) or without any."""
    data = _data(3, 60, cut_from=40)
    n_h, n_d = data.kwh.shape[:2]
    rng = np.random.default_rng(5)
    tables = ContextTables(weather_day=data.days[::2].astype(np.int32),
                           temp_max=rng.normal(12, 5, len(data.days[::2])).astype(np.float32),
                           temp_min=rng.normal(4, 4, len(data.days[::2])).astype(np.float32)
                           ) if weather else None
    temp = daily_temperature(tables, data.days)
    assert np.isfinite(temp).sum() == (30 if weather else 0)
    ref = [SustainedDetector().replay(data.kwh[h], data.days, temp)[0] for h in range(n_h)]
    assert ref[0].alert[40:47].any() and not ref[0].alert[:40].any()
    for chunk in (1, 7, n_d):
        metrics = create_metrics(CollectorRegistry())
        tracker = SustainedTracker(changes=metrics.sustained_changes)
        table = HouseholdTable()
        hi = table.lookup(data.household_ids)
        found: dict[tuple[int, int], dict] = {}
        for lo in range(0, n_d, chunk):
            d = np.arange(lo, min(n_d, lo + chunk))
            rows_h = np.repeat(hi, len(d))  # household-major: each one's days in order
            rows_d = np.tile(d, n_h)
            after, changes = tracker.update(
                table.state, rows_h, data.kwh[rows_h, rows_d], data.days[rows_d], tables)
            for r, c in changes.items():
                found[(int(rows_h[r]), int(rows_d[r]))] = c
            last = rows_d == d[-1]
            np.testing.assert_array_equal(after["sustained_cusum"][last],
                                          table.state["sustained_cusum"][rows_h[last]])
        for h in range(n_h):
            for name in ("mean", "hdd_mean", "hdd_cov"):
                np.testing.assert_array_equal(
                    table.state[f"sustained_{name}"][hi[h]],
                    to_storage(name, getattr(ref[h].state, name)[0]))
        expected = {(int(hi[h]), int(d)): ref[h].describe(int(d))
                    for h in range(n_h) for d in np.flatnonzero(ref[h].alert)}
        assert found == expected, chunk
        assert metrics.registry.get_sample_value("meterwatch_sustained_changes_total",
                                         {"signature": "evening_cut"}) == len(expected)


def test_change_record_is_valid_and_named_by_its_day_score() -> None:
    change = {"type": "sustained_change", "signature": "evening_cut",
              "start_date": "2013-02-10", "statistic": "evening",
              "direction": "down", "what": "the evening peak (16:00-22:00) shrank",
              "shift": -0.81, "shift_sd": -4.1, "changed": ["evening"], "factor": 0.445}
    score: dict[str, Any] = {"household_id": "H1", "date": "2013-02-13"}
    (rec,) = change_records({0: change}, [score], "alerts", 3, model_version="v1")
    doc = SustainedChange.model_validate_json(rec.value)
    assert (rec.topic, rec.partition, rec.key) == ("alerts", 3, b"H1")
    assert doc.days == 4 and doc.start_date == dt.date(2013, 2, 10) and doc.factor == 0.445
    assert "0.45x" in doc.summary and doc.model_version == "v1"
    assert score["sustained_change"]["summary"] == doc.summary


@pytest.mark.integration
async def test_evening_cut_is_found_through_the_service_across_a_crash(
        broker, detector_path, tmp_path):
    cut = 40
    data = _data(6, 60, cut_from=cut)
    settings = unique_settings(broker)
    log = tmp_path / "service.log"
    cut_date, h0 = _iso(data.days[cut]), data.household_ids[0]
    proc = ServiceProcess(settings, detector_path, log_path=log).start()
    await asyncio.to_thread(proc.wait_ready)
    # two days of the cut closed and scored (day cut+2 is still open), then a crash
    await produce_synthetic(settings.bootstrap_servers, settings.input_topic, data,
                            days=range(0, cut + 3), seed=1)
    scores = await read_topic(settings, settings.scores_topic,
                              min_records=len(data.household_ids) * (cut + 2), timeout_s=120)
    closed = {s["date"] for s in scores if s["household_id"] == h0}
    assert _iso(data.days[cut + 1]) in closed, sorted(closed)[-3:]
    first = [a for a in await read_topic(settings, settings.alerts_topic)
             if a.get("type") == "sustained_change"]
    assert first == [], first  # not yet: the CUSUM needs a few days
    building = next(s for s in scores if s["household_id"] == h0
                    and s["date"] == _iso(data.days[cut + 1]))
    assert max(building["state"]["sustained_cusum"]) > 0  # the CUSUM is building up
    proc.kill()
    t0 = time.monotonic()
    proc = ServiceProcess(settings, detector_path, log_path=log).start()
    await asyncio.to_thread(proc.wait_ready, 120)
    await produce_synthetic(settings.bootstrap_servers, settings.input_topic, data,
                            days=range(cut + 3, len(data.days)), seed=2)
    n_closed = len(data.household_ids) * (len(data.days) - 1)
    scores = await read_topic(settings, settings.scores_topic, min_records=n_closed,
                              timeout_s=120)
    assert_unique([(s["household_id"], s["date"]) for s in scores])
    changes = [a for a in await read_topic(settings, settings.alerts_topic)
               if a.get("type") == "sustained_change"]
    counted = metric(proc.port, "meterwatch_sustained_changes_total",
                     'signature="evening_cut"')
    assert proc.terminate() == 0
    assert counted == 1.0  # built after the restart, by this incarnation
    assert "Traceback" not in log.read_text()
    # exactly one change, for the household that changed, with the right start date, found
    # within 7 days of it; its day score names it
    assert [(c["household_id"], c["start_date"], c["signature"], c["direction"])
            for c in changes] == [(h0, cut_date, "evening_cut", "down")], changes
    c = changes[0]
    SustainedChange.model_validate({k: v for k, v in c.items() if not k.startswith("_")})
    assert c["_key"] == h0 and 1 <= c["days"] <= 7, c
    (named,) = [s for s in scores if s.get("sustained_change")]
    assert (named["household_id"], named["date"]) == (h0, c["date"])
    DayScore.model_validate({k: v for k, v in named.items() if not k.startswith("_")})
    assert named["sustained_change"]["created_at"] == c["created_at"]
    print(f"sustained change found {c['days']} days after its start; the run after the "
          f"crash took {time.monotonic() - t0:.1f} s")


def test_a_failing_update_leaves_the_state_and_does_not_raise() -> None:
    """A bug in the update must not stop the service: the days keep their state."""
    kwh = np.ones((2, 48), np.float32)
    after, changes = SustainedTracker().update({}, np.array([0, 1]), kwh,
                                               np.array([16000, 16000], np.int32))
    assert (after, changes) == ({}, {})
