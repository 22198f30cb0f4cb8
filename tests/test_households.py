"""The household table: the hash-array id index, eviction and index reuse, snapshots."""

from __future__ import annotations

import json

import numpy as np
import orjson

from meterwatch.stream.households import NO_DAY, HouseholdIndex, HouseholdTable, Int24, grown


def test_index_finds_inserts_and_reuses():
    ix = HouseholdIndex()
    ids = [f"MAC{i:06d}" for i in range(50_000)] + ["é-ü", "x" * 64, "a", "a\x00", "\x00a"]
    got = ix.lookup(ids)
    assert got.tolist() == list(range(len(ids)))
    assert ix.lookup(ids[::-1]).tolist() == list(range(len(ids)))[::-1]
    assert ix.lookup(["a", "b"], insert=False).tolist() == [ids.index("a"), -1]
    assert ix.ids_of([ids.index("é-ü"), ids.index("a\x00")]) == ["é-ü", "a\x00"]
    # the same new id twice in one lookup gets one index
    twice = ix.lookup(["new", "new"])
    assert twice[0] == twice[1] == len(ids)
    # remove 30,000, then their indices are reused by new ids and the rest still resolve
    gone = np.arange(0, 30_000, dtype=np.int32)
    ix.remove(gone)
    assert (ix.lookup(ids[:30_000], insert=False) == -1).all()
    assert ix.lookup(ids[30_000:], insert=False).tolist() == list(range(30_000, len(ids)))
    fresh = ix.lookup([f"NEW{i}" for i in range(40_000)])
    assert set(fresh[:30_000].tolist()) == set(gone.tolist())
    assert ix.alive == len(ids) + 1 - 30_000 + 40_000
    assert ix.ids_of(fresh[:3].tolist()) == ["NEW0", "NEW1", "NEW2"]
    assert ix.lookup(ids[30_000:], insert=False).tolist() == list(range(30_000, len(ids)))


def test_hash_collisions_are_told_apart_by_the_bytes():
    ix = HouseholdIndex()
    data = np.frombuffer(b"firstsecondthird!", dtype=np.uint8)
    start, lens = np.array([0, 5, 11]), np.array([5, 6, 6])
    same = np.full(3, 7, dtype=np.uint32)  # one hash for all: only the bytes tell them apart
    assert ix._insert(data, start[:2], same[:2], lens[:2]).tolist() == [0, 1]
    order = [1, 0, 2]
    assert ix._find(data, start[order], same, lens[order]).tolist() == [1, 0, -1]
    assert ix.ids_of([0, 1]) == ["first", "second"]


def test_rehash_and_removal_recompute_hashes_from_the_ids():
    """The index keeps one byte of each id's hash (a filter); rehashes and removals
    recompute the hash from the stored bytes, so every kind of id (non-ASCII, astral, a
    lone surrogate, NUL) is found again after many rehashes and removals."""
    ix = HouseholdIndex()
    odd = ["é-ü", "\U0001f600" * 64, "\ud800x", "a\x00", "x" * 64, "MAC000002"]
    assert ix.lookup(odd[:1]).tolist() == [0] and ix.length.dtype == np.uint8
    ix.remove(np.array([0], np.int32))
    ix.lookup(odd)  # an id of 256 bytes: the lengths turn int16
    assert ix.tag.dtype == np.uint8 and ix.length.dtype == np.int16
    assert ix.lookup(odd, insert=False).tolist() == list(range(len(odd)))
    for k in range(6):  # 6 rounds: inserts past several rehashes, half removed each time
        ids = [f"R{k}-{i}" for i in range(20_000)]
        got = ix.lookup(ids)
        ix.remove(got[::2].astype(np.int32))
        assert (ix.lookup(ids[::2], insert=False) == -1).all()
        assert ix.lookup(ids[1::2], insert=False).tolist() == got[1::2].tolist()
        assert ix.lookup(odd, insert=False).tolist() == list(range(len(odd)))
    assert ix.ids_of(list(range(len(odd)))) == odd


