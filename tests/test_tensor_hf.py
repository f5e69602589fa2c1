"""Hugging Face models (built from configs: random weights, nothing downloaded), sharded by the plan
found from their structure: Llama (grouped-query), Qwen2 (q/k/v biases), Mistral, GPT-2 (Conv1D,
fused qkv, tied embeddings) and Phi-3 (fused qkv_proj and gate_up_proj)."""

import os

import pytest
import tp_workers

from plait import launch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

FAMILIES = ("llama", "qwen2", "mistral", "gpt2", "phi3")
EXACT = 1e-9  # float64


def _check(r: dict, tp: int, sequence_parallel: bool, case) -> None:
    worst = max(r["grads"], key=r["grads"].get)
    assert r["logits"] <= EXACT, (case, r["logits"])
    assert r["loss"] <= EXACT, (case, r["loss"])
    assert r["own_loss"] <= EXACT, (case, r["own_loss"])  # model(ids, labels=ids).loss
    assert r["grads"][worst] <= EXACT, (case, worst, r["grads"][worst])
    assert r["grad_names_match"], case
    assert r["local_vocab"] == -(-101 // tp), case  # logits left vocabulary-sharded
    assert r["head_sharded"], case
    assert r["tied"] == (case[0] == "gpt2"), case
    assert r["norm_tokens"] == (tp_workers.HF_T // tp if sequence_parallel else tp_workers.HF_T)
    assert r["clipped"], case  # max_norm was below the norm: clipping did scale
    assert all(e <= EXACT for e in r["norms"]), (case, r["norms"])
    assert r["replicated_identical"], case  # norms, row-parallel biases: bit-identical over tp
    # SGD follows the unsharded run exactly; AdamW amplifies rounding where a gradient is ~0
    # (the key bias's, which is zero in exact arithmetic), so compare it a little looser.
    assert r["params_after"] <= (EXACT if case[2] == "sgd" else 1e-6), (case, r["params_after"])


@pytest.mark.slow
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
def test_hf_models_sharded_by_structure_equal_the_unsharded_model(sequence_parallel):
    tp = 2
    cases = [
        (family, sequence_parallel, "adamw" if i % 2 else "sgd", 3)
        for i, family in enumerate(FAMILIES)
    ]
    results = launch(tp_workers.hf_equivalence_many, tp, tp, cases)
    for per_rank in results:
        for case in cases:
            _check(per_rank[case], tp, sequence_parallel, case)


@pytest.mark.slow
def test_parts_of_an_hf_model_under_their_own_names_are_sharded_and_chain_exactly():
    tp = 2
    for per_rank in launch(tp_workers.hf_stages, tp, tp):
        for sp, r in per_rank.items():
            assert "model.layers.2.self_attn.q_proj.weight" in r["stage1_names"]
            assert "lm_head.weight" in r["stage1_names"]
            assert r["hidden_shape"] == (tp_workers.HF_B, tp_workers.HF_T, 32), sp  # whole
            assert r["logits"] <= EXACT, (sp, r["logits"])
            assert r["loss"] <= EXACT, (sp, r["loss"])
            worst = max(r["grads"], key=r["grads"].get)
            assert r["grads"][worst] <= EXACT, (sp, worst, r["grads"][worst])
            assert r["all_grads"], sp


@pytest.mark.slow
def test_llama_plan_gathers_the_logits_for_the_models_own_forward():
    tp = 2
    for r in launch(tp_workers.llama_logits, tp, tp):
        assert r["type"] == "ColumnParallelLinear"
        assert r["q_proj_rows"] == 32 // tp
        assert r["logits"] <= 1e-9, r["logits"]
        assert r["loss"] <= 1e-9, r["loss"]
        assert "sharded over tp=2: save_pretrained would write shard shapes" in r["save_refused"]


# --- fast: no processes ------------------------------------------------------------------------


def test_structure_picks_each_familys_styles():
    from plait.tensor import (
        Colwise,
        Heads,
        Region,
        Rowwise,
        SequenceNorm,
        SequenceSpan,
        Vocab,
        default_plan,
    )

    plans = {f: default_plan(tp_workers.hf_model(f)) for f in FAMILIES}
    llama = plans["llama"]
    attn = llama["model.layers.0.self_attn"]
    assert isinstance(attn, Heads) and (attn.heads, attn.kv_heads, attn.head_dim) == (4, 2, 8)
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert isinstance(llama[f"model.layers.0.self_attn.{proj}"], Colwise)
    assert isinstance(llama["model.layers.0.self_attn.o_proj"], Rowwise)
    assert type(llama["model.layers.0.mlp"]) is Region
    assert isinstance(llama["model.layers.1.mlp.down_proj"], Rowwise)
    assert isinstance(llama["model.layers.0.input_layernorm"], SequenceNorm)
    assert llama["model.layers.0"] == SequenceSpan(scatter_input=True, gather_output=False)
    assert llama["model.layers.1"] == SequenceSpan(scatter_input=False, gather_output=True)
    assert llama["model.embed_tokens"] == Vocab(sequence_sharded=False)
    assert llama["lm_head"] == Vocab(gather_output=False, sequence_sharded=False)
    assert "model.norm" not in llama  # outside the decoder layers: whole sequence, replicated
    assert set(plans["qwen2"]) == set(llama) == set(plans["mistral"])

    gpt2 = plans["gpt2"]
    assert gpt2["transformer.h.0.attn"].heads == gpt2["transformer.h.0.attn"].kv_heads == 4
    assert gpt2["transformer.h.0.attn.c_attn"].parts == (32, 32, 32)  # q, k, v cut separately
    assert gpt2["transformer.h.0.attn.c_proj"] == Rowwise(what="num_heads * head_dim")
    assert isinstance(gpt2["transformer.h.0.mlp.c_fc"], Colwise)
    assert isinstance(gpt2["transformer.h.0.ln_2"], SequenceNorm)
    assert isinstance(gpt2["transformer.wte"], Vocab) and isinstance(gpt2["lm_head"], Vocab)
    assert "transformer.wpe" not in gpt2  # positions stay replicated

    phi3 = plans["phi3"]
    assert phi3["model.layers.0.self_attn.qkv_proj"].parts == (32, 16, 16)  # 4 q, 2 kv heads
    assert phi3["model.layers.0.mlp.gate_up_proj"].parts == (64, 64)
    assert "model.layers.0.mlp" not in phi3  # one column layer: no shared-input region


def test_structure_finds_layers_in_a_part_of_a_model_under_their_own_names():
    from torch import nn

    from plait.tensor import hf_plan

    full = tp_workers.hf_model("llama", layers=4)
    part = nn.Module()
    part.model = nn.Module()
    part.model.layers = nn.ModuleDict({"3": full.model.layers[3]})
    part.lm_head = full.lm_head
    plan = hf_plan(part)
    assert "model.layers.3.self_attn.q_proj" in plan and "lm_head" in plan
    assert not any(k.startswith(("model.embed_tokens", "model.layers.0")) for k in plan)


def test_tp_must_divide_the_key_value_heads_in_one_line():
    from transformers import LlamaConfig, LlamaForCausalLM

    from plait.tensor import validate

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    gqa = LlamaForCausalLM(LlamaConfig(**small, num_attention_heads=4, num_key_value_heads=2))
    validate(gqa, 2)
    with pytest.raises(ValueError) as e:
        validate(gqa, 4)
    msg = str(e.value)
    assert "\n" not in msg
    assert "tp=4 does not divide num_key_value_heads=2" in msg
    assert "num_attention_heads=4" in msg and "choose tp from [1, 2]" in msg
    with pytest.raises(ValueError, match="tp=3 does not divide num_attention_heads=4"):
        validate(gqa, 3)


def test_a_plan_pattern_that_matches_nothing_is_an_error():
    from plait.tensor import validate

    model = tp_workers.hf_model("llama", layers=1)
    with pytest.raises(ValueError) as e:
        validate(model, 2, plan={"*q_proj": "column", "*self_attn.qproj": "column"})
    msg = str(e.value)
    assert "\n" not in msg
    assert "'*self_attn.qproj' matches no module of LlamaForCausalLM" in msg
    assert "model.layers.0.self_attn" in msg  # names some modules that do exist


def test_sequence_parallelism_on_hf_models_checks_the_sequence_length():
    from plait.tensor import validate

    model = tp_workers.hf_model("gpt2", layers=1)
    validate(model, 2, sequence_parallel=True, seq_len=8)
    with pytest.raises(ValueError, match="sequence length 7 with tp=2"):
        validate(model, 2, sequence_parallel=True, seq_len=7)


def test_sharded_attention_gets_its_local_head_counts():
    from plait.tensor.styles import LocalConfig, localize_heads

    gpt2 = tp_workers.hf_model("gpt2", layers=1)
    attn = gpt2.transformer.h[0].attn
    localize_heads(attn, heads=4, kv_heads=4, head_dim=8, tp=2)
    assert (attn.num_heads, attn.split_size, attn.head_dim) == (2, 16, 8)

    phi3 = tp_workers.hf_model("phi3", layers=1)
    attn = phi3.model.layers[0].self_attn
    localize_heads(attn, heads=4, kv_heads=2, head_dim=8, tp=2)
    assert attn.num_key_value_heads == 1
    assert isinstance(attn.config, LocalConfig)
    assert (attn.config.num_attention_heads, attn.config.num_key_value_heads) == (2, 1)
    assert phi3.config.num_attention_heads == 4  # the model's own config is untouched
    phi3.config._attn_implementation = "eager"
    assert attn.config._attn_implementation == "eager"  # read through


def test_clip_grad_norm_needs_a_mesh_and_matches_torch_on_one_process():
    import torch

    from plait import Mesh
    from plait.tensor import clip_grad_norm_

    model = tp_workers.hf_model("qwen2", layers=1)
    ref = tp_workers.hf_model("qwen2", layers=1)
    ids = tp_workers._hf_ids(101)
    for m in (model, ref):
        tp_workers._next_token_loss(m(input_ids=ids).logits, ids).backward()
    norm = clip_grad_norm_(model.parameters(), 0.1, Mesh())
    want = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
    assert abs(norm.item() - want.item()) <= 1e-12 * want.item()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=0)
    with pytest.raises(TypeError, match="needs a plait.Mesh"):
        clip_grad_norm_(model.parameters(), 1.0, None)
