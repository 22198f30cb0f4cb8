"""Turning scored days into output documents: day scores, alerts and data-quality reports.

An alert explains itself: which detectors fired, the day's observed and expected energy,
and the half-hours that drove the score (start time, observed vs expected kWh, share of
the score), with a one-sentence summary such as::

    MAC000002 on 2013-03-04: 41.8 kWh used vs 8.3 kWh expected (5.0x); largest gaps
    17:00-19:00 (observed 3.10 vs expected 0.62 kWh at 18:00); signals: model
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np

from meterwatch.stream.assembler import COMPLETE, INCOMPLETE, STATUS_NAMES, ClosedDays, state_rows
from meterwatch.stream.events import SCHEMA_VERSION
from meterwatch.stream.scorer import Scored
from meterwatch.stream.timegrid import SLOTS, TimeGrid

_EPOCH = dt.date(1970, 1, 1)


@dataclass(frozen=True)
class Documents:
    """Output documents of one closed day (``alert``/``data_quality`` may be None)."""

    household_id: str
    day_score: dict
    alert: dict | None
    data_quality: dict | None


def day_date(day: int) -> dt.date:
    return _EPOCH + dt.timedelta(days=int(day))


def build_documents(days: ClosedDays, scored: Scored | None, seq: np.ndarray, *,
                    threshold: float, model_version: str, signal_names: tuple[str, ...],
                    grid: TimeGrid, top_slots: int) -> list[Documents]:
    """One ``Documents`` per closed day; ``scored`` rows align with the non-incomplete days."""
    out: list[Documents] = []
    j = 0  # row in scored
    gaps = np.isnan(days.kwh).any(axis=1).tolist()
    states = state_rows(scored.state) if scored is not None else []
    for i in range(len(days)):
        hid = days.household_ids[i]
        date = day_date(days.day[i])
        status = int(days.status[i])
        kwh = days.kwh[i]
        missing = np.flatnonzero(np.isnan(kwh)).tolist() if gaps[i] else []
        base = {"schema_version": SCHEMA_VERSION, "household_id": hid, "date": date.isoformat()}
        dq = None
        if status != COMPLETE:
            dq = {**base, "kind": "incomplete_day" if status == INCOMPLETE else "imputed_day",
                  "readings": int(days.readings[i]), "expected_readings": int(days.expected[i]),
                  "missing_slots": missing}
        if status == INCOMPLETE or scored is None:
            doc = {**base, "status": STATUS_NAMES[status], "score": None, "threshold": threshold,
                   "is_alert": False, "model_version": model_version,
                   "readings": int(days.readings[i]),
                   "expected_readings": int(days.expected[i]), "missing_slots": missing,
                   "seq": int(seq[i]), "state": {}, "alert": None}
            out.append(Documents(hid, doc, None, dq))
            continue
        score = float(scored.score[j])
        is_alert = bool(scored.is_alert[j])
        alert = None
        if is_alert:
            alert = _alert(base, days, i, scored, j, threshold, model_version, signal_names,
                           grid, top_slots, missing)
        state = states[j]
        doc = {**base, "status": STATUS_NAMES[status], "score": score, "threshold": threshold,
               "is_alert": is_alert, "model_version": model_version,
               "readings": int(days.readings[i]), "expected_readings": int(days.expected[i]),
               "missing_slots": missing, "seq": int(seq[i]), "state": state, "alert": alert}
        out.append(Documents(hid, doc, alert, dq))
        j += 1
    return out


def _alert(base: dict, days: ClosedDays, i: int, scored: Scored, j: int, threshold: float,
           model_version: str, signal_names: tuple[str, ...], grid: TimeGrid, top_slots: int,
           missing: list[int]) -> dict:
    kwh = days.kwh[i]
    expected = scored.expected[j]
    err = scored.slot_error[j]
    top = np.argsort(-err, kind="stable")[:top_slots]
    top = top[err[top] > 0] if (err[top] > 0).any() else top
    slots = [{
        "slot": int(s),
        "start": grid.slot_start(int(days.day[i]), int(s)).isoformat(),
        "observed_kwh": None if np.isnan(kwh[s]) else round(float(kwh[s]), 4),
        "expected_kwh": round(float(expected[s]), 4),
        "error": round(float(err[s]), 4),
    } for s in sorted(top.tolist())]
    bits = int(scored.signals[j])
    signals = [name for b, name in enumerate(signal_names) if bits >> b & 1] or ["model"]
    observed_total = float(np.nansum(kwh))
    expected_total = float(expected.sum())
    ratio = observed_total / expected_total if expected_total > 0 else float("inf")
    worst = int(top[0]) if len(top) else 0
    summary = (
        f"{base['household_id']} on {base['date']}: {observed_total:.1f} kWh used vs "
        f"{expected_total:.1f} kWh expected ({ratio:.1f}x); largest gaps "
        f"{_span(sorted(top.tolist()))} (observed "
        f"{'n/a' if np.isnan(kwh[worst]) else f'{kwh[worst]:.2f}'} vs expected "
        f"{expected[worst]:.2f} kWh at {_hhmm(worst)}); signals: {', '.join(signals)}")
    return {**base, "score": float(scored.score[j]), "threshold": threshold,
            "model_version": model_version, "signals": signals, "imputed_slots": missing,
            "observed_kwh_total": round(observed_total, 4),
            "expected_kwh_total": round(expected_total, 4), "top_slots": slots,
            "summary": summary}


def _hhmm(slot: int) -> str:
    return f"{slot // 2:02d}:{30 * (slot % 2):02d}"


def _span(slots: list[int]) -> str:
    """'17:00-19:00, 02:30-03:00' for sorted slot indices (runs merged)."""
    if not slots:
        return "none"
    runs, start, prev = [], slots[0], slots[0]
    for s in [*slots[1:], None]:
        if s is not None and s == prev + 1:
            prev = s
            continue
        end = prev + 1
        runs.append(f"{_hhmm(start)}-{'24:00' if end == SLOTS else _hhmm(end)}")
        if s is not None:
            start = prev = s
    return ", ".join(runs)