def test_index_table_turns_int32_past_24_bit_indices():
    """The hash table's slots take 3 bytes while every index is below ``Int24.LIMIT``;
    an index past it (a partition of more than 16.7 M households) turns the table int32,
    and every id, old and new, still resolves to its exact index."""
    ix = HouseholdIndex()
    assert ix.lookup(["first", "second"]).tolist() == [0, 1]
    assert ix._table.wide is None and ix._table.nbytes == 3 * len(ix._table)
    # indices handed out up to just below the limit (free ones, as if their households
    # had gone): the next new ids get indices on both sides of it
    lim = Int24.LIMIT
    ix.tag, ix.offset = grown(ix.tag, lim + 8), ix.offset.grown(lim + 8)
    ix.length = grown(ix.length, lim + 8)
    ix.length[2:] = ix._gone  # free
    ix.size = lim - 3
    new = [f"N{i}" for i in range(6)]
    got = ix.lookup(new)
    assert got.tolist() == list(range(lim - 3, lim + 3))
    assert ix._table.wide is not None and ix._table.wide.dtype == np.int32
    assert ix.lookup(["second", "first", *new], insert=False).tolist() == [1, 0, *got]
    assert ix.ids_of(got[-2:]) == new[-2:]
    ix.remove(got[-1:].astype(np.int32))
    assert ix.lookup(new, insert=False).tolist() == [*got[:-1], -1]
    s = Int24(8)  # 3-byte slots hold every index below the limit, _EMPTY and _TOMB
    s[np.arange(4)] = [0, lim - 1, -1, -2]
    s[4] = 12_345_678
    assert s[np.arange(5)].tolist() == [0, lim - 1, -1, -2, 12_345_678] and s[7] == -1


def test_id_offsets_turn_uint32_past_16_mib_of_ids():
    """The ids' offsets in the arena take 3 bytes while the arena is below
    ``Int24.LIMIT`` bytes; ids past it turn them uint32, and every id keeps its bytes."""
    ix = HouseholdIndex()
    first = [f"{i:06d}" + "é" * 120 for i in range(40_000)]  # 246 bytes each: 9.8 MB
    ix.lookup(first)
    assert ix.offset.wide is None and ix.offset.nbytes == 3 * len(ix.offset)
    more = [f"{i:06d}" + "ü" * 124 for i in range(40_000)]  # 19.7 MB in all: past 16 MiB
    got = ix.lookup(more)
    assert ix.offset.wide is not None and ix.offset.wide.dtype == np.uint32
    assert int(ix.offset[int(got[-1])]) > Int24.LIMIT
    assert ix.lookup(first + more, insert=False).tolist() == list(range(80_000))
    assert ix.ids_of([0, 39_999, int(got[0]), int(got[-1])]) == [first[0], first[-1],
                                                                 more[0], more[-1]]
    assert ix.id_of(int(got[-1])) == more[-1]


def test_table_evicts_resets_and_snapshots():
    t = HouseholdTable()
    h = t.lookup(["A", "B", "C"])
    t.state["level"][h] = [0.1, 0.2, 0.3]
    t.state["profile_mean"][h[0]] = np.linspace(-3, 0, 12)
    seq = t.mark_closed(np.array([h[0], h[0], h[1]]), np.array([12, 10, 5]))
    assert seq.tolist() == [2, 1, 1] and t.closed_max[h[0]] == 12
    snap = t.snapshot(int(h[0]))
    assert snap["seq"] == 2 and snap["closed_max"] == 12
    t2 = HouseholdTable()
    t2.restore("A", snap)
    a = int(t2.lookup(["A"])[0])
    np.testing.assert_allclose(t2.state["profile_mean"][a], np.linspace(-3, 0, 12), atol=2e-3)
    assert t2.is_closed(np.array([a, a]), np.array([12, 13])).tolist() == [True, False]
    t.evict(np.array([h[1]]))
    assert len(t) == 2 and t.lookup(["B"], insert=False)[0] == -1
    b = int(t.lookup(["D"])[0])  # reuses B's index, as a new household
    assert b == h[1] and np.isnan(t.state["level"][b]) and t.closed_max[b] == NO_DAY


