"""The context files follow their files, as the model does (``stream/lifecycle.py``).

``--household-info``, ``--weather`` and ``--holidays`` were read once at start: a service
that ran past the end of its weather file scored every later day as one without weather,
households added to the household file after the start as unknown ones, and bank holidays
after the file's last year as ordinary days, until it was restarted, and nothing told the
operator. Now each file is watched (``--model-poll-s``, SIGHUP), read again when it changes
and used from the next batch on, in the scorer process; a file that cannot be read is
refused and the tables before go on; scored days without their weather or household row,
or after the holidays file's last year, are counted
(``meterwatch_days_without_context_total``).

Through ``meterwatch run`` with default settings: every published score is the one the
model gives each day with the tables the service held that day (replayed offline), and
the days after the update score differently from what the old tables give them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from benchmarks.state_precision import replay as stored_replay
from meterwatch.model import ContextTables, Detector, SyntheticConfig, generate
from meterwatch.model.state import STORAGE_DTYPES
from meterwatch.stream.simulate import produce_synthetic
from meterwatch.stream.testing import ServiceProcess
from tests.conftest import metric, read_topic, unique_settings, wait_until

N = 20
DAYS = 8
#: the weather file covers the first WEATHER days at first; the household file half of them
WEATHER = 4


def _iso(day: int) -> str:
    return (dt.date(1970, 1, 1) + dt.timedelta(days=int(day))).isoformat()


def _replace(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` as an operator's job would: elsewhere, then renamed."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.mark.integration
def test_context_files_are_read_again_when_they_change(broker, detector_path: Path,
                                                       tmp_path: Path) -> None:
    data = generate(SyntheticConfig(n_households=N, n_days=DAYS, anomaly_rate=0.0, seed=21))
    days = [int(d) for d in data.days]
    rng = np.random.default_rng(3)
    temps = {d: (4 + 8 * rng.random(), -2 + 5 * rng.random()) for d in days}

    def weather(covered: list[int]) -> str:
        return "time,temperatureMax,temperatureMin\n" + "".join(
            f"{_iso(d)} 00:00:00,{temps[d][0]:.2f},{temps[d][1]:.2f}\n" for d in covered)

    def households(n: int) -> str:
        return "LCLid,stdorToU,Acorn,Acorn_grouped,file\n" + "".join(
            f"{h},{data.tariff[i]},ACORN-A,{data.acorn_group[i]},block_0\n"
            for i, h in enumerate(data.household_ids[:n]))

    paths = {k: tmp_path / f"{k}.csv" for k in ("weather", "households", "holidays")}
    paths["weather"].write_text(weather(days[:WEATHER]))
    paths["households"].write_text(households(N // 2))
    paths["holidays"].write_text("Bank holidays,Type\n2012-12-25,Christmas Day\n")
    settings = unique_settings(broker, weather=paths["weather"],
                               household_info=paths["households"], holidays=paths["holidays"])
    old = ContextTables.from_files(paths["households"], paths["weather"], paths["holidays"])
    svc = ServiceProcess(settings, detector_path, log_path=tmp_path / "service.log").start()

    def produce(first: int, last: int) -> None:
        asyncio.run(produce_synthetic(settings.bootstrap_servers, settings.input_topic, data,
                                      days=range(first, last)))

    def value(name: str, labels: str = "") -> float:
        return metric(svc.port, name, labels)

    def without(table: str) -> float:
        return value("meterwatch_days_without_context_total", f'table="{table}"')

    try:
        svc.wait_ready()
        produce(0, 6)
        wait_until(lambda: value("meterwatch_days_scored_total") >= 6 * N,
                   what="six days scored", service=svc)
        assert without("weather") == 2 * N  # days 4 and 5: no row in the weather file
        assert without("household_info") == 6 * N // 2  # half the households, every day
        assert without("holidays") == 6 * N  # 2013: after the last year it lists
        # the operator's jobs bring the files up to date and announce it (SIGHUP; polling
        # finds them too: test_one_watcher_of_several_files_reads_them_once_per_change)
        paths["weather"].write_text(weather(days))  # (appended in place, as a feed does)
        _replace(paths["households"], households(N))
        _replace(paths["holidays"], f"Bank holidays,Type\n{_iso(days[1])},Test day\n")
        assert svc.proc is not None
        svc.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: value("meterwatch_context_reloads_total") >= 1,
                   what="the changes read", service=svc)
        new = ContextTables.from_files(paths["households"], paths["weather"], paths["holidays"])
        # a holidays file caught half written, announced by SIGHUP (taken as it is):
        # refused, the tables before go on
        _replace(paths["holidays"], "Bank holidays,Type\n2013-12-")
        svc.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: value("meterwatch_context_reload_failures_total") >= 1,
                   what="the broken file refused", service=svc)
        produce(6, DAYS)
        wait_until(lambda: value("meterwatch_days_scored_total") >= DAYS * N,
                   what="every day scored", service=svc)
        assert without("weather") == 2 * N and without("household_info") == 6 * N // 2
        assert without("holidays") == 6 * N
        assert value("meterwatch_context_reloads_total") == 1  # both files, read once
        scores = asyncio.run(read_topic(settings, settings.scores_topic, min_records=DAYS * N))
    finally:
        svc.terminate()
    log = (tmp_path / "service.log").read_text()
    assert "context tables read again" in log and f"{N} households, weather to " \
        f"{_iso(days[-1])}" in log, log[-3000:]
    refused = [line for line in log.splitlines() if "context reload refused" in line]
    assert len(refused) == 1 and "holidays.csv:2" in refused[0], refused

    # every score is what the model gives the day with the tables the service then held
    det = Detector.load(detector_path, device="cpu")
    ids, day, kwh, _ = data.long()
    held, _, _ = stored_replay(det, list(ids), day, kwh,
                               lambda d: old if d < days[6] else new, set(STORAGE_DTYPES))
    before, _, _ = stored_replay(det, list(ids), day, kwh, old, set(STORAGE_DTYPES))
    want = {(h, _iso(d)): float(x) for h, d, x in zip(ids, day, held, strict=True)}
    stale = {(h, _iso(d)): float(x) for h, d, x in zip(ids, day, before, strict=True)}
    assert len(scores) == len(want) == DAYS * N
    moved = 0
    for s in scores:
        key = (s["household_id"], s["date"])
        assert s["score"] == pytest.approx(want[key], rel=1e-3, abs=1e-3), s
        moved += abs(s["score"] - stale[key]) > 1e-2
    assert moved >= N // 2, moved  # the update changed what days 6-7 score
