"""The torch scoring path (model.torch_scoring) against the numpy reference, on CPU.

Tolerance: scores, z-scores and statistics within 1e-3 (absolute, relative 1e-4), the state
within 1e-4 relative; alert flags equal except for days whose score lies within 1e-3 of the
threshold. The detector is built directly (random network, calibration with cold-start maps
and a within-household variance), so every branch of the scoring runs without training.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from meterwatch.model import Detector, HouseholdState, SyntheticConfig, generate
from meterwatch.model import torch_scoring as ts
from meterwatch.model.features import ContextTables, context_features
from meterwatch.model.network import ConditionalAutoencoder, ModelConfig
from meterwatch.model.quality import run_lengths
from meterwatch.model.scoring import N_STATS, Calibration

ATOL, RTOL = 1e-3, 1e-4


@pytest.fixture(autouse=True)
def _torch_for_every_batch(monkeypatch) -> None:
    """Small test batches take the torch path too (on the CPU it starts at 1,024 days)."""
    monkeypatch.setattr(ts, "CPU_MIN_ROWS", 0)


def _detector(shape_input: bool = True, within: bool = True) -> Detector:
    torch.manual_seed(0)
    cfg = dataclasses.replace(ModelConfig.default(), shape_input=shape_input)
    rng = np.random.default_rng(3)
    z = rng.standard_t(4, size=(4000, N_STATS)).astype(np.float32)
    count = rng.integers(0, 20, 4000)
    cal = Calibration.fit_tails(np.array([-3.0, -1.0, 0.0, 0.5]), np.array([1.0, 1.5, 0.3, 1.0]),
                                z)
    cal = cal.with_cold_tails((0, 1, 2, 3, 5, 7, 10, 14), z, count)
    cal.cold_offset = np.array([np.inf, 0.5, 0.3, 0.2, 0.1, 0.0, 0.0], np.float32)
    if within:
        cal.stat_within = np.array([0.6, 1.0, 0.1, 0.7], np.float32)
    return Detector(ConditionalAutoencoder(cfg), threshold=4.0, calibration=cal, device="cpu")


def _days(n_households: int, n_days: int, seed: int) -> tuple[list[str], np.ndarray,
                                                                np.ndarray, ContextTables]:
    data = generate(SyntheticConfig(n_households=n_households, n_days=n_days, seed=seed))
    ids, day, kwh, _ = data.long()
    kwh = kwh.copy()
    rng = np.random.default_rng(seed)
    n = len(kwh)
    pick = rng.choice(n, size=(6, max(1, n // 20)), replace=False)
    kwh[pick[0], rng.integers(0, 48, pick.shape[1])] = np.nan  # missing
    kwh[pick[1], 10:20] = 0.0  # outage
    kwh[pick[2], 20:32] = 0.25  # stuck register
    kwh[pick[3], 5] = -1.0  # impossible
    kwh[pick[4], 7] = 50.0  # impossible
    kwh[pick[5]] *= 5.0  # level anomaly
    kwh[pick[0][:3]] = np.nan  # nothing observed
    kwh[pick[1][:2], :30] = np.nan  # too few readings to learn from
    return ids, day, kwh, data.tables


def _state(n: int, seed: int) -> HouseholdState:
    """Households of every age: new, cold-start buckets, established, with profiles."""
    rng = np.random.default_rng(seed)
    count = rng.choice([0, 0, 1, 2, 4, 6, 8, 12, 30, 200], n).astype(np.int32)
    st = HouseholdState.empty(n)
    known = count > 0
    st.count[:] = count
    st.level[known] = rng.uniform(0.05, 0.8, known.sum())
    st.level[rng.random(n) < 0.05] = 0.005  # tiny user: zero runs are normal
    for i, (m, v) in enumerate((("err_mean", "err_var"), ("peak_mean", "peak_var"),
                                ("ratio_mean", "ratio_var"), ("timing_mean", "timing_var"))):
        getattr(st, m)[known] = rng.normal([-3, -1, 0, 0.5][i], 0.3, known.sum())
        getattr(st, v)[known] = rng.uniform(0.05, 1.0, known.sum())
    st.profile_mean[known] = rng.normal(-2.5, 0.3, (known.sum(), 12))
    st.profile_var[known] = rng.uniform(0.0, 0.2, (known.sum(), 12))
    st.fault_rate[known] = rng.choice([0.0, 0.01, 0.3], known.sum())
    return st


def _assert_scores_close(a, b, threshold: float) -> None:
    for name in ("score", "raw_error", "model_score", "stat_z", "stats", "expected",
                 "slot_error"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=RTOL, atol=ATOL,
                                   equal_nan=True, err_msg=name)
    near = np.abs(np.nan_to_num(a.score, nan=-1e9) - threshold) < ATOL
    np.testing.assert_array_equal(a.is_alert[~near], b.is_alert[~near])
    sig_ok = near | (a.signals == b.signals)
    assert sig_ok.all(), np.flatnonzero(~sig_ok)
    far = ~near  # what an alert says is unusual: the same statistics (off the threshold)
    np.testing.assert_array_equal(a.unusual[far], b.unusual[far])
    np.testing.assert_array_equal(a.imputed, b.imputed)
    _assert_state_close(a.state, b.state, near)


def _assert_state_close(a: HouseholdState, b: HouseholdState,
                        skip: np.ndarray | None = None) -> None:
    keep = slice(None) if skip is None else ~skip
    for f in dataclasses.fields(HouseholdState):
        np.testing.assert_allclose(getattr(a, f.name)[keep], getattr(b, f.name)[keep],
                                   rtol=RTOL, atol=1e-5, equal_nan=True, err_msg=f.name)


def _both(det: Detector, fn):
    det.torch_scoring = False
    ref = fn()
    det.torch_scoring = True
    return ref, fn()


@pytest.mark.parametrize("shape_input,within", [(True, True), (False, False)])
def test_score_matches_numpy(shape_input: bool, within: bool) -> None:
    det = _detector(shape_input, within)
    ids, day, kwh, tables = _days(60, 6, seed=1)
    n = len(day)
    st = _state(n, seed=2)
    for tab in (tables, None):
        before = {f.name: getattr(st, f.name).copy() for f in dataclasses.fields(st)}
        kwh_before = kwh.copy()
        ref, got = _both(det, lambda tab=tab: det.score(kwh, day, ids, st, tab))
        assert ref.is_alert.any() and (~ref.is_alert).any()
        assert (ref.signals >> 1 & 1).any() and (ref.signals >> 2 & 1).any()
        _assert_scores_close(ref, got, det.threshold)
        np.testing.assert_array_equal(kwh, kwh_before)  # pure: inputs untouched
        for f, v in before.items():
            np.testing.assert_array_equal(getattr(st, f), v)


def test_replay_matches_numpy_sequential_days() -> None:
    det = _detector()
    ids, day, kwh, tables = _days(40, 12, seed=4)
    perm = np.random.default_rng(0).permutation(len(day))  # any row order
    ids = [ids[i] for i in perm]
    day, kwh = day[perm], kwh[perm]
    (ref, ref_final), (got, got_final) = _both(
        det, lambda: det.replay(kwh, day, ids, tables))
    _assert_scores_close(ref, got, det.threshold)
    assert ref_final.keys() == got_final.keys()
    for h in ref_final:
        _assert_state_close(ref_final[h], got_final[h])


def test_replay_in_time_chunks_equals_one_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    """A long replay runs a stretch of days at a time (bounded device memory), each
    household's state carried from one chunk to the next: the scores and states are those
    of one scan over everything."""
    det = _detector()
    ids, day, kwh, tables = _days(40, 12, seed=5)
    perm = np.random.default_rng(1).permutation(len(day))
    ids = [ids[i] for i in perm]
    day, kwh = day[perm], kwh[perm]
    whole, whole_final = det.replay(kwh, day, ids, tables)
    monkeypatch.setattr(ts, "REPLAY_CHUNK_ROWS", 50)  # 40 households x 12 days: ~10 chunks
    hh = np.unique(np.asarray(ids), return_inverse=True)[1]
    chunks = ts._time_chunks(hh, day, 50)
    assert len(chunks) > 5 and sorted(np.concatenate(chunks).tolist()) == list(range(len(day)))
    # households split across chunks: their state is carried over, not restarted
    assert sum(len(np.intersect1d(hh[a], hh[b])) for a, b in itertools.pairwise(chunks)) > 20
    got, got_final = det.replay(kwh, day, ids, tables)
    for f in dataclasses.fields(whole):
        a, b = getattr(whole, f.name), getattr(got, f.name)
        if f.name == "state":
            _assert_state_close(a, b)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, equal_nan=True,
                                       err_msg=f.name)
    for h in whole_final:
        _assert_state_close(whole_final[h], got_final[h])


def test_batch_with_several_days_per_household_equals_one_day_at_a_time() -> None:
    """score_batch's scan over ranks == calling score once per day, carrying the state."""
    det = _detector()
    ids, day, kwh, tables = _days(30, 5, seed=7)
    keys = np.unique(np.asarray(ids), return_inverse=True)[1]
    st0 = _state(int(keys.max()) + 1, seed=8)
    out, new = ts.score_batch(det, kwh, day, ids, keys, st0.take(keys), tables)
    cur = st0.copy()
    det.torch_scoring = False
    for d in np.unique(day):
        rows = np.flatnonzero(day == d)
        ref = det.score(kwh[rows], day[rows], [ids[i] for i in rows], cur.take(keys[rows]),
                        tables)
        cur.put(keys[rows], ref.state)
        np.testing.assert_allclose(out["score"][rows], ref.score, rtol=RTOL, atol=ATOL,
                                   equal_nan=True)
        got_state = HouseholdState(**{f: v[rows] for f, v in new.items()})
        _assert_state_close(got_state, ref.state)
    # only alert rows carry explanations when asked for
    out_a, _ = ts.score_batch(det, kwh, day, ids, keys, st0.take(keys), tables,
                              detail_rows="alerts")
    alert = out_a["is_alert"]
    assert alert.any()
    np.testing.assert_array_equal(out_a["expected"][alert], out["expected"][alert])
    assert not out_a["expected"][~alert].any()


