"""Alert documents a subscriber can act on: where each signal fired, half-hours inside the
fault, severity, rounding, creation time; checked against the shipped JSON Schema."""

from __future__ import annotations

import datetime as dt

import jsonschema
import numpy as np

from meterwatch.model import SIGNAL_NAMES
from meterwatch.stream.alerts import UNUSUAL, build_documents, rule_spans, severity
from meterwatch.stream.assembler import COMPLETE, ClosedDays
from meterwatch.stream.events import Alert
from meterwatch.stream.metrics import ALERT_KINDS
from meterwatch.stream.schemas import load_schema
from meterwatch.stream.scorer import Scored
from meterwatch.stream.timegrid import TimeGrid

DAY = (dt.date(2013, 3, 2) - dt.date(1970, 1, 1)).days


def _closed(kwh: np.ndarray) -> ClosedDays:
    n = len(kwh)
    return ClosedDays(np.arange(n, dtype=np.int32), [f"H{i}" for i in range(n)],
                      np.full(n, DAY, np.int32), kwh.astype(np.float32),
                      np.full(n, COMPLETE, np.uint8), np.full(n, 48, np.int16),
                      np.full(n, 48, np.int16), np.zeros(n, np.int64), np.zeros(n, np.int64),
                      np.arange(1, n + 1, dtype=np.int64))


def _scored(kwh: np.ndarray, score: float, signals: list[str],
            slot_error: np.ndarray) -> Scored:
    bits = sum(1 << SIGNAL_NAMES.index(s) for s in signals)
    return Scored(score=np.array([score], np.float32), is_alert=np.array([True]),
                  expected=np.full((1, 48), 0.4, np.float32), slot_error=slot_error[None],
                  signals=np.array([bits], np.uint8), state={"level": np.array([0.4])},
                  seconds=0.0, memory_cap=1)


def test_severity_bands() -> None:
    assert severity(6.0, 5.0) == "low" and severity(10.0, 5.0) == "medium"
    assert severity(25.0, 5.0) == "high" and severity(1.0, 0.0) == "high"


def test_rule_spans() -> None:
    kwh = np.full(48, 0.3, np.float32)
    kwh[2:14] = 0.0  # 01:00-07:00
    kwh[40:42] = 0.0  # a short zero run elsewhere is not part of the rule
    assert rule_spans(kwh, "zero_run") == [(2, 14)]
    flat = np.linspace(0.1, 1.0, 48).astype(np.float32)
    flat[20:32] = 0.75
    assert rule_spans(flat, "flat_run") == [(20, 32)]
    assert rule_spans(kwh, "model") == []


def test_zero_run_alert_points_at_the_outage() -> None:
    """The issue's case: an outage 01:00-07:00 whose alert listed half-hours outside it."""
    kwh = np.full((1, 48), 0.4, np.float32)
    kwh[0, 2:14] = 0.0
    err = np.zeros(48, np.float32)
    err[[1, 14, 15, 28, 38, 40]] = 0.9  # the model's largest errors lie elsewhere
    err[2:14] = 0.1
    docs = build_documents(_closed(kwh), _scored(kwh, 101.97134, ["zero_run"], err),
                           np.array([1]), threshold=5.898512345, model_version="m-1",
                           signal_names=SIGNAL_NAMES, grid=TimeGrid("Europe/London"),
                           top_slots=6)
    alert = docs[0].alert
    assert alert is not None
    assert alert["where"] == [{
        "signal": "zero_run", "from": "01:00", "to": "07:00",
        "start": "2013-03-02T01:00:00+00:00", "end": "2013-03-02T07:00:00+00:00",
        "slots": list(range(2, 14))}]
    assert all(2 <= s["slot"] < 14 for s in alert["top_slots"]) and len(alert["top_slots"]) == 6
    assert alert["score"] == 101.9713 and alert["threshold"] == 5.8985
    assert alert["severity"] == "high" and "zero_run 01:00-07:00" in alert["summary"]
    assert dt.datetime.fromisoformat(alert["created_at"]).utcoffset() == dt.timedelta(0)
    assert docs[0].day_score["score"] == 101.9713
    jsonschema.validate(alert, load_schema("alert"))
    Alert.model_validate(alert)


def test_model_alert_spans_are_its_largest_errors() -> None:
    kwh = np.full((1, 48), 0.4, np.float32)
    kwh[0, 34:38] = 2.0  # 17:00-19:00, five times the usual
    err = np.full(48, 0.001, np.float32)
    err[34:38] = 0.5
    docs = build_documents(_closed(kwh), _scored(kwh, 9.0, ["model"], err), np.array([1]),
                           threshold=5.0, model_version="m-1", signal_names=SIGNAL_NAMES,
                           grid=TimeGrid("UTC"), top_slots=4)
    alert = docs[0].alert
    assert alert is not None and alert["severity"] == "low"
    assert [(w["signal"], w["from"], w["to"]) for w in alert["where"]] == [
        ("model", "17:00", "19:00")]
    assert [s["slot"] for s in alert["top_slots"]] == [34, 35, 36, 37]
    jsonschema.validate(alert, load_schema("alert"))


