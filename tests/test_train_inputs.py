"""``meterwatch train`` on a history too small to train on: exit 2 and one line that names
the input and says how much is enough (it was a traceback); ``train`` on every layout the
loaders read, and ``evaluate`` on one. None of it needs a broker."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from meterwatch.model import SyntheticConfig, generate, train_detector
from meterwatch.model.training import SMALLEST_HISTORY, TrainConfig, TrainingDataError
from tests.cli_helpers import meterwatch, one_line_error, write_layout


@pytest.mark.parametrize(("households", "days"), [(1, 1), (2, 14)])
def test_synthetic_history_too_small(households: int, days: int, tmp_path: Path) -> None:
    line = one_line_error(meterwatch("train", "--synthetic", "--households", str(households),
                                     "--days", str(days), "--max-epochs", "1",
                                     "--out", str(tmp_path / "m.pt")))
    assert line.startswith("meterwatch: error: --households/--days: too little history to "
                           f"train: {households} households over {days} days"), line
    assert SMALLEST_HISTORY in line
    assert not (tmp_path / "m.pt").exists()


def test_data_too_small_names_data(tmp_path: Path) -> None:
    data = generate(SyntheticConfig(n_households=2, n_days=5, anomaly_rate=0.0, seed=3))
    path = write_layout(data, "csv", tmp_path / "d")
    line = one_line_error(meterwatch("train", "--data", str(path), "--max-epochs", "1",
                                     "--out", str(tmp_path / "m.pt")))
    assert line.startswith("meterwatch: error: --data: too little history to train: "
                           "2 households over 5 days (10 household-days)"), line


def test_smallest_history_quoted_trains(caplog: pytest.LogCaptureFixture) -> None:
    """The sizes the message quotes do train; 8 households x 5 days does not. Readings
    training takes as missing (negative: solar export netted off; above the model's limit)
    are counted in a warning first: they used to be dropped without a word."""
    for households, days in ((8, 8), (4, 10)):
        data = generate(SyntheticConfig(n_households=households, n_days=days,
                                        anomaly_rate=0.0, seed=0))
        ids, day, kwh, _ = data.long()
        det = train_detector(kwh, day, ids, data.tables, TrainConfig(max_epochs=1))
        assert det.threshold > 0
    data = generate(SyntheticConfig(n_households=8, n_days=5, anomaly_rate=0.0, seed=0))
    ids, day, kwh, _ = data.long()
    kwh = kwh.copy()
    kwh[:4, 26] = -0.3  # four afternoons exporting more than the house used
    kwh[0, 40] = 80.0
    with caplog.at_level(logging.WARNING, logger="meterwatch.model.training"), \
            pytest.raises(TrainingDataError, match="too little history"):
        train_detector(kwh, day, ids, data.tables, TrainConfig(max_epochs=1))
    said = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("4 readings (0.21 %) are negative (export netted off?") and
               m.endswith("as bad_kwh): training takes them as missing") for m in said), said
    assert "1 reading (0.052 %) is above 12 kWh in a half-hour: training takes it as " \
        "missing" in said, said


@pytest.mark.parametrize("layout", ["csv", "csv.gz", "tar.gz", "datastore", "hhblock", "own",
                                    "own-wide"])
def test_train_on_every_layout(layout: str, tmp_path: Path) -> None:
    data = generate(SyntheticConfig(n_households=6, n_days=12, anomaly_rate=0.0, seed=2))
    path = write_layout(data, layout, tmp_path / "data")
    out = tmp_path / "model.pt"
    proc = meterwatch("train", "--data", str(path), "--out", str(out), "--max-epochs", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "72 household-days of 6 households" in proc.stderr, proc.stderr
    assert out.exists()


def test_evaluate_on_the_folder_train_reads(tmp_path: Path) -> None:
    """``meterwatch evaluate`` on the folder layout the CLI pipeline trains on (it was the
    pipeline test's last step; it uses no broker, so it runs once, not in both of CI's
    broker passes)."""
    import datetime as dt
    import json

    first = dt.date(2013, 2, 1)
    data = generate(SyntheticConfig(n_households=40, n_days=28, start_day=first,
                                    anomaly_rate=0.0, seed=5))
    folder = write_layout(data, "folder", tmp_path / "readings")
    out = tmp_path / "evaluation"
    proc = meterwatch("evaluate", "--data", str(folder), "--out", str(out),
                      "--calib-start", (first + dt.timedelta(days=18)).isoformat(),
                      "--test-start", (first + dt.timedelta(days=23)).isoformat(),
                      "--methods", "meterwatch,profile", "--cold-households", "0",
                      "--protocol", "split")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["metrics"]) == {"meterwatch", "profile"}
    assert (out / "RESULTS.md").exists()
