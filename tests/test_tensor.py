"""Tensor parallelism reproduces the single-process model: outputs, loss, every gradient."""

import pytest
import torch
import tp_workers

from plait import Mesh, launch
from plait.models.transformer import ModelConfig, Transformer
from plait.tensor import parallelize, validate

FLOAT64_RTOL = 1e-9
FLOAT32_RTOL = 5e-6  # float32 rounding over two blocks (measured <= 6e-7), relative to max |ref|


def _check(result: dict, rtol: float) -> None:
    assert result["logits"] <= rtol, result["logits"]
    assert result["grad_norm_sq"] <= rtol, result["grad_norm_sq"]  # replicated counted once
    assert result["loss"] <= rtol, result["loss"]
    worst = max(result["grads"], key=result["grads"].get)
    assert result["grads"][worst] <= rtol, (worst, result["grads"][worst])
    assert len(result["grads"]) == len(list(Transformer(tp_workers.CFG).parameters()))


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
def test_matches_single_process_float64(tp, sequence_parallel):
    results = launch(tp_workers.equivalence, tp, tp, sequence_parallel, "float64")
    for r in results:
        _check(r, FLOAT64_RTOL)
        assert r["state_keys_match"] and r["state_exact"]  # sharding took the existing weights
        assert r["local_logits_width"] == -(-tp_workers.CFG.vocab_size // tp)
        assert r["sharded_fraction"] < 0.75  # the big matrices really are split
        # token table; per block q, k, v (weight and bias), o_proj and fc_out weights, fc_in
        # weight and bias; the head's projection. Norms, positions and row biases are replicated.
        assert r["n_sharded"] == 1 + tp_workers.CFG.n_layers * (6 + 1 + 2 + 1) + 1


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
def test_matches_single_process_float32(tp, sequence_parallel):
    for r in launch(tp_workers.equivalence, tp, tp, sequence_parallel, "float32"):
        _check(r, FLOAT32_RTOL)


@pytest.mark.slow
def test_tensor_groups_inside_a_larger_mesh():
    # dp=2 x tp=2: each tp group is two of four ranks; group ranks, not global ranks, pick shards.
    for r in launch(tp_workers.equivalence, 4, 2, True, "float64", 2):
        _check(r, FLOAT64_RTOL)


def test_tp_of_one_leaves_the_model_alone():
    model = Transformer(tp_workers.CFG)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert parallelize(model, Mesh(tp=1)) is model
    assert parallelize(model, None) is model
    assert all(type(m).__module__.startswith(("torch", "plait.models")) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.loss is Transformer.loss


@pytest.mark.slow
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
def test_parts_of_a_model_shard_like_pipeline_stages(sequence_parallel):
    tp = 2
    for r in launch(tp_workers.stages, tp, tp, sequence_parallel):
        seq = tp_workers.T // tp if sequence_parallel else tp_workers.T
        assert r["hidden_shape"] == (tp_workers.B, seq, tp_workers.CFG.hidden)
        assert r["loss"] <= FLOAT64_RTOL
        assert len(r["grads"]) == len(list(Transformer(tp_workers.CFG).parameters()))
        worst = max(r["grads"], key=r["grads"].get)
        assert r["grads"][worst] <= FLOAT64_RTOL, (worst, r["grads"][worst])


@pytest.mark.slow
def test_autograd_collectives():
    for r in launch(tp_workers.collectives, 2, 2):
        assert all(r.values()), {k: v for k, v in r.items() if not v}


@pytest.mark.slow
def test_sequence_parallel_refuses_a_sequence_tp_does_not_divide():
    for msg in launch(tp_workers.sequence_error, 2, 2):
        assert "sequence length 3 with tp=2" in msg


def test_validate_names_the_size_tp_does_not_divide():
    model = Transformer(ModelConfig(hidden=48, n_heads=4, ffn=96, vocab_size=50))
    with pytest.raises(ValueError, match=r"tp=3 does not divide n_heads=4 of 'blocks.0.attn'"):
        validate(model, 3)
    odd_ffn = Transformer(ModelConfig(hidden=48, n_heads=4, ffn=90, vocab_size=50))
    with pytest.raises(ValueError, match=r"tp=4 does not divide ffn=90 of 'blocks.0.mlp.fc_in'"):
        validate(odd_ffn, 4)
    validate(model, 4)  # vocab 50 does not divide by 4: padded, allowed
    with pytest.raises(ValueError, match="sequence length 10 with tp=4"):
        validate(model, 4, sequence_parallel=True, seq_len=10)
    with pytest.raises(ValueError, match="unknown style 'diagonal'"):
        validate(model, 2, plan={"*fc_in": "diagonal"})
    with pytest.raises(TypeError, match="style 'row' applies to Linear"):
        validate(model, 2, plan={"blocks.0.norm1": "row"})
