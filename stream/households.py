"""The households of one input partition: ids, closed days, model state, snapshots.

Everything is columnar, with no Python object per household (1 M households cost about
166 bytes each here, ids, day-model and sustained-change state included, open days not;
``benchmarks/memory.py``, docs/assembler.md "Memory"):

* ``HouseholdIndex`` maps a household id to a dense index ``h``: an open-addressing hash
  table of indices in 3-byte slots (``Int24``; load at most 0.7) placed by the ids'
  hashes, one byte of each hash kept as a filter, the ids' UTF-8 bytes in one arena.
  Indices of evicted households are reused.
* ``HouseholdTable`` holds, per index: the row of the household's open day (-1 if none),
  its newest closed day and closed-day count (``seq``; uint16 while they fit,
  ``NarrowColumn``), and the model's running state
  (``model.state.STORAGE_DTYPES``: float16 statistics and profile, uint16 count and day),
  and the sustained-change detector's state (``model.sustained.storage_columns``, columns
  ``sustained_*``, 62 bytes: float16, int16 and uint16 days; ``stream.sustained``).

Days of a household close in date order (``stream.assembler``), so "closed" is one number
per household: every day up to ``closed_max`` is closed (or will never be opened again).
"""

from __future__ import annotations

import datetime as _dt
import mmap
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from meterwatch.model.state import clip_to, storage_columns, to_storage
from meterwatch.model.sustained import storage_columns as sustained_columns

_EPOCH = _dt.date(1970, 1, 1)
_date = _dt.date.fromisoformat
NO_DAY = np.iinfo(np.int32).min // 2
#: Readings a household must have sent before it counts towards the watermark's quorum
#: (one day's worth): a burst of one-reading households cannot move the watermark.
ESTABLISHED = 48
_EMPTY, _TOMB = -1, -2
_MAX_LOAD = 0.7
_NONE = np.empty(0, dtype=np.int32)
#: Entries per slice of the index's rehash: its temporaries (int64) stay below glibc's
#: default mmap threshold (128 KiB), so their frees never raise it (see ``zeros``)
_SLICE = 1 << 13
GROWTH = 1.25  # capacity steps of every growable array (a doubling wastes up to half)


def zeros(shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """A zeroed array; from 4 KiB on, in an anonymous memory map of its own.

    Growing a column copies it; glibc keeps freed heap blocks below its (dynamic, up to
    32 MiB) mmap threshold inside the process, so with ordinary allocations the old copies
    of every column stayed resident (measured: +110 B per household-day at 1 M). A map of
    its own is returned to the system when the array goes, and the pages of unused capacity
    are never touched, so they cost no memory.
    """
    dt = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dt.itemsize
    if nbytes < 1 << 12:
        return np.zeros(shape, dtype=dt)
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype=dt).reshape(shape)


def full(shape: tuple[int, ...], fill: object, dtype: np.dtype | type) -> np.ndarray:
    """``zeros`` filled with ``fill`` (from 4 KiB on, in a memory map of its own)."""
    a = zeros(shape, dtype)
    a.fill(fill)
    return a


def grown(a: np.ndarray, cap: int, fill: object = None) -> np.ndarray:
    """``a`` in a new array of ``cap`` rows; the new rows are zero, or ``fill``."""
    b = zeros((cap, *a.shape[1:]), a.dtype)
    b[:len(a)] = a
    if fill is not None and fill != 0:
        b[len(a):] = fill
    return b


def next_capacity(cap: int, need: int) -> int:
    return max(need, int(cap * GROWTH), 1024)


