"""Day scoring as batched torch operations, on the detector's device (GPU or CPU).

``Detector.score`` and ``Detector.replay`` run here by default (``Detector.torch_scoring``).
It is the same computation as the numpy reference (``model.features.model_inputs``,
``model.scoring.day_statistics``, ``Detector.zscores``, ``Calibration.model_score``,
``model.quality.check``, ``model.state.absorb``), written as whole-batch tensor operations:
no loop over rows, no host synchronisation between the steps, so on a GPU a batch is one
host-to-device copy of the readings and the state, a few hundred kernels, and one copy back.
``tests/test_torch_scoring.py`` compares the two paths on the same inputs (scores within
1e-3, state within 1e-4 relative; alerts may differ only for scores within 1e-3 of the
threshold).

**Several days of one household in a batch** keep the stream's sequential semantics: each
household's days are ranked by date (``rank``) and the batch is a scan over ranks, every step
scoring the r-th day of every household that has one, with the state carried on the device
from one step to the next (``score_batch``). The side information that does not depend on the
state (calendar, weather, household info, the data-quality runs) is computed once for the
whole batch. A backfill replay of a year is one call of ~365 steps, not 365 calls.

Only the host-side parts that are lookups stay in numpy, vectorised: the household info
(``model.features.household_codes``: one ``searchsorted`` over the batch's ids) and the
ordering of days into ranks (one ``lexsort``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from meterwatch.model.features import (
    LEVEL_REF,
    MIN_SCALE,
    N_CONTEXT,
    N_SLOTS,
    TEMP_REF,
    TEMP_SCALE,
    ContextTables,
    encode,
    gather_rows,
    household_codes,
)
from meterwatch.model.scoring import N_BLOCKS, N_STATS
from meterwatch.model.state import HouseholdState, StatesByHousehold

if TYPE_CHECKING:
    from meterwatch.model.detector import DayScores, Detector

log = logging.getLogger(__name__)
Tensor = torch.Tensor
STATE_FIELDS = tuple(f.name for f in dataclasses.fields(HouseholdState))
_STAT_FIELDS = (("err_mean", "err_var"), ("peak_mean", "peak_var"),
                ("ratio_mean", "ratio_var"), ("timing_mean", "timing_var"))
_SHARE_EPS = 0.02
_LOG_EPS = 1e-4
_RATIO_KWH = 0.01


# ------------------------------------------------------------------------ constants


class _Constants:
    """A detector's calibration and settings as tensors on its device (built once)."""

    def __init__(self, det: Detector) -> None:
        dev, cal, sc = det.device, det.calibration, det.scoring
        self.device = dev

        def t(a: Any, dtype: torch.dtype = torch.float32) -> Tensor:
            return torch.as_tensor(np.asarray(a), dtype=dtype, device=dev)

        self.stat_mean, self.stat_var = t(cal.stat_mean), t(cal.stat_var)
        self.has_within = len(cal.stat_within) > 0
        self.stat_within = t(cal.stat_within) if self.has_within else None
        self.tail = (t(cal.tail_z), t(cal.tail_s), _tail_lo(cal.tail_s))
        self.cold_edges = t(cal.cold_edges, torch.int64)
        self.cold = [(t(z), t(s), _tail_lo(s)) for z, s in zip(cal.cold_tail_z,
                                                              cal.cold_tail_s, strict=True)]
        self.cold_offset = t(cal.cold_offset)
        self.min_stat_std2 = t(np.asarray(sc.min_stat_std, np.float32) ** 2)
        self.per_household = t(np.asarray(sc.per_household, np.float32))
        # 1 << k for each statistic k: DayScores.unusual's bits (on the device: a copy from
        # the host inside a step would stop the step from being captured as a CUDA graph)
        self.stat_bits = t([1 << k for k in range(N_STATS)], torch.uint8)


def _tail_lo(s: np.ndarray) -> int:
    """Start of the last decade of probability of a tail map (``model.scoring._surprise``)."""
    s = np.asarray(s)
    return min(int(np.searchsorted(s, s[-1] - np.log(10.0))), len(s) - 2)


#: On the CPU, batches smaller than this go to the numpy reference instead: below it the
#: fixed cost of ~300 torch operations exceeds numpy's (benchmarks/RESULTS.md, scorer; the
#: two were level at 1,024 days on the 2-vCPU machine).
CPU_MIN_ROWS = 1024
#: On a GPU, batches smaller than this go to the numpy reference too (its network still on
#: the GPU): on an H100 a one-day batch of 256 took 5.4 ms either way (2026-11-27,
#: benchmarks/RESULTS.md), and a smaller one still replays the 256-row graph
#: (``GRAPH_MIN_ROWS``) while the reference does less (on the CPU here, 8 days took 41 % of
#: 256 days' time). A live stream's batches are mostly a few days.
GPU_MIN_ROWS = 256


def enabled(det: Detector, n: int) -> bool:
    """Whether ``Detector.score`` of ``n`` days runs here (else the numpy reference)."""
    floor = CPU_MIN_ROWS if det.device.type == "cpu" else GPU_MIN_ROWS
    return bool(det.torch_scoring) and n >= floor


_CONSTANTS: weakref.WeakKeyDictionary[Any, tuple[tuple[Any, ...], _Constants]] = (
    weakref.WeakKeyDictionary())
_TABLES: weakref.WeakKeyDictionary[ContextTables, dict[str, Tensor]] = (
    weakref.WeakKeyDictionary())


def constants(det: Detector) -> _Constants:
    """The detector's constants on its device, rebuilt when its calibration, scoring
    settings or device change (the key holds the objects, so identities stay unique)."""
    cal = det.calibration
    key = (cal, *(getattr(cal, f.name) for f in dataclasses.fields(cal)), det.scoring,
           det.device)
    hit = _CONSTANTS.get(det)
    if hit is None or len(hit[0]) != len(key) or any(
            a is not b for a, b in zip(hit[0], key, strict=True)):
        hit = (key, _Constants(det))
        _CONSTANTS[det] = hit
    return hit[1]


#: the side tables of a batch without any (one object, so that its tensors are cached)
_NO_TABLES = ContextTables.empty()


