"""Tensor parallelism: the matrices inside each layer split across a tensor group.

All ranks of the group work on the same data at once and talk at every layer: one all-reduce per
attention and one per MLP, forward and backward (or an all-gather and a reduce-scatter in their
place with sequence parallelism). Every collective is counted in :data:`plait.comm.stats`.

The API::

    parallelize(model, mesh, sequence_parallel=False, plan=None)  # shard in place
    validate(model, tp, sequence_parallel=..., seq_len=...)       # check sizes, no processes
    loss_fn(model)(logits, targets)        # vocabulary-parallel cross-entropy (model.loss too)
    gather_state_dict(model), gather_grads(model)   # back to the unsharded layout
    is_tp_sharded(param), grad_norm_sq(params, group)
    clip_grad_norm_(params, max_norm, mesh)  # global-norm clipping over tp and pp; returns the norm
    ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, vocab_parallel_cross_entropy
    copy_to_region, reduce_from_region, gather_from_sequence, reduce_scatter_to_seq, ...
    default_plan(model): transformer_plan(model) for the reference model, else hf_plan(model),
        found by structure (Llama, Mistral, Qwen2, Phi-3, GPT-2, ... or a part of one)
    styles Colwise, Rowwise, Vocab, Region, Heads, SequenceNorm, SequenceSpan

Example (inside :func:`plait.launch` with 2 workers)::

    mesh = plait.Mesh(tp=2)
    model = parallelize(Transformer(cfg, seed=0), mesh)
    loss = model.loss(model(x), y)
    loss.backward()
"""

from plait.tensor.clip import clip_grad_norm_
from plait.tensor.collectives import (
    copy_to_region,
    gather_from_region,
    gather_from_sequence,
    reduce_from_region,
    reduce_scatter_to_seq,
    scatter_to_sequence,
)
from plait.tensor.hf import hf_plan
from plait.tensor.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    TPShard,
    VocabParallelEmbedding,
)
from plait.tensor.loss import (
    causal_lm_loss_function,
    gather_vocab,
    loss_fn,
    vocab_head,
    vocab_parallel_cross_entropy,
)
from plait.tensor.parallelize import parallelize, resolve_group, validate
from plait.tensor.plans import ParallelEmbedding, default_plan, llama_plan, transformer_plan
from plait.tensor.state import gather_grads, gather_state_dict, grad_norm_sq, is_tp_sharded
from plait.tensor.styles import (
    Colwise,
    Heads,
    Region,
    Rowwise,
    SequenceNorm,
    SequenceSpan,
    Style,
    Vocab,
)

__all__ = [
    "ColumnParallelLinear",
    "Colwise",
    "Heads",
    "ParallelEmbedding",
    "Region",
    "RowParallelLinear",
    "Rowwise",
    "SequenceNorm",
    "SequenceSpan",
    "Style",
    "TPShard",
    "Vocab",
    "VocabParallelEmbedding",
    "causal_lm_loss_function",
    "clip_grad_norm_",
    "copy_to_region",
    "default_plan",
    "gather_from_region",
    "gather_from_sequence",
    "gather_grads",
    "gather_state_dict",
    "gather_vocab",
    "grad_norm_sq",
    "hf_plan",
    "is_tp_sharded",
    "llama_plan",
    "loss_fn",
    "parallelize",
    "reduce_from_region",
    "reduce_scatter_to_seq",
    "resolve_group",
    "scatter_to_sequence",
    "transformer_plan",
    "validate",
    "vocab_head",
    "vocab_parallel_cross_entropy",
]
