"""Sustained changes in the running service: ``model.sustained`` over every scored day.

The day scorer asks "is this day unusual for this household?"; this stage asks "has this
household's use fallen, or its meter started to fail, and since when?" (``model.sustained``:
one-sided CUSUMs on four daily statistics, alerting on four signatures). It runs on the
event loop, after a batch is scored: the update is a few dozen numpy operations over the
batch's rows (``SustainedTracker.update``; measured 9-14 ms per 10,000 days, about 1 us a
day, on the shared 2-vCPU machine on 2026-11-26), cheaper than shipping the state to the
scorer process and back, and it leaves the scorer's interface unchanged.

Where the state lives and how it survives (nothing here is new protocol):

* the household table (``stream.households``) holds the sustained state as extra columns
  (``model.sustained.storage_columns``, prefix ``sustained_``, 62 bytes a household in
  float16, int16 and uint16 days), next to the day model's;
* every day score's ``state`` carries the household's sustained state after that day too,
  and the state topic's snapshots carry the columns: recovery (``stream.recovery``)
  restores them exactly as it restores the day model's state, so a restarted or newly
  assigned owner continues every CUSUM where the last published day left it;
* a day that raises a change publishes a ``sustained_change`` record
  (``stream.events.SustainedChange``) on the alerts topic, keyed by the household, in the
  same step as the day's alert; the day score names it (``sustained_change``) so that
  recovery republishes it if a crash fell between the two steps. Days are never scored
  twice, so a change is never raised twice.

Readers of the alerts topic tell the two records apart by ``type``: ``sustained_change``
records have it, day alerts do not.
The counter ``meterwatch_sustained_changes_total{signature}`` counts the records built.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter

from meterwatch.model.features import ContextTables
from meterwatch.model.sustained import (
    COLUMN_PREFIX,
    SustainedDetector,
    SustainedState,
    daily_temperature,
    from_columns,
    to_columns,
    to_storage,
)
from meterwatch.model.torch_scoring import ranks
from meterwatch.stream.events import SCHEMA_VERSION
from meterwatch.stream.outputs import OutRecord, json_record

log = logging.getLogger(__name__)
_EPOCH = dt.date(1970, 1, 1)


class SustainedTracker:
    """Updates the sustained state of a household table for scored days; builds the
    ``sustained_change`` records (module docstring)."""

    def __init__(self, detector: SustainedDetector | None = None, *,
                 changes: Counter | None = None) -> None:
        self.detector = detector or SustainedDetector()
        #: ``meterwatch_sustained_changes_total{signature}`` (``stream.metrics``): records
        #: built; without one, a counter on a registry of its own
        self.changes = changes if changes is not None else Counter(
            "meterwatch_sustained_changes", "sustained_change records built, by signature",
            ["signature"], registry=CollectorRegistry())

    def update(self, columns: dict[str, np.ndarray], households: np.ndarray,
               kwh: np.ndarray, day: np.ndarray, tables: ContextTables | None = None
               ) -> tuple[dict[str, np.ndarray], dict[int, dict[str, Any]]]:
        """Days of a household table's households: ``households`` (N,) indices into
        ``columns`` (the table's state columns), (N, 48) kWh, (N,) days; each household's
        rows in date order; ``tables``: the service's side tables, whose daily weather
        gives each day its temperature (``model.sustained.daily_temperature``; without
        weather, or on a day it lacks, the heating rules stay out of it). The columns are
        updated in place (each household ends at the state after its newest row). Returns
        the state after each row (columns named like the table's, for the day scores) and
        the changes raised, by row
        (``SustainedResult.describe``). Should the update fail (a bug: nothing a valid
        reading can cause), the batch's days keep their state and it is logged, rather
        than the service stopping."""
        try:
            return self._update(columns, households, kwh, day, tables)
        except Exception:
            log.exception("the sustained-change update of %d days failed; their sustained "
                          "state is left as it was", len(day))
            return {}, {}

    def _update(self, columns: dict[str, np.ndarray], households: np.ndarray,
                kwh: np.ndarray, day: np.ndarray, tables: ContextTables | None
                ) -> tuple[dict[str, np.ndarray], dict[int, dict[str, Any]]]:
        n = len(day)
        temperature = daily_temperature(tables, np.asarray(day))
        hi = np.asarray(households, np.int64)
        # wave w: every household's w-th row of the batch by date
        rank, _ = ranks(hi, np.asarray(day))
        after = {COLUMN_PREFIX + f.name: np.empty((n, *columns[COLUMN_PREFIX + f.name].shape[1:]),
                                                  columns[COLUMN_PREFIX + f.name].dtype)
                 for f in fields(SustainedState)}
        changes: dict[int, dict[str, Any]] = {}
        for w in range(int(rank.max()) + 1 if n else 0):
            rows = np.flatnonzero(rank == w)
            res = self.detector.update(kwh[rows], day[rows], from_columns(columns, hi[rows]),
                                       temperature[rows])
            to_columns(res.state, columns, hi[rows])
            for f in fields(SustainedState):
                after[COLUMN_PREFIX + f.name][rows] = to_storage(f.name,
                                                                 getattr(res.state, f.name))
            for j in np.flatnonzero(res.alert).tolist():
                doc = res.describe(j)
                assert doc is not None
                changes[int(rows[j])] = doc
                self.changes.labels(signature=doc["signature"]).inc()
        return after, changes


def change_record(change: dict[str, Any], household_id: str, day: int, *,
                  model_version: str, created_at: str | None = None) -> dict[str, Any]:
    """The ``sustained_change`` document (``stream.events.SustainedChange``) of a change
    (``SustainedResult.describe``) found on ``day`` of ``household_id``."""
    date = _EPOCH + dt.timedelta(days=int(day))
    start = dt.date.fromisoformat(change["start_date"])
    days = (date - start).days + 1
    factor = change.get("factor")
    size = (f"to {factor:.2f}x its usual level" if factor is not None
            else f"by {change['shift']:+.2f}")
    summary = (f"{household_id} since {start.isoformat()} ({days} days): {change['what']}, "
               f"{size}")
    return {"schema_version": SCHEMA_VERSION, "type": "sustained_change",
            "household_id": household_id, "date": date.isoformat(),
            "start_date": change["start_date"], "days": days,
            "signature": change["signature"],
            "statistic": change["statistic"], "direction": change["direction"],
            "what": change["what"], "shift": change["shift"], "shift_sd": change["shift_sd"],
            "factor": factor, "changed": change["changed"],
            "created_at": created_at or dt.datetime.now(dt.timezone.utc).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "model_version": model_version, "summary": summary}


def change_records(changes: dict[int, dict[str, Any]], day_scores: Sequence[dict[str, Any]],
                   topic: str, partition: int, *, model_version: str) -> list[OutRecord]:
    """The records of ``changes`` (by row of ``day_scores``); each day score names its
    change (``sustained_change``), so that recovery can complete a missing record."""
    out = []
    for row, change in sorted(changes.items()):
        score = day_scores[row]
        doc = change_record(change, score["household_id"],
                            (dt.date.fromisoformat(score["date"]) - _EPOCH).days,
                            model_version=model_version)
        score["sustained_change"] = doc
        out.append(json_record(topic, partition, doc["household_id"], doc))
    return out