class Int24:
    """Integers of the id index stored in 3 bytes (uint16 + uint8) while they fit, in
    ``wide_dtype`` for good otherwise; read as int32 (``wide_dtype`` once wide).

    The hash table's slots (an index, ``_EMPTY`` or ``_TOMB``: 0xFFFFFF and 0xFFFFFE;
    narrow while every index is below ``LIMIT``, 16,777,214 households in a partition) and
    the ids' offsets in the arena (narrow while the arena is below ``LIMIT`` bytes; uint32,
    as before, past it), the households' open rows (narrow while the assembler has at most
    ``LIMIT`` rows) and the day rows' households (narrow while every household index is
    below ``LIMIT``): 3 instead of 4 bytes each. The owner calls ``widened`` before it
    writes a value at or past ``LIMIT``.
    """

    LIMIT = (1 << 24) - 2

    def __init__(self, size: int, *, fill: int = _EMPTY, wide: bool = False,
                 wide_dtype: type[np.integer[Any]] = np.int32) -> None:
        self.fill, self.wide_dtype, self.size = fill, np.dtype(wide_dtype), size
        self.wide = full((size,), fill, wide_dtype) if wide else None
        code = fill & 0xFFFFFF
        n = 0 if wide else size
        self.lo = full((n,), code & 0xFFFF, np.uint16)
        self.hi = full((n,), code >> 16, np.uint8)

    def __len__(self) -> int:
        return self.size

    @property
    def nbytes(self) -> int:
        return (self.wide.nbytes if self.wide is not None
                else int(self.lo.nbytes + self.hi.nbytes))

    def __getitem__(self, pos: Any) -> Any:
        if self.wide is not None:
            return self.wide[pos]
        if isinstance(pos, int):  # one entry (probing one id): no arrays
            i = (int(self.hi[pos]) << 16) | int(self.lo[pos])
            return i - (1 << 24) if i >= self.LIMIT else i
        x = (self.hi[pos].astype(np.int32) << 16) | self.lo[pos]
        return np.where(x >= self.LIMIT, x - (1 << 24), x).astype(np.int32)

    def __setitem__(self, pos: Any, values: Any) -> None:
        if self.wide is not None:
            self.wide[pos] = values
            return
        v = np.asarray(values).astype(np.int32) & 0xFFFFFF
        self.lo[pos] = v & 0xFFFF
        self.hi[pos] = v >> 16

    def nonnegative(self) -> np.ndarray:
        """Where the values are >= 0 (a bool mask over all entries; no int32 copy)."""
        if self.wide is not None:
            return self.wide >= 0
        return ~((self.hi == 0xFF) & (self.lo >= 0xFFFE))

    def grown(self, cap: int) -> Int24:
        """The same values in ``cap`` entries (the new ones: ``fill``)."""
        out = Int24(0, fill=self.fill, wide=self.wide is not None,
                    wide_dtype=self.wide_dtype.type)
        out.size = cap
        if self.wide is not None:
            out.wide = grown(self.wide, cap, self.fill)
        else:
            code = self.fill & 0xFFFFFF
            out.lo, out.hi = grown(self.lo, cap, code & 0xFFFF), grown(self.hi, cap, code >> 16)
        return out

    def widened(self) -> Int24:
        """The same values in ``wide_dtype``, for good."""
        if self.wide is not None:
            return self
        out = Int24(0, fill=self.fill, wide=True, wide_dtype=self.wide_dtype.type)
        out.size = self.size
        out.wide = zeros((self.size,), self.wide_dtype)
        for lo in range(0, self.size, 1 << 16):  # slices: bounded transients
            out.wide[lo:lo + (1 << 16)] = self[lo:lo + (1 << 16)]
        return out


