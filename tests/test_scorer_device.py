"""The scorer's device-facing parts, on CPU with injected faults and fakes: allocation
failures split the batch (outside the ``except``) and lower the batcher's cap, only alert rows
travel back from a scorer process, and the service process never touches CUDA."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from meterwatch.model import torch_scoring
from meterwatch.stream import scorer as scorer_mod
from meterwatch.stream.scorer import STATE_FIELDS, Scorer
from tests.cli_helpers import FORBID_CUDA
from tests.test_torch_scoring import _days, _detector, _state


@pytest.fixture(autouse=True)
def _torch_for_every_batch(monkeypatch) -> None:
    monkeypatch.setattr(torch_scoring, "CPU_MIN_ROWS", 0)


def _batch(n_households: int = 24, n_days: int = 4):  # type: ignore[no-untyped-def]
    ids, day, kwh, tables = _days(n_households, n_days, seed=5)
    keys = np.unique(np.asarray(ids), return_inverse=True)[1].astype(np.int64)
    st = _state(int(keys.max()) + 1, seed=6).take(keys)
    state = {k: getattr(st, k) for k in STATE_FIELDS}
    return kwh, day, ids, keys, state, tables


def test_allocation_errors_split_outside_except_and_lower_the_cap(monkeypatch) -> None:
    kwh, day, ids, keys, state, tables = _batch()
    det = _detector()
    ref_scorer = Scorer(det, tables)
    asyncio.run(ref_scorer.start())
    ref = asyncio.run(ref_scorer.score(kwh, day, ids, keys, state))
    ref_scorer.close()

    real = torch_scoring.score_batch
    calls: list[int] = []
    errors = itertools.cycle([
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate`"),
        RuntimeError("CUDA error: out of memory (pinned memory allocator)")])

    def flaky(det_, kwh_, day_, ids_, keys_, state_, tables_=None, detail_rows="all"):  # type: ignore[no-untyped-def]
        # the retry must not run inside the handler of the previous failure
        assert sys.exc_info() == (None, None, None)
        calls.append(len(day_))
        if len(day_) > 20:
            raise next(errors)
        return real(det_, kwh_, day_, ids_, keys_, state_, tables_, detail_rows)

    s = Scorer(det, tables)
    asyncio.run(s.start())  # warms up (one batch) before the faults begin
    monkeypatch.setattr(torch_scoring, "score_batch", flaky)
    s.memory_cap = 10_000
    caps: list[int] = []
    s.on_memory_cap = caps.append
    got = asyncio.run(s.score(kwh, day, ids, keys, state))
    s.close()
    n = len(day)
    # each size fails once; after that, batches above the lowered cap are split untried
    assert calls[:3] == [n, n // 2, n // 4], calls
    assert max(calls[3:]) <= n // 8 and sum(calls[3:]) == n, calls
    assert s.memory_cap == n // 8 and caps == [s.memory_cap]
    # households with several days keep their order across the halves: same results
    np.testing.assert_allclose(got.score, ref.score, rtol=1e-5, atol=1e-5, equal_nan=True)
    np.testing.assert_array_equal(got.is_alert, ref.is_alert)
    np.testing.assert_allclose(got.expected, ref.expected, rtol=1e-5, atol=1e-6)
    for k in STATE_FIELDS:
        np.testing.assert_allclose(got.state[k], ref.state[k], rtol=1e-5, atol=1e-6,
                                   equal_nan=True, err_msg=k)


def test_other_runtime_errors_are_not_swallowed(monkeypatch) -> None:
    kwh, day, ids, keys, state, tables = _batch(10, 2)

    def broken(*a, **kw):  # type: ignore[no-untyped-def]
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    s = Scorer(_detector(), tables)
    asyncio.run(s.start())
    monkeypatch.setattr(torch_scoring, "score_batch", broken)
    with pytest.raises(RuntimeError, match="shapes"):
        asyncio.run(s.score(kwh, day, ids, keys, state))
    s.close()
    assert scorer_mod.is_allocation_error(torch.cuda.OutOfMemoryError("x"))
    assert not scorer_mod.is_allocation_error(ValueError("out of memory"))


def test_only_alert_rows_travel_back_from_the_process() -> None:
    kwh, day, ids, keys, state, tables = _batch(12, 3)
    det = _detector()
    thread = Scorer(det, tables)
    proc = Scorer(det, tables, process=True, device="cpu")

    async def both():  # type: ignore[no-untyped-def]
        await thread.start()
        await proc.start()
        try:
            return (await thread.score(kwh, day, ids, keys, state),
                    await proc.score(kwh, day, ids, keys, state))
        finally:
            thread.close()
            proc.close()

    a, b = asyncio.run(both())
    assert a.is_alert.any() and (~a.is_alert).any()
    # (the process is not monkeypatched: it scores this small batch with the numpy
    # reference, equal within the tolerance of tests/test_torch_scoring.py)
    np.testing.assert_allclose(a.score, b.score, rtol=1e-4, atol=1e-3, equal_nan=True)
    both = a.is_alert & b.is_alert
    assert both.sum() >= 0.9 * a.is_alert.sum()
    np.testing.assert_allclose(a.expected[both], b.expected[both], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(a.slot_error[both], b.slot_error[both], rtol=1e-4, atol=1e-4)
    assert b.expected[b.is_alert].any(axis=1).all() and not b.expected[~b.is_alert].any()
    # the torch path asks the device for alert rows' explanations only, in a thread too
    assert a.expected[a.is_alert].any(axis=1).all() and not a.expected[~a.is_alert].any()
    packed = scorer_mod._compact(a)
    assert packed.expected.shape == (a.is_alert.sum(), 49)
    back = scorer_mod._expand(packed)
    assert dataclasses.replace(back, state={}) is not None
    np.testing.assert_array_equal(back.expected[a.is_alert], a.expected[a.is_alert])


_NO_CUDA_SCRIPT = FORBID_CUDA + textwrap.dedent("""
    class Mem:
        used, total = 3 * 2**30, 80 * 2**30

    class Util:
        gpu = 37

    fake = types.ModuleType("pynvml")
    fake.nvmlInit = lambda: None
    fake.nvmlDeviceGetCount = lambda: 2
    fake.nvmlDeviceGetHandleByIndex = lambda i: ("h", i)
    fake.nvmlDeviceGetHandleByUUID = lambda u: ("u", u)
    fake.nvmlDeviceGetMemoryInfo = lambda h: Mem()
    fake.nvmlDeviceGetUtilizationRates = lambda h: Util()
    sys.modules["pynvml"] = fake

    import meterwatch.stream.service  # noqa: F401  (the whole service import path)
    from meterwatch.stream.metrics import create_metrics
    from prometheus_client import generate_latest

    m = create_metrics()
    text = generate_latest(m.registry).decode()
    assert 'meterwatch_gpu_memory_used_bytes{gpu="0"} 3.221225472e+09' in text, text
    assert 'meterwatch_gpu_utilization_ratio{gpu="0"} 0.37' in text, text
    assert 'gpu="1"' not in text  # CUDA_VISIBLE_DEVICES=1 is CUDA's device 0
    assert not touched and not torch.cuda.is_initialized(), touched
    print("ok")
