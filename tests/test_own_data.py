"""A utility's own data, not the Low Carbon London layouts: readings exported with the
stream's own field names (``household_id,ts,kwh``, timestamps with their UTC offset), side
tables with plain column names, and days that are local days in Europe/London, across both
daylight-saving changes.

What must hold: ``train --data`` cuts the days as ``meterwatch run --timezone`` does (the
second pass through the hour the clocks go back averaged with the first, the hour skipped
in spring missing); the checkpoint remembers the zone and ``run`` in another zone is
refused with one line naming ``--timezone``; ``simulate --data`` sends each local day so
that the service, in that zone, scores exactly the readings the file holds; ``score_frame``
reads the same export the same way. And the utility's own household groups and tariffs
are learnt in training, kept in the checkpoint and read through by every scoring path.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
import uuid
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pytest
import torch

from benchmarks.state_precision import replay as stored_replay
from meterwatch.model import ContextTables, Detector, HouseholdState
from meterwatch.model.features import (
    check_coverage,
    describe_unknown,
    encode,
    household_codes,
    learn_vocabulary,
    unknown_values,
)
from meterwatch.model.loaders import (
    LoadError,
    date_to_day,
    day_to_date,
    read_bank_holidays,
    read_daily_weather,
    read_household_info,
    read_readings,
)
from meterwatch.model.state import STORAGE_DTYPES
from meterwatch.stream.broker import Broker, create_topics, free_port
from meterwatch.stream.simulate import slot_times
from meterwatch.stream.timegrid import TimeGrid
from tests.cli_helpers import (
    cli_service,
    meterwatch,
    one_line_error,
    service_env,
    settings_of,
)
from tests.conftest import read_topic

LONDON = ZoneInfo("Europe/London")
SPRING, AUTUMN = dt.date(2013, 3, 31), dt.date(2013, 10, 27)  # 46 and 50 half-hours


def _value(h: int, date: dt.date, slot: int, second_pass: bool = False) -> float:
    """A reading that tells household, day, slot and pass apart."""
    return round(0.1 + 0.01 * h + 0.002 * slot + 0.05 * (date.day % 7)
                 + (0.3 if second_pass else 0.0), 3)


def write_export(path: Path, households: list[str], first: dt.date, days: int,
                 offsets: bool = True) -> None:
    """``household_id,ts,kwh`` in local time with offsets (or, ``offsets=False``, local
    wall-clock time without, as a spreadsheet has it), as a utility's head-end exports it:
    every half-hour that happened, in time order, the repeated hour twice (with its own
    readings)."""
    rows = ["household_id,ts,kwh"]
    for h, hid in enumerate(households):
        for k in range(days):
            date = first + dt.timedelta(days=k)
            start = dt.datetime.combine(date, dt.time(), LONDON).astimezone(dt.timezone.utc)
            end = dt.datetime.combine(date + dt.timedelta(days=1), dt.time(),
                                      LONDON).astimezone(dt.timezone.utc)
            t = start
            while t < end:
                local = t.astimezone(LONDON)
                slot = local.hour * 2 + local.minute // 30
                text = local.isoformat() if offsets else local.replace(tzinfo=None).isoformat()
                rows.append(f"{hid},{text},{_value(h, date, slot, local.fold == 1)}")
                t += dt.timedelta(minutes=30)
    path.write_text("\n".join(rows) + "\n")


def expected_day(h: int, date: dt.date) -> np.ndarray:
    """The 48 slots the service scores for a local day of ``write_export``'s file."""
    out = np.array([_value(h, date, s) for s in range(48)], dtype=np.float64)
    if date == SPRING:
        out[2:4] = np.nan
    if date == AUTUMN:
        out[2:4] = [(_value(h, date, s) + _value(h, date, s, True)) / 2 for s in (2, 3)]
    return out