def test_building_blocks() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((300, 48)) < 0.7
    loop = np.zeros(mask.shape, np.int64)  # brute force
    for r in range(len(mask)):
        for i in range(48):
            if mask[r, i]:
                lo = i
                while lo > 0 and mask[r, lo - 1]:
                    lo -= 1
                hi = i
                while hi < 47 and mask[r, hi + 1]:
                    hi += 1
                loop[r, i] = hi - lo + 1
    np.testing.assert_array_equal(run_lengths(mask), loop)
    np.testing.assert_array_equal(ts.run_lengths(torch.from_numpy(mask)).numpy(), loop)
    days = np.arange(-800_000, 800_000, 37, dtype=np.int64)  # 0160 .. 4160, leap centuries
    dates = days.astype("datetime64[D]")
    want = (dates - dates.astype("datetime64[Y]")).astype(np.int64)
    np.testing.assert_array_equal(ts.day_of_year(torch.from_numpy(days)).numpy(), want)


def test_household_lookup_matches_dicts() -> None:
    tables = ContextTables(acorn_group={"a": "Affluent", "b": "Adversity", "c": "?"},
                           tariff={"a": "ToU", "d": "Std"})
    ids = ["a", "b", "c", "d", "e", "a"]
    f = context_features(np.full(6, 19723), ids, np.full(6, np.nan), tables)
    np.testing.assert_array_equal(f[:, 6:10], [[1, 0, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0],
                                               [0, 0, 0, -1], [0, 0, 0, 0], [1, 0, 0, 1]])


