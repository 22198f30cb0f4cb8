"""Day assembly: readings of one partition become closed household-days, in date order.

State is columnar and compact (no Python object per reading, per day or per household):

* per household (``stream.households.HouseholdTable``): id, the row of its open day, its
  newest closed day and closed-day count (``seq``), the model's running state;
* per open day (row ``r``): 48 slots of 1/10,000 kWh in uint16 (exact for readings with at
  most 4 decimals up to 6.5534 kWh; 65535 marks a slot not seen yet; a day with any other
  reading keeps float32 slots in ``_wide``), the household, the day (uint16 above a base),
  the first Kafka offset and the latest Kafka timestamp (uint32 above a base; exact,
  ``RelativeColumn``); its readings are counted from its slots (``_readings``). A household
  rarely has two open days (around midnight); the others live in ``_extra``.

Rules (docs/assembler.md; tested in ``tests/test_assembler.py``). Readings are taken in
stream order, and every decision about a reading depends only on the readings before it in
the partition, never on fetch boundaries or producer batching:

* **Duplicate** reading for a slot already filled: the first value is kept, the duplicate
  is counted (``meterwatch_duplicate_readings_total``). Replays are idempotent.
* **Watermark**: the ``watermark_quorum``-th newest (default 3rd) of the newest readings of
  the households that have sent at least 48 readings (in a partition of fewer than 5 such
  households, the ceil(n/2)-th). A day whose end
  plus ``grace_s`` is at or behind the watermark is closed: with at most ``max_imputed``
  slots missing it is scored with those imputed (status ``imputed``), else reported
  ``incomplete``. One
  household (one reading dated today, or a meter with a wrong clock) cannot close anything.
* **Late** (dropped and counted, ``meterwatch_late_readings_total``): a reading whose day
  was behind the watermark as it stood just before the reading, or whose day is on or
  before its household's newest closed day.
* **Date order**: a household's days close in date order; a complete day waits behind an
  earlier open day of its household until that one closes (complete, or by the
  watermark), so ``seq`` and the state that scoring writes back follow the calendar.
* **Idle households**: one silent for ``idle_evict_days`` (default 60) starts again as a
  new household when it returns (population statistics, ``seq`` from 1); ``evict_idle``
  frees its memory meanwhile (its last state stays on the compacted state topic).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from meterwatch.stream.households import (
    NO_DAY,
    HouseholdTable,
    Int24,
    grown,
    next_capacity,
    zeros,
)
from meterwatch.stream.parse import ParsedBatch
from meterwatch.stream.timegrid import DAY_S, SLOTS, TimeGrid

log = logging.getLogger(__name__)

COMPLETE, IMPUTED, INCOMPLETE = 0, 1, 2
STATUS_NAMES = ("scored", "imputed", "incomplete")
_MIN_TS = np.iinfo(np.int64).min // 4


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


class DayAssembler:
    """Assembles the household-days of one input partition (rules: module docstring)."""

    def __init__(self, grid: TimeGrid, *, grace_s: float = 3600.0, max_imputed: int = 4,
                 initial_rows: int = 1024, watermark_quorum: int = 3,
                 idle_evict_days: int = 60) -> None:
        self.grid = grid
        self.grace_s = grace_s
        self.max_imputed = max_imputed
        self.quorum = max(1, watermark_quorum)
        self.idle_evict_days = idle_evict_days
        self.households = HouseholdTable()
        self.households.fit_rows(initial_rows)
        self.watermark = _MIN_TS
        #: the (at most ``quorum``) households with the newest readings, and those readings
        self._top_h = np.empty(0, dtype=np.int32)
        self._top_ts = np.empty(0, dtype=np.int64)
        self._next_close_check = _MIN_TS
        n = initial_rows
        # 1/10,000 kWh, _MISSING where no reading yet (see _wide); set when allocated
        self.kwh = np.zeros((n, SLOTS), dtype=np.uint16)
        #: the household of each row (-1: free): 3 bytes while household indices are below
        #: ``Int24.LIMIT``, int32 past it (``_allocate``)
        self.row_hh = Int24(n, fill=-1)
        self._relative_columns(n)
        self._free = np.arange(n - 1, -1, -1, dtype=np.int32)  # a stack: _free[:_nfree]
        self._nfree = n
        self._open = 0
        #: rows holding a reading that 1/10,000 kWh steps cannot hold exactly: float32 slots
        self._wide: dict[int, np.ndarray] = {}
        self._extra: dict[int, dict[int, int]] = {}  # h -> {day: row}, further open days
        self._waiting: set[int] = set()  # complete rows behind an open earlier day
        self._repeats: dict[tuple[int, int], float] = {}  # (row, slot) -> repeated reading
        self._repeat_n: dict[int, int] = {}  # row -> its entries in _repeats
        self.evicted = 0

    def _relative_columns(self, n: int) -> None:
        self.row_day = RelativeColumn(n, empty=0, wide_empty=0, dtype=np.uint16,
                                      wide=np.int32)  # days since 1970
        self.row_first = RelativeColumn(n, empty=_NONE, wide_empty=np.iinfo(np.int64).max)
        self.row_last_ts = RelativeColumn(n, empty=0, wide_empty=0)

    # -- queries ---------------------------------------------------------------------------
    @property
    def open_days(self) -> int:
        return self._open

    def low_offset(self) -> int | None:
        """The lowest Kafka offset any open day still needs (None when nothing is open)."""
        if self._open == 0:
            return None
        used = self.row_hh.nonnegative()
        return int(self.row_first.get(used).min())

    def memory_bytes(self) -> int:
        """Bytes of the day rows and the household table (arrays; not Python overhead)."""
        arrays = (self.kwh, self.row_hh, self.row_day, self.row_first,
                  self.row_last_ts, self._free)
        return (sum(a.nbytes for a in arrays) + SLOTS * 4 * len(self._wide)
                + self.households.memory_bytes())

    # -- updates ---------------------------------------------------------------------------
    def add(self, batch: ParsedBatch, offsets: np.ndarray, timestamps_ms: np.ndarray) -> AddResult:
        """Add a parsed batch; ``offsets``/``timestamps_ms`` are per source record.

        Readings are taken in stream order (source record, then position in the record);
        every decision about a reading depends only on the readings before it in the
        partition, never on where fetches begin and end.
        """
        if len(batch) == 0:
            return AddResult(self._close_round(np.empty(0, dtype=np.int64)))
        households = self.households
        order: np.ndarray | slice = slice(None)
        if len(batch) > 1 and (np.diff(batch.record) < 0).any():
            order = np.argsort(batch.record, kind="stable")
        hh = households.lookup(batch.ids)[batch.id_index][order]
        ts = batch.ts[order]
        kwh_in = batch.kwh[order]
        rec = batch.record[order]
        day, slot, repeat = self.grid.locate(ts)
        off = offsets[rec]
        kts = timestamps_ms[rec]

        # Late: behind the watermark as it stood before the reading, or a day of the
        # household that is closed or older than its newest closed day.
        threshold = self.grid.day_ends(day) + int(self.grace_s)
        late_mask = self._advance_watermark(hh, ts, threshold)
        late_mask |= households.is_closed(hh, day)
        late = int(late_mask.sum())
        keep = ~late_mask
        hh, day, slot, repeat, kwh, off, kts = (a[keep] for a in (hh, day, slot, repeat,
                                                                  kwh_in, off, kts))
        if len(off):  # (before rows are allocated: only rows in use are rebased)
            self.row_day.fit(int(day.min()), int(day.max()), self.row_hh)
            self.row_first.fit(int(off.min()), int(off.max()), self.row_hh)
            self.row_last_ts.fit(int(kts.min()), int(kts.max()), self.row_hh)
        self._restart_idle(hh, day)
        rows = self._rows_for(hh, day)

        # Duplicates inside the batch: keep the first of each (row, slot, repeat).
        key = (rows.astype(np.int64) * 128 + slot.astype(np.int64) * 2 + repeat)
        _, first = np.unique(key, return_index=True)
        dup_mask = np.ones(len(key), dtype=bool)
        dup_mask[first] = False
        # Duplicates against what the rows already hold (a stored slot is not _MISSING).
        primary = ~repeat
        dup_mask |= primary & (self.kwh[rows, slot] != _MISSING)
        if repeat.any():
            for j in np.flatnonzero(repeat & ~dup_mask):
                k = (int(rows[j]), int(slot[j]))
                if k in self._repeats:
                    dup_mask[j] = True
                else:
                    self._repeats[k] = float(kwh[j])
                    self._repeat_n[k[0]] = self._repeat_n.get(k[0], 0) + 1
        duplicates = int(dup_mask.sum())
        new = ~dup_mask
        p = new & primary
        self._store(rows[p], slot[p], kwh[p])
        np.minimum.at(self.row_first.values, rows, self.row_first.encode(off))
        np.maximum.at(self.row_last_ts.values, rows[new], self.row_last_ts.encode(kts[new]))

        touched = np.unique(rows[new])
        exp = self._expected(self.row_day.get(touched))
        done = touched[self._readings(touched) >= exp]
        return AddResult(self._close_round(done), accepted=int(new.sum()),
                         duplicates=duplicates, late=late)

    def close_expired(self, *, force: bool = False) -> ClosedDays:
        """Close the days the watermark has passed by more than the grace period (``force``:
        every open day)."""
        return self._close_round(np.empty(0, dtype=np.int64), force=force)

    def evict_idle(self, keep: Iterable[int] | Callable[[], Iterable[int]] = ()) -> int:
        """Forget households silent for ``idle_evict_days`` (see the module docstring).

        A household is evicted when it has no open day and its newest closed day is more
        than ``idle_evict_days`` (plus the grace, rounded up to days, plus one) before the
        watermark's day, or when it has neither an open nor a closed day (all its readings
        were late). ``keep``: household indices that must stay (days of theirs still being
        scored or published), or a function giving them (called only when some household
        is idle). Returns how many were evicted.
        """
        if self.watermark == _MIN_TS:
            return 0
        hh = self.households
        n = hh.index.size
        wday = int(self.grid.locate(np.array([self.watermark], dtype=np.int64))[0][0])
        limit = wday - self.idle_evict_days - 1 - int(np.ceil(self.grace_s / DAY_S))
        cm = hh.closed_max[:n]
        idle = hh.index.alive_mask() & (hh.open_row[:n] < 0) & (cm <= limit)
        if not idle.any():
            return 0
        if self._extra:
            idle[list(self._extra)] = False
        keep_arr = np.fromiter(keep() if callable(keep) else keep, dtype=np.int64)
        if len(keep_arr):
            idle[keep_arr[keep_arr < n]] = False
        gone = np.flatnonzero(idle)
        if len(gone):
            hh.evict(gone)
            in_top = np.isin(self._top_h, gone)
            self._top_h, self._top_ts = self._top_h[~in_top], self._top_ts[~in_top]
            self.evicted += len(gone)
            log.debug("evicted %d idle households", len(gone))
        return len(gone)

    def drop_all(self) -> None:
        """Forget every open day (the partition was revoked)."""
        self.row_hh[:] = -1
        n = len(self.row_hh)
        self._relative_columns(n)
        self._free = np.arange(n - 1, -1, -1, dtype=np.int32)
        self._nfree = n
        self._open = 0
        self._extra.clear()
        self._waiting.clear()
        self._repeats.clear()
        self._repeat_n.clear()
        self._wide.clear()
        self.households.open_row[:] = -1

    # -- watermark -------------------------------------------------------------------------
    def _advance_watermark(self, hh: np.ndarray, ts: np.ndarray,
                           threshold: np.ndarray) -> np.ndarray:
        """Which readings are behind the watermark as it stood just before each of them
        (``threshold``: the end of the reading's day plus the grace); then advance it.

        The watermark is the ``quorum``-th newest of the newest readings of established
        households (48 readings or more; ``HouseholdTable.count_readings``): one household,
        however far ahead it reads, or any number of one-reading households, cannot move it.
        The usual fetch needs no per-reading work: a reading is late
        for sure if its threshold is behind the watermark before the fetch, on time for
        sure if it is ahead of every reading before it; only the readings in between are
        decided exactly, per distinct threshold.
        """
        w0 = self.watermark
        late = threshold <= w0
        n = len(ts)
        top_h, top_ts = self._top_h, self._top_ts
        households = self.households
        counts, established = households.count_readings(hh)
        quorum = np.maximum(1, np.minimum(self.quorum, (established + 1) // 2))
        before = np.maximum.accumulate(ts)
        bound = np.empty(n, dtype=np.int64)
        bound[0] = w0
        np.maximum(before[:-1], w0, out=bound[1:])
        unsure = ~late & (threshold <= bound)
        if unsure.any():
            positions = np.arange(n)
            q0 = max(1, min(self.quorum, (households.established_before + 1) // 2))
            for theta in np.unique(threshold[unsure]).tolist():
                ahead = top_h[top_ts >= theta]  # households already past theta
                at = np.flatnonzero((ts >= theta) & counts)
                h_at, first = np.unique(hh[at], return_index=True)
                firsts = np.sort(at[first[~np.isin(h_at, ahead)]])
                # the first reading after which enough households are past theta
                reached = len(ahead) + np.arange(1, len(firsts) + 1) >= quorum[firsts]
                cross = (-1 if len(ahead) >= q0 else
                         int(firsts[np.argmax(reached)]) if reached.any() else n)
                sel = unsure & (threshold == theta)
                late[sel] = positions[sel] > cross
        # The quorum-th newest household reading after this fetch. Candidates: households
        # with a counting reading at or after ``cut``, lowered until it spans ``quorum``
        # households (one whose readings are all older cannot be among the newest).
        cts, chh = ts[counts], hh[counts]
        if len(cts):
            cut = int(cts.max())
            while True:
                sel = cts >= cut
                uh, inv = np.unique(chh[sel], return_inverse=True)
                older = cts[~sel]
                if len(uh) >= self.quorum or len(older) == 0:
                    break
                cut = int(older.max())
            newest = np.full(len(uh), _MIN_TS, dtype=np.int64)
            np.maximum.at(newest, inv, cts[sel])
            cand_h = np.concatenate([top_h, uh.astype(np.int32)])
            cand_ts = np.concatenate([top_ts, newest])
            o = np.lexsort((-cand_ts, cand_h))
            first = np.r_[True, cand_h[o][1:] != cand_h[o][:-1]]
            cand_h, cand_ts = cand_h[o][first], cand_ts[o][first]
            best = np.argsort(-cand_ts, kind="stable")[:self.quorum]
            self._top_h, self._top_ts = cand_h[best], cand_ts[best]
        q_end = int(quorum[-1])
        if len(self._top_ts) >= q_end:
            self.watermark = max(w0, int(self._top_ts[q_end - 1]))
        return late

    # -- internals -------------------------------------------------------------------------
    def _restart_idle(self, hh: np.ndarray, day: np.ndarray) -> None:
        """A household back after ``idle_evict_days`` or more starts again as a new one,
        whether it was evicted meanwhile or not (so eviction changes no result)."""
        households = self.households
        cm = households.closed_max[hh]
        back = (cm != NO_DAY) & (day.astype(np.int64) - cm >= self.idle_evict_days)
        if back.any():
            hs = np.unique(hh[back])
            hs = hs[households.open_row[hs] < 0]
            if self._extra:
                hs = hs[~np.isin(hs, list(self._extra))]
            households.reset(hs)

    def _readings(self, rows: np.ndarray) -> np.ndarray:
        """Readings each row has accepted (int16): its seen slots, plus its repeated
        half-hours (autumn DST). Counted, not stored (a day's count is its slots')."""
        n = np.empty(len(rows), dtype=np.int16)
        for lo in range(0, len(rows), 1 << 16):  # slices: a bounded transient however many
            r = rows[lo:lo + (1 << 16)]
            n[lo:lo + len(r)] = (self.kwh[r] != _MISSING).sum(axis=1)
        if self._repeat_n:
            n += np.array([self._repeat_n.get(r, 0) for r in rows.tolist()], dtype=np.int16)
        return n

    def _expected(self, days: np.ndarray) -> np.ndarray:
        if self.grid.is_utc:
            return np.full(len(days), SLOTS, dtype=np.int16)
        uniq, inv = np.unique(days, return_inverse=True)
        exp = np.array([self.grid.expected_readings(int(d)) for d in uniq], dtype=np.int16)
        return exp[inv]

    def _store(self, rows: np.ndarray, slots: np.ndarray, kwh: np.ndarray) -> None:
        """Write first readings: as 1/10,000 kWh in uint16 where that is exact (every value
        with at most 4 decimals up to 6.5534 kWh), else the row goes float32 (``_wide``: NaN
        where no reading yet; the uint16 slot then only marks the slot as seen)."""
        q = np.rint(kwh.astype(np.float64) * _SCALE)
        ok = (q >= 0) & (q < _MISSING)
        q = np.where(ok, q, 0).astype(np.uint16)
        ok &= _decode(q) == kwh
        if self._wide:
            ok &= ~np.isin(rows, list(self._wide))
        self.kwh[rows[ok], slots[ok]] = q[ok]
        for j in np.flatnonzero(~ok).tolist():
            r = int(rows[j])
            w = self._wide.get(r)
            if w is None:
                w = self._wide[r] = _decode(self.kwh[r])
            w[slots[j]] = kwh[j]
        self.kwh[rows[~ok], slots[~ok]] = 0  # seen (the value is in _wide)

    def _rows_for(self, hh: np.ndarray, day: np.ndarray) -> np.ndarray:
        """Row of each (household, day), allocating rows for days not open yet."""
        open_row = self.households.open_row
        rows = open_row[hh]
        ok = (rows >= 0) & (self.row_day.get(np.maximum(rows, 0)) == day)
        if ok.all():
            return rows
        rows = rows.copy()
        bad = np.flatnonzero(~ok)
        keys = (hh[bad].astype(np.int64) << 32) | (day[bad].astype(np.int64) & 0xFFFFFFFF)
        uniq, inv = np.unique(keys, return_inverse=True)
        uh = (uniq >> 32).astype(np.int32)
        ud = (uniq & 0xFFFFFFFF).astype(np.uint32).view(np.int32)
        found = np.full(len(uniq), -1, dtype=np.int32)
        if self._extra:
            for i in np.flatnonzero(np.isin(uh, list(self._extra))).tolist():
                r = self._extra[int(uh[i])].get(int(ud[i]))
                if r is not None:
                    found[i] = r
        new = np.flatnonzero(found < 0)
        if len(new):
            found[new] = self._allocate(uh[new], ud[new])
        rows[bad] = found[inv]
        return rows

    def _allocate(self, hs: np.ndarray, days: np.ndarray) -> np.ndarray:
        """Rows for new open days (``hs``, ``days``: distinct pairs, sorted by household)."""
        m = len(hs)
        while self._nfree < m:
            self._grow_rows()
        rows = self._free[self._nfree - m:self._nfree][::-1].copy()
        self._nfree -= m
        self._open += m
        if int(hs.max()) >= Int24.LIMIT:
            self.row_hh = self.row_hh.widened()
        self.row_hh[rows] = hs
        self.row_day.values[rows] = self.row_day.encode(days)
        self.row_first.clear(rows)
        self.row_last_ts.clear(rows)
        self.kwh[rows] = _MISSING
        open_row = self.households.open_row
        first = np.r_[True, hs[1:] != hs[:-1]]
        primary = first & (open_row[hs] < 0)
        open_row[hs[primary]] = rows[primary]
        for i in np.flatnonzero(~primary).tolist():
            self._extra.setdefault(int(hs[i]), {})[int(days[i])] = int(rows[i])
        # A new day may be behind the watermark already (its first reading came late).
        ends = self.grid.day_ends(days) + int(self.grace_s)
        self._next_close_check = min(self._next_close_check, int(ends.min()))
        return rows

    def _grow_rows(self) -> None:
        n = len(self.row_hh)
        m = next_capacity(n, n + 1)
        self.households.fit_rows(m)
        self.kwh = grown(self.kwh, m)  # rows are set when allocated (_allocate)
        self.row_hh = self.row_hh.grown(m)
        self.row_day.grow(m)
        self.row_first.grow(m)
        self.row_last_ts.grow(m)
        free = zeros((m,), np.int32)
        free[:m - n] = np.arange(m - 1, n - 1, -1, dtype=np.int32)
        free[m - n:m - n + self._nfree] = self._free[:self._nfree]
        self._free = free
        self._nfree += m - n

    def _close_round(self, done: np.ndarray, *, force: bool = False) -> ClosedDays:
        """Emit the complete rows ``done``, the rows the watermark closed, and complete rows
        that waited: each household's days in date order, a day never before an earlier
        open day of its household (it waits in ``_waiting`` until that one closes)."""
        parts = [done.astype(np.int64)]
        if self._waiting:
            parts.append(np.fromiter(self._waiting, dtype=np.int64))
        if force or self.watermark >= self._next_close_check:
            used = np.flatnonzero(self.row_hh.nonnegative())
            if len(used):
                ends = self.grid.day_ends(self.row_day.get(used)) + int(self.grace_s)
                passed = ends <= self.watermark
                parts.append(used if force else used[passed])
                pending = ends[~passed]
                self._next_close_check = (int(pending.min()) if len(pending)
                                          else np.iinfo(np.int64).max)
            else:
                self._next_close_check = np.iinfo(np.int64).max
        cand = parts[0] if len(parts) == 1 else np.unique(np.concatenate(parts))
        if len(cand) == 0:
            return ClosedDays.empty()
        if self._extra:
            hc = self.row_hh[cand]
            multi = np.isin(hc, list(self._extra))
            if multi.any():
                cset = set(cand[multi].tolist())
                go: list[int] = []
                day_values = self.row_day.values  # (one base: the order is the days')
                for h in np.unique(hc[multi]).tolist():
                    open_rows = sorted([int(self.households.open_row[h]),
                                        *self._extra[h].values()],
                                       key=lambda r: int(day_values[r]))
                    blocked = False
                    for r in open_rows:
                        if blocked or r not in cset:
                            blocked = True
                            if r in cset:
                                self._waiting.add(r)
                        else:
                            go.append(r)
                cand = np.concatenate([cand[~multi], np.array(go, dtype=np.int64)])
        self._waiting.difference_update(cand.tolist())
        days = self.row_day.get(cand)
        missing = self._expected(days) - self._readings(cand)
        status = np.where(missing <= 0, COMPLETE,
                          np.where(missing <= self.max_imputed, IMPUTED, INCOMPLETE))
        return self._emit(cand, status.astype(np.uint8))

    def _emit(self, rows: np.ndarray, status: np.ndarray) -> ClosedDays:
        households = self.households
        hh = self.row_hh[rows]
        days = self.row_day.get(rows)
        o = np.lexsort((days, hh))  # each household's days in date order
        rows, hh, days, status = rows[o], hh[o], days[o], status[o]
        kwh = np.empty((len(rows), SLOTS), dtype=np.float32)
        for lo in range(0, len(rows), 1 << 16):  # slices: a bounded transient however many
            r = rows[lo:lo + (1 << 16)]
            kwh[lo:lo + len(r)] = _decode(self.kwh[r])
        if self._wide:
            for i, r in enumerate(rows.tolist()):
                w = self._wide.pop(r, None)
                if w is not None:
                    kwh[i] = w
        if self._repeats:  # autumn DST: a repeated slot scores the mean of its two readings
            for i, r in enumerate(rows.tolist()):
                for s in range(SLOTS):
                    v = self._repeats.pop((r, s), None)
                    if v is not None:
                        kwh[i, s] = v if np.isnan(kwh[i, s]) else (kwh[i, s] + v) / 2.0
        seq = households.mark_closed(hh, days)
        out = ClosedDays(
            household_index=hh, household_ids=households.index.ids_of(hh),
            day=days, kwh=kwh, status=status, readings=self._readings(rows),
            expected=self._expected(days), first_offset=self.row_first.get(rows),
            last_ts_ms=self.row_last_ts.get(rows), seq=seq)
        if self._repeat_n:
            for r in rows.tolist():
                self._repeat_n.pop(r, None)
        # free the rows; a household's next open day (if any) becomes its open row
        open_row = households.open_row
        if self._extra:
            multi = np.isin(hh, list(self._extra))
            for r, h, d in zip(rows[multi].tolist(), hh[multi].tolist(), days[multi].tolist(),
                               strict=True):
                extra = self._extra.get(h)
                if open_row[h] == r:
                    open_row[h] = extra.pop(min(extra)) if extra else -1
                elif extra is not None:
                    extra.pop(d, None)
                if extra is not None and not extra:
                    del self._extra[h]
            open_row[hh[~multi]] = -1
        else:
            open_row[hh] = -1
        self.row_hh[rows] = -1
        self._free[self._nfree:self._nfree + len(rows)] = rows
        self._nfree += len(rows)
        self._open -= len(rows)
        return out


class RelativeColumn:
    """Per-row integers (days, Kafka offsets, Kafka timestamps) stored unsigned above a base
    (``dtype``: uint32, or uint16 for days).

    ``fit(lo, hi, row_hh)`` before values in [lo, hi] are written: where they or the values
    of the rows in use (``row_hh >= 0``) would not fit, the base moves and the stored values
    shift with it; where even that cannot hold them (a spread of the dtype's maximum: 4.29 G
    offsets, 49.7 days of timestamps, 179 years of days among open days) the column becomes
    ``wide`` (int64; int32 for days) for good. Always exact; ``get`` returns ``wide``
    values. ``empty`` (relative) / ``wide_empty`` (wide) is a new row's value.
    """

    def __init__(self, n: int, *, empty: int, wide_empty: int, dtype: type = np.uint32,
                 wide: type = np.int64) -> None:
        self.values: np.ndarray = zeros((n,), dtype)
        self.base = 0
        self.empty, self.wide_empty = empty, wide_empty
        self.none = int(np.iinfo(dtype).max)  # no value (``empty`` of row_first)
        self.wide = np.dtype(wide)

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes)

    def fit(self, lo: int, hi: int, row_hh: Int24) -> None:
        none = self.none
        if self.values.dtype == self.wide or (lo >= self.base and hi - self.base < none):
            return
        keep = row_hh.nonnegative()
        keep &= self.values != none
        cur = self.values[keep]
        if len(cur):
            lo = min(lo, self.base + int(cur.min()))
            hi = max(hi, self.base + int(cur.max()))
        if hi - lo >= none:  # cannot be held relative to any base: wide from now on
            wide = zeros(self.values.shape, self.wide)
            wide[:] = self.values.astype(np.int64) + self.base
            wide[self.values == none] = self.wide_empty
            self.values, self.base = wide, 0
            return
        self.values[keep] = cur.astype(np.int64) + (self.base - lo)
        self.base = lo

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Values (fitted) as stored."""
        if self.values.dtype == self.wide:
            return x
        return (x.astype(np.int64) - self.base).astype(self.values.dtype)

    def get(self, rows: np.ndarray | int) -> np.ndarray:
        """The values of ``rows`` (a copy, ``wide``)."""
        return (self.values[rows].astype(np.int64) + self.base).astype(self.wide)

    def clear(self, rows: np.ndarray) -> None:
        self.values[rows] = self.wide_empty if self.values.dtype == self.wide else self.empty

    def grow(self, m: int) -> None:
        self.values = grown(self.values, m)


_NONE = 2**32 - 1  # a RelativeColumn's "no value" (row_first of a new row)
_SCALE = 10_000
_MISSING = 65535  # a uint16 slot with no reading yet


def _decode(q: np.ndarray) -> np.ndarray:
    """kWh from 1/10,000 kWh steps (float32, exactly as ``_store`` checks it); NaN where
    ``_MISSING``."""
    k = q.astype(np.float32) / np.float32(_SCALE)
    k[q == _MISSING] = np.nan
    return k