def test_sustained_state_is_compact_and_restores_older_documents():
    """The sustained columns are float16 / int16 / uint16 days; a snapshot round-trips
    through JSON, and a document written before (int32 days, "never" as -2**30, float32)
    restores clipped to the columns, never wrapped."""
    t = HouseholdTable()
    h = int(t.lookup(["A"])[0])
    assert t.state["sustained_mean"].dtype == np.float16
    assert t.state["sustained_start"].dtype == np.uint16
    t.state["sustained_mean"][h] = [-0.5, -1.25, -2.0, 0.125]
    t.state["sustained_start"][h] = [15800, 15801, 0, 0]
    t.state["sustained_count"][h] = 40
    snap = json.loads(orjson.dumps(t.snapshot(h), option=orjson.OPT_SERIALIZE_NUMPY))
    t2 = HouseholdTable()
    t2.restore("A", snap)
    a = int(t2.lookup(["A"])[0])
    for name in ("sustained_mean", "sustained_start", "sustained_count", "sustained_var"):
        np.testing.assert_array_equal(t2.state[name][a], t.state[name][h])
    old = {**snap, "sustained_last_alert": -(2**30), "sustained_start": [15800, -3, 70000, 5],
           "sustained_count": 40_000, "sustained_cusum": [1e6, 2.5, 0.0, 0.0]}
    t2.restore("A", old)
    assert int(t2.state["sustained_last_alert"][a]) == 0  # never
    assert t2.state["sustained_start"][a].tolist() == [15800, 0, 65535, 5]
    assert int(t2.state["sustained_count"][a]) == 32767
    assert np.isfinite(t2.state["sustained_cusum"][a]).all()


def test_model_state_is_compact_clipped_and_restores_older_documents():
    """The model-state columns are float16 and uint16 (``model.state.STORAGE_DTYPES``):
    writing through ``state_column`` rounds and clips (a finite value never becomes inf, a
    count never wraps), a snapshot round-trips through JSON, and a document written with
    float32/int32 state restores clipped into range."""
    from meterwatch.model import HouseholdState

    t = HouseholdTable()
    h = t.lookup(["A", "B", "C"])
    assert t.state["level"].dtype == np.float16 and t.state["err_var"].dtype == np.float16
    assert t.state["count"].dtype == np.uint16 and t.state["last_day"].dtype == np.uint16
    assert sum(t.state[k][0].nbytes for k in ("level", "err_mean", "err_var", "count",
               "peak_mean", "peak_var", "ratio_mean", "ratio_var", "fault_rate",
               "timing_mean", "timing_var", "ratio_z_last", "last_day")) == 26
    t.state_column("level")[h] = np.array([0.123, 1e9, np.nan], np.float32)
    t.state_column("err_var")[h] = np.array([1e-9, -1e9, 3.0], np.float32)
    t.state_column("count")[h] = np.array([70_000, 12, -4], np.int32)
    t.state_column("last_day")[h] = np.array([15_800, 0, 80_000], np.int32)
    level = t.state_column("level")[h].astype(np.float32)
    assert level[0] == np.float32(np.float16(0.123)) and level[1] == 65504
    assert np.isnan(level[2]) and np.isfinite(t.state["err_var"][h]).all()
    assert t.state["count"][h].tolist() == [65535, 12, 0]
    assert t.state["last_day"][h].tolist() == [15_800, 0, 65535]
    # the scorer reads the columns back into float32 / int32
    st = HouseholdState(**{k: t.state_column(k)[h] for k in ("level", "err_mean", "err_var",
                                                             "count", "last_day")})
    assert st.level.dtype == np.float32 and st.count.dtype == np.int32
    assert st.count.tolist() == [65535, 12, 0]

    a = int(h[0])
    snap = json.loads(orjson.dumps(t.snapshot(a), option=orjson.OPT_SERIALIZE_NUMPY))
    t2 = HouseholdTable()
    t2.restore("A", snap)
    a2 = int(t2.lookup(["A"])[0])
    for name in ("level", "err_var", "count", "last_day", "profile_mean"):
        np.testing.assert_array_equal(t2.state[name][a2], t.state[name][a])
    old = {**snap, "level": 1e6, "err_mean": -3.3, "count": 100_000, "last_day": 15_900.0,
           "ratio_var": 1e-12, "timing_mean": None}
    t2.restore("A", old)
    assert float(t2.state["level"][a2]) == 65504 and int(t2.state["count"][a2]) == 65535
    assert int(t2.state["last_day"][a2]) == 15_900
    assert float(t2.state["err_mean"][a2]) == float(np.float16(-3.3))
    assert np.isfinite(t2.state["ratio_var"][a2]) and t2.state["ratio_var"][a2] >= 0