def test_pinned_arena_stages_every_dtype() -> None:
    arena = ts.PinnedArena(pin=False)  # the staging logic; page-locking needs a GPU
    arena.reset(10_000)
    arrays = [np.arange(48 * 3, dtype=np.float32).reshape(3, 48), np.arange(5, dtype=np.int64),
              np.zeros(0, np.float32), np.arange(7, dtype=np.int32)]
    staged = [arena.stage(a, torch.device("cpu")) for a in arrays]
    for a, t in zip(arrays, staged, strict=True):
        np.testing.assert_array_equal(t.numpy(), a)
    assert arena.used % ts.PinnedArena.ALIGN == 0


def _run_both_kinds(det: Detector) -> list[tuple[dict, dict]]:
    """score_batch on a batch of several days per household (a scan of 5 steps of 30 rows)
    and on a batch of one day per household (one step of 70 rows)."""
    ids, day, kwh, tables = _days(30, 5, seed=7)
    keys = np.unique(np.asarray(ids), return_inverse=True)[1]
    st0 = _state(int(keys.max()) + 1, seed=8)
    st1 = _state(70, seed=9)
    return [ts.score_batch(det, kwh, day, ids, keys, st0.take(keys), tables),
            ts.score_batch(det, kwh[:70], day[:70], [f"h{i}" for i in range(70)], None, st1,
                           tables, detail_rows="alerts")]


