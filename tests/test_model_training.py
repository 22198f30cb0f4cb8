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
    fit_autoencoder,
    plot_history,
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
