"""The network and its hyper-parameters."""

import torch

from meterwatch.model import N_CONTEXT, ConditionalAutoencoder, ModelConfig


def _linear_shapes(seq: torch.nn.Sequential) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in seq if isinstance(m, torch.nn.Linear)]


def test_reference_sizes() -> None:
    cfg = ModelConfig.reference()
    net = ConditionalAutoencoder(cfg)
    assert cfg.n_slots == 48 and cfg.n_context == N_CONTEXT == 15
    assert _linear_shapes(net.encoder) == [(48 + 15, 32), (32, 8), (8, 2)]
    assert _linear_shapes(net.decoder) == [(2 + 15, 8), (8, 32), (32, 48)]
    assert not cfg.shape_input


def test_forward_shapes_default() -> None:
    net = ConditionalAutoencoder(ModelConfig.default())
    x, c = torch.randn(5, 48), torch.randn(5, 15)
    assert net(x, c).shape == (5, 48)
    assert net.encode(x, c).shape == (5, ModelConfig.default().latent)


def test_config_dict_round_trip() -> None:
    cfg = ModelConfig(hidden=(16, 4), latent=3)
    d = cfg.to_dict()
    assert d["hidden"] == [16, 4]
    assert ModelConfig.from_dict(d) == cfg
