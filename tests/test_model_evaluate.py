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
               "--test-start", "2013-04-01", "--rate", "0.15", "--threads", "2"])
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
