"""Loaders on tiny generated files in every supported layout (no real data needed)."""

import gzip
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from meterwatch.model.loaders import (
    LoadError,
    day_to_date,
    load_dataset,
    parse_day,
    read_bank_holidays,
    read_daily_weather,
    read_household_info,
    read_readings,
)

D0 = parse_day("2013-01-01")


def _check(r, n_households: int = 2) -> None:
    assert len(set(r.household_ids)) == n_households
    assert r.kwh.dtype == np.float32 and r.kwh.shape == (len(r.day), 48)
    assert r.day.dtype == np.int32
    assert r.household_ids == sorted(r.household_ids)


def test_london_datastore(tmp_path: Path) -> None:
    p = tmp_path / "CC_LCL-FullData.csv"
    p.write_text(
        "LCLid,stdorToU,DateTime,KWH/hh (per half hour) \r\n"
        "MAC000002,Std,2013-01-01 00:00:00.0000000, 0.219 \r\n"
        "MAC000002,Std,2013-01-01 00:30:00.0000000,Null\r\n"
        "MAC000002,Std,2013-01-01 23:30:00.0000000,0.5\r\n"
        "MAC000002,Std,2013-01-01 23:30:00.0000000,0.6\r\n"  # duplicate: last wins
        "MAC000003,ToU,2013-01-02 12:00:00.0000000,1.25\r\n")
    r = read_readings(p, progress=False)
    _check(r)
    assert r.day.tolist() == [D0, D0 + 1]
    np.testing.assert_allclose(r.kwh[0, [0, 47]], [0.219, 0.6], rtol=1e-6)
    assert np.isnan(r.kwh[0, 1]) and np.isnan(r.kwh[0, 2:47]).all()
    assert r.kwh[1, 24] == 1.25


def test_kaggle_halfhourly_csv_and_tar(tmp_path: Path) -> None:
    def body(hh: str) -> bytes:
        rows = [f"{hh},2013-01-01 {i // 2:02d}:{30 * (i % 2):02d}:00, {i / 100:.3f} "
                for i in range(48)]
        return ("LCLid,tstp,energy(kWh/hh)\n" + "\n".join(rows) + "\n").encode()

    single = tmp_path / "block_0.csv.gz"
    single.write_bytes(gzip.compress(body("MAC000002") + body("MAC000003").split(b"\n", 1)[1]))
    r = read_readings(single, progress=False)
    _check(r)
    np.testing.assert_allclose(r.kwh[1], np.arange(48) / 100, atol=1e-6)

    tgz = tmp_path / "readings.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        for hh in ("MAC000003", "MAC000002"):
            data = body(hh)
            info = tarfile.TarInfo(f"readings/{hh}.csv")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    r2 = read_readings(tgz, households={"MAC000002"}, progress=False)
    assert r2.household_ids == ["MAC000002"]
    np.testing.assert_allclose(r2.kwh[0], np.arange(48) / 100, atol=1e-6)


def test_hhblock(tmp_path: Path) -> None:
    p = tmp_path / "block_0.csv"
    header = "LCLid,day," + ",".join(f"hh_{i}" for i in range(48))
    row = "MAC000002,2013-01-03," + ",".join(["0.1"] * 47 + [""])
    p.write_text(f"{header}\n{row}\n")
    r = read_readings(p, progress=False)
    _check(r, 1)
    assert r.day[0] == D0 + 2 and np.isnan(r.kwh[0, 47]) and r.kwh[0, 0] == np.float32(0.1)


def test_bad_input_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.csv"
    p.write_text("LCLid,tstp,energy(kWh/hh)\nMAC000002,2013-01-01 00:00:00,0.1\n"
                 "MAC000002,yesterday,0.2\n")
    with pytest.raises(LoadError, match=r"bad\.csv:3"):
        read_readings(p, progress=False)
    q = tmp_path / "nothing.csv"
    q.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(LoadError, match=r"nothing\.csv:1"):
        read_readings(q, progress=False)
    with pytest.raises(LoadError, match="no such file"):
        read_readings(tmp_path / "missing.csv")


def test_side_tables_and_directory(tmp_path: Path) -> None:
    (tmp_path / "household_information.csv").write_bytes(
        b"LCLid,stdorToU,Acorn,Acorn_grouped,file\r\nMAC000002,Std,ACORN-A,Affluent,"
        b"\"block_0\r\"\nMAC000003,ToU,ACORN-U,ACORN-U,block_0\r\n")
    (tmp_path / "weather_daily_darksky.csv").write_text(
        "temperatureMax,time,temperatureMin\n5.5,2013-01-02 00:00:00,1.0\n"
        "4.0,2013-01-01 00:00:00,\n")
    with gzip.open(tmp_path / "uk_bank_holidays.csv.gz", "wt") as f:
        f.write('"Bank holidays",Type\n2013-01-01,"New Year"\n')
    (tmp_path / "readings.csv").write_text(
        "LCLid,tstp,energy(kWh/hh)\nMAC000002,2013-01-01 00:00:00, 0.1 \n")
    groups, tariffs = read_household_info(tmp_path / "household_information.csv")
    assert groups == {"MAC000002": "Affluent", "MAC000003": "ACORN-U"}
    assert tariffs["MAC000003"] == "ToU"
    wd, tmax, tmin = read_daily_weather(tmp_path / "weather_daily_darksky.csv")
    assert wd.tolist() == [D0, D0 + 1] and tmax.tolist() == [4.0, 5.5] and np.isnan(tmin[0])
    assert read_bank_holidays(tmp_path / "uk_bank_holidays.csv.gz").tolist() == [D0]
    r, sides = load_dataset(tmp_path)
    assert len(r) == 1 and all(v is not None for v in sides.values())


