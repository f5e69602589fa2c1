import pytest
import torch

from plait.models import PRESETS, ModelConfig, Transformer, get_config


def test_same_seed_same_weights_other_seed_different():
    a, b, c = (Transformer(get_config("tiny"), seed=s) for s in (1, 1, 2))
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_parameter_count_formula():
    for name, cfg in PRESETS.items():
        model = Transformer(cfg)
        assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters(), name


def test_causal():
    torch.manual_seed(0)
    model = Transformer(get_config("tiny"), seed=0)
    x = torch.randint(0, 256, (2, 16))
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % 256  # change only the future
    assert torch.allclose(model(x)[:, :10], model(y)[:, :10])
    assert not torch.allclose(model(x)[:, 10:], model(y)[:, 10:])


def test_float64_forward_and_loss_keep_precision():
    model = Transformer(get_config("tiny"), seed=0).double()
    x = torch.randint(0, 256, (2, 8))
    loss = model.loss(model(x), x)
    assert loss.dtype == torch.float64


def test_bad_configs():
    with pytest.raises(ValueError, match="hidden=10 must be divisible by n_heads=4"):
        ModelConfig(hidden=10, n_heads=4)
    with pytest.raises(ValueError, match="ModelConfig.n_layers must be a positive integer, got 0"):
        ModelConfig(n_layers=0)
    with pytest.raises(ValueError, match="unknown model 'huge'; presets are"):
        get_config("huge")
    with pytest.raises(ValueError, match="sequence length 200 exceeds max_seq_len=128"):
        Transformer(get_config("tiny"))(torch.zeros(1, 200, dtype=torch.long))