def _assert_same_results(a: list[tuple[dict, dict]], b: list[tuple[dict, dict]]) -> None:
    for (out_a, new_a), (out_b, new_b) in zip(a, b, strict=True):
        for part_a, part_b in ((out_a, out_b), (new_a, new_b)):
            assert part_a.keys() == part_b.keys()
            for name, v in part_a.items():
                assert v.dtype == part_b[name].dtype, name
                np.testing.assert_allclose(v, part_b[name], rtol=1e-6, atol=1e-6,
                                           equal_nan=True, err_msg=name)


def test_padded_steps_equal_plain_steps(monkeypatch) -> None:
    """The CUDA-graph runner's padding to a bucket, gathering of a wave's rows into its
    buffers, and chunking of large steps (run eagerly here: capture needs a GPU) give the
    plain steps' results."""
    det = _detector()
    plain = _run_both_kinds(det)
    high = det.threshold
    det.threshold = high / 2  # an alert budget moved (--target-far, rolling calibration)
    plain_low = _run_both_kinds(det)
    assert plain_low[1][0]["is_alert"].sum() > plain[1][0]["is_alert"].sum()
    det.threshold = high
    monkeypatch.setattr(ts, "GRAPH_MIN_ROWS", 8)
    monkeypatch.setattr(ts, "GRAPH_MAX_ROWS", 16)  # waves of 30 rows: chunks of 16 and 14
    runners = []
    real = ts.step_graphs

    def padded(det: Detector, k, capture=None):
        runners.append(real(det, k, capture=False))
        return runners[-1]

    monkeypatch.setattr(ts, "step_graphs", padded)
    _assert_same_results(_run_both_kinds(det), plain)
    det.threshold = high / 2
    _assert_same_results(_run_both_kinds(det), plain_low)
    # one runner, kept between calls and across the threshold's change (an input of the
    # graphs, not a number captured in them)
    assert len({id(r) for r in runners}) == 1
    assert sorted(runners[-1].graphs) == [8, 16]  # 70 rows: 4 chunks of 16, then 6 -> 8


def test_a_failed_capture_falls_back_to_plain_steps(monkeypatch, caplog) -> None:
    """Where a step cannot be captured (here: no GPU), scoring goes on without graphs, says
    so once, and gives the same results."""
    det = _detector()
    plain = _run_both_kinds(det)
    real = ts.step_graphs
    monkeypatch.setattr(ts, "step_graphs", lambda det, k, capture=None:
                        real(det, k, capture=True) if det.cuda_graphs else None)
    with caplog.at_level("WARNING", logger=ts.__name__):
        _assert_same_results(_run_both_kinds(det), plain)
        _assert_same_results(_run_both_kinds(det), plain)
    assert det.cuda_graphs is False
    failed = [r for r in caplog.records if "CUDA graph capture failed" in r.getMessage()]
    assert len(failed) == 1