def test_dark_sky_days_are_the_days_they_describe(tmp_path: Path) -> None:
    """Dark Sky's daily ``time`` is the local midnight written in UTC: a London summer day
    reads as 23:00 the day before. Its date part made every summer day take the next day's
    weather, lost the day the clocks go back and gave the day they go forward two rows."""
    rows = [("2013-03-30 00:00:00", 1.0), ("2013-03-31 00:00:00", 2.0),
            ("2013-03-31 23:00:00", 3.0), ("2013-07-14T23:00:00Z", 4.0),
            ("2013-10-25 23:00:00", 5.0), ("2013-10-26 23:00:00", 6.0),
            ("2013-10-28 00:00:00", 7.0), ("2013-06-01", 8.0), ("2013-06-02 12:00", 9.0),
            ("1371250800", 10.0)]  # Unix seconds: 2013-06-14 23:00 UTC
    path = tmp_path / "weather_daily_darksky.csv"
    path.write_text("temperatureMax,time,temperatureMin\n"
                    + "".join(f'{t},"{when}",0\n' for when, t in rows))
    day, tmax, _ = read_daily_weather(path)
    got = {str(day_to_date(int(d))): float(t) for d, t in zip(day, tmax, strict=True)}
    # Dark Sky's default units (and Pirate Weather's) are °F; ERA5's kelvin
    for hot in (84.2, 291.3):
        bad = tmp_path / "weather_f.csv"
        bad.write_text(f"date,temp_max,temp_min\n2013-06-01,{hot},{hot - 10}\n")
        with pytest.raises(LoadError, match=rf"weather_f.csv: a temperature of {hot} is no °C "
                                            r"\(the highest ever recorded is 56.7 °C\): in °F "
                                            r"or kelvin\?"):
            read_daily_weather(bad)
    assert got == {"2013-03-30": 1.0, "2013-03-31": 2.0, "2013-04-01": 3.0,
                   "2013-07-15": 4.0, "2013-10-26": 5.0, "2013-10-27": 6.0,
                   "2013-10-28": 7.0, "2013-06-01": 8.0, "2013-06-02": 9.0,
                   "2013-06-15": 10.0}


def _household_csv(hh: str, days: int = 2, sep: str = "\n") -> str:
    rows = [f"{hh},2013-01-{1 + d:02d} {i // 2:02d}:{30 * (i % 2):02d}:00, {i / 100:.3f} "
            for d in range(days) for i in range(48)]
    return sep.join(["LCLid,tstp,energy(kWh/hh)", *rows]) + sep


def test_folder_of_per_household_csvs(tmp_path: Path) -> None:
    """An extracted readings.tar.gz: one CSV per household (plain or gzipped), side tables
    beside them and other tables that are not readings (skipped)."""
    (tmp_path / "MAC000002.csv").write_text(_household_csv("MAC000002"))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "MAC000003.csv.gz").write_bytes(
        gzip.compress(_household_csv("MAC000003", sep="\r\n").encode()))
    (tmp_path / "weather_hourly_darksky.csv").write_text("time,temperature\n")
    with gzip.open(tmp_path / "uk_bank_holidays.csv.gz", "wt") as f:
        f.write('"Bank holidays",Type\n2013-01-01,"New Year"\n')
    r, sides = load_dataset(tmp_path, progress=False)
    assert sorted(set(r.household_ids)) == ["MAC000002", "MAC000003"] and len(r) == 4
    np.testing.assert_allclose(r.kwh[3], np.arange(48) / 100, atol=1e-6)
    assert sides["holidays"] == tmp_path / "uk_bank_holidays.csv.gz"
    assert sides["household"] is None and sides["weather"] is None
    # side tables given explicitly win over (or add to) the folder's
    (tmp_path.parent / "side").mkdir(exist_ok=True)
    info = tmp_path.parent / "side" / "elsewhere.csv"
    info.write_text("LCLid,stdorToU,Acorn,Acorn_grouped,file\nMAC000002,Std,A,Affluent,b\n")
    _, sides = load_dataset(tmp_path, household_info=info, progress=False)
    assert sides["household"] == info
    with pytest.raises(LoadError, match=r"nope\.csv: no such file"):
        load_dataset(tmp_path, weather=tmp_path / "nope.csv")


def test_folder_without_readings_and_empty_files(tmp_path: Path) -> None:
    (tmp_path / "uk_bank_holidays.csv").write_text('"Bank holidays",Type\n')
    with pytest.raises(LoadError, match="no readings in this folder"):
        load_dataset(tmp_path)
    empty = tmp_path / "MAC000009.csv"
    empty.write_text("")
    with pytest.raises(LoadError, match=r"MAC000009\.csv:1: empty file"):
        load_dataset(tmp_path)


def test_zip_and_truncated_gzip(tmp_path: Path) -> None:
    import zipfile

    z = tmp_path / "halfhourly_dataset.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("halfhourly_dataset/block_0.csv", _household_csv("MAC000002"))
        f.writestr("halfhourly_dataset/block_1.csv", _household_csv("MAC000004"))
    r, _ = load_dataset(tmp_path, progress=False)
    assert sorted(set(r.household_ids)) == ["MAC000002", "MAC000004"]

    data = gzip.compress(_household_csv("MAC000002", days=30).encode())
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match=r"cut\.csv\.gz: cannot read"):
        read_readings(cut, progress=False)
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"LCLid,tstp,energy(kWh/hh)\n\xff\xfe\x00garbage\n")
    with pytest.raises(LoadError, match=r"binary\.csv: not UTF-8"):
        read_readings(binary, progress=False)