class HouseholdIndex:
    """Household id -> dense index (see the module docstring)."""

    def __init__(self) -> None:
        self._table = Int24(1024)
        self._used_slots = 0  # live entries + tombstones
        #: bits 24-31 of the id's hash (its low 32 bits place it in the table): a filter
        #: before the bytes are compared; the full hash is recomputed from the id when a
        #: rehash or a removal needs it (``_hashes``)
        self.tag = np.empty(0, dtype=np.uint8)
        #: where each id starts in the arena (compacted below 4 GiB): 3 bytes while the
        #: arena is below 16 MiB, uint32 past it (``Int24``)
        self.offset = Int24(0, fill=0, wide_dtype=np.uint32)
        #: bytes of each id, ``_gone`` where the index is free: uint8 (255: free) until an
        #: id of 255 bytes or more arrives (64 characters of 4 bytes), then int16 (-1: free)
        self.length = np.empty(0, dtype=np.uint8)
        self._gone = 255
        self._arena = np.empty(1 << 16, dtype=np.uint8)
        self._arena_used = 0
        self._arena_dead = 0
        self.size = 0  # indices handed out so far (high-water mark)
        self.alive = 0
        self._free = _NONE  # evicted indices, reused first (a stack: _free[:_nfree])
        self._nfree = 0
        self.inserted = _NONE  # the indices the last lookup added

    # -- queries ---------------------------------------------------------------------------
    def capacity(self) -> int:
        return len(self.tag)

    def memory_bytes(self) -> int:
        return (self._table.nbytes + self.tag.nbytes + self.offset.nbytes
                + self.length.nbytes + self._arena.nbytes + self._free.nbytes)

    def id_of(self, h: int) -> str:
        o = int(self.offset[h])
        return self._arena[o:o + int(self.length[h])].tobytes().decode("utf-8", "surrogatepass")

    def ids_of(self, hs: Iterable[int] | np.ndarray) -> list[str]:
        hs = np.fromiter(hs, dtype=np.int64) if not isinstance(hs, np.ndarray) else hs
        if len(hs) > 1 << 16:  # slices: a bounded transient however many
            return [i for lo in range(0, len(hs), 1 << 16)
                    for i in self.ids_of(hs[lo:lo + (1 << 16)])]
        if len(hs) == 0:
            return []
        lens = self.length[hs].astype(np.int64)
        ends = np.cumsum(lens)
        total = int(ends[-1])
        src = np.repeat(self.offset[hs].astype(np.int64) - (ends - lens), lens) + np.arange(total)
        raw = self._arena[src].tobytes()
        text = raw.decode("utf-8", "surrogatepass")
        bounds = ends.tolist()
        starts = [0, *bounds[:-1]]
        if len(text) == total:  # ASCII: characters are bytes
            return [text[a:b] for a, b in zip(starts, bounds, strict=True)]
        return [raw[a:b].decode("utf-8", "surrogatepass")
                for a, b in zip(starts, bounds, strict=True)]

    def alive_mask(self) -> np.ndarray:
        return self.length[:self.size] != self._gone

    # -- lookups ---------------------------------------------------------------------------
    def lookup(self, ids: Sequence[str], *, insert: bool = True) -> np.ndarray:
        """Index of each id, adding the missing ones (or -1 without ``insert``)."""
        n = len(ids)
        if n == 1 and self.alive:  # one id (recovery restores them one by one): no arrays
            h = self._find_one(ids[0])
            if h >= 0:
                self.inserted = _NONE
                return np.array([h], dtype=np.int32)
        # str hashes are cached in the str objects; one join encodes every id at once
        hashes = np.fromiter(map(hash, ids), dtype=np.int64, count=n).astype(np.uint32)
        lens = np.fromiter(map(len, ids), dtype=np.int64, count=n)
        data = "".join(ids).encode("utf-8", "surrogatepass")
        if len(data) != int(lens.sum()):  # not all ASCII: lengths in bytes
            enc = [s.encode("utf-8", "surrogatepass") for s in ids]
            lens = np.fromiter(map(len, enc), dtype=np.int64, count=n)
        if n and lens.max() > np.iinfo(np.int16).max:
            raise ValueError("household id longer than 32,767 bytes")
        if n and lens.max() >= self._gone > 0:  # uint8 lengths cannot hold it: int16
            wide = zeros(self.length.shape, np.int16)
            wide[:] = self.length
            wide[self.length == self._gone] = -1
            self.length, self._gone = wide, -1
        qbytes = np.frombuffer(data, dtype=np.uint8)
        qstart = np.cumsum(lens) - lens
        found = self._find(qbytes, qstart, hashes, lens)
        missing = np.flatnonzero(found < 0)
        if insert and len(missing):
            first: dict[str, int] = {}
            which = np.array([first.setdefault(ids[i], len(first)) for i in missing.tolist()],
                             dtype=np.int64)
            distinct = missing[np.unique(which, return_index=True)[1]]
            new = self._insert(qbytes, qstart[distinct], hashes[distinct], lens[distinct])
            found[missing] = new[which]
            self.inserted = new
        else:
            self.inserted = _NONE
        return found

    def _find(self, qbytes: np.ndarray, qstart: np.ndarray, hashes: np.ndarray,
              lens: np.ndarray) -> np.ndarray:
        """Probe for each query (``qbytes[qstart:qstart+lens]``, its hash): the hash's tag
        and the length select a candidate, then the bytes of all candidates are compared at
        once (a tag and length match with other bytes, 1 in 256, probes on)."""
        n = len(hashes)
        out = np.full(n, -1, dtype=np.int32)
        if self.alive == 0 or n == 0:
            return out
        table, tag, length = self._table, self.tag, self.length
        qtag = (hashes >> 24).astype(np.uint8)
        mask = len(table) - 1
        pos = (hashes & mask).astype(np.int64)
        active = np.arange(n)
        while len(active):
            cand = np.full(n, -1, dtype=np.int32)
            pending = active
            while len(pending) > 64:  # vectorised rounds while many queries still probe
                t = table[pos[pending]]
                hit = t >= 0
                hit[hit] = (tag[t[hit]] == qtag[pending[hit]]) & (length[t[hit]]
                                                                  == lens[pending[hit]])
                cand[pending[hit]] = t[hit]
                pending = pending[~hit & (t != _EMPTY)]
                pos[pending] = (pos[pending] + 1) & mask
            for j in pending.tolist():  # the few long probe sequences, one by one
                p, hq, lq = int(pos[j]), int(qtag[j]), int(lens[j])
                while True:
                    slot = int(table[p])
                    if slot == _EMPTY:
                        break
                    if slot >= 0 and int(tag[slot]) == hq and int(length[slot]) == lq:
                        cand[j] = slot
                        break
                    p = (p + 1) & mask
                pos[j] = p
            found = active[cand[active] >= 0]
            c = cand[found]
            ok = self._same_bytes(qbytes, qstart[found], lens[found], c)
            out[found[ok]] = c[ok]
            active = found[~ok]  # a tag match with other bytes: probe on
            pos[active] = (pos[active] + 1) & mask
        return out

    def _find_one(self, household_id: str) -> int:
        data = household_id.encode("utf-8", "surrogatepass")
        hq, lq = hash(household_id) & 0xFFFFFFFF, len(data)
        table, mask, tq = self._table, len(self._table) - 1, hq >> 24
        p = hq & mask
        while True:
            slot = int(table[p])
            if slot == _EMPTY:
                return -1
            if slot >= 0 and int(self.tag[slot]) == tq and int(self.length[slot]) == lq:
                o = int(self.offset[slot])
                if self._arena[o:o + lq].tobytes() == data:
                    return slot
            p = (p + 1) & mask

    def _same_bytes(self, qbytes: np.ndarray, qstart: np.ndarray, lens: np.ndarray,
                    cand: np.ndarray) -> np.ndarray:
        """Whether each query (bytes at ``qstart``, ``lens``) equals the id of ``cand``."""
        total = int(lens.sum())
        if total == 0:
            return np.ones(len(cand), dtype=bool)
        which = np.repeat(np.arange(len(cand)), lens)
        k = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens)
        q = qbytes[np.repeat(qstart, lens) + k]
        a = self._arena[np.repeat(self.offset[cand], lens) + k]
        bad = np.bincount(which[q != a], minlength=len(cand))
        return bad == 0

    def _insert(self, qbytes: np.ndarray, qstart: np.ndarray, hashes: np.ndarray,
                lens: np.ndarray) -> np.ndarray:
        m = len(hashes)
        reuse = min(m, self._nfree)
        idx = np.empty(m, dtype=np.int32)
        if reuse:
            idx[:reuse] = self._free[self._nfree - reuse:self._nfree][::-1]
            self._nfree -= reuse
        idx[reuse:] = np.arange(self.size, self.size + m - reuse, dtype=np.int32)
        self.size += m - reuse
        if self.size > len(self.tag):
            cap = next_capacity(len(self.tag), self.size)
            self.tag = grown(self.tag, cap)
            self.offset = self.offset.grown(cap)
            self.length = grown(self.length, cap)
        total = int(lens.sum())
        data = qbytes[np.repeat(qstart - (np.cumsum(lens) - lens), lens) + np.arange(total)]
        need = self._arena_used + len(data)
        if need > len(self._arena):
            self._compact(need)
            need = self._arena_used + len(data)
            if need > len(self._arena):
                self._arena = grown(self._arena, next_capacity(len(self._arena), need))
        if need >= 1 << 32:
            raise MemoryError("household ids of one partition exceed 4 GiB")
        self._arena[self._arena_used:need] = data
        if need > Int24.LIMIT:
            self.offset = self.offset.widened()
        self.offset[idx] = self._arena_used + np.cumsum(lens) - lens
        self._arena_used = need
        self.length[idx] = lens
        self.tag[idx] = hashes >> 24
        self.alive += m
        if ((self._used_slots + m) > _MAX_LOAD * len(self._table)
                or (self._table.wide is None and self.size > Int24.LIMIT)):
            self._rehash(self.alive)
        else:
            self._place(idx, hashes)
        return idx

    def _hashes(self, idx: np.ndarray) -> np.ndarray:
        """The low 32 bits of the hashes of these (alive) indices' ids, as ``lookup`` takes
        them (``hash`` of the id: the same str, so the same hash, in this process)."""
        return np.fromiter(map(hash, self.ids_of(idx)), dtype=np.int64,
                           count=len(idx)).astype(np.uint32)

    def _place(self, idx: np.ndarray, hashes: np.ndarray) -> None:
        """Put new indices (of ids not in the table; ``hashes``: theirs) into free slots,
        linear probing."""
        mask = len(self._table) - 1
        pos = (hashes & mask).astype(np.int64)
        active = np.arange(len(idx))
        while len(active):
            p = pos[active]
            free = self._table[p] < 0
            cand, pc = active[free], p[free]
            _, first = np.unique(pc, return_index=True)
            win = cand[first]
            self._used_slots += int((self._table[pos[win]] == _EMPTY).sum())
            self._table[pos[win]] = idx[win]
            placed = np.zeros(len(idx), dtype=bool)
            placed[win] = True
            active = active[~placed[active]]
            pos[active] = (pos[active] + 1) & mask

    def _rehash(self, n: int) -> None:
        size = 1024
        while size < 2 * n:  # load at most 0.5 after a rehash, 0.7 before the next
            size *= 2
        self._table = Int24(size, wide=self.size > Int24.LIMIT)
        self._used_slots = 0
        # in slices: bounded transients (glibc keeps freed heap below its dynamic mmap
        # threshold, so big temporaries here stayed resident: +6 B per household at 1 M)
        for lo in range(0, self.size, _SLICE):
            live = (np.flatnonzero(self.length[lo:min(self.size, lo + _SLICE)] != self._gone)
                    + lo).astype(np.int32)
            self._place(live, self._hashes(live))

    def _compact(self, need: int) -> None:
        """Drop the bytes of evicted ids when they are at least half the arena."""
        if self._arena_dead * 2 < self._arena_used:
            return
        live = np.flatnonzero(self.alive_mask())
        lens = self.length[live].astype(np.int64)
        starts = np.cumsum(lens) - lens
        total = int(lens.sum())
        src = np.repeat(self.offset[live] - starts, lens) + np.arange(total)
        cap = next_capacity(0, total + need - self._arena_used)
        arena = zeros((max(cap, 1 << 16),), np.uint8)
        arena[:total] = self._arena[src]
        self._arena = arena
        self.offset[live] = starts
        self._arena_used = total
        self._arena_dead = 0

    def remove(self, idx: np.ndarray) -> None:
        """Forget these (alive) indices; they are reused by later inserts."""
        if len(idx) == 0:
            return
        mask = len(self._table) - 1
        pos = (self._hashes(idx) & mask).astype(np.int64)
        active = np.arange(len(idx))
        while len(active):
            t = self._table[pos[active]]
            hit = t == idx[active]
            self._table[pos[active[hit]]] = _TOMB
            assert not (t[~hit] == _EMPTY).any(), "index not in the table"
            active = active[~hit]
            pos[active] = (pos[active] + 1) & mask
        self._arena_dead += int(self.length[idx].sum())
        self.length[idx] = self._gone
        self.alive -= len(idx)
        if self._nfree + len(idx) > len(self._free):
            self._free = grown(self._free, next_capacity(len(self._free), self._nfree + len(idx)))
        self._free[self._nfree:self._nfree + len(idx)] = np.sort(idx)[::-1]
        self._nfree += len(idx)