""")


def test_service_process_never_initialises_cuda() -> None:
    """A fresh interpreter: import the service, build and scrape its metrics with a GPU
    'present' (fake NVML); no torch.cuda call that creates a context may happen."""
    env = {"CUDA_VISIBLE_DEVICES": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", _NO_CUDA_SCRIPT], capture_output=True,
                         text=True, timeout=120, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_shared_batch_round_trip() -> None:
    """What the service writes into shared memory is what the scorer process reads."""
    sb = scorer_mod.SharedBatch()
    try:
        for n in (3, 5000):  # the second one grows the block
            arrays = {"kwh": np.random.default_rng(n).random((n, 48), dtype=np.float32),
                      "day": np.arange(n, dtype=np.int64),
                      "ids": np.asarray([f"MAC{i:06d}" for i in range(n)], dtype=str),
                      "state.profile_mean": np.ones((n, 12), np.float32),
                      "empty": np.zeros(0, np.int32)}
            desc = sb.put(arrays)
            back = scorer_mod._read_shared(desc)
            for k, v in arrays.items():
                np.testing.assert_array_equal(back[k], v)
    finally:
        for block in scorer_mod._ATTACHED.values():
            block.close()
        scorer_mod._ATTACHED.clear()
        sb.close()
    assert sb.block is None
