"""The evaluation command end to end, on synthetic data written in the LCL layout."""

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest

from meterwatch.model import SyntheticConfig, generate
from meterwatch.model.evaluate import METHODS, main


@pytest.fixture(scope="module")
def lcl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = generate(SyntheticConfig(n_households=12, n_days=120, anomaly_rate=0.0, seed=2))
    root = tmp_path_factory.mktemp("lcl")
    lines = ["LCLid,tstp,energy(kWh/hh)"]
    for h, hid in enumerate(d.household_ids):
        for j, day in enumerate(d.days):
            date = dt.date(1970, 1, 1) + dt.timedelta(days=int(day))
            for s in range(48):
                lines.append(f"{hid},{date} {s // 2:02d}:{30 * (s % 2):02d}:00, "
                             f"{d.kwh[h, j, s]:.3f} ")
    (root / "readings.csv").write_text("\n".join(lines) + "\n")
    info = ["LCLid,stdorToU,Acorn,Acorn_grouped,file"] + [
        f"{h},{d.tariff[i]},ACORN-A,{d.acorn_group[i]},block_0"
        for i, h in enumerate(d.household_ids)]
    (root / "household_information.csv").write_text("\r\n".join(info) + "\r\n")
    return root


def test_evaluate_writes_report(lcl_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    rc = main(["--data", str(lcl_dir), "--out", str(out), "--calib-start", "2013-03-15",
               "--test-start", "2013-04-01", "--rate", "0.15", "--threads", "2",
               "--protocol", "split"])
    assert rc == 0
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["metrics"]) == set(METHODS)
    for m in summary["metrics"].values():
        assert 0.0 <= m["pr_auc"] <= 1.0 and 0.0 <= m["roc_auc"] <= 1.0
    assert summary["metrics"]["meterwatch"]["roc_auc"] > 0.7
    text = (out / "RESULTS.md").read_text()
    assert "| meterwatch |" in text and "| reference |" in text
    for png in ("pr_curves.png", "loss_curves.png", "alert_gallery.png"):
        assert (out / png).stat().st_size > 1000
    assert np.isfinite(summary["seconds"])


def test_fold_protocol_scores_only_unseen_households(lcl_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "folds"
    weather = tmp_path / "weather.csv"  # given by flag: the folds used to ignore it
    weather.write_text("date,temp_max,temp_min\n2013-03-01,12.5,4.0\n")
    rc = main(["--data", str(lcl_dir), "--out", str(out), "--calib-start", "2013-03-15",
               "--test-start", "2013-04-01", "--threads", "2", "--folds", "3", "--seeds", "0",
               "--max-epochs", "3", "--boot", "30", "--weather", str(weather)])
    assert rc == 0
    summary = json.loads((out / "results.json").read_text())
    assert summary["context"] == {
        "household": str(lcl_dir / "household_information.csv"), "weather": str(weather),
        "holidays": None, "timezone": "UTC"}
    fold_of = summary["fold_of"]
    assert len(summary["folds"]) == 2  # development folds only; the final one untouched
    assert 2 not in {f["fold"] for f in summary["folds"]}
    assert sorted(set(fold_of.values())) == [0, 1, 2]
    mw = summary["results"]["meterwatch"]
    for how in ("at1", "calibrated", "budget:history:0.01", "budget:rolling_28_days:0.01"):
        r = mw[how]
        assert 0.0 <= r["false_alarm_rate"] <= 1.0
        lo, hi = r["recall_all_types_ci"]
        assert lo <= r["recall_all_types"] <= hi
    outage = mw["at1"]["per_type"]["outage"]
    assert outage["sweep"][-1] > 0.8  # 6 hours of zeros in a synthetic household
    assert set(summary["holdout_types"]) == {"partial_level", "weekend_extra", "heating_mild"}
    assert summary["sustained"]["households"] == 12
    text = (out / "RESULTS.md").read_text()
    assert f"- context: household {lcl_dir / 'household_information.csv'}, weather {weather}, "\
        "holidays none; days in UTC" in text
    assert "50 %-detection magnitude" in text and "Alert budget" in text
    # 4 unseen households a run: the 1 % cut stands on the single highest clean day
    fewest = min(f["test_days"] for f in summary["folds"])
    assert fewest < 500 and f"- **too few clean test days for a 1 % cut**: {fewest} in the " \
        "smallest run" in text, text[:2000]
    assert (out / "magnitude_sweeps.png").stat().st_size > 1000


def _days(first: str, last: str) -> np.ndarray:
    start = (dt.date.fromisoformat(first) - dt.date(1970, 1, 1)).days
    return np.arange(start, (dt.date.fromisoformat(last) - dt.date(1970, 1, 1)).days + 1)


@pytest.mark.parametrize(("first", "last", "given", "expected"), [
    # a year of 2013: the first round's periods (Sep calibration, Oct-Dec test)
    ("2013-01-01", "2013-12-31", {}, ("2013-09-01", "2013-10-01")),
    # any other year: the same months of it (2013's dates refused it: no test days)
    ("2012-01-01", "2012-12-31", {}, ("2012-09-01", "2012-10-01")),
    ("2024-03-10", "2025-03-09", {}, ("2024-11-01", "2024-12-01")),
    # the whole London trial: the last quarter of its span
    ("2011-11-23", "2014-02-28", {}, ("2013-06-01", "2013-08-01")),
    # under half a year: days, not months
    ("2013-01-01", "2013-04-30", {}, ("2013-03-22", "2013-04-01")),
    # one given: the other keeps the distance
    ("2013-01-01", "2013-12-31", {"test_start": "2013-11-01"}, ("2013-10-01", "2013-11-01")),
    ("2013-01-01", "2013-12-31", {"calib_start": "2013-06-01"}, ("2013-06-01", "2013-07-01")),
])
def test_default_periods_follow_the_data(first: str, last: str, given: dict[str, str],
                                         expected: tuple[str, str]) -> None:
    from meterwatch.model.evaluate import periods
    from meterwatch.model.loaders import parse_day

    got = periods(_days(first, last), **{k: parse_day(v) for k, v in given.items()})
    assert got == tuple(parse_day(e) for e in expected)