@pytest.mark.parametrize("offsets", [True, False], ids=["offsets", "wall-clock"])
def test_own_export_is_cut_into_local_days_as_the_service_cuts_them(offsets: bool,
                                                                    tmp_path: Path) -> None:
    path = tmp_path / "export.csv"
    write_export(path, ["H-1", "H-2"], SPRING - dt.timedelta(days=1), 3, offsets)
    r = read_readings(path, timezone="Europe/London", progress=False)
    assert r.household_ids == ["H-1"] * 3 + ["H-2"] * 3
    for i, (hid, day) in enumerate(zip(r.household_ids, r.day.tolist(), strict=True)):
        date = dt.date(1970, 1, 1) + dt.timedelta(days=day)
        np.testing.assert_allclose(r.kwh[i], expected_day(int(hid[-1]) - 1, date),
                                   atol=1e-6, err_msg=f"{hid} {date}")
    write_export(path, ["H-1", "H-2"], AUTUMN - dt.timedelta(days=1), 3, offsets)
    r = read_readings(path, timezone="Europe/London", progress=False)
    autumn = date_to_day(AUTUMN)
    assert r.day.tolist() == [autumn - 1, autumn, autumn + 1] * 2
    np.testing.assert_allclose(r.kwh[1], expected_day(0, AUTUMN), atol=1e-6)
    np.testing.assert_allclose(r.kwh[4], expected_day(1, AUTUMN), atol=1e-6)
    if offsets:  # the same file in UTC: the summer day before starts at 23:00 local
        utc = read_readings(path, progress=False)
        assert utc.day[0] == autumn - 2
        assert utc.kwh[0, 46] == pytest.approx(_value(0, AUTUMN - dt.timedelta(days=1), 0))


def test_wall_clock_times_the_zone_skips_are_refused(tmp_path: Path) -> None:
    """A meter on standard time all year (as the Low Carbon London files are, on GMT) has
    readings at 01:00-02:00 on the spring day: read as Europe/London wall-clock time, every
    summer day would be cut an hour off. The loader says so instead."""
    path = tmp_path / "gmt.csv"
    rows = ["household_id,ts,kwh"] + [f"H1,2013-03-31 {s // 2:02d}:{30 * (s % 2):02d}:00,0.1"
                                      for s in range(48)]
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(LoadError, match=r"gmt.csv:4: .*'2013-03-31 01:00:00' does not exist "
                                        r"in Europe/London \(the clocks went forward\)"):
        read_readings(path, timezone="Europe/London", progress=False)
    assert read_readings(path, progress=False).kwh.shape == (1, 48)  # in UTC: all of it


@pytest.mark.parametrize("body", [
    # a database's export: every field quoted
    '"household_id","ts","kwh"\n"H,1","2013-06-01T00:00:00Z","0.5"\n"H,1",'
    '"2013-06-01T00:30:00Z","0.25"\n',
    # pandas' to_csv: quotes only where a field needs them
    'household_id,ts,kwh\n"H,1",2013-06-01T00:00:00Z,0.5\n"H,1",2013-06-01T00:30:00Z,0.25\n',
    # a spreadsheet's in much of Europe: semicolons, decimal commas, CRLF, a blank line
    'household_id;ts;kwh\r\nH,1;2013-06-01T00:00:00Z;0,5\r\n\r\nH,1;2013-06-01T00:30:00Z;'
    '0,25\r\n',
    # the day table of the same, with semicolons
    'household_id;date;' + ";".join(f"hh_{i}" for i in range(48)) + "\nH,1;2013-06-01;0,5;0,25"
    + ";" * 46 + "\n",
    # a spreadsheet's or a database client's text export: tabs
    'household_id\tts\tkwh\nH,1\t2013-06-01T00:00:00Z\t0.5\nH,1\t2013-06-01T00:30:00Z\t0,25\n',
], ids=["quoted", "quoted-where-needed", "semicolons", "semicolons-wide", "tabs"])
def test_exports_of_a_database_and_a_spreadsheet(body: str, tmp_path: Path) -> None:
    path = tmp_path / "export.csv"
    path.write_text(body)
    r = read_readings(path, progress=False)
    assert r.household_ids == ["H,1"] and r.day.tolist() == [date_to_day(dt.date(2013, 6, 1))]
    assert r.kwh[0, :2].tolist() == [0.5, 0.25] and np.isnan(r.kwh[0, 2:]).all()


def test_readings_off_the_half_hour_and_a_header_without_a_household(tmp_path: Path) -> None:
    path = tmp_path / "quarter.csv"
    path.write_text("household_id,ts,kwh\nH1,2013-06-01T00:00:00Z,0.1\n"
                    "H1,2013-06-01T00:15:00Z,0.1\n")
    with pytest.raises(LoadError, match=r"quarter.csv:3: .*not on the hour or half-hour: "
                                        r"the readings must be half-hourly"):
        read_readings(path, progress=False)
    path.write_text("meter,ts,kwh\nH1,2013-06-01T00:00:00Z,0.1\n")
    with pytest.raises(LoadError, match=r"expected a household \(LCLid, household_id, "
                                        r"household\)"):
        read_readings(path, progress=False)