def _table_tensors(tables: ContextTables, device: torch.device) -> dict[str, Tensor]:
    cached = _TABLES.get(tables)
    if cached is None or cached["holidays"].device != device:
        cached = {
            "holidays": torch.as_tensor(np.asarray(tables.holidays, np.int64), device=device),
            "weather_day": torch.as_tensor(np.asarray(tables.weather_day, np.int64),
                                           device=device),
            "temp_max": torch.as_tensor(np.asarray(tables.temp_max, np.float32), device=device),
            "temp_min": torch.as_tensor(np.asarray(tables.temp_min, np.float32), device=device),
        }
        _TABLES[tables] = cached
    return cached


# ------------------------------------------------------------------------ building blocks


def day_of_year(day: Tensor) -> Tensor:
    """int64 days since 1970-01-01 -> day of the year (1 January = 0), proleptic Gregorian
    (the civil-from-days arithmetic, in integer tensor operations)."""
    z = day + 719468
    era = torch.div(z, 146097, rounding_mode="floor")
    doe = z - era * 146097
    yoe = torch.div(doe - doe // 1460 + doe // 36524 - doe // 146096, 365, rounding_mode="floor")
    doy_mar = doe - (365 * yoe + yoe // 4 - yoe // 100)  # 0 = 1 March
    mp = (5 * doy_mar + 2) // 153
    month = torch.where(mp < 10, mp + 3, mp - 9)
    year = yoe + era * 400 + (month <= 2).long()
    # days from civil (year, 1, 1): January counts in the previous March-based year
    y = year - 1
    era1 = torch.div(y, 400, rounding_mode="floor")
    yoe1 = y - era1 * 400
    jan1 = era1 * 146097 + yoe1 * 365 + yoe1 // 4 - yoe1 // 100 + 306 - 719468
    return day - jan1


def _running_max(a: Tensor) -> Tensor:
    """Running maximum along dim 1 by doubling (log2(width) whole-tensor steps; faster than
    ``torch.cummax`` on the CPU for 48 columns, and no slower on a GPU)."""
    a = a.clone()
    shift = 1
    while shift < a.shape[1]:
        a[:, shift:] = torch.maximum(a[:, shift:], a[:, :-shift])
        shift *= 2
    return a


def _running_min_reversed(a: Tensor) -> Tensor:
    """Running minimum along dim 1 from the right (position i: min of a[:, i:])."""
    a = a.clone()
    shift = 1
    while shift < a.shape[1]:
        a[:, :-shift] = torch.minimum(a[:, :-shift], a[:, shift:])
        shift *= 2
    return a


def _columns(n: int, s: int, device: torch.device) -> Tensor:
    return torch.arange(s, dtype=torch.int16, device=device).expand(n, s)


def run_lengths(mask: Tensor) -> Tensor:
    """Torch twin of ``model.quality.run_lengths`` (length of the run of True containing each
    position along dim 1; 0 where False), from two running extrema."""
    n, s = mask.shape
    idx = _columns(n, s, mask.device)
    last_false = _running_max(torch.where(mask, -1, idx))
    next_false = _running_min_reversed(torch.where(mask, s, idx))
    return torch.where(mask, next_false - last_false - 1, 0)


def impute(kwh: Tensor, observed: Tensor, fallback: Tensor, any_observed: Tensor | None = None
           ) -> Tensor:
    """Torch twin of ``model.features.impute`` (``any_observed``: ``observed.any(1)``)."""
    n, s = kwh.shape
    idx = _columns(n, s, kwh.device)
    prev = _running_max(torch.where(observed, idx, -1))
    nxt = _running_min_reversed(torch.where(observed, idx, s))
    has_prev, has_next = prev >= 0, nxt < s
    v_prev = torch.gather(kwh, 1, prev.clamp(0, s - 1).long())
    v_next = torch.gather(kwh, 1, nxt.clamp(0, s - 1).long())
    w = (idx - prev).float() / (nxt - prev).clamp_min(1).float()
    interp = torch.where(has_prev & has_next, v_prev + w * (v_next - v_prev),
                         torch.where(has_prev, v_prev, v_next))
    filled = torch.where(observed, kwh, interp)
    if any_observed is None:
        any_observed = observed.any(dim=1)
    return torch.where(any_observed[:, None], filled, fallback[:, None])


def _log1p_rel(kwh: Tensor, scale: Tensor) -> Tensor:
    return torch.log1p(kwh.clamp_min(0.0) / scale[:, None])


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """``np.interp`` for increasing ``xp`` (NaN in, NaN out)."""
    q = len(xp)
    i = torch.searchsorted(xp, x.contiguous()).clamp(1, q - 1)
    x0, x1 = xp[i - 1], xp[i]
    f0, f1 = fp[i - 1], fp[i]
    y = f0 + (x - x0) * (f1 - f0) / (x1 - x0)
    y = torch.where(x <= xp[0], fp[0], y)
    return torch.where(x >= xp[-1], fp[-1], y)


def _surprise(z: Tensor, tail_z: Tensor, s: Tensor, lo: int) -> Tensor:
    """Torch twin of ``model.scoring._surprise`` (``lo``: ``_tail_lo(s)``)."""
    cols = []
    for k in range(z.shape[1]):
        zq = tail_z[k]
        slope = (s[-1] - s[lo]) / (zq[-1] - zq[lo]).clamp_min(1e-6)
        inside = _interp(z[:, k], zq, s)
        beyond = s[-1] + slope * (z[:, k] - zq[-1])
        cols.append(torch.where(z[:, k] > zq[-1], beyond, inside))
    return torch.nan_to_num(torch.stack(cols, dim=1), nan=0.0)


# ------------------------------------------------------------------------ per-batch inputs


@dataclass
class _Static:
    """What does not depend on the household state: computed once per batch."""

    kwh: Tensor  # (N, 48) float32, NaN = missing
    observed: Tensor  # (N, 48) bool
    n_obs: Tensor  # (N,) int64
    day_mean: Tensor  # (N,) float32
    context: Tensor  # (N, N_CONTEXT) float32, the level columns still to be filled
    zero_any: Tensor  # (N,) bool: a zero run long enough (before the level test)
    flat_run: Tensor  # (N,) bool
    impossible: Tensor  # (N,) bool
    missing: Tensor  # (N,) bool
    day: Tensor  # (N,) int64 days since 1970-01-01


def _static(det: Detector, kwh_np: np.ndarray, day_np: np.ndarray,
            household_ids: Sequence[str] | np.ndarray, tables: ContextTables | None,
            device: torch.device, staging: PinnedArena | None = None) -> _Static:
    sc = det.scoring
    kwh = _tensor(kwh_np, np.float32, device, staging)
    day = _tensor(day_np, np.int64, device, staging)
    n = len(kwh)
    finite = torch.isfinite(kwh)
    observed = finite & (kwh >= 0) & (kwh <= sc.max_kwh)
    n_obs = observed.sum(dim=1)
    total = torch.where(observed, kwh, 0.0).double().sum(dim=1)
    day_mean = torch.where(n_obs > 0, total / n_obs.clamp_min(1), math.nan).float()

    ctx = torch.zeros((n, N_CONTEXT), dtype=torch.float32, device=device)
    dow = torch.remainder(day + 3, 7).double()
    ctx[:, 0] = torch.sin(2 * math.pi * dow / 7).float()
    ctx[:, 1] = torch.cos(2 * math.pi * dow / 7).float()
    ctx[:, 2] = (dow >= 5).float()
    tables = encode(tables, det.vocabulary) or _NO_TABLES
    tt = _table_tensors(tables, device)
    if len(tt["holidays"]):
        ctx[:, 3] = torch.isin(day, tt["holidays"]).float()
    doy = day_of_year(day).double()
    ctx[:, 4] = torch.sin(2 * math.pi * doy / 365.25).float()
    ctx[:, 5] = torch.cos(2 * math.pi * doy / 365.25).float()
    if tables.acorn_group or tables.tariff:
        g_np, tariff_np = household_codes(tables, household_ids)
        g = torch.as_tensor(g_np).to(device)
        onehot = torch.nn.functional.one_hot(g.clamp_min(0), 3).float() * (g >= 0)[:, None]
        ctx[:, 6:9] = onehot
        ctx[:, 9] = torch.as_tensor(tariff_np).to(device)
    wd = tt["weather_day"]
    if len(wd):
        i = torch.searchsorted(wd, day).clamp(0, len(wd) - 1)
        tmax, tmin = tt["temp_max"][i], tt["temp_min"][i]
        ok = (wd[i] == day) & torch.isfinite(tmax) & torch.isfinite(tmin)
        ctx[:, 10] = torch.where(ok, (tmax - TEMP_REF) / TEMP_SCALE, 0.0)
        ctx[:, 11] = torch.where(ok, (tmin - TEMP_REF) / TEMP_SCALE, 0.0)
        ctx[:, 12] = (~ok).float()
    else:
        ctx[:, 12] = 1.0

    n_nan = torch.isnan(kwh).sum(dim=1)
    zero = observed & (kwh == 0.0)
    zero_any = run_lengths(zero).amax(dim=1) >= sc.zero_run_slots
    same = observed[:, 1:] & observed[:, :-1] & (kwh[:, 1:] == kwh[:, :-1])
    same &= kwh[:, 1:] >= sc.flat_min_kwh
    flat_run = run_lengths(same).amax(dim=1) >= sc.flat_run_slots - 1
    return _Static(kwh=kwh, observed=observed, n_obs=n_obs, day_mean=day_mean, context=ctx,
                   zero_any=zero_any, flat_run=flat_run,
                   impossible=n_obs + n_nan < N_SLOTS, missing=n_nan > 0, day=day)


class PinnedArena:
    """One page-locked host buffer that a batch's inputs are staged through on their way to
    a GPU (``cudaHostAlloc`` is slow: it is allocated once, at warm-up, for the largest batch
    expected, and grown only when a larger one comes). Reusable once the stream has
    synchronised, which ``score_batch`` does when it copies the results back."""

    ALIGN = 256

    def __init__(self, pin: bool = True) -> None:
        self.buf: Tensor | None = None
        self.used = 0
        self.pin = pin  # False: plain host memory (tests on machines without a GPU)

    def reserve(self, nbytes: int) -> None:
        if self.buf is None or len(self.buf) < nbytes:
            self.buf = None  # the old buffer goes before the new one is allocated
            self.buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)

    def reset(self, nbytes: int) -> None:
        self.reserve(nbytes)
        self.used = 0

    def stage(self, a: np.ndarray, device: torch.device) -> Tensor:
        assert self.buf is not None
        nbytes = a.nbytes
        view = self.buf[self.used:self.used + nbytes]
        self.used += -(-nbytes // self.ALIGN) * self.ALIGN
        host = view.view(torch.from_numpy(a[:0]).dtype if a.size == 0 else
                         torch.from_numpy(a).dtype).reshape(a.shape)
        host.numpy()[...] = a
        return host.to(device, non_blocking=True)

    def receive(self, t: Tensor) -> Tensor:
        """A copy of device tensor ``t`` into the buffer, enqueued: valid on the host once
        the stream has synchronised."""
        assert self.buf is not None
        nbytes = t.numel() * t.element_size()
        view = self.buf[self.used:self.used + nbytes]
        self.used += -(-nbytes // self.ALIGN) * self.ALIGN
        host = view.view(t.dtype).reshape(t.shape)
        host.copy_(t, non_blocking=True)
        return host


_ARENAS: weakref.WeakKeyDictionary[Any, PinnedArena] = weakref.WeakKeyDictionary()
#: Host bytes one household-day takes in a batch's staged inputs (readings, day, state).
STAGED_BYTES_PER_DAY = 4 * (N_SLOTS + 2 + 13 + 2 * N_BLOCKS) + 8 * 4


def arena(det: Detector, results: bool = False) -> PinnedArena:
    """The detector's staging buffer for inputs (or, with ``results``, for results)."""
    arenas = _RESULT_ARENAS if results else _ARENAS
    a = arenas.get(det)
    if a is None:
        a = arenas[det] = PinnedArena()
    return a


_RESULT_ARENAS: weakref.WeakKeyDictionary[Any, PinnedArena] = weakref.WeakKeyDictionary()


def _tensor(a: Any, dtype: type, device: torch.device, staging: PinnedArena | None = None
            ) -> Tensor:
    """A numpy array on ``device``: through the pinned ``staging`` buffer to a GPU; on the
    CPU sharing memory (read-only arrays are copied)."""
    a = np.ascontiguousarray(a, dtype=dtype)
    if staging is not None:
        return staging.stage(a, device)
    if not a.flags.writeable:
        a = a.copy()
    return torch.from_numpy(a).to(device)


def _rows(s: _Static, idx: Tensor | None) -> _Static:
    if idx is None:
        return s
    return _Static(**{f.name: getattr(s, f.name)[idx] for f in dataclasses.fields(s)})


# ------------------------------------------------------------------------ one step


def _stat_counts(count: Tensor, min_profile_days: int) -> Tensor:
    c = count.float()
    return torch.stack([c, c, (c - 1.0).clamp_min(0.0),
                        (c - float(min_profile_days)).clamp_min(0.0)], dim=1)


def _absorb(st: dict[str, Tensor], day_mean: Tensor, stats: Tensor, shares: Tensor,
            mask: Tensor, fault: Tensor, counts: Tensor, det: Detector, alert: Tensor
            ) -> dict[str, Tensor]:
    """Torch twin of ``model.state.absorb`` as ``Detector.score`` calls it (level and
    statistics masks equal), normal and alert days at once: on ``alert`` rows the level
    target is clipped by ``alert_level_clip`` and the profile weight is
    ``alert_profile_weight``."""
    sc = det.scoring
    new = dict(st)
    c = st["count"].float()
    a1 = 1.0 / (c + 1.0)
    m = mask & torch.isfinite(day_mean)
    a = a1.clamp_min(sc.level_alpha)
    old = st["level"]
    target = day_mean
    known = torch.isfinite(old)
    clip = sc.alert_level_clip
    if math.isfinite(clip):
        clipped = torch.minimum(torch.maximum(target, old / clip), old * clip)
        target = torch.where(known & alert, clipped, target)
    new["level"] = torch.where(m, torch.where(known, old + a * (target - old), target), old)

    mm = mask[:, None]
    a = (1.0 / (counts + 1.0)).clamp_min(sc.err_alpha)
    mean = torch.stack([st[f] for f, _ in _STAT_FIELDS], dim=1)
    var = torch.stack([st[f] for _, f in _STAT_FIELDS], dim=1)
    ok = torch.isfinite(stats)
    delta = torch.where(ok, stats - mean, 0.0)
    first = ok & ((counts == 0) | ((var == 0) & (mean == 0)))
    new_mean = torch.where(first, torch.nan_to_num(stats), mean + a * delta)
    new_var = torch.where(first, 0.0, (1.0 - a) * (var + a * delta**2))
    new_var = torch.where(ok | first, new_var, var)
    new_mean = torch.where(mm, new_mean, mean)
    new_var = torch.where(mm, new_var, var)
    for k, (fm, fv) in enumerate(_STAT_FIELDS):
        new[fm] = new_mean[:, k]
        new[fv] = new_var[:, k]

    weight = torch.where(alert, sc.alert_profile_weight, 1.0)
    ap = (a1.clamp_min(sc.err_alpha) * weight)[:, None]
    pm, pv = st["profile_mean"], st["profile_var"]
    d = shares - pm
    fresh = (c == 0)[:, None]
    new["profile_mean"] = torch.where(mm, torch.where(fresh, shares, pm + ap * d), pm)
    new["profile_var"] = torch.where(mm, torch.where(fresh, 0.0, (1.0 - ap) * (pv + ap * d**2)),
                                     pv)
    a_f = a1.clamp_min(sc.fault_alpha)
    fr = st["fault_rate"]
    new["fault_rate"] = torch.where(mask, fr + a_f * (fault.float() - fr), fr)
    new["count"] = st["count"] + mask.to(st["count"].dtype)
    return new


def _network(det: Detector, x: Tensor, context: Tensor) -> Tensor:
    out = torch.empty_like(x)
    for lo in range(0, len(x), det.chunk_size):
        hi = min(lo + det.chunk_size, len(x))
        out[lo:hi] = det.model(x[lo:hi].to(det.dtype), context[lo:hi].to(det.dtype)).float()
    return out


def _step(det: Detector, k: _Constants, s: _Static, st: dict[str, Tensor],
          threshold: Tensor | float) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Score one day per household (rows of ``s``) from state ``st``: (outputs, new state).
    ``threshold``: the detector's (a device scalar in a CUDA graph, so that a new threshold
    needs no new capture)."""
    sc, cal = det.scoring, det.calibration
    obs = s.observed
    level = st["level"]
    known = torch.isfinite(level) & (level > 0)
    # model inputs
    scale = torch.where(known, level, torch.where(torch.isfinite(s.day_mean), s.day_mean,
                                                  LEVEL_REF)).clamp_min(MIN_SCALE)
    scorable = s.n_obs > 0
    filled = impute(torch.where(obs, s.kwh, 0.0), obs, scale, scorable)
    own = filled.mean(dim=1).clamp_min(MIN_SCALE)
    x = _log1p_rel(filled, scale)
    ctx = s.context.clone()
    safe = torch.where(known, level.clamp_min(MIN_SCALE), LEVEL_REF)
    ctx[:, 13] = torch.where(known, torch.log(safe / LEVEL_REF), 0.0)
    ctx[:, 14] = (~known).float()
    recon = _network(det, _log1p_rel(filled, own) if det.config.shape_input else x, ctx)

    # day statistics
    n_obs = obs.sum(dim=1).clamp_min(1).float()
    sq = torch.where(obs, (x - recon) ** 2, 0.0)
    expected = torch.expm1(recon.clamp_min(0.0)) * scale[:, None]
    own_d = filled.mean(dim=1).clamp_min(1e-3)
    exp_mean = expected.mean(dim=1).clamp_min(1e-3)
    shape_sq = torch.where(obs, (_log1p_rel(filled, own_d) - _log1p_rel(expected, exp_mean))
                           ** 2, 0.0)
    obs_mean = torch.where(obs, filled, 0.0).sum(dim=1) / n_obs
    exp_obs_mean = torch.where(obs, expected, 0.0).sum(dim=1) / n_obs
    blocks = filled.reshape(len(filled), N_BLOCKS, N_SLOTS // N_BLOCKS).sum(dim=2)
    total = blocks.sum(dim=1, keepdim=True) + 1e-3
    shares = torch.log(blocks / total + _SHARE_EPS)
    bz2 = (shares - st["profile_mean"]) ** 2 / st["profile_var"].clamp_min(
        sc.min_block_std**2)
    top = torch.topk(bz2, sc.timing_blocks, dim=1).values.mean(dim=1)
    ready = st["count"] >= sc.min_profile_days
    timing = torch.where(ready, torch.log(top + _LOG_EPS), math.nan)
    ratio = torch.log((obs_mean + _RATIO_KWH) / (exp_obs_mean + _RATIO_KWH))
    ratio = torch.where(known, ratio, math.nan)
    stats = torch.stack([torch.log(shape_sq.sum(dim=1) / n_obs + _LOG_EPS),
                         torch.log(sq.amax(dim=1) + _LOG_EPS), ratio, timing], dim=1)

    # z-scores (Detector.zscores, Calibration.shrink)
    counts = _stat_counts(st["count"], sc.min_profile_days)
    c = counts * k.per_household
    h_mean = torch.stack([st[f] for f, _ in _STAT_FIELDS], dim=1)
    h_var = torch.stack([st[f] for _, f in _STAT_FIELDS], dim=1)
    if k.stat_within is None:
        pd = sc.prior_days
        mean = (c * h_mean + pd * k.stat_mean) / (c + pd)
        var = (c * h_var + pd * k.stat_var) / (c + pd)
    else:
        within = k.stat_within.clamp_min(1e-6)
        between = torch.maximum(k.stat_var - within, 1e-3 * k.stat_var + 1e-6)
        kk = within / between
        mean = (c * h_mean + kk * k.stat_mean) / (c + kk)
        own_v = (c * h_var + sc.prior_days * within) / ((c - 1.0).clamp_min(0.0)
                                                        + sc.prior_days)
        var = own_v + within / (c + kk)
    std = torch.sqrt(torch.maximum(var, k.min_stat_std2))
    z = (stats - mean) / std
    level_z = z[:, 2].clone()
    if sc.level_ar:
        phi = sc.level_ar
        last = st["last_day"]
        follows = (last.long() == s.day - 1) & (last > 0)
        z[:, 2] = torch.where(follows, (level_z - phi * st["ratio_z_last"])
                              / math.sqrt(1.0 - phi * phi), level_z)
    z[:, 2] = z[:, 2].abs()

    # surprises, each statistic's score and the model score (Calibration.stat_scores)
    count = st["count"]
    sur = _surprise(z, *k.tail)
    if len(k.cold):
        edges = k.cold_edges
        b = torch.searchsorted(edges, count.long().contiguous(), right=True) - 1
        b = torch.where(count >= edges[-1], -1, b)
        for j, cold in enumerate(k.cold):
            if z.device.type == "cpu":  # only the bucket's rows
                rows = torch.nonzero(b == j).squeeze(1)
                if len(rows):
                    sur[rows] = _surprise(z[rows], *cold)
            else:  # every row, then select: no host synchronisation on a GPU
                sur = torch.where((b == j)[:, None], _surprise(z, *cold), sur)
        offset = torch.where(b >= 0, k.cold_offset[b.clamp_min(0)], 0.0)[:, None]
        stat_scores = torch.where(torch.isposinf(offset), 0.0, (sur - offset).clamp_min(0.0))
    else:
        stat_scores = sur
    model_score = stat_scores.amax(dim=1)
    del cal

    # data-quality rules and fusion
    live = ~(level < sc.zero_min_level)
    zero_run = s.zero_any & live
    cf = count.float()
    fault_rate = cf * st["fault_rate"] / (cf + sc.prior_days)
    routine = fault_rate >= sc.fault_mute_rate
    fault = zero_run | s.flat_run
    alerting = (fault & ~routine) | s.impossible
    score = torch.where(scorable, model_score + sc.rule_bonus * alerting.float(), math.nan)
    is_alert = score >= threshold
    model_fired = (model_score >= threshold) & scorable
    signals = (model_fired.to(torch.uint8) | (zero_run.to(torch.uint8) << 1)
               | (s.flat_run.to(torch.uint8) << 2) | (s.impossible.to(torch.uint8) << 3)
               | (s.missing.to(torch.uint8) << 4))

    # state update: every day with enough readings; alert days clipped and down-weighted
    enough = s.n_obs >= sc.min_observed
    w = sc.winsor_z * std
    capped = torch.minimum(torch.maximum(stats, mean - w), mean + w)
    capped = torch.where(torch.isnan(stats), stats, capped)
    new = _absorb(st, s.day_mean, capped, shares, enough, fault, counts, det, is_alert)
    measured = enough & torch.isfinite(level_z)
    new["ratio_z_last"] = torch.where(measured, level_z.clamp(-sc.winsor_z, sc.winsor_z), 0.0)
    new["last_day"] = torch.where(measured, s.day, 0).to(st["last_day"].dtype)
    out = {"score": score, "raw_error": sq.sum(dim=1) / n_obs, "model_score": model_score,
           "stat_z": z, "stats": stats, "is_alert": is_alert,
           "expected": expected, "slot_error": sq / n_obs[:, None], "signals": signals,
           "unusual": ((stat_scores >= threshold) & scorable[:, None]).to(torch.uint8)
           .mul(k.stat_bits).sum(dim=1).to(torch.uint8), "imputed": ~obs}
    return out, new


# ------------------------------------------------------------------------ CUDA graphs

#: A step's rows are padded to a power of two of at least this many, so that a few captured
#: graphs serve every batch size; steps of more rows than GRAPH_MAX_ROWS are replayed in
#: chunks of that many (a step's rows are independent of one another).
GRAPH_MIN_ROWS = 256
GRAPH_MAX_ROWS = 65536


def _bucket(m: int) -> int:
    return max(GRAPH_MIN_ROWS, 1 << max(0, m - 1).bit_length())


class _StepGraph:
    """``_step`` for ``rows`` rows, captured once with static input buffers and replayed.

    A step is ~1,100 small kernels whose launches, not the GPU, set its time (H100, 2026-11-27:
    17.7 ms a step at any batch up to 65,536 days, of which the device was busy ~3 ms;
    ``benchmarks/gpu_profile.py``). A replay launches them at once. ``capture=False`` runs
    ``_step`` on the same padded buffers eagerly: the padding and gathering, without a GPU.
    """

    def __init__(self, det: Detector, k: _Constants, rows: int, s_like: _Static,
                 st_like: Mapping[str, Tensor], capture: bool) -> None:
        dev = det.device
        self.k, self.rows = k, rows  # not the detector: the cache is keyed weakly by it

        def blank(v: Tensor) -> Tensor:
            return torch.zeros((rows, *v.shape[1:]), dtype=v.dtype, device=dev)

        self.s = _Static(**{f.name: blank(getattr(s_like, f.name))
                            for f in dataclasses.fields(_Static)})
        self.st = {f: blank(v) for f, v in st_like.items()}
        self.threshold = torch.zeros((), dtype=torch.float32, device=dev)
        self.graph: Any = None
        self.outs: dict[str, Tensor] = {}
        self.new: dict[str, Tensor] = {}
        if capture:
            # warm up on a side stream (lazy initialisation, cuBLAS workspaces), then capture;
            # "thread_local": another thread's CUDA calls do not break the capture
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                _step(det, k, self.s, self.st, self.threshold)
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.outs, self.new = _step(det, k, self.s, self.st, self.threshold)
            self.graph = graph

    def run(self, det: Detector, s: _Static, st: Mapping[str, Tensor], rows: Tensor | slice
            ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The step for ``rows`` of ``s`` and ``st`` (an index tensor or a slice); the results
        are views of this graph's output buffers, valid until its next run."""
        m = _count(rows)
        for field in dataclasses.fields(_Static):
            _load(getattr(self.s, field.name), getattr(s, field.name), rows, m)
        for name, v in st.items():
            _load(self.st[name], v, rows, m)
        self.threshold.fill_(det.threshold)
        if self.graph is not None:
            self.graph.replay()
            outs, new = self.outs, self.new
        else:
            outs, new = _step(det, self.k, self.s, self.st, self.threshold)
        return {n: v[:m] for n, v in outs.items()}, {f: v[:m] for f, v in new.items()}


def _count(rows: Tensor | slice | None, s: _Static | None = None) -> int:
    """How many rows an index tensor or a slice selects (None: all of ``s``'s)."""
    if rows is None:
        assert s is not None
        return len(s.day)
    return len(rows) if isinstance(rows, Tensor) else rows.stop - rows.start


def _load(dst: Tensor, src: Tensor, rows: Tensor | slice, m: int) -> None:
    if isinstance(rows, Tensor):
        torch.index_select(src, 0, rows, out=dst[:m])
    else:
        dst[:m].copy_(src[rows])


class StepGraphs:
    """A detector's captured steps, one per padded size (``_bucket``), for its current
    constants, network and precision (any change captures afresh: a graph holds the numbers
    it was captured with). The threshold is an input: it moves with ``--target-far`` and the
    rolling calibration, which would otherwise capture anew every time."""

    def __init__(self, det: Detector, k: _Constants, capture: bool) -> None:
        self.key = _graph_key(det, k)
        self.k, self.capture = k, capture
        self.graphs: dict[int, _StepGraph] = {}

    def run(self, det: Detector, s: _Static, st: Mapping[str, Tensor], idx: Tensor | None
            ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``_step`` on the rows ``idx`` of ``s`` and ``st`` (None: all rows)."""
        m = _count(idx, s)
        chunks: list[Tensor | slice] = []
        for lo in range(0, max(m, 1), GRAPH_MAX_ROWS):
            hi = min(lo + GRAPH_MAX_ROWS, m)
            chunks.append(slice(lo, hi) if idx is None else idx[lo:hi])
        if len(chunks) == 1:
            return self._graph(det, chunks[0], s, st).run(det, s, st, chunks[0])
        outs: dict[str, Tensor] = {}
        new: dict[str, Tensor] = {}
        lo = 0
        for rows in chunks:
            o, nw = self._graph(det, rows, s, st).run(det, s, st, rows)
            hi = lo + len(o["score"])
            for part, whole in ((o, outs), (nw, new)):
                for name, v in part.items():
                    if name not in whole:
                        whole[name] = torch.empty((m, *v.shape[1:]), dtype=v.dtype,
                                                  device=v.device)
                    whole[name][lo:hi] = v
            lo = hi
        return outs, new

    def _graph(self, det: Detector, rows: Tensor | slice, s: _Static,
               st: Mapping[str, Tensor]) -> _StepGraph:
        b = _bucket(_count(rows))
        g = self.graphs.get(b)
        if g is None:
            try:
                g = _StepGraph(det, self.k, b, s, st, self.capture)
            except torch.cuda.OutOfMemoryError:
                raise  # the scorer's to handle (it splits the batch)
            except Exception as exc:  # any failure to capture: the steps run eagerly
                raise CaptureFailed(f"{type(exc).__name__}: {exc}") from exc
            self.graphs[b] = g
        return g


class CaptureFailed(RuntimeError):
    """A step could not be captured as a CUDA graph."""


def _graph_key(det: Detector, k: _Constants) -> tuple[Any, ...]:
    return (k, det.model, det.dtype, det.chunk_size)


_GRAPHS: weakref.WeakKeyDictionary[Any, StepGraphs] = weakref.WeakKeyDictionary()


def step_graphs(det: Detector, k: _Constants, capture: bool | None = None
                ) -> StepGraphs | None:
    """The detector's captured steps (None: steps run eagerly: on the CPU, with
    ``det.cuda_graphs`` off, or after a capture failed). ``capture=False`` gives the padded
    eager runner (tests)."""
    if capture is None:
        if det.device.type != "cuda" or not det.cuda_graphs:
            return None
        capture = True
    runner = _GRAPHS.get(det)
    key = _graph_key(det, k)
    if runner is None or runner.capture != capture or len(runner.key) != len(key) or any(
            a is not b and a != b for a, b in zip(runner.key, key, strict=True)):
        runner = _GRAPHS[det] = StepGraphs(det, k, capture)
    return runner


def _run_step(det: Detector, k: _Constants, s: _Static, st: Mapping[str, Tensor],
              idx: Tensor | None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``_step`` on the rows ``idx`` of ``s`` and ``st`` (None: all rows): on a GPU through
    captured graphs; if a capture fails, eagerly from then on (logged once)."""
    runner = step_graphs(det, k)
    if runner is not None and _count(idx, s):
        try:
            return runner.run(det, s, st, idx)
        except CaptureFailed as exc:
            log.warning("CUDA graph capture failed (%s); scoring steps run without graphs "
                        "from now on", exc)
            det.cuda_graphs = False
            _GRAPHS.pop(det, None)
    if idx is None:
        return _step(det, k, s, dict(st), det.threshold)
    return _step(det, k, _rows(s, idx), {f: v[idx] for f, v in st.items()}, det.threshold)


# ------------------------------------------------------------------------ entry points


def ranks(keys: np.ndarray, day: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's rank among its household's rows by date (0 = earliest), and the row of the
    same household's next day (-1: none in the batch)."""
    n = len(day)
    order = np.lexsort((day, keys))
    sk = keys[order]
    starts = np.r_[True, sk[1:] != sk[:-1]] if n else np.zeros(0, bool)
    group_start = np.maximum.accumulate(np.where(starts, np.arange(n), 0)) if n else starts
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - group_start
    nxt = np.full(n, -1, dtype=np.int64)
    if n:
        follow = ~starts[1:]
        nxt[order[:-1][follow]] = order[1:][follow]
    return rank, nxt


def _state_tensors(state: HouseholdState | dict[str, np.ndarray], device: torch.device,
                   staging: PinnedArena | None = None) -> dict[str, Tensor]:
    get = state.get if isinstance(state, dict) else (lambda f: getattr(state, f))
    return {f: _tensor(get(f), np.int32 if f in ("count", "last_day") else np.float32, device,
                       staging)
            for f in STATE_FIELDS}


def score_batch(
    det: Detector,
    kwh: np.ndarray,
    day: np.ndarray,
    household_ids: Sequence[str] | np.ndarray,
    keys: np.ndarray | None,
    state: HouseholdState | dict[str, np.ndarray],
    tables: ContextTables | None = None,
    detail_rows: str = "all",
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Score N household-days on the detector's device.

    ``keys`` (N,) identify households (equal key = same household; None: every row its own);
    ``state`` holds, per row, the household's state before that row's day (rows whose
    household has an earlier day in the batch get the state that day leaves instead).
    ``detail_rows``: ``"all"`` returns ``expected``/``slot_error`` for every row,
    ``"alerts"`` only for alert rows (the rest zero; the copy back shrinks to those rows).

    Returns (outputs, state after each row's day) as numpy arrays in row order.
    """
    kwh = np.asarray(kwh)
    day = np.asarray(day)
    n = len(day)
    assert kwh.shape == (n, N_SLOTS), f"kwh must be (N, {N_SLOTS}), got {kwh.shape}"
    k = constants(det)
    dev = det.device
    with det._lock, torch.inference_mode():
        staging = None
        if dev.type == "cuda":
            staging = arena(det)
            staging.reset(n * STAGED_BYTES_PER_DAY + 64 * PinnedArena.ALIGN)
        s_all = _static(det, kwh, day, household_ids, tables, dev, staging)
        cur = _state_tensors(state, dev, staging)
        if keys is None or n == 0:
            waves: list[Tensor | None] = [None]
            follow: list[tuple[Tensor, Tensor]] = []
        else:
            rank, nxt = ranks(np.asarray(keys), day)
            top = int(rank.max())
            if top == 0:
                waves, follow = [None], []
            else:
                order = np.argsort(rank, kind="stable")
                bounds = np.searchsorted(rank[order], np.arange(1, top + 1))
                groups = np.split(order, bounds)
                waves = [torch.as_tensor(g).to(dev) for g in groups]
                follow = []
                for g in groups:
                    later = nxt[g]
                    has = later >= 0
                    follow.append((torch.as_tensor(np.flatnonzero(has)).to(dev),
                                   torch.as_tensor(later[has]).to(dev)))
        if waves == [None]:
            outs, new = _run_step(det, k, s_all, cur, None)
        else:
            outs_parts: dict[str, Tensor] = {}
            cur = {f: v.clone() for f, v in cur.items()}  # the caller's arrays stay as they were
            new = {f: torch.empty_like(v) for f, v in cur.items()}
            for w, idx in enumerate(waves):
                assert idx is not None
                o, nw = _run_step(det, k, s_all, cur, idx)
                for name, v in o.items():
                    if name not in outs_parts:
                        outs_parts[name] = torch.empty((n, *v.shape[1:]), dtype=v.dtype,
                                                       device=dev)
                    outs_parts[name][idx] = v
                pos, dst = follow[w]
                for f, v in nw.items():
                    new[f][idx] = v
                    cur[f][dst] = v[pos]
            outs = outs_parts
        return _to_host(outs, new, detail_rows,
                        arena(det, results=True) if dev.type == "cuda" else None)


def warm_up(det: Detector, n: int) -> None:
    """Score synthetic days (on a GPU: CUDA context, cuBLAS handles and kernels load here
    instead of in the first real batch, and a step is captured as a CUDA graph for each
    padded size up to ``n`` days) and reserve the pinned staging buffer for batches of
    ``n`` days."""
    sizes = [min(n, 1024)]
    if det.device.type == "cuda":
        arena(det).reserve(n * STAGED_BYTES_PER_DAY + 64 * PinnedArena.ALIGN)
        if det.cuda_graphs:
            top = _bucket(min(n, GRAPH_MAX_ROWS))
            sizes = [b for b in (GRAPH_MIN_ROWS << i for i in range(32)) if b <= top]
    for m in sizes:
        kwh = np.full((m, N_SLOTS), 0.2, np.float32)
        kwh[:, ::7] = 0.4
        st = HouseholdState.empty(m)
        score_batch(det, kwh, np.full(m, 19723), [f"warm-up-{i}" for i in range(m)], None,
                    st)
    if det.device.type == "cuda":
        torch.cuda.synchronize(det.device)


def _to_host(outs: dict[str, Tensor], new: dict[str, Tensor], detail_rows: str,
             staging: PinnedArena | None = None
             ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    detail = ("expected", "slot_error")
    wanted = {name: v for name, v in outs.items()
              if detail_rows == "all" or name not in detail}
    host = host_arrays({**wanted, **{f"state.{f}": v for f, v in new.items()}},
                       staging=staging)
    state = {f: host.pop(f"state.{f}") for f in new}
    if detail_rows == "alerts":
        n = len(host["score"])
        rows = np.flatnonzero(host["is_alert"])
        rows_t = torch.as_tensor(rows).to(outs["expected"].device)
        picked = host_arrays({name: outs[name][rows_t] for name in detail}) if len(rows) else {}
        for name in detail:
            full = np.zeros((n, N_SLOTS), np.float32)
            if len(rows):
                full[rows] = picked[name]
            host[name] = full
    return host, state


_NUMPY = {torch.float32: np.float32, torch.int32: np.int32, torch.uint8: np.uint8,
          torch.bool: np.bool_}
_CARRIER = {4: torch.int32, 1: torch.uint8}


def host_arrays(tensors: Mapping[str, Tensor], pack: bool | None = None,
                staging: PinnedArena | None = None) -> dict[str, np.ndarray]:
    """The tensors as numpy arrays on the host.

    From a GPU (or with ``pack``), tensors of 4-byte and of 1-byte types travel packed, one
    transfer per size, instead of one small transfer (and host synchronisation) each; with
    ``staging``, into its page-locked buffer and then copied out (the arrays never share it).
    From a GPU, copies into fresh pageable memory ran at ~1 GB/s: 16 MB of results of 65,536
    days took 12-17 ms (H100, 2026-11-27). On the CPU, unpacked, the arrays share the
    tensors' memory.
    """
    first = next(iter(tensors.values()), None)
    if pack is None:
        pack = first is not None and first.device.type != "cpu"
    if not pack or first is None:
        return {name: v.cpu().numpy() for name, v in tensors.items()}
    groups = []
    for size, carrier in _CARRIER.items():
        names = [n for n, v in tensors.items() if v.dtype in _NUMPY and v.element_size() == size]
        if names:
            groups.append((names, torch.cat([tensors[n].contiguous().view(carrier).reshape(-1)
                                             for n in names])))
    if staging is not None:
        staging.reset(sum(f.numel() * f.element_size() + PinnedArena.ALIGN for _, f in groups))
        landed = [staging.receive(flat) for _, flat in groups]
        if first.device.type == "cuda":
            torch.cuda.current_stream(first.device).synchronize()
        bufs = [t.numpy().copy() for t in landed]
    else:
        bufs = [flat.cpu().numpy() for _, flat in groups]
    host: dict[str, np.ndarray] = {}
    for (names, _), buf in zip(groups, bufs, strict=True):
        pos = 0
        for n in names:
            v = tensors[n]
            host[n] = buf[pos:pos + v.numel()].view(_NUMPY[v.dtype]).reshape(v.shape)
            pos += v.numel()
    for n, v in tensors.items():
        if n not in host:
            host[n] = v.cpu().numpy()
    return host


def score(det: Detector, kwh: np.ndarray, day: np.ndarray, household_ids: Sequence[str],
          state: HouseholdState, tables: ContextTables | None = None) -> DayScores:
    """``Detector.score`` on the device: one day per household."""
    from meterwatch.model.detector import DayScores

    out, new = score_batch(det, kwh, day, household_ids, None, state, tables)
    return DayScores(**out, state=HouseholdState(**new))


#: a replay scores at most about this many days at once: the device holds each day's
#: inputs, intermediates and outputs while it scans, so a chunk bounds that and not the
#: history (training on 352,600 days: peak resident memory 1,472 -> 1,295 MB, 2026-11-26)
REPLAY_CHUNK_ROWS = 65536


def _time_chunks(hh: np.ndarray, day: np.ndarray, rows: int) -> list[np.ndarray]:
    """Row indices in date order (households by code within a date), cut every ``rows``
    rows. Each chunk holds a run of consecutive days of each household in it, and a
    household's later days come in later chunks, so the scan carries each household's
    state from one chunk to the next. Every step of the scan (one day of every household
    in the chunk) stays as wide as the data: chunks of whole households had ~104
    households a step on the full London set (5,567 households x 630 days), and the scan
    was ~34,000 narrow steps instead of ~700 wide ones."""
    if len(hh) <= rows:
        return [np.arange(len(hh))]
    order = np.lexsort((hh, day))
    return np.split(order, range(rows, len(order), rows))


def replay(det: Detector, kwh: np.ndarray, day: np.ndarray, household_ids: Sequence[str],
           tables: ContextTables | None = None,
           state: Mapping[str, HouseholdState] | None = None,
           ) -> tuple[DayScores, StatesByHousehold]:
    """``Detector.replay`` as one scan: each household's days in date order, all households
    at once per step."""
    from meterwatch.model.detector import DayScores

    kwh = np.asarray(kwh)
    day = np.asarray(day)
    ids = np.asarray(household_ids, dtype=object)
    uniq, hh = np.unique(ids.astype(str), return_inverse=True)
    start = HouseholdState.starting(uniq.tolist(), state)
    pairs = hh.astype(np.int64) * (int(day.max(initial=0)) - int(day.min(initial=0)) + 1) + (
        day - day.min(initial=0))
    assert len(np.unique(pairs)) == len(pairs), "a household twice on one day"
    out: dict[str, np.ndarray] = {}
    new: dict[str, np.ndarray] = {}
    for rows in _time_chunks(hh, day, REPLAY_CHUNK_ROWS):
        o, nw = score_batch(det, kwh[rows], day[rows], list(ids[rows]), hh[rows],
                            start.take(hh[rows]), tables)
        gather_rows(out, o, rows, len(day))
        gather_rows(new, nw, rows, len(day))
        # each household's state after its latest day here starts its next chunk (and,
        # after the last chunk, is its final state: ``start`` is in ``uniq`` order)
        h = hh[rows]
        by = np.lexsort((day[rows], h))
        last = by[np.r_[h[by][1:] != h[by][:-1], True]]
        start.put(h[last], HouseholdState(**{f: v[last] for f, v in nw.items()}))
    return DayScores(**out, state=HouseholdState(**new)), StatesByHousehold(uniq.tolist(), start)
