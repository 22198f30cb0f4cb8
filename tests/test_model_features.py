"""Context features, imputation and the side tables."""

import dataclasses
import datetime as dt
import gzip
from pathlib import Path

import numpy as np
import pytest

from meterwatch.model import (
    N_CONTEXT,
    ContextTables,
    SyntheticConfig,
    context_features,
    features,
    generate,
)
from meterwatch.model.features import FEATURE_NAMES, impute, model_inputs


def _day(y: int, m: int, d: int) -> int:
    return (dt.date(y, m, d) - dt.date(1970, 1, 1)).days


def test_calendar_and_unknowns() -> None:
    days = np.array([_day(2013, 1, 7), _day(2013, 1, 12), _day(2013, 12, 25)], np.int32)
    f = context_features(days, ["a", "b", "c"], np.array([0.2, np.nan, 2.0], np.float32),
                         ContextTables.empty())
    col = {n: f[:, i] for i, n in enumerate(FEATURE_NAMES)}
    assert f.shape == (3, N_CONTEXT) and f.dtype == np.float32
    np.testing.assert_allclose(col["dow_cos"][0], 1.0)  # Monday
    assert col["weekend"].tolist() == [0, 1, 0]
    assert col["holiday"].tolist() == [0, 0, 0]  # no table, no holidays
    assert col["level_missing"].tolist() == [0, 1, 0]
    np.testing.assert_allclose(col["log_level"], [0.0, 0.0, np.log(10.0)], rtol=1e-6)
    assert col["weather_missing"].tolist() == [1, 1, 1]
    assert (f[:, 6:10] == 0).all()  # unknown household


def test_tables_from_files(tmp_path: Path) -> None:
    hh = tmp_path / "household_information.csv.gz"
    with gzip.open(hh, "wt", newline="") as f:
        f.write('LCLid,stdorToU,Acorn,Acorn_grouped,file\r\n'
                'MAC000002,Std,ACORN-A,Affluent,"block_0\r"\n'
                'MAC000003,ToU,ACORN-U,ACORN-U,block_0\r\n')
    weather = tmp_path / "weather.csv"
    weather.write_text('temperatureMax,time,temperatureMin\n'
                       '20.0,"2013-06-01 00:00:00",12.0\n')
    hol = tmp_path / "hol.csv"
    hol.write_text('"Bank holidays",Type\n2013-12-25,"Christmas Day"\n')
    t = ContextTables.from_files(household_csv=hh, weather_csv=weather, holidays_csv=hol)
    days = np.array([_day(2013, 6, 1), _day(2013, 12, 25)], np.int32)
    f = context_features(days, ["MAC000002", "MAC000003"], np.full(2, 0.2, np.float32), t)
    col = {n: f[:, i] for i, n in enumerate(FEATURE_NAMES)}
    assert col["acorn_affluent"].tolist() == [1, 0]
    assert col["tariff"].tolist() == [-1, 1]
    assert col["holiday"].tolist() == [0, 1]
    assert col["weather_missing"].tolist() == [0, 1]
    np.testing.assert_allclose(col["temp_max"][0], (20 - 12) / 8)


def test_impute_interpolates() -> None:
    kwh = np.array([[np.nan, 1.0, np.nan, 3.0] + [1.0] * 44, [np.nan] * 48], np.float32)
    obs = np.isfinite(kwh)
    out = impute(np.nan_to_num(kwh), obs, np.array([9.0, 0.5], np.float32))
    assert out[0, 0] == 1.0 and out[0, 2] == 2.0
    assert (out[1] == 0.5).all()


def test_model_inputs_handles_bad_values() -> None:
    kwh = np.full((2, 48), 0.2, np.float32)
    kwh[0, 3] = np.nan
    kwh[1, 5] = -1.0
    kwh[1, 6] = np.inf
    before = kwh.copy()
    inp = model_inputs(kwh, np.zeros(2, np.int32), ["a", "b"], np.full(2, np.nan, np.float32),
                       None, max_kwh=12.0)
    np.testing.assert_array_equal(kwh, before)
    assert np.isfinite(inp.x).all() and np.isfinite(inp.x_shape).all()
    assert inp.observed.sum() == 96 - 3
    np.testing.assert_allclose(inp.scale, 0.2)


def test_model_inputs_in_chunks_equal_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many rows are built ``INPUT_CHUNK_ROWS`` at a time (bounded temporaries: they were
    the peak memory of a large training); every field is what one pass gives, bit for bit."""
    data = generate(SyntheticConfig(n_households=60, n_days=20, anomaly_rate=0.05, seed=3))
    ids, day, kwh, _ = data.long(slice(0, 20))
    kwh = kwh.copy()
    kwh[::7, 5], kwh[::11, 9], kwh[::13] = np.nan, -1.0, np.nan  # imputed slots, empty days
    level = np.where(np.arange(len(day)) % 3 == 0, np.nan, 0.3).astype(np.float32)
    whole = model_inputs(kwh, day, ids, level, data.tables, 10.0)
    monkeypatch.setattr(features, "INPUT_CHUNK_ROWS", 250)  # 1,200 rows: 5 chunks
    chunked = model_inputs(kwh, day, ids, level, data.tables, 10.0)
    for f in dataclasses.fields(whole):
        a, b = getattr(whole, f.name), getattr(chunked, f.name)
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True), f.name


def test_changed_parts_and_an_update_that_keeps_the_household_index() -> None:
    ids = ["A", "B", "C"]
    old = ContextTables(acorn_group={"A": "Affluent", "B": "Adversity"},
                        tariff={"A": "Std", "B": "ToU"},
                        weather_day=np.array([10, 11], np.int32),
                        temp_max=np.array([5.0, np.nan], np.float32),
                        temp_min=np.array([1.0, 2.0], np.float32),
                        holidays=np.array([10], np.int32))
    codes = features.household_codes(old, ids)
    same = ContextTables(acorn_group=dict(old.acorn_group), tariff=dict(old.tariff),
                         weather_day=old.weather_day.copy(), temp_max=old.temp_max.copy(),
                         temp_min=old.temp_min.copy(), holidays=old.holidays.copy())
    assert old.changed(same) == {}  # equal by value (NaN included)
    # tomorrow's weather: only the weather travels, and the household index is kept
    longer = dataclasses.replace(same, weather_day=np.array([10, 11, 12], np.int32),
                                 temp_max=np.array([5.0, np.nan, 7.0], np.float32),
                                 temp_min=np.array([1.0, 2.0, 3.0], np.float32))
    parts = old.changed(longer)
    assert set(parts) == {"weather_day", "temp_max", "temp_min"}
    new = old.updated(parts)
    assert features._LOOKUPS[new] is features._LOOKUPS[old]
    assert new.acorn_group is old.acorn_group and not new.changed(longer)
    assert float(new.max_temperature(np.array([12]))[0]) == 7.0
    # a new household: the household information travels, and is looked up afresh
    more = dataclasses.replace(longer, acorn_group={**old.acorn_group, "C": "Comfortable"},
                               tariff={**old.tariff, "C": "ToU"})
    parts = new.changed(more)
    assert set(parts) == {"acorn_group", "tariff"}
    newer = new.updated(parts)
    assert newer not in features._LOOKUPS
    assert features.household_codes(newer, ids)[1].tolist() == [-1.0, 1.0, 1.0]
    assert codes[1].tolist() == [-1.0, 1.0, 0.0]
    assert set(newer.changed(dataclasses.replace(more, holidays=np.array([], np.int32)))) \
        == {"holidays"}
