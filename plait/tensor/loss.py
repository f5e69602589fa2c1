"""Cross-entropy over vocabulary-sharded logits, without gathering the full vocabulary anywhere.

Each rank holds logits for its slice of the vocabulary, ``(..., V/tp)``. The softmax needs two
numbers per token from the whole vocabulary -- the maximum and the sum of exponentials -- and the
loss one more, the target's logit, which lives on one rank. So forward costs two small all-reduces
of ``(tokens,)`` (a max, then the sum of exponentials and the target logit together) instead of an
all-gather of ``(tokens, V)``; backward, ``softmax - onehot`` of the local slice, costs none.

How a trainer gets a loss from a sharded model::

    loss = plait.tensor.loss_fn(model)(model(x), y)

:func:`plait.tensor.parallelize` also sets ``model.loss`` to the same function when the model has
a ``loss`` method (the reference :class:`~plait.models.Transformer`), so ``model.loss(model(x), y)``
keeps working unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from plait import comm

__all__ = [
    "vocab_parallel_cross_entropy",
    "loss_fn",
    "vocab_head",
    "gather_vocab",
    "causal_lm_loss_function",
]


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, group, start, vocab_size, ignore_index):
        local = logits.shape[-1]
        valid = max(0, min(local, vocab_size - start))  # columns past vocab_size are padding
        x = logits.reshape(-1, local)
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()  # half-precision logits: take the softmax in float32
        t = targets.reshape(-1)
        if valid < local:
            x = x.clone()
            x[:, valid:] = float("-inf")
        # The max only keeps exp() in range; it cancels out of the loss, so no gradient flows to it.
        m = x.max(dim=-1).values
        comm.all_reduce(m, group, op=dist.ReduceOp.MAX, axis="tp", phase="forward")
        shifted = x - m.unsqueeze(-1)
        mine = (t >= start) & (t < start + valid)
        local_t = (t - start).masked_fill(~mine, 0)
        target_logit = shifted.gather(1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(~mine, 0.0)
        exp = shifted.exp()
        both = torch.stack([exp.sum(dim=-1), target_logit])
        comm.all_reduce(both, group, axis="tp", phase="forward")
        sum_exp, target_logit = both[0], both[1]
        keep = t != ignore_index
        count = keep.sum()
        losses = (sum_exp.log() - target_logit).masked_fill(~keep, 0.0)
        loss = losses.sum() / count
        exp.div_(sum_exp.unsqueeze(-1))  # now the local slice of the softmax
        ctx.save_for_backward(exp, mine & keep, local_t, keep, count)
        ctx.shape, ctx.dtype = logits.shape, logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad):
        softmax, hit, local_t, keep, count = ctx.saved_tensors
        g = softmax.clone()  # the saved softmax stays intact for a retained graph
        rows = torch.nonzero(hit).squeeze(-1)
        g[rows, local_t[rows]] -= 1.0
        g.mul_((keep.to(g.dtype) / count).unsqueeze(-1) * grad)
        return g.reshape(ctx.shape).to(ctx.dtype), None, None, None, None, None


def vocab_parallel_cross_entropy(
    local_logits: torch.Tensor,
    targets: torch.Tensor,
    group: dist.ProcessGroup | None,
    *,
    vocab_size: int | None = None,
    vocab_start: int | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean cross-entropy of ``targets`` under logits sharded along the vocabulary.

    Matches ``F.cross_entropy(full_logits.flatten(0, -2), targets.flatten(), ignore_index=...)``.

    Args:
        local_logits: ``(..., V_local)``, this rank's contiguous slice of the vocabulary.
        targets: ``(...)`` global token ids.
        group: the tensor-parallel group the vocabulary is split over.
        vocab_size: the true vocabulary; columns past it (padding) are ignored. Default: all.
        vocab_start: first id of this rank's slice; default ``rank * V_local``.
        ignore_index: targets equal to it do not count.

    Example::

        loss = vocab_parallel_cross_entropy(model(x), y, mesh.group("tp"), vocab_size=256)
    """
    local = local_logits.shape[-1]
    tp = comm.group_size(group)
    start = comm.group_rank(group) * local if vocab_start is None else vocab_start
    vocab_size = local * tp if vocab_size is None else vocab_size
    return _VocabParallelCrossEntropy.apply(
        local_logits, targets, group, start, vocab_size, ignore_index
    )