def test_readings_in_watt_hours_are_read_as_kwh_or_refused(detector_path: Path,
                                                            tmp_path: Path) -> None:
    """A head-end exports watt-hours as often as kWh. A column named for them is divided by
    1000; watt-hours under a kWh name (or in ``hh_*`` columns) are refused with the fix: read
    as kWh they trained a model on days the service never sees, and nothing said so."""
    import pandas as pd

    from meterwatch.model import score_frame

    kwh_path = tmp_path / "export.csv"
    write_export(kwh_path, ["H-1", "H-2"], dt.date(2013, 6, 1), 3)
    want = read_readings(kwh_path, progress=False)
    lines = kwh_path.read_text().splitlines()
    wh_rows = [f"{hid},{ts},{round(float(v) * 1000)}"
               for hid, ts, v in (line.split(",") for line in lines[1:])]
    for header in ("household_id,ts,energy_wh", "household_id,ts,Wh", "household_id,ts,"
                   "energy(Wh/hh)", "consumption_wh,household_id,ts"):
        path = tmp_path / "wh.csv"
        rows = wh_rows if header.endswith(("wh", "Wh", "hh)")) else \
            [",".join([r.split(",")[2], *r.split(",")[:2]]) for r in wh_rows]
        path.write_text("\n".join([header, *rows]) + "\n")
        got = read_readings(path, progress=False)
        assert got.household_ids == want.household_ids, header
        np.testing.assert_array_equal(got.kwh, want.kwh, err_msg=header)
    (tmp_path / "wh.csv").write_text("\n".join(["household_id,ts,kwh", *wh_rows]) + "\n")
    fix = (r"wh.csv: the median half-hourly reading is \d+, which is no household's in "
           r"kWh \(0.05-2\); the readings look like watt-hours: name the readings column wh")
    with pytest.raises(LoadError, match=fix):
        read_readings(tmp_path / "wh.csv", progress=False)
    line = one_line_error(meterwatch("train", "--data", str(tmp_path / "wh.csv"), "--out",
                                     str(tmp_path / "m.pt")))
    assert re.search(fix, line), line
    assert not (tmp_path / "m.pt").exists()
    wide = tmp_path / "wh-wide.csv"
    wide.write_text("household_id,date," + ",".join(f"hh_{i}" for i in range(48)) + "\n"
                    + "H-1,2013-06-01," + ",".join(str(180 + 40 * (i % 3)) for i in range(48))
                    + "\n")
    with pytest.raises(LoadError, match="look like watt-hours"):
        read_readings(wide, progress=False)
    # a meter's register (the total so far) in place of each half-hour's use
    fields = [line.split(",") for line in lines[1:]]
    total = np.cumsum([float(v) for _, _, v in fields]) + 23_456.0
    register = [f"{hid},{ts},{t:.3f}" for (hid, ts, _), t in zip(fields, total, strict=True)]
    (tmp_path / "register.csv").write_text("\n".join(["household_id,ts,kwh", *register]))
    with pytest.raises(LoadError, match=r"no household's in kWh \(0.05-2\), and the readings "
                                        r"only rise within a day: they look like a meter's "
                                        r"register"):
        read_readings(tmp_path / "register.csv", progress=False)
    frame = pd.read_csv(kwh_path)
    det = Detector.load(detector_path, device="cpu")
    assert len(score_frame(det, frame, timezone="Europe/London")) == 6
    frame["kwh"] *= 1000
    with pytest.raises(ValueError, match="look like watt-hours: divide them by 1000"):
        score_frame(det, frame, timezone="Europe/London")


def test_side_tables_with_plain_column_names(tmp_path: Path) -> None:
    info = tmp_path / "households.csv"
    info.write_text("household_id,group,tariff,postcode\nH1,affluent,STD,E1\n"
                    "H2,Comfortable,tou,E2\nH3,Band C,economy7,E3\nH4,unknown,Std,E4\n")
    groups, tariffs = read_household_info(info)
    assert groups == {"H1": "Affluent", "H2": "Comfortable", "H3": "Band C", "H4": "unknown"}
    assert tariffs == {"H1": "Std", "H2": "ToU", "H3": "economy7", "H4": "Std"}
    tables = ContextTables(acorn_group=groups, tariff=tariffs)
    # a model of the Low Carbon London names does not know 'Band C' nor 'economy7'
    assert unknown_values(tables, None) == {"group": {"Band C": 1}, "tariff": {"economy7": 1}}
    assert describe_unknown(unknown_values(tables, None)) == (
        "1 household with a group the model does not know ('Band C' 1); 1 household with "
        "a tariff the model does not know ('economy7' 1)")
    weather = tmp_path / "weather.csv"
    weather.write_text("date,temp_min,temp_max\n2013-06-02,9.5,21.0\n2013-06-01,8,19.5\n")
    day, tmax, tmin = read_daily_weather(weather)
    assert day.tolist() == [date_to_day(dt.date(2013, 6, 1)), date_to_day(dt.date(2013, 6, 2))]
    assert tmax.tolist() == [19.5, 21.0] and tmin.tolist() == [8.0, 9.5]
    holidays = tmp_path / "holidays.csv"
    holidays.write_text("date,name\n2013-12-25,Christmas\n")
    assert read_bank_holidays(holidays).tolist() == [date_to_day(dt.date(2013, 12, 25))]
    # a spreadsheet's: semicolons and decimal commas
    weather.write_text("date;temp_min;temp_max\r\n2013-06-01;8;19,5\r\n")
    assert read_daily_weather(weather)[1].tolist() == [19.5]
    info.write_text("household_id;group;tariff\nH1;Adversity;ToU\n")
    assert read_household_info(info) == ({"H1": "Adversity"}, {"H1": "ToU"})
    holidays.write_text("date;name\n2013-12-26;Boxing Day\n")
    assert read_bank_holidays(holidays).tolist() == [date_to_day(dt.date(2013, 12, 26))]


