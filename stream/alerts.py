"""Turning scored days into output documents: day scores, alerts and data-quality reports.

An alert explains itself so that a subscriber can act on it:

* ``signals``: which detectors fired (``model``, ``zero_run``, ``flat_run``, ``impossible``);
* ``unusual``: when the model fired, what about the day is unusual for this household: each
  of its statistics that passes the threshold on its own (``UNUSUAL``: the day's ``total``,
  one ``half_hour``, the ``hours`` its use fell in, the ``shape`` of the day);
* ``where``: for each signal, the half-hours it fired on, as from-to spans (``zero_run``
  01:00-07:00 is the run of zero readings; ``model`` spans are its largest errors);
* ``top_slots``: the half-hours that point at the fault (inside a data-quality rule's span
  when one fired, else the model's largest errors), observed vs expected kWh;
* ``severity``: from how rare the score is among normal household-days, relative to the
  alert budget (``Detector.severity``: ``high`` at most a tenth of the budget's false-alarm
  rate, ``medium`` at most a third, else ``low``; rule alerts ``high``); for a checkpoint
  without a calibration curve, from score / threshold (``severity()``);
* ``created_at`` (UTC), ``model_version`` (the model that scored the day);
* kWh and scores rounded to 4 decimals; a one-sentence summary such as::

    MAC000002 on 2013-03-04 (high): 41.8 kWh used vs 8.3 kWh expected (5.0x); model
    (unusual: the day's total) 17:00-19:00 (observed 3.10 vs expected 0.62 kWh at 18:00)

The JSON Schemas of every output record are in ``stream/schemas`` (package data).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

import numpy as np

from meterwatch.model.calibration import SEVERITIES
from meterwatch.model.scoring import STAT_NAMES
from meterwatch.stream.assembler import COMPLETE, INCOMPLETE, STATUS_NAMES, ClosedDays, state_rows
from meterwatch.stream.events import SCHEMA_VERSION
from meterwatch.stream.scorer import Scored
from meterwatch.stream.timegrid import SLOTS, TimeGrid

log = logging.getLogger(__name__)

_EPOCH = dt.date(1970, 1, 1)
#: Decimals of every kWh, score and threshold in an output record.
DECIMALS = 4
#: Severity bands: an alert's score over its threshold below 2 is ``low``, below 5
#: ``medium``, else ``high`` (data-quality rule alerts carry a large score bonus: ``high``).
SEVERITY_BANDS = ((2.0, "low"), (5.0, "medium"))
# Shortest runs the data-quality rules fire on (model.detector.ScoringConfig defaults); a
# span shorter than this is listed only when it is the longest run of the day.
_ZERO_RUN_SLOTS = 8
_FLAT_RUN_SLOTS = 10
_FLAT_MIN_KWH = 0.02
_MAX_KWH = 12.0
#: The model's statistics (``model.scoring.STAT_NAMES``) as an alert's ``unusual`` lists
#: them (in this order) and as its summary words them.
UNUSUAL: dict[str, tuple[str, str]] = {
    "level": ("total", "the day's total"),
    "peak": ("half_hour", "one half-hour"),
    "timing": ("hours", "the hours of use"),
    "shape": ("shape", "the shape of the day"),
}
assert set(UNUSUAL) == set(STAT_NAMES), STAT_NAMES


def severity(score: float, threshold: float) -> str:
    """``low`` | ``medium`` | ``high`` from how far past the threshold the score is.

    ratio = score / threshold: below 2 ``low``, below 5 ``medium``, else ``high``. A rule
    alert (zero run, flat run, impossible value) scores far above any threshold: ``high``.

    >>> severity(6.0, 5.0), severity(12.0, 5.0), severity(118.6, 5.69)
    ('low', 'medium', 'high')
    """
    if not threshold > 0:
        return "high"
    ratio = score / threshold
    for bound, name in SEVERITY_BANDS:
        if ratio < bound:
            return name
    return "high"


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of True as (first slot, last slot + 1)."""
    out: list[tuple[int, int]] = []
    start = None
    for i, v in enumerate([*mask.tolist(), False]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            out.append((start, i))
            start = None
    return out


def _long_runs(runs: list[tuple[int, int]], min_len: int) -> list[tuple[int, int]]:
    if not runs:
        return []
    longest = max(b - a for a, b in runs)
    need = min(min_len, longest)
    return [(a, b) for a, b in runs if b - a >= need]


def rule_spans(kwh: np.ndarray, signal: str) -> list[tuple[int, int]]:
    """Half-hour spans (first slot, last slot + 1) where a data-quality rule fired on one
    day's readings ``kwh`` (48,) (NaN = missing)."""
    observed = ~np.isnan(kwh)
    with np.errstate(invalid="ignore"):
        if signal == "zero_run":
            return _long_runs(_runs(observed & (kwh == 0.0)), _ZERO_RUN_SLOTS)
        if signal == "flat_run":
            same = observed[1:] & observed[:-1] & (kwh[1:] == kwh[:-1]) & \
                (kwh[1:] >= _FLAT_MIN_KWH)
            runs = [(a, b + 1) for a, b in _runs(same)]  # n equal pairs = n + 1 readings
            return _long_runs(runs, _FLAT_RUN_SLOTS)
        if signal == "impossible":
            return _runs(observed & ((kwh < 0) | (kwh > _MAX_KWH) | ~np.isfinite(kwh)))
    return []


def _span_doc(signal: str, a: int, b: int, day: int, grid: TimeGrid) -> dict:
    start = grid.slot_start(day, a)
    end = grid.slot_start(day, b - 1) + dt.timedelta(minutes=30)
    return {"signal": signal, "from": _hhmm(a), "to": "24:00" if b == SLOTS else _hhmm(b),
            "start": start.isoformat(), "end": end.isoformat(), "slots": list(range(a, b))}


@dataclass(frozen=True)
class Documents:
    """Output documents of one closed day (``alert``/``data_quality`` may be None)."""

    household_id: str
    day_score: dict
    alert: dict | None
    data_quality: dict | None


_DQ_KINDS = {"incomplete": "incomplete_day", "imputed": "imputed_day",
             "failed": "scoring_failed"}


def data_quality_record(household_id: str, date: str, status: str, readings: int,
                        expected_readings: int, missing_slots: list[int],
                        reason: str | None = None) -> dict:
    """The data-quality record of a closed day that was not scored as a complete day
    (``status`` ``imputed``, ``incomplete`` or ``failed``, with the ``reason``); the only
    builder, used by recovery too."""
    doc = {"schema_version": SCHEMA_VERSION, "household_id": household_id, "date": date,
           "kind": _DQ_KINDS[status], "readings": readings,
           "expected_readings": expected_readings, "missing_slots": missing_slots}
    if reason is not None:
        doc["reason"] = reason
    return doc


def day_date(day: int) -> dt.date:
    return _EPOCH + dt.timedelta(days=int(day))


def build_documents(days: ClosedDays, scored: Scored | None, seq: np.ndarray, *,
                    threshold: float, model_version: str, signal_names: tuple[str, ...],
                    grid: TimeGrid, top_slots: int) -> list[Documents]:
    """One ``Documents`` per closed day; ``scored`` rows align with the non-incomplete days.

    ``threshold`` and ``model_version`` are those of the model serving when no day was
    scored (``scored`` None); otherwise ``scored`` says which scored it.

    A day whose documents cannot be built (anything unforeseen) does not stop the others:
    its day score has status ``failed`` with the ``error``, and a data-quality record of kind
    ``scoring_failed`` says why (``_failed``).
    """
    if scored is not None and scored.model_version:  # what the scorer used
        threshold, model_version = scored.threshold, scored.model_version
    out: list[Documents] = []
    j = 0  # row in scored
    gaps = np.isnan(days.kwh).any(axis=1).tolist()
    states = state_rows(scored.state) if scored is not None else []
    for i in range(len(days)):
        row = j if scored is not None and int(days.status[i]) != INCOMPLETE else None
        try:
            out.append(_documents(days, i, scored, j, seq, gaps[i], states, threshold=threshold,
                                  model_version=model_version, signal_names=signal_names,
                                  grid=grid, top_slots=top_slots))
        except Exception as exc:
            log.exception("could not build the documents of %r, day %s: reported as failed",
                          days.household_ids[i], int(days.day[i]))
            out.append(_failed(days, i, scored, row, seq, threshold, model_version, exc))
        if row is not None:
            j += 1
    return out


def _failed(days: ClosedDays, i: int, scored: Scored | None, row: int | None,
            seq: np.ndarray, threshold: float, model_version: str,
            exc: Exception) -> Documents:
    """The documents of a day whose own ones could not be built (kept minimal: nothing in
    here may raise for a day the parser accepted)."""
    hid = str(days.household_ids[i])
    try:
        date = day_date(days.day[i]).isoformat()
    except (OverflowError, ValueError):
        date = "1970-01-01"
    error = f"{type(exc).__name__}: {str(exc)[:200]}"
    missing = np.flatnonzero(np.isnan(days.kwh[i])).tolist()
    score = None
    is_alert = False
    if row is not None and scored is not None and np.isfinite(scored.score[row]):
        score = round(float(scored.score[row]), DECIMALS)
        is_alert = bool(scored.is_alert[row])
    doc = {"schema_version": SCHEMA_VERSION, "household_id": hid, "date": date,
           "status": "failed", "score": score, "threshold": round(threshold, DECIMALS),
           "is_alert": is_alert, "model_version": model_version,
           "readings": int(days.readings[i]), "expected_readings": int(days.expected[i]),
           "missing_slots": missing, "seq": int(seq[i]), "state": {}, "alert": None,
           "error": error}
    return Documents(hid, doc, None, data_quality_record(
        hid, date, "failed", int(days.readings[i]), int(days.expected[i]), missing,
        reason=error))


def _documents(days: ClosedDays, i: int, scored: Scored | None, j: int, seq: np.ndarray,
               gap: bool, states: list[dict], *, threshold: float, model_version: str,
               signal_names: tuple[str, ...], grid: TimeGrid, top_slots: int) -> Documents:
    """The documents of day ``i`` (``j``: its row in ``scored``)."""
    hid = days.household_ids[i]
    date = day_date(days.day[i])
    status = int(days.status[i])
    kwh = days.kwh[i]
    missing = np.flatnonzero(np.isnan(kwh)).tolist() if gap else []
    date_text = date.isoformat()
    base = {"schema_version": SCHEMA_VERSION, "household_id": hid, "date": date_text}
    dq = None
    if status != COMPLETE:
        dq = data_quality_record(hid, date_text, STATUS_NAMES[status],
                                 int(days.readings[i]), int(days.expected[i]), missing)
    if status == INCOMPLETE or scored is None:
        doc = {**base, "status": STATUS_NAMES[status], "score": None,
               "threshold": round(threshold, DECIMALS),
               "is_alert": False, "model_version": model_version,
               "readings": int(days.readings[i]),
               "expected_readings": int(days.expected[i]), "missing_slots": missing,
               "seq": int(seq[i]), "state": {}, "alert": None}
        return Documents(hid, doc, None, dq)
    score = float(scored.score[j])
    is_alert = bool(scored.is_alert[j])
    alert = None
    if is_alert:
        alert = _alert(base, days, i, scored, j, threshold, model_version, signal_names,
                       grid, top_slots, missing)
    state = states[j]
    doc = {**base, "status": STATUS_NAMES[status], "score": round(score, DECIMALS),
           "threshold": round(threshold, DECIMALS),
           "is_alert": is_alert, "model_version": model_version,
           "readings": int(days.readings[i]), "expected_readings": int(days.expected[i]),
           "missing_slots": missing, "seq": int(seq[i]), "state": state, "alert": alert}
    return Documents(hid, doc, alert, dq)


def _alert(base: dict, days: ClosedDays, i: int, scored: Scored, j: int, threshold: float,
           model_version: str, signal_names: tuple[str, ...], grid: TimeGrid, top_slots: int,
           missing: list[int]) -> dict:
    kwh = days.kwh[i]
    day = int(days.day[i])
    expected = scored.expected[j]
    err = scored.slot_error[j]
    bits = int(scored.signals[j])
    signals = [name for b, name in enumerate(signal_names) if bits >> b & 1] or ["model"]
    where: list[dict] = []
    in_rule = np.zeros(SLOTS, dtype=bool)
    for name in signals:
        for a, b in rule_spans(kwh, name):
            where.append(_span_doc(name, a, b, day, grid))
            in_rule[a:b] = True
    # the half-hours that point at the fault: inside the rules' spans when one fired
    candidates = np.flatnonzero(in_rule) if in_rule.any() else np.arange(SLOTS)
    order = candidates[np.argsort(-err[candidates], kind="stable")]
    top = order[:top_slots]
    if not in_rule.any():
        top = top[err[top] > 0] if (err[top] > 0).any() else top
    top_sorted = sorted(top.tolist())
    if "model" in signals:
        model_top = np.argsort(-err, kind="stable")[:top_slots]
        model_top = model_top[err[model_top] > 0]
        for a, b in _runs(np.isin(np.arange(SLOTS), model_top)):
            where.append(_span_doc("model", a, b, day, grid))
    slots = [{
        "slot": int(s),
        "start": grid.slot_start(day, int(s)).isoformat(),
        "observed_kwh": None if np.isnan(kwh[s]) else round(float(kwh[s]), DECIMALS),
        "expected_kwh": round(float(expected[s]), DECIMALS),
        "error": round(float(err[s]), DECIMALS),
    } for s in top_sorted]
    observed_total = float(np.nansum(kwh))
    expected_total = float(expected.sum())
    ratio = observed_total / expected_total if expected_total > 0 else float("inf")
    worst = int(top[0]) if len(top) else 0
    score = float(scored.score[j])
    if scored.severity is not None:  # from the calibration curve (Detector.severity)
        sev = SEVERITIES[max(int(scored.severity[j]), 1) - 1]
    else:  # a checkpoint without a curve
        sev = severity(score, threshold)
    by_signal: dict[str, list[str]] = {}
    for w in where:
        by_signal.setdefault(w["signal"], []).append(f"{w['from']}-{w['to']}")
    unusual: list[str] = []
    if "model" in signals and scored.unusual is not None:
        bits = int(scored.unusual[j])
        found = [UNUSUAL[s] for s in UNUSUAL if bits >> STAT_NAMES.index(s) & 1]
        unusual = [name for name, _ in found]
        words = ", ".join(text for _, text in found)
        by_signal = {(f"model (unusual: {words})" if k == "model" and words else k): v
                     for k, v in by_signal.items()}
    spans = "; ".join(f"{name} {', '.join(v)}" for name, v in by_signal.items()) or "no span"
    summary = (
        f"{base['household_id']} on {base['date']} ({sev}): {observed_total:.1f} kWh used vs "
        f"{expected_total:.1f} kWh expected ({ratio:.1f}x); {spans} (observed "
        f"{'n/a' if np.isnan(kwh[worst]) else f'{kwh[worst]:.2f}'} vs expected "
        f"{expected[worst]:.2f} kWh at {_hhmm(worst)})")
    return {**base, "score": round(score, DECIMALS), "threshold": round(threshold, DECIMALS),
            "severity": sev,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
            "model_version": model_version, "signals": signals, "unusual": unusual,
            "where": where,
            "imputed_slots": missing,
            "observed_kwh_total": round(observed_total, DECIMALS),
            "expected_kwh_total": round(expected_total, DECIMALS), "top_slots": slots,
            "summary": summary}


def _hhmm(slot: int) -> str:
    return f"{slot // 2:02d}:{30 * (slot % 2):02d}"
