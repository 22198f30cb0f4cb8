"""Day assembly: readings of one partition become complete household-days.

State is columnar and compact (no object per reading or per day):

* per household (index ``h``): ``open_row[h]`` (the row of its open day, -1 if none),
  ``closed_max[h]`` and ``closed_mask[h]`` (a 64-day bitmap of closed days ending at
  ``closed_max``), and the model's running household state (level, error statistics);
* per open day (row ``r``): 48 float32 slots, a bitmap of the slots seen, the household,
  the day, the readings count, the first Kafka offset and the latest Kafka timestamp.
  A household rarely has two open days (around midnight); the second lives in ``_extra``.

Policies (documented in the README, tested in ``tests/test_assembler.py``):

* **Duplicate** reading for a slot already filled: the first value is kept, the duplicate
  is counted (``meterwatch_duplicate_readings_total``). Replays after a restart are
  therefore idempotent.
* **Late** reading for a day already closed, or 64+ days older than the household's newest
  closed day: dropped and counted (``meterwatch_late_readings_total``).
* **Watermark**: the partition's event-time watermark is the largest reading timestamp
  seen. A day whose end plus ``grace_s`` is behind the watermark is closed: with at most
  ``max_imputed`` slots missing it is scored with those slots imputed (status ``imputed``),
  otherwise it is reported as ``incomplete`` (data-quality topic) and not scored.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
from dataclasses import dataclass, field

import numpy as np

from meterwatch.model import HouseholdState
from meterwatch.stream.parse import ParsedBatch
from meterwatch.stream.timegrid import SLOTS, TimeGrid

log = logging.getLogger(__name__)

COMPLETE, IMPUTED, INCOMPLETE = 0, 1, 2
_EPOCH = _dt.date(1970, 1, 1)
_date = _dt.date.fromisoformat
STATUS_NAMES = ("scored", "imputed", "incomplete")
_NO_DAY = np.iinfo(np.int32).min // 2
_MASK_DAYS = 64


@dataclass
class ClosedDays:
    """Household-days that left the assembler, columnar."""

    household_index: np.ndarray  # int32, index into the assembler's household table
    household_ids: list[str]
    day: np.ndarray  # int32 local day
    kwh: np.ndarray  # float32 (n, 48), NaN where a slot is missing
    status: np.ndarray  # uint8: COMPLETE | IMPUTED | INCOMPLETE
    readings: np.ndarray  # int16 readings received
    expected: np.ndarray  # int16 readings expected (46/48/50)
    first_offset: np.ndarray  # int64 lowest Kafka offset among the day's readings
    last_ts_ms: np.ndarray  # int64 Kafka timestamp of the day's newest reading
    seq: np.ndarray  # int64 per-household count of closed days, this one included

    def __len__(self) -> int:
        return len(self.day)

    @classmethod
    def empty(cls) -> ClosedDays:
        return cls(np.empty(0, np.int32), [], np.empty(0, np.int32),
                   np.empty((0, SLOTS), np.float32), np.empty(0, np.uint8),
                   np.empty(0, np.int16), np.empty(0, np.int16), np.empty(0, np.int64),
                   np.empty(0, np.int64), np.empty(0, np.int64))

    def select(self, mask: np.ndarray) -> ClosedDays:
        idx = np.flatnonzero(mask)
        return ClosedDays(self.household_index[idx], [self.household_ids[i] for i in idx],
                          self.day[idx], self.kwh[idx], self.status[idx], self.readings[idx],
                          self.expected[idx], self.first_offset[idx], self.last_ts_ms[idx],
                          self.seq[idx])

    @staticmethod
    def concat(parts: list[ClosedDays]) -> ClosedDays:
        parts = [p for p in parts if len(p)]
        if not parts:
            return ClosedDays.empty()
        if len(parts) == 1:
            return parts[0]
        return ClosedDays(
            np.concatenate([p.household_index for p in parts]),
            [h for p in parts for h in p.household_ids],
            np.concatenate([p.day for p in parts]), np.concatenate([p.kwh for p in parts]),
            np.concatenate([p.status for p in parts]),
            np.concatenate([p.readings for p in parts]),
            np.concatenate([p.expected for p in parts]),
            np.concatenate([p.first_offset for p in parts]),
            np.concatenate([p.last_ts_ms for p in parts]),
            np.concatenate([p.seq for p in parts]))


def state_row(columns: dict[str, np.ndarray], i: int) -> dict[str, object]:
    """Row ``i`` of state columns, for orjson with ``OPT_SERIALIZE_NUMPY`` (numpy scalars
    and vectors as they are; NaN becomes null)."""
    return {name: col[i] for name, col in columns.items()}


def state_rows(columns: dict[str, np.ndarray]) -> list[dict[str, object]]:
    """Every row of state columns, as ``state_row`` gives them (one pass per column)."""
    names = list(columns)
    return [dict(zip(names, row, strict=True))
            for row in zip(*(list(c) for c in columns.values()), strict=True)]


def load_state_row(columns: dict[str, np.ndarray], i: int, doc: dict) -> None:
    """Inverse of ``state_row`` (missing keys keep their value)."""
    for name, col in columns.items():
        v = doc.get(name)
        if v is None:
            continue
        col[i] = np.array(v, dtype=np.float64)  # None inside a list becomes NaN


@dataclass
class AddResult:
    closed: ClosedDays
    accepted: int = 0
    duplicates: int = 0
    late: int = 0


@dataclass
class HouseholdTable:
    """Households of one partition: ids, closed-day bitmaps, model state columns."""

    ids: list[str] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)
    open_row: np.ndarray = field(default_factory=lambda: np.empty(0, np.int32))
    closed_max: np.ndarray = field(default_factory=lambda: np.empty(0, np.int32))
    closed_mask: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))
    seq: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    #: the model's per-household state, one column per ``model.HouseholdState`` field
    state: dict[str, np.ndarray] = field(default_factory=lambda: {
        f.name: getattr(HouseholdState.empty(0), f.name)
        for f in dataclasses.fields(HouseholdState)})

    def __len__(self) -> int:
        return len(self.ids)

    def lookup(self, households: list[str]) -> np.ndarray:
        """Indices of the households, adding the new ones."""
        found = list(map(self.index.get, households))
        if None not in found:
            return np.array(found, dtype=np.int32)
        idx = np.array([-1 if i is None else i for i in found], dtype=np.int32)
        missing = np.flatnonzero(idx < 0)
        if len(missing):
            for j in missing:
                h = households[j]
                i = self.index.get(h)
                if i is None:
                    i = self.index[h] = len(self.ids)
                    self.ids.append(h)
                idx[j] = i
            self._grow(len(self.ids))
        return idx

    def _grow(self, n: int) -> None:
        cap = len(self.open_row)
        if n <= cap:
            return
        new_cap = max(n, cap * 2, 1024)

        def grow(a: np.ndarray, fill: object) -> np.ndarray:
            b = np.empty((new_cap, *a.shape[1:]), dtype=a.dtype)
            b[:] = fill
            b[:cap] = a
            return b

        self.open_row = grow(self.open_row, -1)
        self.closed_max = grow(self.closed_max, _NO_DAY)
        self.closed_mask = grow(self.closed_mask, 0)
        self.seq = grow(self.seq, 0)
        fresh = HouseholdState.empty(1)
        for name, arr in self.state.items():
            self.state[name] = grow(arr, getattr(fresh, name)[0])

    def state_column(self, name: str) -> np.ndarray:
        return self.state[name]

    def snapshot(self, h: int) -> dict[str, object]:
        """The household's durable state (a record of the compacted state topic)."""
        return {"seq": int(self.seq[h]), "closed_max": int(self.closed_max[h]),
                "closed_mask": int(self.closed_mask[h]), **state_row(self.state, h)}

    def restore(self, household_id: str, doc: dict) -> None:
        """Load a household's durable state (from ``snapshot``)."""
        h = int(self.lookup([household_id])[0])
        self.seq[h] = doc["seq"]
        self.closed_max[h] = doc["closed_max"]
        self.closed_mask[h] = np.uint64(doc["closed_mask"])
        load_state_row(self.state, h, doc)

    def restore_day(self, day_score: dict) -> None:
        """Apply a published day score: the day is closed; a newer state wins."""
        h = int(self.lookup([day_score["household_id"]])[0])
        day = (_date(day_score["date"]) - _EPOCH).days
        if self.is_closed(np.array([h]), np.array([day]))[0]:
            return
        seq = int(self.seq[h])
        self.mark_closed(h, day)
        self.seq[h] = max(seq, int(day_score["seq"]))
        if int(day_score["seq"]) > seq and day_score.get("state"):
            load_state_row(self.state, h, day_score["state"])

    def is_closed(self, h: np.ndarray, day: np.ndarray) -> np.ndarray:
        """Whether each (household, day) was closed already (or is too old to reopen)."""
        back = self.closed_max[h].astype(np.int64) - day
        in_mask = (back >= 0) & (back < _MASK_DAYS)
        bit = np.left_shift(np.uint64(1), np.clip(back, 0, _MASK_DAYS - 1).astype(np.uint64))
        return (in_mask & ((self.closed_mask[h] & bit) != 0)) | (back >= _MASK_DAYS) & \
            (self.closed_max[h] != _NO_DAY)

    def mark_closed(self, h: int, day: int) -> None:
        cm = int(self.closed_max[h])
        mask = int(self.closed_mask[h])
        if cm == _NO_DAY or day > cm:
            shift = day - cm if cm != _NO_DAY else _MASK_DAYS
            mask = (mask << shift) & 0xFFFF_FFFF_FFFF_FFFF if shift < _MASK_DAYS else 0
            self.closed_max[h] = day
            mask |= 1
        elif cm - day < _MASK_DAYS:
            mask |= 1 << (cm - day)
        self.closed_mask[h] = np.uint64(mask)
        self.seq[h] += 1