def test_two_series_under_one_household_are_refused_and_corrections_said(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An export with import and export (or two meters) under one household id, in rows or
    in columns, used to train on whichever came last or first, without a word."""
    path = tmp_path / "export.csv"
    write_export(path, ["H-1", "H-2"], dt.date(2013, 6, 1), 2)
    lines = path.read_text().splitlines()
    want = read_readings(path, progress=False)
    # rows: a second channel, the export, after each reading
    channels = [lines[0]] + [x for line in lines[1:]
                             for x in (line, line.rsplit(",", 1)[0] + ",0.05")]
    path.write_text("\n".join(channels) + "\n")
    with pytest.raises(LoadError, match=r"export.csv: 192 half-hours came twice with different "
                                        r"readings \(the first: 'H-1' on 2013-05-31 at 23:00, "
                                        r"0.15 then 0.05\): two meters or channels \(import "
                                        r"and export\?\) under one household id"):
        read_readings(path, progress=False)
    # the same rows twice (an export run twice into one file): nothing to say
    path.write_text("\n".join([*lines, *lines[1:]]) + "\n")
    with caplog.at_level(logging.WARNING, logger="meterwatch.model.loaders"):
        np.testing.assert_array_equal(read_readings(path, progress=False).kwh, want.kwh)
    assert not caplog.records, caplog.text
    # a correction re-sent, and a missing reading after a real one: said, the last real kept
    path.write_text("\n".join([*lines, "H-1,2013-06-01T10:00:00+01:00,0.999",
                               "H-2,2013-06-01T10:00:00+01:00,"]) + "\n")
    with caplog.at_level(logging.WARNING, logger="meterwatch.model.loaders"):
        got = read_readings(path, progress=False)
    assert any("2 half-hours came twice with different readings (the first: 'H-1' on "
               "2013-06-01 at 09:00" in r.getMessage() for r in caplog.records), caplog.text
    row = {(h, d): i for i, (h, d) in enumerate(zip(got.household_ids, got.day.tolist(),
                                                    strict=True))}
    d = date_to_day(dt.date(2013, 6, 1))
    assert got.kwh[row["H-1", d], 18] == np.float32(0.999)
    assert got.kwh[row["H-2", d], 18] == want.kwh[row["H-2", d], 18]
    # columns: the import is taken; two that say nothing is one line naming them
    values = [line.rsplit(",", 1) for line in lines[1:]]
    path.write_text("household_id,ts,energy_export,energy_import\n" + "".join(
        f"{rest},0.05,{v}\n" for rest, v in values))
    np.testing.assert_array_equal(read_readings(path, progress=False).kwh, want.kwh)
    path.write_text("household_id,ts,kwh_meter_a,kwh_meter_b\n" + "".join(
        f"{rest},0.05,{v}\n" for rest, v in values))
    with pytest.raises(LoadError, match=r"export.csv:1: several readings columns \(kwh_meter_a, "
                                        r"kwh_meter_b\); keep one"):
        read_readings(path, progress=False)


def test_household_day_rows_read_twice_are_checked_like_half_hours(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The day-row layout (``household_id,date,hh_0..hh_47``): a household-day written twice
    used to keep the last row whole, without a word, also a second channel's and a blank
    after a real reading. Now as in the long layouts: the same rows again say nothing, a
    correction is said, a missing half-hour never erases one, two series are refused."""
    header = "household_id,date," + ",".join(f"hh_{k}" for k in range(48))
    days = [dt.date(2013, 6, 1) + dt.timedelta(days=k) for k in range(10)]

    def row(h: str, d: dt.date, values: list[str]) -> str:
        return f"{h},{d}," + ",".join(values)

    base = [row(h, d, [f"{0.1 + 0.01 * k:.2f}" for k in range(48)])
            for h in ("H-1", "H-2") for d in days]
    path = tmp_path / "days.csv"
    path.write_text("\n".join([header, *base]) + "\n")
    want = read_readings(path, progress=False)
    # the same rows twice: nothing to say
    path.write_text("\n".join([header, *base, *base]) + "\n")
    with caplog.at_level(logging.WARNING, logger="meterwatch.model.loaders"):
        np.testing.assert_array_equal(read_readings(path, progress=False).kwh, want.kwh)
    assert not caplog.records, caplog.text
    # a day re-sent with two half-hours corrected and the rest blank: said, nothing erased
    fixed = [""] * 48
    fixed[18], fixed[19] = "0.999", "0.5"
    path.write_text("\n".join([header, *base, row("H-2", days[3], fixed)]) + "\n")
    with caplog.at_level(logging.WARNING, logger="meterwatch.model.loaders"):
        got = read_readings(path, progress=False)
    assert any("days.csv: 2 half-hours came twice with different readings (the first: 'H-2' "
               "on 2013-06-04 at 09:00, 0.28 then 0.999)" in r.getMessage()
               for r in caplog.records), caplog.text
    r = got.household_ids.index("H-2") + 3
    expect = want.kwh[r].copy()
    expect[18], expect[19] = 0.999, 0.5
    np.testing.assert_array_equal(got.kwh[r], expect)
    # two whole days re-sent corrected (96 half-hours of 1,056 read): said, not refused
    redo = [row("H-1", d, ["0.333"] * 48) for d in days[:2]]
    path.write_text("\n".join([header, *base, *redo]) + "\n")
    with caplog.at_level(logging.WARNING, logger="meterwatch.model.loaders"):
        assert (read_readings(path, progress=False).kwh[:2] == np.float32(0.333)).all()
    assert "96 half-hours came twice" in caplog.text
    # a second channel: every day again with other readings
    export = [row(h, d, ["0.05"] * 48) for h in ("H-1", "H-2") for d in days]
    path.write_text("\n".join([header, *base, *export]) + "\n")
    with pytest.raises(LoadError, match=r"days.csv: 960 half-hours came twice with different "
                                        r"readings .* two meters or channels"):
        read_readings(path, progress=False)


def test_side_tables_that_miss_the_readings_are_named(tmp_path: Path) -> None:
    """A household file whose ids are written another way, or another year's weather, used
    to train a model without that context and say nothing: now refused with the flag (none
    covered) or named in a warning (part covered)."""
    ids = ["H-1", "H-2", "H-3"] * 200
    day = np.repeat(np.arange(date_to_day(dt.date(2013, 1, 1)),
                              date_to_day(dt.date(2013, 1, 1)) + 200), 3)
    files = {"household": tmp_path / "households.csv", "weather": tmp_path / "weather.csv",
             "holidays": tmp_path / "holidays.csv"}
    files["household"].write_text("household_id,tariff,group\nh-1,Std,Affluent\n")
    files["weather"].write_text("date,temp_max,temp_min\n2014-01-01,5,1\n")
    files["holidays"].write_text("date\n2012-12-25\n")

    def coverage() -> list[str]:
        tables = ContextTables.from_files(*files.values())
        return check_coverage(tables, ids, day, files)

    with pytest.raises(ValueError, match=r"^--household-info: households.csv has none of the "
                                         r"readings' 3 households \(its ids: 'h-1'; the "
                                         r"readings': 'H-1', 'H-2', 'H-3'\); the household ids "
                                         r"must be written the same$"):
        coverage()
    files["household"].write_text("household_id,tariff,group\nH-1,Std,Affluent\n")
    with pytest.raises(ValueError, match=r"^--weather: weather.csv has none of the readings' "
                                         r"days \(2013-01-01..2013-07-19\); it has "
                                         r"2014-01-01..2014-01-01$"):
        coverage()
    files["weather"].write_text("date,temp_max,temp_min\n" + "".join(
        f"{dt.date(2013, 1, 1) + dt.timedelta(days=k)},5,1\n" for k in range(199)))
    assert coverage() == [
        "households.csv has 1 of the readings' 3 households; the other 2 ('H-2', 'H-3') get "
        "an unknown group and tariff",
        "weather.csv has 199 of the readings' 200 days (2013-01-01..2013-07-18); 2013-07-19 "
        "is a day without weather",
        "holidays.csv has no holiday in the readings' 2013-01-01..2013-07-19 "
        "(2012-12-25..2012-12-25); every day is an ordinary one"]
    files["household"].write_text("household_id,tariff,group\nH-1,Std,Affluent\n"
                                  "H-2,Std,Affluent\nH-3,ToU,\n")
    files["weather"].write_text("date,temp_max,temp_min\n" + "".join(
        f"{dt.date(2013, 1, 1) + dt.timedelta(days=k)},5,1\n" for k in range(200)))
    files["holidays"].write_text("date\n2013-04-01\n")
    assert coverage() == []
    # through the script: one line, exit 2, no model
    export = tmp_path / "export.csv"
    write_export(export, ["H-1", "H-2"], dt.date(2013, 6, 1), 3)
    (tmp_path / "weather.csv").write_text("date,temp_max,temp_min\n2014-06-01,20,10\n")
    line = one_line_error(meterwatch("train", "--data", str(export), "--weather",
                                     str(tmp_path / "weather.csv"), "--out",
                                     str(tmp_path / "m.pt")))
    assert line == ("meterwatch: error: --weather: weather.csv has none of the readings' days "
                    "(2013-05-31..2013-06-03); it has 2014-06-01..2014-06-01"), line
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("date", [SPRING, AUTUMN, dt.date(2013, 6, 1)])
def test_simulate_sends_each_local_day_as_the_service_assembles_it(date: dt.date) -> None:
    grid = TimeGrid("Europe/London")
    day = date_to_day(date)
    times = slot_times(day, grid)
    sent = [t for ts in times for t in ts]
    assert len(sent) == grid.expected_readings(day) == len(set(sent))
    got_day, got_slot, repeat = grid.locate(np.array(sent, dtype=np.int64))
    assert set(got_day.tolist()) == {day}
    flat = [s for s, ts in enumerate(times) for _ in ts]
    assert got_slot.tolist() == flat
    assert int(repeat.sum()) == (2 if date == AUTUMN else 0)
    assert slot_times(day) == [[day * 86400 + s * 1800] for s in range(48)]  # UTC


@pytest.mark.integration
def test_own_export_trained_run_and_simulated_in_its_time_zone(broker: Broker,
                                                               tmp_path: Path) -> None:
    """The user path on a utility's export and household file (its own segments and
    tariffs), with default settings but the zone."""
    households = [f"UTIL-{h:03d}" for h in range(8)]
    data = tmp_path / "export.csv"
    first = dt.date(2013, 10, 1)
    write_export(data, households, first, 30)
    info = tmp_path / "households.csv"
    info.write_text("household_id;segment;group;tariff\n" + "".join(
        f"{h};x;{('Urban', 'Rural')[i % 2]};{('E7', 'Flat', 'Flat')[i % 3]}\n"
        for i, h in enumerate(households)))
    model = tmp_path / "model.pt"
    proc = meterwatch("train", "--data", str(data), "--household-info", str(info), "--out",
                      str(model), "--timezone", "Europe/London", "--max-epochs", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "240 household-days of 8 households" in proc.stderr, proc.stderr[-3000:]
    assert "household values learnt: group 'Rural' -> Affluent, 'Urban' -> Comfortable; " \
        "tariff 'Flat' -> Std, 'E7' -> ToU" in proc.stderr, proc.stderr[-3000:]
    ckpt = torch.load(model, weights_only=True)
    assert ckpt["info"]["timezone"] == "Europe/London"

    tag = uuid.uuid4().hex[:8]
    port = free_port()
    env = service_env(broker, tag, METERWATCH_MODEL_PATH=str(model),
                      METERWATCH_METRICS_PORT=str(port), METERWATCH_HOUSEHOLD_INFO=str(info))
    line = one_line_error(meterwatch("run", env=env))  # the default zone: UTC
    assert line == (f"meterwatch: error: --timezone: UTC, but {model} was trained on days in "
                    "Europe/London; run with --timezone Europe/London, or give a model "
                    "trained with meterwatch train --timezone UTC"), line

    env["METERWATCH_TIMEZONE"] = "Europe/London"  # run and simulate take it alike
    settings = settings_of(env)
    asyncio.run(create_topics(settings.bootstrap_servers, {settings.input_topic: 4}))
    with cli_service(env, tmp_path / "run.log", port):
        # 26, 27 (50 half-hours), 28 and 29 October
        proc = meterwatch("simulate", "--data", str(data), "--start", "2013-10-26",
                          "--days", "4", "--anomaly-rate", "0", "--labels",
                          str(tmp_path / "labels.csv"), env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"produced {8 * (48 * 3 + 50):,} readings" in proc.stdout, proc.stdout
        scores = asyncio.run(read_topic(settings, settings.scores_topic,
                                        min_records=8 * 4, timeout_s=120))
    log = (tmp_path / "run.log").read_text()
    assert "context tables: 8 households, weather to none" in log, log[-3000:]
    assert "does not know" not in log, log[-3000:]  # the model learnt the file's values
    by_day = {(s["household_id"], s["date"]): s for s in scores}
    for hid in households:
        for k in range(4):
            date = dt.date(2013, 10, 26) + dt.timedelta(days=k)
            s = by_day[(hid, date.isoformat())]
            assert s["status"] == "scored" and s["missing_slots"] == [], s
            assert s["expected_readings"] == s["readings"] == (50 if date == AUTUMN else 48), s

    # every score is the model's score of the file's local days (households new to the
    # service, as to this replay); the autumn day's repeated hour averaged, not overwritten
    det = Detector.load(model, device="cpu")
    days = read_readings(data, timezone="Europe/London", start_day=date_to_day(first) + 25,
                         end_day=date_to_day(first) + 29, progress=False)
    for i, (hid, day) in enumerate(zip(days.household_ids, days.day.tolist(), strict=True)):
        np.testing.assert_allclose(days.kwh[i], expected_day(households.index(hid),
                                                             day_to_date(day)), atol=1e-6)
    tables = ContextTables.from_files(household_csv=info)
    want, _, _ = stored_replay(det, days.household_ids, days.day, days.kwh, tables,
                               set(STORAGE_DTYPES))
    first_pass = days.kwh.copy()
    autumn = days.day == date_to_day(AUTUMN)
    first_pass[np.ix_(autumn, [2, 3])] = [[_value(households.index(h), AUTUMN, s)
                                           for s in (2, 3)]
                                          for h in np.array(days.household_ids)[autumn]]
    other, _, _ = stored_replay(det, days.household_ids, days.day, first_pass, tables,
                                set(STORAGE_DTYPES))
    assert len(want) == len(scores) == 8 * 4, len(scores)
    for hid, day, x, y in zip(days.household_ids, days.day.tolist(), want, other,
                              strict=True):
        s = by_day[(hid, day_to_date(day).isoformat())]
        assert s["score"] == pytest.approx(float(x), rel=1e-3, abs=1e-3), (s, x)
        if day == date_to_day(AUTUMN):
            assert abs(float(x) - float(y)) > 1e-3, (hid, x, y)  # the test can tell


def test_a_swap_to_a_model_of_another_zone_is_refused(detector_path: Path) -> None:
    """The lifecycle's check for a checkpoint that arrives while the service runs."""
    from meterwatch.stream.lifecycle import ModelRejected, other_zone, validate

    det = Detector.load(detector_path, device="cpu")
    assert "timezone" not in det.info  # trained on synthetic days: any zone
    validate(det, None, None, "Europe/London")
    det.info["timezone"] = "Europe/London"
    assert other_zone(det, "Europe/London") is None and other_zone(det, "UTC") == \
        "Europe/London"
    with pytest.raises(ModelRejected, match="trained on days in Europe/London, but this "
                                            r"service cuts days in UTC \(--timezone\)"):
        validate(det, None, None, "UTC")
    det.info["timezone"] = "UTC"
    validate(det, None, None, "Etc/UTC")  # one zone, two names


def test_score_frame_cuts_the_export_as_the_loader_and_keeps_the_models_zone(
        detector_path: Path, tmp_path: Path) -> None:
    """The notebook path on the same export: the autumn day's repeated hour averaged (it
    used to be refused as 'a second reading'), the same scores as the loader's days replayed,
    and the detector's zone by default."""
    import pandas as pd

    from meterwatch.model import score_frame

    path = tmp_path / "export.csv"
    write_export(path, ["H-1", "H-2", "H-3"], AUTUMN - dt.timedelta(days=2), 4)
    det = Detector.load(detector_path, device="cpu")
    det.info["timezone"] = "Europe/London"
    frame = pd.read_csv(path)
    out = score_frame(det, frame)  # the detector's zone
    days = read_readings(path, timezone="Europe/London", progress=False)
    want, _, _ = stored_replay(det, days.household_ids, days.day, days.kwh,
                               ContextTables.empty(), None)  # its state in full precision
    assert out.household_id.tolist() == days.household_ids
    assert out.date.tolist() == [day_to_date(d) for d in days.day.tolist()]
    np.testing.assert_allclose(out.score.to_numpy(), want, rtol=1e-4, atol=1e-4)
    assert out.readings.tolist() == [48, 48, 48, 48] * 3  # the 27th: 50 readings, 48 slots
    with pytest.raises(ValueError, match="trained on days in Europe/London; leave timezone"):
        score_frame(det, frame, timezone="UTC")
    with pytest.raises(ValueError, match="a second reading"):  # one instant twice
        score_frame(det, pd.concat([frame, frame.iloc[:1]]))
    mixed = frame.copy()
    mixed.loc[5, "ts"] = mixed.loc[5, "ts"][:19]
    with pytest.raises(ValueError, match=r"row 5: .* some timestamps have a UTC offset and "
                                         "some not"):
        score_frame(det, mixed)


def test_a_utilitys_own_groups_and_tariffs_are_learnt() -> None:
    """The model's group and tariff columns hold the Low Carbon London values; a utility's
    own segments and tariffs used to be unknown to every model (the columns all zero).
    Now training learns the most common of them, the checkpoint keeps them, and they
    change what the model expects of a household."""
    from dataclasses import replace

    from meterwatch.model import SyntheticConfig, TrainConfig, generate, train_detector

    data = generate(SyntheticConfig(n_households=40, n_days=24, anomaly_rate=0.0, seed=8))
    ids, day, kwh, _ = data.long()
    lcl = data.tables
    assert learn_vocabulary(lcl, ids) is None  # the LCL names: nothing to learn
    own_names = {"Affluent": "Band A", "Comfortable": "Band B", "Adversity": "Band C"}
    own = replace(lcl, acorn_group={h: own_names[g] for h, g in lcl.acorn_group.items()},
                  tariff={h: {"Std": "flat", "ToU": "agile"}[t] for h, t in lcl.tariff.items()})
    vocabulary = learn_vocabulary(own, ids)
    assert vocabulary is not None
    assert sorted(vocabulary["group"]) == ["Band A", "Band B", "Band C"]
    assert sorted(vocabulary["group"].values()) == ["Adversity", "Affluent", "Comfortable"]
    flat_first = sum(t == "flat" for t in own.tariff.values()) >= len(own.tariff) / 2
    assert vocabulary["tariff"] == ({"flat": "Std", "agile": "ToU"} if flat_first
                                    else {"agile": "Std", "flat": "ToU"})
    enc = encode(own, vocabulary)
    assert enc is not None and enc.encoded and encode(enc, vocabulary) is enc  # once
    assert encode(own, vocabulary) is enc  # built once per tables and vocabulary
    group, tariff = household_codes(enc, ids[:40])
    assert (group >= 0).all() and set(tariff.tolist()) <= {-1.0, 1.0}
    assert unknown_values(own, vocabulary) == {}
    # a new day of weather (the service's context reload): the encoding and its household
    # index carry over, not rebuilt (seconds at a million households)
    from meterwatch.model.features import _LOOKUPS

    more = own.updated({"weather_day": np.append(own.weather_day, own.weather_day[-1] + 1),
                        "temp_max": np.append(own.temp_max, 10.0),
                        "temp_min": np.append(own.temp_min, 2.0)})
    enc_more = encode(more, vocabulary)
    assert enc_more is not None and enc_more is not enc and len(enc_more.weather_day) == \
        len(enc.weather_day) + 1
    assert enc_more.acorn_group is enc.acorn_group and _LOOKUPS.get(enc_more) is _LOOKUPS[enc]

    det = train_detector(kwh, day, ids, own, TrainConfig(device="cpu", max_epochs=3, seed=0))
    assert det.vocabulary == vocabulary
    again = Detector.from_checkpoint(det.checkpoint(), device="cpu")
    assert again.vocabulary == vocabulary
    last = day == day.max()
    state = HouseholdState.empty(int(last.sum()))
    rows = [ids[i] for i in np.flatnonzero(last)]
    with_own = det.score(kwh[last], day[last], rows, state, own)
    np.testing.assert_allclose(again.score(kwh[last], day[last], rows, state, own).score,
                               with_own.score, rtol=1e-6, atol=1e-6)
    # the groups and tariffs are context the model uses: without them it expects otherwise
    bare = replace(own, acorn_group={}, tariff={})
    without = det.score(kwh[last], day[last], rows, state, bare)
    assert np.abs(with_own.expected - without.expected).max() > 1e-3
    # the service's path (batched torch operations) reads them the same way
    from meterwatch.model import torch_scoring

    batched = torch_scoring.score(det, kwh[last], day[last], rows, state, own)
    np.testing.assert_allclose(batched.expected, with_own.expected, rtol=1e-4, atol=1e-4)