def test_host_arrays_packed_equal_one_by_one() -> None:
    """Results packed into one transfer per element size (as from a GPU) come back as the
    same arrays, dtypes and shapes as copied one by one."""
    torch.manual_seed(1)
    tensors = {"f": torch.randn(5, 4), "i": torch.arange(5, dtype=torch.int32) - 2,
               "b": torch.rand(5, 3) > 0.5, "u": torch.arange(5, dtype=torch.uint8) * 50,
               "strided": torch.randn(10)[::2], "wide": torch.randn(3, dtype=torch.float64),
               "nan": torch.tensor([np.nan, 1.0]), "empty": torch.zeros((0, 48))}
    packed, plain = ts.host_arrays(tensors, pack=True), ts.host_arrays(tensors, pack=False)
    assert packed.keys() == plain.keys()
    for name, v in plain.items():
        assert packed[name].dtype == v.dtype and packed[name].shape == v.shape, name
        np.testing.assert_array_equal(packed[name], v, err_msg=name)


def test_device_constants_are_built_once(monkeypatch) -> None:
    """A detector's calibration and the side tables go to its device once, not per batch
    (each is a host-to-device copy on a GPU); a new calibration is taken up."""
    det = _detector()
    ids, day, kwh, _ = _days(4, 2, seed=1)
    st = _state(len(day), seed=2)
    built, tables = [], []
    real, real_tables = ts._Constants, ts._table_tensors
    monkeypatch.setattr(ts, "_Constants", lambda d: built.append(1) or real(d))
    monkeypatch.setattr(ts, "_table_tensors", lambda t, dev: tables.append(real_tables(t, dev))
                        or tables[-1])
    for _ in range(3):
        det.score(kwh, day, ids, st)  # no side tables
    assert len(built) == 1 and len(tables) == 3 and len({id(t) for t in tables}) == 1
    det.calibration = dataclasses.replace(det.calibration)
    det.score(kwh, day, ids, st)
    assert len(built) == 2 and tables[-1] is tables[0]


def test_results_staged_through_a_reused_buffer_are_copied_out() -> None:
    """Results that land in the page-locked buffer (as from a GPU) are copied out of it: the
    next batch's results, landing in the same buffer, leave the first batch's alone."""
    staging = ts.PinnedArena(pin=False)
    first = {"f": torch.arange(6, dtype=torch.float32), "b": torch.tensor([True, False]),
             "i": torch.arange(3, dtype=torch.int32)}
    got = ts.host_arrays(first, pack=True, staging=staging)
    kept = {n: v.copy() for n, v in got.items()}
    second = {n: torch.zeros_like(v) for n, v in first.items()}
    again = ts.host_arrays(second, pack=True, staging=staging)
    for n, v in kept.items():
        np.testing.assert_array_equal(got[n], v, err_msg=n)
        assert got[n].dtype == first[n].numpy().dtype
        np.testing.assert_array_equal(again[n], 0)


def test_a_replaced_detector_is_freed_with_its_graphs(monkeypatch) -> None:
    """The per-detector caches (constants, captured steps, staging buffers) are keyed weakly
    by the detector and hold nothing that refers back to it: after a model swap the old
    detector, and the device memory of its graphs, are freed."""
    import gc
    import weakref

    real = ts.step_graphs
    monkeypatch.setattr(ts, "step_graphs", lambda det, k, capture=None:
                        real(det, k, capture=False))
    det = _detector()
    _run_both_kinds(det)
    ts.arena(det, results=True)
    assert det in ts._GRAPHS and det in ts._CONSTANTS
    gone = weakref.ref(det)
    del det
    gc.collect()
    assert gone() is None


def test_small_batches_on_a_gpu_take_the_numpy_reference() -> None:
    """On a GPU a batch under 256 days takes the numpy reference (it would still replay the
    256-row graph: no faster than the reference at 256 days on the H100, slower below)."""
    from types import SimpleNamespace

    gpu = SimpleNamespace(torch_scoring=True, device=torch.device("cuda"))
    assert not ts.enabled(gpu, 255) and ts.enabled(gpu, 256)  # type: ignore[arg-type]
    assert not ts.enabled(SimpleNamespace(torch_scoring=False, device=gpu.device), 10**6)  # type: ignore[arg-type]
    assert ts.GRAPH_MIN_ROWS <= 256  # a graph for the smallest batch that takes the path
