"""Tiny Hugging Face causal LMs of the covered families, built from configs with random weights
and saved with ``save_pretrained`` (nothing is downloaded). Dropout is off: a pipeline's ranks
draw from their own random streams, so only dropout-free training can match one process."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FAMILIES = ("llama", "qwen2", "mistral", "gpt2", "phi3")

_COMMON = dict(
    vocab_size=256,  # byte-level data
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention
    max_position_embeddings=128,
    tie_word_embeddings=False,
)


def config(family: str, layers: int = 4):
    import transformers as T

    if family == "llama":
        return T.LlamaConfig(**_COMMON, num_hidden_layers=layers)
    if family == "qwen2":
        return T.Qwen2Config(**_COMMON, num_hidden_layers=layers)
    if family == "mistral":
        return T.MistralConfig(**_COMMON, num_hidden_layers=layers, sliding_window=16)
    if family == "phi3":
        return T.Phi3Config(**_COMMON, num_hidden_layers=layers, pad_token_id=0)
    if family == "gpt2":  # fused qkv in Conv1D, learned positions, tied embeddings
        return T.GPT2Config(
            vocab_size=256,
            n_embd=32,
            n_layer=layers,
            n_head=4,
            n_positions=128,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
    raise ValueError(family)


def save(family: str, directory, layers: int = 4, weights: bool = True, seed: int = 0) -> str:
    """Save a tiny ``family`` model (with its weights, or only its config) into ``directory``."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = config(family, layers)
    if weights:
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(directory)
    else:
        cfg.save_pretrained(directory)
    return str(directory)
