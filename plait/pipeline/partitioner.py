"""Cut a model into consecutive pipeline stages that share the model's own parameters.

Which models, and how a stage of each runs, is the model's *layout*
(:func:`plait.models.layout.find_layout`): plait's reference transformer, a Hugging Face causal
LM, an ``nn.Sequential``, or a layout passed explicitly. A stage holds a contiguous run of the
model's *same* module objects under the *same* dotted names, so ``stage.named_parameters()``
yields the original names (``blocks.3.mlp.fc_in.weight``, ``model.layers.3.mlp.up_proj.weight``):
checkpoints keyed by the model's names load into stages, and a tensor-parallel plan for the whole
model works on a stage.

Balancing, by ``balance=``:

    "layers"     blocks split as evenly as possible; the pre modules (embeddings) ride with the
                 first stage, the post modules (final norm, head) with the last; every stage
                 needs at least one block
    "params"     units (embed, each block, head) weighted by parameter count; the largest stage
                 is made as small as possible. The embedding and head of a small model are heavy,
                 so edge stages get fewer blocks
    "time"       units weighted by measured forward + backward time on a sample batch
    [n0, n1, ...] explicit: blocks per stage (sum = number of blocks); the first stage may have 0
                 blocks (it still holds embed), as may the last (head); a middle stage may not

Example::

    stages = partition(Transformer(get_config("tiny", n_layers=4)), 2, balance="layers")
    stages[1](stages[0](idx))  # == model(idx)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn

from plait.models.layout import Layout, Stage, find_layout
from plait.pipeline.split import split_blocks

__all__ = ["Stage", "partition"]


def partition(
    model: nn.Module,
    num_stages: int,
    balance: str | Sequence[int] = "layers",
    sample: torch.Tensor | None = None,
    layout: Layout | None = None,
) -> list[nn.Module]:
    """Split ``model`` into ``num_stages`` stage modules sharing its parameters.

    Args:
        model: plait's Transformer, a Hugging Face causal LM, an ``nn.Sequential``, or any
            model with an explicit ``layout``.
        num_stages: ``p`` for one chunk per rank, ``p * v`` for interleaved or V schedules.
        balance: ``"layers"``, ``"params"``, ``"time"`` or blocks per stage (see module doc).
        sample: inputs to time on for ``balance="time"``; default random ``(4, 64)`` token ids.
        layout: how to cut a model :func:`~plait.models.layout.find_layout` does not know.

    Returns:
        ``num_stages`` stages; stage 0 holds the embeddings, the last the head.

    Raises:
        ValueError: a stage would be empty, the split is impossible (names the numbers), or
            the model has no layout the partitioner knows (says what it looked for).

    Example::

        stages = partition(model, 4, balance="params")
        [s.block_indices for s in stages]
    """
    layout = layout if layout is not None else find_layout(model)
    L = len(layout.blocks)
    if not isinstance(num_stages, int) or isinstance(num_stages, bool) or num_stages < 1:
        raise ValueError(f"num_stages must be a positive integer, got {num_stages!r}")
    costs = None
    if balance == "params":
        pre = sum(_num_params(m) for _, m in layout.pre)
        post = sum(_num_params(m) for _, m in layout.post)
        costs = [pre, *[_num_params(m) for _, m in layout.blocks], post]
    elif balance == "time":
        costs = _profile(model, layout, sample)
    counts = split_blocks(L, num_stages, balance, costs)
    stages, start = [], 0
    for i, n in enumerate(counts):
        stages.append(layout.stage(i, num_stages, list(range(start, start + n))))
        start += n
    return stages


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _profile(model, layout, sample, repeats: int = 3) -> list[float]:
    """Median forward + backward seconds of each unit on ``sample``, run in sequence (each unit
    as a one-unit stage, so it runs as it will in the pipeline)."""
    if sample is None:
        cfg = getattr(model, "config", None)
        vocab = getattr(cfg, "vocab_size", 256)
        seq = min(64, getattr(cfg, "max_seq_len", getattr(cfg, "max_position_embeddings", 64)))
        sample = torch.randint(0, vocab, (4, seq), generator=torch.Generator().manual_seed(0))
    L = len(layout.blocks)
    units = [layout.stage(0, 3, [])] + [layout.stage(1, 3, [k]) for k in range(L)]
    units.append(layout.stage(2, 3, []))
    times: list[list[float]] = [[] for _ in units]
    for _ in range(repeats):
        x = sample
        for u, unit in enumerate(units):
            x = x.detach().requires_grad_(x.is_floating_point())
            t0 = time.perf_counter()
            y = unit(x)
            if y.requires_grad:
                y.float().square().mean().backward()
            times[u].append(time.perf_counter() - t0)
            x = y
    for p in model.parameters():  # profiling must not leave gradients behind
        p.grad = None
    return [statistics.median(t) for t in times]
