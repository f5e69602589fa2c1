"""Ready-made plans: the reference transformer (found by module type) and, found by structure,
users' decoder models (:func:`~plait.tensor.hf.hf_plan`: Llama, Mistral, Qwen2, Phi-3, GPT-2, ...).

:func:`transformer_plan` looks for the reference model's modules wherever they sit, so it shards a
whole :class:`~plait.models.Transformer` or any part of one (a pipeline stage holding ``embed`` and
some blocks, or blocks and ``head``):

* ``Attention``: a region (q, k, v share one input) sharded by heads -- q, k, v column-parallel,
  o_proj row-parallel: one all-reduce forward, one backward.
* ``MLP``: fc_in column-parallel, fc_out row-parallel: one all-reduce forward, one backward.
* ``Embedding``: the token table vocabulary-parallel; positions replicated.
* ``Head``: the projection vocabulary-parallel, logits left sharded for
  :func:`~plait.tensor.vocab_parallel_cross_entropy`.
* the norms: replicated (sequence-sharded under sequence parallelism).

With sequence parallelism the activations between blocks are ``(B, T/tp, H)``, this rank's chunk of
the sequence: the embedding reduce-scatters into that layout and the head gathers out of it.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from plait import comm
from plait.tensor.collectives import check_sequence_divisible
from plait.tensor.layers import VocabParallelEmbedding, sync_grad_across
from plait.tensor.styles import (
    Colwise,
    Context,
    Region,
    Rowwise,
    SequenceNorm,
    Style,
    Vocab,
)

__all__ = [
    "ParallelEmbedding",
    "ReferenceEmbedding",
    "transformer_plan",
    "llama_plan",
    "default_plan",
    "match",
]


class ParallelEmbedding(nn.Module):
    """The reference ``Embedding`` with a vocabulary-parallel token table.

    Keeps the names ``tok`` and ``pos`` (so state dicts line up). Under sequence parallelism the
    token lookup is reduce-scattered along the sequence and each rank adds the positions of its own
    chunk.

    Example::

        embed = ParallelEmbedding(model.embed, group, sequence_parallel=True)
        embed(ids).shape   # (B, T // tp, H)
    """

    def __init__(self, embed: nn.Module, group, *, sequence_parallel: bool = False):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.max_seq_len = embed.max_seq_len
        self.tok = VocabParallelEmbedding.from_embedding(
            embed.tok, group, output_mode="reduce_scatter" if sequence_parallel else "reduce"
        )
        self.pos = embed.pos
        if sequence_parallel:
            sync_grad_across(self.pos.weight, group)  # each rank reads only its positions

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        if T > self.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.max_seq_len}")
        if not self.sequence_parallel:
            return self.tok(idx) + self.pos.weight[:T]
        size, rank = comm.group_size(self.group), comm.group_rank(self.group)
        check_sequence_divisible(T, size)
        chunk = T // size
        return self.tok(idx) + self.pos.weight[rank * chunk : (rank + 1) * chunk]


class ReferenceEmbedding(Style):
    """Style for the reference ``Embedding``: replace it with :class:`ParallelEmbedding`."""

    def apply(self, module, name, ctx: Context):
        return ParallelEmbedding(module, ctx.group, sequence_parallel=ctx.sequence_parallel)


def transformer_plan(module: nn.Module) -> dict[str, Style]:
    """The plan for whatever reference-transformer modules ``module`` holds (exact names).

    Example::

        plan = transformer_plan(model)
        plan["blocks.0.attn.q_proj"]   # Colwise(gather_output=False, what='hidden')
    """
    from plait.models.transformer import MLP, Attention, Block, Embedding, Head

    plan: dict[str, Style] = {}
    for name, m in module.named_modules():
        p = f"{name}." if name else ""
        if isinstance(m, Embedding):
            plan[name] = ReferenceEmbedding()
        elif isinstance(m, Attention):
            plan[name] = Region(counts={"n_heads": m.q_proj.out_features // m.head_dim})
            for proj in ("q_proj", "k_proj", "v_proj"):
                plan[p + proj] = Colwise(what="hidden")
            plan[p + "o_proj"] = Rowwise(what="hidden")
        elif isinstance(m, MLP):
            plan[p + "fc_in"] = Colwise(what="ffn")
            plan[p + "fc_out"] = Rowwise(what="ffn")
        elif isinstance(m, Block):
            plan[p + "norm1"] = SequenceNorm()
            plan[p + "norm2"] = SequenceNorm()
        elif isinstance(m, Head):
            plan[p + "norm"] = SequenceNorm()
            plan[p + "proj"] = Vocab()
    return plan


def llama_plan(model: nn.Module) -> dict[str, Style]:
    """The structural plan (:func:`~plait.tensor.hf.hf_plan`) with the head's logits gathered to
    the full vocabulary, so the model's own forward, loss and ``generate`` see whole logits.

    Kept for the name; it is no longer specific to Llama (and shards tied embeddings too).

    Example::

        model = LlamaForCausalLM(LlamaConfig(...))
        parallelize(model, mesh, plan=llama_plan(model))
    """
    from plait.tensor.hf import hf_plan

    return hf_plan(model, gather_output=True)


def default_plan(module: nn.Module) -> dict[str, Style]:
    """The reference transformer's plan, or the structural one (:func:`~plait.tensor.hf.hf_plan`),
    or an error saying what was looked for.

    Example::

        default_plan(GPT2LMHeadModel(cfg))["transformer.h.0.attn.c_attn"]   # Colwise(parts=...)
    """
    from plait.tensor.hf import hf_plan

    plan = transformer_plan(module) or hf_plan(module)
    if plan:
        return plan
    raise ValueError(
        f"no tensor-parallel plan found for {type(module).__name__}: looked for the reference "
        f"transformer's modules and for attention (q_proj/k_proj/v_proj/o_proj, qkv_proj+o_proj "
        f"or c_attn+c_proj), MLPs (gate_proj/up_proj/down_proj, gate_up_proj+down_proj or "
        f"c_fc+c_proj), a token embedding and an output head; pass "
        f"plan={{'module.name.pattern': 'column' | 'row' | 'vocab' | 'region' | 'norm'}}"
    )


def match(plan: dict, name: str):
    """The first style in ``plan`` whose pattern matches ``name`` (fnmatch; ``*`` spans dots)."""
    for pattern, style in plan.items():
        if pattern == name or fnmatch.fnmatchcase(name, pattern):
            return style
    return None