def test_closed_days_and_seq_stay_exact_past_uint16():
    """``closed_max`` and ``seq`` are uint16 while they fit (``NarrowColumn``): the days'
    base moves down and up with the values held, and a spread no uint16 holds (days
    70,000 apart; a seq of 65,536; a negative seq from a document) turns the column int32
    for good; every value, NO_DAY included, comes back exact and round-trips."""
    t = HouseholdTable()
    a, b, c = (int(i) for i in t.lookup(["A", "B", "C"]))
    assert t.closed_max.values.dtype == np.uint16 and t.seq.values.dtype == np.uint16
    assert t.closed_max[c] == NO_DAY and t.seq[c] == 0
    t.mark_closed(np.array([a]), np.array([15_000]))
    t.mark_closed(np.array([b]), np.array([15_000 - 40_000]))  # below the base: it moves
    assert t.closed_max.values.dtype == np.uint16
    assert t.closed_max[[a, b, c]].tolist() == [15_000, -25_000, NO_DAY]
    assert t.is_closed(np.array([a, a, b, c]), np.array([15_000, 15_001, -25_001, 0])).tolist() \
        == [True, False, True, False]
    t.mark_closed(np.array([c]), np.array([15_000 + 30_000]))  # 70,000 apart: int32 now
    assert t.closed_max.values.dtype == np.int32
    assert t.closed_max[[a, b, c]].tolist() == [15_000, -25_000, 45_000]
    d = int(t.lookup(["D"])[0])  # a new household after the change: no day yet
    assert t.closed_max[d] == NO_DAY and t.seq[d] == 0

    t.seq[a] = 65_535
    assert t.seq.values.dtype == np.uint16
    seq = t.mark_closed(np.array([a, a]), np.array([45_001, 45_002]))
    assert seq.tolist() == [65_536, 65_537] and t.seq.values.dtype == np.int32
    assert t.seq[[a, b, c, d]].tolist() == [65_537, 1, 1, 0]
    for h, name in ((a, "A"), (b, "B"), (c, "C"), (d, "D")):
        snap = json.loads(orjson.dumps(t.snapshot(h), option=orjson.OPT_SERIALIZE_NUMPY))
        t2 = HouseholdTable()
        t2.restore(name, snap)
        h2 = int(t2.lookup([name])[0])
        assert (int(t2.seq[h2]), int(t2.closed_max[h2])) == (int(t.seq[h]),
                                                             int(t.closed_max[h]))
    t3 = HouseholdTable()  # a document's seq below zero: kept exactly too
    t3.restore("E", {"seq": -3, "closed_max": 15_000})
    e = int(t3.lookup(["E"])[0])
    assert t3.seq.values.dtype == np.int32 and t3.seq[e] == -3 and t3.closed_max[e] == 15_000
    t3.restore_day({"household_id": "E", "date": "2013-03-01", "seq": -10})
    assert (t3.seq[e], t3.closed_max[e]) == (-2, 15_765)
    t3.evict(np.array([e]))
    f = int(t3.lookup(["F"])[0])
    assert f == e and t3.closed_max[f] == NO_DAY and t3.seq[f] == 0


