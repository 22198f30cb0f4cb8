"""The conditional autoencoder: one short file, read top to bottom.

A day of 48 half-hourly readings (already normalised, see ``model.features.model_inputs``)
is encoded together with the day's context vector
(calendar, household, weather, level; ``model.features.FEATURE_NAMES``) into a small
latent code, and decoded back, again with the context. Conditioning both halves on the
context lets the latent code spend its few dimensions on the shape of *this* day instead of
on "it is a cold Sunday in an affluent house".
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of ``ConditionalAutoencoder`` (saved inside every checkpoint)."""

    # 48 half-hours per local day: the unit the stream scores.
    n_slots: int = 48
    # Context features per day (model.features.N_CONTEXT); checked against the code on load.
    n_context: int = 15
    # Encoder widths; the decoder mirrors them. Wide enough to model weekday/weekend/season
    # shapes, small enough to train in seconds on 2 CPU cores.
    hidden: tuple[int, ...] = (128, 64)
    # Bottleneck size: the fewer dimensions, the less an anomaly can be "explained away";
    # 8 keeps normal shapes (peak timing, peak height, baseload ...) reconstructable.
    latent: int = 8
    # Dropout between hidden layers; a light regulariser for small training sets.
    dropout: float = 0.05
    # Feed the context to the decoder too (a conditional AE); False = plain AE on [x, c].
    condition_decoder: bool = True
    # Encode the day's shape only (readings over the day's own mean) while the target is
    # relative to the household's level: the latent code then cannot carry the day's level,
    # so the decoder predicts it from context and a level shift is a reconstruction error.
    # False = the plain AE of the case study (input == target).
    shape_input: bool = True

    def __post_init__(self) -> None:
        assert self.n_slots > 0 and self.n_context >= 0, (self.n_slots, self.n_context)
        assert self.latent > 0 and all(h > 0 for h in self.hidden), (self.hidden, self.latent)
        assert 0.0 <= self.dropout < 1.0, self.dropout
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))

    @classmethod
    def reference(cls) -> ModelConfig:
        """The case study's architecture: 48 + 15 context -> 32 -> 8 -> 2 latent."""
        return cls(hidden=(32, 8), latent=2, dropout=0.0, shape_input=False)

    @classmethod
    def default(cls) -> ModelConfig:
        """meterwatch's preset (chosen by ``model.evaluate`` on real data)."""
        return cls()

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (``torch.load(weights_only=True)``-safe)."""
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        d["hidden"] = tuple(d["hidden"])
        return cls(**d)


def _mlp(widths: list[int], dropout: float) -> nn.Sequential:
    """Linear layers with GELU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.GELU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class ConditionalAutoencoder(nn.Module):
    """x (B, 48) and context c (B, C) -> reconstruction (B, 48).

    >>> net = ConditionalAutoencoder(ModelConfig.reference())
    >>> net(torch.zeros(4, 48), torch.zeros(4, 15)).shape
    torch.Size([4, 48])
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        cfg = config
        dec_in = cfg.latent + (cfg.n_context if cfg.condition_decoder else 0)
        self.encoder = _mlp([cfg.n_slots + cfg.n_context, *cfg.hidden, cfg.latent], cfg.dropout)
        self.decoder = _mlp([dec_in, *reversed(cfg.hidden), cfg.n_slots], cfg.dropout)

    def encode(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        assert x.shape[-1] == self.config.n_slots, f"x {tuple(x.shape)}"
        assert c.shape[-1] == self.config.n_context, f"c {tuple(c.shape)}"
        return self.encoder(torch.cat([x, c], dim=-1))  # (B, 48 + C) -> (B, latent)

    def decode(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.config.condition_decoder:
            z = torch.cat([z, c], dim=-1)  # (B, latent + C)
        return self.decoder(z)  # -> (B, 48)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x, c), c)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