class _Ids(Sequence[str]):
    """``table.ids[h]``: the id of household index ``h``."""

    def __init__(self, index: HouseholdIndex) -> None:
        self._index = index

    def __len__(self) -> int:
        return self._index.size

    def __getitem__(self, h):
        if isinstance(h, slice):
            return self._index.ids_of(range(*h.indices(len(self))))
        return self._index.id_of(int(h))


class NarrowColumn:
    """Per-household integers (``closed_max``: days; ``seq``: closed-day counts) kept in
    uint16 while they fit, exact always.

    Stored: ``base + code``, with code 0 meaning ``none`` where the column has one
    (``closed_max``: ``NO_DAY``, which is also a new household's value, so capacity that
    was never handed out is already "none"); without ``none`` the base stays 0 and codes
    are the values. ``relative``: the base moves (the stored codes shift with it) when a
    value would not fit and all the values held still span at most 65,534 (179 years of
    days); otherwise, as soon as any value falls outside (a negative ``seq``, one above
    65,535), the column turns ``wide`` (int32, the type it had before) for good. Reading
    gives ``wide`` values (a copy); writing fits first, so a value is never wrapped or
    clipped (writing a value outside ``wide`` fails or wraps exactly as assigning it to an
    int32 array does).
    """

    def __init__(self, *, none: int | None = None, relative: bool = False,
                 wide: type[np.signedinteger[Any]] = np.int32) -> None:
        self.values: np.ndarray = np.empty(0, dtype=np.uint16)
        self.base = 0
        self.none, self.relative, self.wide = none, relative, np.dtype(wide)
        self._wide_range = (int(np.iinfo(wide).min), int(np.iinfo(wide).max))
        self._lo = 1 if none is not None else 0  # the smallest code of a value

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes)

    @property
    def is_wide(self) -> bool:
        return self.values.dtype == self.wide

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, idx: Any) -> Any:
        v = self.values[idx]
        if self.is_wide:
            return v.copy() if isinstance(v, np.ndarray) else v
        code = np.asarray(v)
        x = np.array(code, dtype=np.int64)
        x += self.base
        x = x.astype(self.wide)
        if self.none is not None:
            x[code == 0] = self.none
        return x[()] if x.ndim == 0 else x

    def __setitem__(self, idx: Any, values: Any) -> None:
        if not self.is_wide:
            x = np.asarray(values)
            if x.dtype.kind not in "iu":  # (what an int32 column would take, as integers)
                x = x.astype(np.int64)
            real = x if self.none is None else x[x != self.none]
            if real.size:
                self._fit(int(real.min()), int(real.max()))
            if not self.is_wide:
                code = x.astype(np.int64) - self.base
                if self.none is not None:
                    code = np.where(x == self.none, 0, code)
                self.values[idx] = code.astype(np.uint16)
                return
        self.values[idx] = values

    def _fit(self, lo: int, hi: int) -> None:
        """Make [lo, hi] storable: nothing, a new base, or wide for good."""
        top = int(np.iinfo(np.uint16).max)
        if lo - self.base >= self._lo and hi - self.base <= top:
            return
        if self.relative and self._wide_range[0] <= lo and hi <= self._wide_range[1]:
            held = self.values[self.values != 0] if self.none is not None else self.values
            if len(held):
                lo = min(lo, self.base + int(held.min()))
                hi = max(hi, self.base + int(held.max()))
            if hi - lo <= top - self._lo:
                new_base = lo - self._lo
                if len(held):
                    nz = self.values != 0 if self.none is not None else slice(None)
                    self.values[nz] = (self.values[nz].astype(np.int64)
                                       + (self.base - new_base)).astype(np.uint16)
                self.base = new_base
                return
        wide = zeros(self.values.shape, self.wide)
        wide[:] = self.values.astype(np.int64) + self.base
        if self.none is not None:
            wide[self.values == 0] = self.none
        self.values, self.base = wide, 0

    def grow(self, cap: int) -> None:
        """Room for ``cap`` households (new entries: ``none``, or 0)."""
        self.values = grown(self.values, cap, self.none if self.is_wide else None)


