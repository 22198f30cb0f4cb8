"""``benchmarks.soak``: its latency quantiles, and a short soak through the console scripts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import common, soak


def _cumulative(values: np.ndarray, bounds: list[float]) -> dict[float, float]:
    return {b: float((values <= b).sum()) for b in bounds}


def test_quantile_is_prometheus_histogram_quantile_between_two_scrapes() -> None:
    """Only the observations between the scrapes count, interpolated within their bucket."""
    bounds = [0.1, 0.2, 0.5, 1.0, float("inf")]
    before_values = np.full(1000, 0.9)  # all in (0.5, 1.0]: must not count
    between = np.concatenate([np.full(50, 0.05), np.full(50, 0.15)])
    before = _cumulative(before_values, bounds)
    after = {b: before[b] + c for b, c in _cumulative(between, bounds).items()}
    assert soak.quantile(before, after, 0.5) == pytest.approx(0.1)
    assert soak.quantile(before, after, 0.75) == pytest.approx(0.15)
    assert soak.quantile(before, after, 0.25) == pytest.approx(0.05)
    assert soak.quantile(after, after, 0.5) is None  # nothing observed in between
    # past the last finite bucket: its lower bound, as Prometheus reports it
    late = {b: after[b] + (10 if np.isinf(b) else 0) for b in bounds}
    assert soak.quantile(after, late, 0.99) == 1.0


def test_a_short_soak_loses_nothing(detector_path: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """``meterwatch run`` and ``meterwatch simulate`` as installed, default settings but the
    names a deployment gives: every reading accepted, every day scored, every malformed
    record dead-lettered, memory sampled, exit 0."""
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(common, "SCRATCH", tmp_path / "scratch")
    code = soak.main(["--duration-s", "8", "--households", "20", "--rate", "1500",
                      "--malformed-every", "50", "--every-s", "2",
                      "--model", str(detector_path)])
    [r] = json.loads((tmp_path / "results" / "soak.json").read_text())
    assert r["checks"] and all(r["checks"].values()), r["checks"]
    assert code == 0
    assert r["produced"]["malformed"] > 0
    assert r["final"]["days_scored"] >= 20 * (r["produced"]["readings"] // (48 * 20))
    assert r["final"]["days_scored"] > 0
    assert all(row["rss_mb"] > 50 for row in r["intervals"])