def test_a_day_whose_documents_fail_is_reported_and_the_others_go_on(monkeypatch) -> None:
    """Issue 15: anything unforeseen while building one day's outputs puts that day on the
    data-quality topic with the reason; the rest of the batch is unaffected."""
    import meterwatch.stream.alerts as alerts

    kwh = np.full((3, 48), 0.4, np.float32)
    err = np.full(48, 0.1, np.float32)
    scored = Scored(score=np.array([9.0, 9.5, 1.0], np.float32),
                    is_alert=np.array([True, True, False]),
                    expected=np.full((3, 48), 0.4, np.float32),
                    slot_error=np.stack([err, err, err]),
                    signals=np.zeros(3, np.uint8),
                    state={"level": np.array([0.4, 0.5, 0.6])}, seconds=0.0, memory_cap=1)
    real = alerts._alert

    def poisoned(base, *args, **kwargs):  # type: ignore[no-untyped-def]
        if base["household_id"] == "H1":
            raise KeyError("something nobody foresaw")
        return real(base, *args, **kwargs)

    monkeypatch.setattr(alerts, "_alert", poisoned)
    docs = build_documents(_closed(kwh), scored, np.array([1, 1, 1]), threshold=5.0,
                           model_version="m-1", signal_names=SIGNAL_NAMES,
                           grid=TimeGrid("UTC"), top_slots=4)
    assert [d.household_id for d in docs] == ["H0", "H1", "H2"]
    assert docs[0].alert is not None and docs[0].day_score["status"] == "scored"
    assert docs[2].alert is None and docs[2].day_score["score"] == 1.0
    failed = docs[1]
    assert failed.alert is None and failed.day_score["status"] == "failed"
    assert failed.day_score["score"] == 9.5 and failed.day_score["is_alert"] is True
    assert "KeyError" in failed.day_score["error"]
    assert failed.data_quality is not None
    assert failed.data_quality["kind"] == "scoring_failed"
    assert "KeyError" in failed.data_quality["reason"]
    jsonschema.validate(failed.day_score, load_schema("day_score"))
    jsonschema.validate(failed.data_quality, load_schema("data_quality"))


def test_model_alert_says_what_is_unusual() -> None:
    """A model alert lists the statistics that pass the threshold on their own (``unusual``,
    in a fixed order) in the record and in its summary; a rule-only alert lists none."""
    kwh = np.full((1, 48), 2.0, np.float32)
    err = np.zeros(48, np.float32)
    err[30:34] = 0.5
    # bits in STAT_NAMES order: shape 1, peak 2, level 4, timing 8
    for bits, names, text in [(4, ["total"], "the day's total"),
                              (2 | 4, ["total", "half_hour"], "the day's total, one half-hour"),
                              (8, ["hours"], "the hours of use"),
                              (1 | 8, ["hours", "shape"],
                               "the hours of use, the shape of the day")]:
        scored = _scored(kwh, 9.0, ["model"], err)
        scored.unusual = np.array([bits], np.uint8)
        docs = build_documents(_closed(kwh), scored, np.array([1]), threshold=5.0,
                               model_version="m-1", signal_names=SIGNAL_NAMES,
                               grid=TimeGrid("Europe/London"), top_slots=4)
        alert = docs[0].alert
        assert alert is not None and alert["unusual"] == names
        assert f"model (unusual: {text}) 15:00-17:00" in alert["summary"], alert["summary"]
        jsonschema.validate(alert, load_schema("alert"))
    kwh[0, 2:14] = 0.0
    scored = _scored(kwh, 101.0, ["zero_run"], err)
    scored.unusual = np.array([4], np.uint8)
    alert = build_documents(_closed(kwh), scored, np.array([1]), threshold=5.0,
                            model_version="m-1", signal_names=SIGNAL_NAMES,
                            grid=TimeGrid("Europe/London"), top_slots=4)[0].alert
    assert alert is not None and alert["unusual"] == [] and "unusual" not in alert["summary"]


def test_alert_metric_kinds_are_the_unusual_names() -> None:
    """``meterwatch_alerts_total{unusual=...}``: one series per name an alert's ``unusual``
    can start with, plus ``rules``."""
    assert ALERT_KINDS == (*(name for name, _ in UNUSUAL.values()), "rules")