def gather_vocab(local_logits: torch.Tensor, group, vocab_size: int) -> torch.Tensor:
    """All-gather vocabulary-sharded logits to ``(..., vocab_size)`` (for inspection, not loss).

    Example::

        full = gather_vocab(model(x), mesh.group("tp"), 256)
    """
    from plait.tensor.collectives import gather_from_region

    return gather_from_region(local_logits, group)[..., :vocab_size]


def _logits(out) -> torch.Tensor:
    """The logits of a model's output: a tensor, or a Hugging Face output's ``.logits``."""
    return out if isinstance(out, torch.Tensor) else out.logits


def _plain_loss(logits, targets: torch.Tensor) -> torch.Tensor:
    from plait.models.transformer import Transformer

    return Transformer.loss(_logits(logits), targets)


def _sharded_loss(logits, targets, *, group, vocab_size, vocab_start, ignore_index=-100):
    return vocab_parallel_cross_entropy(
        _logits(logits),
        targets,
        group,
        vocab_size=vocab_size,
        vocab_start=vocab_start,
        ignore_index=ignore_index,
    )


def vocab_head(module: nn.Module) -> nn.Module | None:
    """The vocabulary-parallel output layer inside ``module``, if it has one."""
    from plait.tensor.layers import ColumnParallelLinear

    heads = [
        m
        for m in module.modules()
        if isinstance(m, ColumnParallelLinear) and getattr(m, "vocab_parallel", False)
    ]
    return heads[-1] if heads else None


def loss_fn(module: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The ``loss(logits, targets)`` to use with ``module``'s output.

    A module (or pipeline stage) whose output layer is vocabulary-parallel gets
    :func:`vocab_parallel_cross_entropy` bound to its group and vocabulary; anything else the
    reference model's plain cross-entropy. ``logits`` may be a Hugging Face model's output (its
    ``.logits`` are used); ``targets`` are aligned with the logits (the next tokens, as
    :class:`plait.data.ByteDataset` gives them), so for an HF causal LM's ``labels=ids`` loss
    pass ``out.logits[:, :-1]`` and ``ids[:, 1:]``.

    Example::

        parallelize(stage, mesh)
        loss = loss_fn(stage)(stage(h), y)
    """
    head = vocab_head(module)
    if head is None:
        return _plain_loss
    return functools.partial(
        _sharded_loss, group=head.group, vocab_size=head.out_features, vocab_start=head.start
    )


def causal_lm_loss_function(module: nn.Module) -> Callable | None:
    """A Hugging Face ``loss_function`` for a causal LM whose head is vocabulary-parallel: the
    model's own ``model(ids, labels=ids).loss`` (labels shifted inside, ``-100`` ignored,
    ``num_items_in_batch`` honoured) from sharded logits. None without such a head.

    Example::

        model.loss_function = causal_lm_loss_function(model)   # parallelize does this
    """
    head = vocab_head(module)
    if head is None:
        return None

    def loss(
        logits,
        labels,
        vocab_size=None,
        num_items_in_batch=None,
        ignore_index=-100,
        shift_labels=None,
        **kwargs,
    ):
        if shift_labels is None:
            padded = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)
            shift_labels = padded[..., 1:]
        shift_labels = shift_labels.to(logits.device)
        mean = vocab_parallel_cross_entropy(
            logits,
            shift_labels,
            head.group,
            vocab_size=head.out_features,
            vocab_start=head.start,
            ignore_index=ignore_index,
        )
        if num_items_in_batch is None:
            return mean
        count = (shift_labels != ignore_index).sum()
        return mean * count / num_items_in_batch

    return loss