def test_open_rows_turn_int32_past_24_bit_rows():
    """A household's open row takes 3 bytes while the assembler has at most
    ``Int24.LIMIT`` day rows; more rows turn the column int32, and every row index (and
    -1, none) is kept exactly."""
    from meterwatch.stream.assembler import DayAssembler
    from meterwatch.stream.parse import ParsedBatch
    from meterwatch.stream.timegrid import TimeGrid

    lim = Int24.LIMIT
    t = HouseholdTable()
    h = t.lookup(["A", "B"])
    assert t.open_row.wide is None and t.open_row.nbytes == 3 * len(t.open_row)
    assert t.open_row[h].tolist() == [-1, -1]
    t.open_row[h] = [lim - 1, -1]
    t.fit_rows(lim)  # row indices up to lim - 1 still fit
    assert t.open_row.wide is None and t.open_row[h].tolist() == [lim - 1, -1]
    t.fit_rows(lim + 1)
    assert t.open_row.wide is not None and t.open_row.wide.dtype == np.int32
    t.open_row[h[1]] = lim + 5
    assert t.open_row[h].tolist() == [lim - 1, lim + 5]
    c = int(t.lookup(["C"])[0])
    assert t.open_row[c] == -1 and int(t.open_row[int(h[1])]) == lim + 5

    asm = DayAssembler(TimeGrid(), initial_rows=lim + 2)  # (untouched rows cost nothing)
    assert asm.households.open_row.wide is not None
    day = 15_800
    pb = ParsedBatch.of(["A"] * 48, day * 86400 + np.arange(48, dtype=np.int64) * 1800,
                        np.full(48, 0.5, np.float32), np.arange(48, dtype=np.int32))
    res = asm.add(pb, np.arange(48, dtype=np.int64), np.zeros(48, np.int64))
    assert res.closed.household_ids == ["A"] and res.closed.readings.tolist() == [48]
    assert asm.households.open_row[0] == -1


def test_day_rows_keep_households_past_24_bit_indices():
    """A day row's household takes 3 bytes while household indices are below
    ``Int24.LIMIT``; a household past it turns the column int32, and the closed days name
    their households exactly."""
    from meterwatch.stream.assembler import DayAssembler
    from meterwatch.stream.parse import ParsedBatch
    from meterwatch.stream.timegrid import TimeGrid

    lim = Int24.LIMIT
    asm = DayAssembler(TimeGrid())
    day = 15_800

    def whole_day(ids: list[str]):  # type: ignore[no-untyped-def]
        n = len(ids)
        pb = ParsedBatch.of([h for h in ids for _ in range(48)],
                            np.tile(day * 86400 + np.arange(48, dtype=np.int64) * 1800, n),
                            np.full(48 * n, 0.5, np.float32), np.arange(48 * n, dtype=np.int32))
        return asm.add(pb, np.arange(48 * n, dtype=np.int64), np.zeros(48 * n, np.int64))

    assert whole_day(["A"]).closed.household_index.tolist() == [0]
    assert asm.row_hh.wide is None and asm.row_hh.nbytes == 3 * len(asm.row_hh)
    # indices handed out up to just below the limit (free ones, as if their households had
    # gone; the table's columns stay unwritten): the next households get indices past it
    ix = asm.households.index
    ix.tag, ix.offset = grown(ix.tag, lim + 8), ix.offset.grown(lim + 8)
    ix.length = grown(ix.length, lim + 8)
    ix.length[1:] = ix._gone
    ix.size = lim - 1
    res = whole_day(["B", "C", "D"])
    assert asm.row_hh.wide is not None and asm.row_hh.wide.dtype == np.int32
    got = dict(zip(res.closed.household_ids, res.closed.household_index.tolist(), strict=True))
    assert got == {"B": lim - 1, "C": lim, "D": lim + 1}
    assert res.closed.readings.tolist() == [48, 48, 48] and asm.open_days == 0
    assert asm.households.seq[[lim - 1, lim, lim + 1]].tolist() == [1, 1, 1]