class DayAssembler:
    """Assembles the household-days of one input partition."""

    def __init__(self, grid: TimeGrid, *, grace_s: float = 3600.0, max_imputed: int = 4,
                 initial_rows: int = 1024) -> None:
        self.grid = grid
        self.grace_s = grace_s
        self.max_imputed = max_imputed
        self.households = HouseholdTable()
        self.watermark = np.iinfo(np.int64).min
        self._next_close_check = np.iinfo(np.int64).min
        n = initial_rows
        self.kwh = np.full((n, SLOTS), np.nan, dtype=np.float32)
        self.seen = np.zeros(n, dtype=np.uint64)  # bitmap of first-occurrence slots
        self.row_hh = np.full(n, -1, dtype=np.int32)
        self.row_day = np.zeros(n, dtype=np.int32)
        self.row_n = np.zeros(n, dtype=np.int16)
        self.row_first = np.zeros(n, dtype=np.int64)
        self.row_last_ts = np.zeros(n, dtype=np.int64)
        self._free = list(range(n - 1, -1, -1))
        self._extra: dict[int, dict[int, int]] = {}  # h -> {day: row}, second open days
        self._repeats: dict[tuple[int, int], float] = {}  # (row, slot) -> repeated reading

    # -- queries ---------------------------------------------------------------------------
    @property
    def open_days(self) -> int:
        return int((self.row_hh >= 0).sum())

    def low_offset(self) -> int | None:
        """The lowest Kafka offset any open day still needs (None when nothing is open)."""
        used = self.row_hh >= 0
        return int(self.row_first[used].min()) if used.any() else None

    def memory_bytes(self) -> int:
        arrays = (self.kwh, self.seen, self.row_hh, self.row_day, self.row_n, self.row_first,
                  self.row_last_ts)
        return sum(a.nbytes for a in arrays)

    # -- updates ---------------------------------------------------------------------------
    def add(self, batch: ParsedBatch, offsets: np.ndarray, timestamps_ms: np.ndarray) -> AddResult:
        """Add a parsed batch; ``offsets``/``timestamps_ms`` are per source record."""
        if len(batch) == 0:
            return AddResult(self.close_expired())
        hh = self.households.lookup(batch.ids)[batch.id_index]
        day, slot, repeat = self.grid.locate(batch.ts)
        off = offsets[batch.record]
        kts = timestamps_ms[batch.record]
        self.watermark = max(self.watermark, int(batch.ts.max()))

        closed = self.households.is_closed(hh, day)
        late = int(closed.sum())
        keep = ~closed
        hh, day, slot, repeat, kwh, off, kts = (a[keep] for a in (hh, day, slot, repeat,
                                                                  batch.kwh, off, kts))
        rows = self._rows_for(hh, day)

        # Duplicates inside the batch: keep the first of each (row, slot, repeat).
        key = (rows.astype(np.int64) * 128 + slot.astype(np.int64) * 2 + repeat)
        _, first = np.unique(key, return_index=True)
        dup_mask = np.ones(len(key), dtype=bool)
        dup_mask[first] = False
        # Duplicates against what the rows already hold.
        bits = np.left_shift(np.uint64(1), slot.astype(np.uint64))
        primary = ~repeat
        dup_mask |= primary & ((self.seen[rows] & bits) != 0)
        if repeat.any():
            for j in np.flatnonzero(repeat & ~dup_mask):
                k = (int(rows[j]), int(slot[j]))
                if k in self._repeats:
                    dup_mask[j] = True
                else:
                    self._repeats[k] = float(kwh[j])
        duplicates = int(dup_mask.sum())
        new = ~dup_mask
        p = new & primary
        self.kwh[rows[p], slot[p]] = kwh[p]
        np.bitwise_or.at(self.seen, rows[p], bits[p])
        np.add.at(self.row_n, rows[new], 1)
        np.minimum.at(self.row_first, rows, off)
        np.maximum.at(self.row_last_ts, rows[new], kts[new])

        touched = np.unique(rows[new])
        exp = self._expected(self.row_day[touched])
        done = touched[self.row_n[touched] >= exp]
        result = AddResult(self._emit(done, COMPLETE), accepted=int(new.sum()),
                           duplicates=duplicates, late=late)
        expired = self.close_expired()
        if len(expired):
            result.closed = ClosedDays.concat([result.closed, expired])
        return result

    def close_expired(self, *, force: bool = False) -> ClosedDays:
        """Close the days the watermark has passed by more than the grace period."""
        if not force and self.watermark < self._next_close_check:
            return ClosedDays.empty()
        used = np.flatnonzero(self.row_hh >= 0)
        if len(used) == 0:
            self._next_close_check = np.iinfo(np.int64).max
            return ClosedDays.empty()
        ends = self.grid.day_ends(self.row_day[used]) + int(self.grace_s)
        expired = used[ends <= self.watermark] if not force else used
        pending = ends[ends > self.watermark]
        self._next_close_check = int(pending.min()) if len(pending) else np.iinfo(np.int64).max
        if len(expired) == 0:
            return ClosedDays.empty()
        missing = self._expected(self.row_day[expired]) - self.row_n[expired]
        imputed = expired[missing <= self.max_imputed]
        incomplete = expired[missing > self.max_imputed]
        return ClosedDays.concat([self._emit(imputed, IMPUTED),
                                  self._emit(incomplete, INCOMPLETE)])

    def drop_all(self) -> None:
        """Forget every open day (the partition was revoked)."""
        self.row_hh[:] = -1
        self.kwh[:] = np.nan
        self.seen[:] = 0
        self.row_n[:] = 0
        self._free = list(range(len(self.row_hh) - 1, -1, -1))
        self._extra.clear()
        self._repeats.clear()
        self.households.open_row[:] = -1

    # -- internals -------------------------------------------------------------------------
    def _expected(self, days: np.ndarray) -> np.ndarray:
        if self.grid.is_utc:
            return np.full(len(days), SLOTS, dtype=np.int16)
        uniq, inv = np.unique(days, return_inverse=True)
        exp = np.array([self.grid.expected_readings(int(d)) for d in uniq], dtype=np.int16)
        return exp[inv]

    def _rows_for(self, hh: np.ndarray, day: np.ndarray) -> np.ndarray:
        """Row of each (household, day), allocating rows for days not open yet."""
        households = self.households
        rows = households.open_row[hh]
        ok = (rows >= 0) & (self.row_day[np.maximum(rows, 0)] == day)
        if ok.all():
            return rows
        rows = rows.copy()
        bad = np.flatnonzero(~ok)
        keys = (hh[bad].astype(np.int64) << 32) | (day[bad].astype(np.int64) - _NO_DAY)
        uniq, inv = np.unique(keys, return_inverse=True)
        found = np.empty(len(uniq), dtype=np.int32)
        for i, k in enumerate(uniq.tolist()):
            h, d = k >> 32, (k & 0xFFFFFFFF) + _NO_DAY
            r = self._extra.get(h, {}).get(d)
            if r is None:
                r = self._allocate(h, d)
            found[i] = r
        rows[bad] = found[inv]
        return rows

    def _allocate(self, h: int, day: int) -> int:
        if not self._free:
            self._grow_rows()
        r = self._free.pop()
        self.row_hh[r] = h
        self.row_day[r] = day
        self.row_n[r] = 0
        self.row_first[r] = np.iinfo(np.int64).max
        self.row_last_ts[r] = 0
        self.seen[r] = 0
        self.kwh[r] = np.nan
        open_row = self.households.open_row
        if open_row[h] < 0:
            open_row[h] = r
        else:
            self._extra.setdefault(h, {})[day] = r
        # A new day may be behind the watermark already (a late first reading).
        end = self.grid.bounds(day)[1] + int(self.grace_s)
        self._next_close_check = min(self._next_close_check, end)
        return r

    def _grow_rows(self) -> None:
        n = len(self.row_hh)
        m = n * 2

        def grow(a: np.ndarray, fill: object) -> np.ndarray:
            b = np.full((m, *a.shape[1:]), fill, dtype=a.dtype)
            b[:n] = a
            return b

        self.kwh = grow(self.kwh, np.nan)
        self.seen = grow(self.seen, 0)
        self.row_hh = grow(self.row_hh, -1)
        self.row_day = grow(self.row_day, 0)
        self.row_n = grow(self.row_n, 0)
        self.row_first = grow(self.row_first, 0)
        self.row_last_ts = grow(self.row_last_ts, 0)
        self._free.extend(range(m - 1, n - 1, -1))

    def _emit(self, rows: np.ndarray, status: int) -> ClosedDays:
        if len(rows) == 0:
            return ClosedDays.empty()
        rows = np.sort(rows)
        hh = self.row_hh[rows].copy()
        days = self.row_day[rows].copy()
        kwh = self.kwh[rows].copy()
        if self._repeats:  # autumn DST: a repeated slot scores the mean of its two readings
            for i, r in enumerate(rows.tolist()):
                for s in range(SLOTS):
                    v = self._repeats.pop((r, s), None)
                    if v is not None:
                        kwh[i, s] = v if np.isnan(kwh[i, s]) else (kwh[i, s] + v) / 2.0
        out = ClosedDays(
            household_index=hh, household_ids=[self.households.ids[h] for h in hh],
            day=days, kwh=kwh, status=np.full(len(rows), status, dtype=np.uint8),
            readings=self.row_n[rows].copy(), expected=self._expected(days),
            first_offset=self.row_first[rows].copy(), last_ts_ms=self.row_last_ts[rows].copy(),
            seq=np.empty(len(rows), dtype=np.int64))
        households = self.households
        for i, (r, h, d) in enumerate(zip(rows.tolist(), hh.tolist(), days.tolist(), strict=True)):
            households.mark_closed(h, d)
            out.seq[i] = households.seq[h]
            extra = self._extra.get(h)
            if households.open_row[h] == r:
                # promote another open day of this household, if any
                households.open_row[h] = extra.pop(min(extra)) if extra else -1
            elif extra is not None:
                extra.pop(d, None)
            if extra is not None and not extra:
                del self._extra[h]
            self.row_hh[r] = -1
            self._free.append(r)
        return out
