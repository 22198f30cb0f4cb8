"""Training loop: checkpoints and resume, NaN guard, loss curves, batch sizing."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from meterwatch.model import ModelConfig, SyntheticConfig, TrainConfig, generate
from meterwatch.model.features import model_inputs
from meterwatch.model.training import (
    _auto_batch_size,
    calibration_days,
    fit_autoencoder,
    plot_history,
    tail_quantile,
    trailing_levels,
)

CFG = TrainConfig(model=ModelConfig(hidden=(16,), latent=2), batch_size=64, device="cpu")


@pytest.fixture(scope="module")
def inputs():
    d = generate(SyntheticConfig(n_households=20, n_days=14, anomaly_rate=0.0))
    ids, day, kwh, _ = d.long()
    level = trailing_levels(kwh, day, ids, CFG.scoring)
    inp = model_inputs(kwh, day, ids, level, d.tables, 12.0)
    return inp


def _rows(inp, sl):
    from meterwatch.model.features import ModelInputs

    return ModelInputs(**{k: getattr(inp, k)[sl] for k in inp.__dataclass_fields__})


def test_checkpoint_resume_continues(inputs, tmp_path: Path) -> None:
    train, val = _rows(inputs, slice(0, 240)), _rows(inputs, slice(240, None))
    cfg = replace(CFG, max_epochs=3, checkpoint_dir=str(tmp_path))
    _, h1 = fit_autoencoder(train, val, cfg, torch.device("cpu"))
    assert h1.epoch == [0, 1, 2] and (tmp_path / "train_state.pt").exists()
    _, h2 = fit_autoencoder(train, val, replace(cfg, max_epochs=5), torch.device("cpu"))
    assert h2.epoch == [0, 1, 2, 3, 4]
    assert h2.train_loss[:3] == h1.train_loss  # resumed, not restarted
    _, h3 = fit_autoencoder(train, val, replace(cfg, max_epochs=5),
                            torch.device("cpu"))
    assert h3.epoch == h2.epoch  # nothing left to do


def test_deterministic_training(inputs) -> None:
    train, val = _rows(inputs, slice(0, 240)), _rows(inputs, slice(240, None))
    cfg = replace(CFG, max_epochs=2)
    m1, _ = fit_autoencoder(train, val, cfg, torch.device("cpu"))
    m2, _ = fit_autoencoder(train, val, cfg, torch.device("cpu"))
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_nan_guard(inputs) -> None:
    bad = _rows(inputs, slice(0, 240))
    bad.x = np.full_like(bad.x, np.nan)
    with pytest.raises(FloatingPointError, match="non-finite"):
        fit_autoencoder(bad, _rows(inputs, slice(240, None)), replace(CFG, max_epochs=1),
                        torch.device("cpu"))


def test_loss_plot_and_batch_size(inputs, tmp_path: Path) -> None:
    _, h = fit_autoencoder(_rows(inputs, slice(0, 240)), _rows(inputs, slice(240, None)),
                           replace(CFG, max_epochs=2), torch.device("cpu"))
    plot_history(h, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 1000
    b = _auto_batch_size(1_000_000, ModelConfig(), torch.device("cpu"))
    assert 64 <= b <= 65536 and b & (b - 1) == 0
    assert _auto_batch_size(100, ModelConfig(), torch.device("cpu")) == 64


def test_resident_and_loader_paths_both_train(inputs) -> None:
    train, val = _rows(inputs, slice(0, 240)), _rows(inputs, slice(240, None))
    losses = {}
    for resident in (True, False):
        _, h = fit_autoencoder(train, val, replace(CFG, max_epochs=3, resident=resident),
                               torch.device("cpu"))
        assert h.epoch == [0, 1, 2] and np.isfinite(h.train_loss).all()
        assert h.train_loss[-1] < h.train_loss[0]
        losses[resident] = h.val_loss[-1]
    assert abs(losses[True] - losses[False]) < 0.5 * losses[False]  # same problem, same scale


def test_non_finite_step_leaves_no_trace() -> None:
    """The device-side guard: a NaN batch changes neither the weights nor Adam's state, also
    when it is the very first step (Adam's state is created empty)."""
    from meterwatch.model.training import _SkipNonFinite

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1, weight_decay=1e-3)
    guard = _SkipNonFinite(model, opt)
    x = torch.randn(8, 4)

    def step(bad: bool) -> None:
        loss = model(x).pow(2).mean() * (float("nan") if bad else 1.0)
        finite = torch.isfinite(loss)
        opt.zero_grad(set_to_none=True)
        torch.where(finite, loss, 0.0).backward()
        saved = guard.before(finite)
        opt.step()
        guard.after(finite, saved)

    w0 = [p.detach().clone() for p in model.parameters()]
    step(bad=True)  # first step, NaN: nothing changes, the state is zeros (as new)
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters(), strict=True))
    assert all(not v.any() for st in opt.state.values() for v in st.values())
    step(bad=False)
    w1 = [p.detach().clone() for p in model.parameters()]
    s1 = [v.clone() for st in opt.state.values() for v in st.values()]
    assert not all(torch.equal(a, b) for a, b in zip(w0, w1, strict=True))
    step(bad=True)
    assert all(torch.equal(a, b) for a, b in zip(w1, model.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in
               zip(s1, [v for st in opt.state.values() for v in st.values()], strict=True))


def test_fp16_resume_from_a_checkpoint_without_scaler_state() -> None:
    from meterwatch.model.training import _load_scaler

    class Scaler:  # torch's GradScaler rejects an empty state the same way
        loaded: dict | None = None

        def load_state_dict(self, state: dict) -> None:
            if not state:
                raise RuntimeError("The source state dict is empty, possibly because it was "
                                   "saved from a disabled instance of GradScaler.")
            self.loaded = state

    sc = Scaler()
    _load_scaler(sc, {}, use_scaler=True)  # a CPU (or bf16) checkpoint resumed with fp16
    _load_scaler(sc, {"scale": 1024.0}, use_scaler=False)
    assert sc.loaded is None
    _load_scaler(sc, {"scale": 1024.0}, use_scaler=True)
    assert sc.loaded == {"scale": 1024.0}


def test_calibration_days_leave_out_household_months_in_a_lasting_unusual_state() -> None:
    # 40 households x 120 days of calm scores; household 3 spends its second month (days
    # 30..59 of 1970) far above everyone: the threshold must not be set by that month
    rng = np.random.default_rng(0)
    hh = np.repeat(np.arange(40), 120)
    day = np.tile(np.arange(120), 40)
    score = rng.exponential(1.0, len(hh))
    odd = (hh == 3) & (day >= 31) & (day < 59)
    score[odd] += 8.0
    usable = np.ones(len(hh), bool)
    usable[5] = False
    sel = calibration_days(score, hh, day, usable, 0.01)
    assert 5 not in sel
    assert not np.isin(np.flatnonzero(odd), sel).any()
    # chance leaves out almost nothing else (a household-month of calm days needs four of
    # its days in the top 1 % to be left out: probability 2e-4)
    assert len(np.setdiff1d(np.flatnonzero(usable & ~odd), sel)) <= 31
    far = (score[~odd] >= tail_quantile(score[sel], 0.01)).mean()
    far_all = (score[~odd] >= tail_quantile(score[usable], 0.01)).mean()
    assert 0.007 <= far <= 0.013 < 0.007 * 2 and far_all < 0.006
