"""A Hugging Face Llama, built from its config (random weights, nothing downloaded), sharded by plan."""

import os

import pytest
import tp_workers

from plait import launch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")


@pytest.mark.slow
def test_llama_sharded_by_its_plan_gives_the_unsharded_logits():
    tp = 2
    for r in launch(tp_workers.llama_logits, tp, tp):
        assert r["type"] == "ColumnParallelLinear"
        assert r["q_proj_rows"] == 32 // tp
        assert r["logits"] <= 1e-9, r["logits"]
        assert r["loss"] <= 1e-9, r["loss"]


def test_llama_plan_refuses_tied_embeddings_and_bad_head_counts():
    from transformers import LlamaConfig, LlamaForCausalLM

    from plait.tensor import llama_plan, validate

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    tied = LlamaForCausalLM(LlamaConfig(**small, num_attention_heads=4, tie_word_embeddings=True))
    with pytest.raises(ValueError, match="tie_word_embeddings=False"):
        llama_plan(tied)
    gqa = LlamaForCausalLM(
        LlamaConfig(
            **small, num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False
        )
    )
    with pytest.raises(ValueError, match="tp=2 does not divide num_key_value_heads=1"):
        validate(gqa, 2, plan=llama_plan(gqa))