class StateColumn:
    """``table.state_column(name)[idx]`` reads the stored values, in the storage type: the
    scorer keeps that type for a household's next day in the same batch, so a day's state
    is rounded alike however the days were batched (in range: readings are at most
    ``stream.validation.MAX_KWH``, the statistics winsorised); assigning rounds and clips
    them to the column's storage type (``model.state.to_storage``)."""

    def __init__(self, name: str, column: np.ndarray) -> None:
        self.name, self.column = name, column

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        return self.column[idx]

    def __setitem__(self, idx: np.ndarray, values: np.ndarray) -> None:
        self.column[idx] = to_storage(self.name, values)


class HouseholdTable:
    """Households of one partition (see the module docstring)."""

    def __init__(self) -> None:
        self.index = HouseholdIndex()
        self.ids = _Ids(self.index)
        #: the row of the household's open day (-1: none): 3 bytes while the assembler has
        #: at most ``Int24.LIMIT`` rows, int32 past it (``fit_rows``)
        self.open_row = Int24(0, fill=0)
        #: the newest closed day (NO_DAY: none) and the closed-day count: uint16 while
        #: they fit (``NarrowColumn``), int32 for good once one does not
        self.closed_max = NarrowColumn(none=NO_DAY, relative=True)
        self.seq = NarrowColumn()
        #: readings seen (any, late and duplicates included), up to ESTABLISHED: a household
        #: with that many counts towards the watermark's quorum
        self.reads = np.empty(0, dtype=np.uint8)
        self.established = 0  # alive households with ESTABLISHED readings or more
        self.established_before = 0  # the same before the last ``count_readings``
        #: the model's per-household state, one column per ``model.HouseholdState`` field,
        #: and the sustained-change state (``model.sustained``, columns ``sustained_*``)
        self.state: dict[str, np.ndarray] = {**storage_columns(0), **sustained_columns(0)}
        self._fresh = {**storage_columns(1), **sustained_columns(1)}

    def __len__(self) -> int:
        return self.index.alive

    def memory_bytes(self) -> int:
        cols: list[np.ndarray | NarrowColumn | Int24] = [
            self.open_row, self.closed_max, self.seq, self.reads, *self.state.values()]
        return self.index.memory_bytes() + sum(a.nbytes for a in cols)

    def lookup(self, households: Sequence[str], *, insert: bool = True) -> np.ndarray:
        """Indices of the (distinct) households, adding the new ones."""
        idx = self.index.lookup(households, insert=insert)
        new = self.index.inserted
        if len(new):
            self._grow(self.index.capacity())
            self.reset(new)
            self.open_row[new] = -1
            self.reads[new] = 0
        return idx

    def count_readings(self, hh: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Count one reading per entry of ``hh`` (stream order). Returns, per reading,
        whether its household is established with it (ESTABLISHED readings, this one
        included), and the number of established households just after it."""
        self.established_before = self.established
        prior = self.reads[hh]
        if len(hh) == 0 or prior.min() >= ESTABLISHED:  # the usual case: nothing to count
            return np.ones(len(hh), dtype=bool), np.full(len(hh), self.established)
        order = np.argsort(hh, kind="stable")
        sh = hh[order]
        start = np.r_[True, sh[1:] != sh[:-1]]
        rank = np.arange(len(sh)) - np.maximum.accumulate(np.where(start, np.arange(len(sh)), 0))
        nth = np.empty(len(hh), dtype=np.int64)
        nth[order] = rank + 1  # 1 for a household's first reading in this batch
        total = prior.astype(np.int64) + nth
        counts = total >= ESTABLISHED
        crossing = counts & (total - 1 < ESTABLISHED)
        established = self.established + np.cumsum(crossing)
        self.established = int(established[-1])
        last = np.r_[start[1:], True]  # each household's last reading in the batch
        self.reads[sh[last]] = np.minimum(ESTABLISHED, total[order][last])
        return counts, established

    def _grow(self, cap: int) -> None:
        """Columns for ``cap`` households (new entries are set when handed out)."""
        if cap <= len(self.open_row):
            return
        self.open_row = self.open_row.grown(cap)
        self.closed_max.grow(cap)
        self.seq.grow(cap)
        self.reads = grown(self.reads, cap)
        for name, arr in self.state.items():
            self.state[name] = grown(arr, cap)

    def fit_rows(self, rows: int) -> None:
        """The assembler has ``rows`` day rows: past ``Int24.LIMIT`` the open-row column
        turns int32 (for good), so every row index is held exactly."""
        if rows > Int24.LIMIT:
            self.open_row = self.open_row.widened()

    def state_column(self, name: str) -> StateColumn:
        """Model-state column ``name``: read as stored, written rounded to storage
        (``model.state.to_storage``: clipped, never overflowed or wrapped)."""
        return StateColumn(name, self.state[name])

    def reset(self, hs: np.ndarray) -> None:
        """These households start again as new ones (population statistics, seq 0)."""
        self.closed_max[hs] = NO_DAY
        self.seq[hs] = 0
        for name, col in self.state.items():
            col[hs] = self._fresh[name][0]

    def evict(self, hs: np.ndarray) -> None:
        """Forget these households (no open day): their index is reused."""
        self.established -= int((self.reads[hs] >= ESTABLISHED).sum())
        self.reads[hs] = 0
        self.reset(hs)
        self.open_row[hs] = -1
        self.index.remove(hs.astype(np.int32))

    def snapshot(self, h: int) -> dict[str, object]:
        """The household's durable state (a record of the compacted state topic)."""
        out: dict[str, object] = {"seq": int(self.seq[h]), "closed_max": int(self.closed_max[h]),
                                  "reads": int(self.reads[h])}
        for name, col in self.state.items():
            v = col[h]
            out[name] = v.astype(np.float32) if v.dtype == np.float16 else v
        return out

    def restore(self, household_id: str, doc: dict) -> int:
        """Load a household's durable state (from ``snapshot``); its index."""
        h = int(self.lookup([household_id])[0])
        self.seq[h] = doc["seq"]
        self.closed_max[h] = doc["closed_max"]
        reads = min(ESTABLISHED, int(doc.get("reads", ESTABLISHED)))  # older: established
        self.established += int(reads >= ESTABLISHED) - int(int(self.reads[h]) >= ESTABLISHED)
        self.reads[h] = reads
        _load_row(self.state, h, doc)
        return h

    def restore_day(self, day_score: dict) -> None:
        """Apply a published day score: the day is closed; a newer day's state wins (days
        of a household are published in date order, so the newest day's state is the
        household's state)."""
        h = int(self.lookup([day_score["household_id"]])[0])
        day = (_date(day_score["date"]) - _EPOCH).days
        if day <= int(self.closed_max[h]):
            return
        self.closed_max[h] = day
        self.seq[h] = max(int(self.seq[h]) + 1, int(day_score["seq"]))
        if day_score.get("state"):
            _load_row(self.state, h, day_score["state"])

    def is_closed(self, h: np.ndarray, day: np.ndarray) -> np.ndarray:
        """Whether each (household, day) is closed (or older than a closed day: such a day
        is never opened again, see ``stream.assembler``)."""
        return day <= self.closed_max[h]

    def mark_closed(self, hs: np.ndarray, days: np.ndarray) -> np.ndarray:
        """Close these days (each household's in date order); returns each day's ``seq``."""
        if len(hs) == 0:
            return np.empty(0, dtype=np.int64)
        order = np.lexsort((days, hs))
        sh, sd = hs[order], days[order]
        start = np.r_[True, sh[1:] != sh[:-1]]
        first = np.maximum.accumulate(np.where(start, np.arange(len(sh)), 0))
        rank = np.arange(len(sh)) - first
        seq = np.empty(len(hs), dtype=np.int64)
        seq[order] = self.seq[sh].astype(np.int64) + rank + 1
        last = np.r_[~start[1:], False] == 0  # the last (newest) day of each household
        self.seq[sh[last]] = seq[order][last]
        self.closed_max[sh[last]] = np.maximum(self.closed_max[sh[last]], sd[last])
        return seq


def _load_row(columns: dict[str, np.ndarray], i: int, doc: dict) -> None:
    """Inverse of ``snapshot`` for the state columns (missing keys keep their value)."""
    for name, col in columns.items():
        v = doc.get(name)
        if v is None:
            if col.ndim == 2 and doc.get(f"{name}_0") is not None:  # ``HouseholdState.row``
                v = [doc.get(f"{name}_{k}") for k in range(col.shape[1])]
            else:
                continue
        # None inside a list becomes NaN; a compact column holds what fits: clipped, never
        # wrapped (state written before it: int32 days, -2**30)
        col[i] = clip_to(np.array(v, dtype=np.float64), col.dtype)
