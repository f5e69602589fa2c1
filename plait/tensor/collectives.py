"""Autograd-aware collectives: the communication a tensor-parallel layer needs, with its conjugate.

Megatron-LM's four operators, named for what happens in forward:

=============================  =============================  ====================================
function                       forward                        backward
=============================  =============================  ====================================
:func:`copy_to_region`         identity                       all-reduce
:func:`reduce_from_region`     all-reduce                     identity
:func:`gather_from_sequence`   all-gather along the sequence  reduce-scatter along the sequence
:func:`reduce_scatter_to_seq`  reduce-scatter along sequence  all-gather along the sequence
:func:`scatter_to_sequence`    keep this rank's chunk         all-gather along the sequence
:func:`gather_from_region`     all-gather the last dim (or    keep this rank's chunk
                               ``dim``)
=============================  =============================  ====================================

A column-parallel layer's input passes through ``copy_to_region`` (every rank needs the whole input;
the gradient w.r.t. it is a sum of every rank's part), a row-parallel layer's output through
``reduce_from_region``. With sequence parallelism the replicated activations between the two are
sharded along the sequence instead, and the all-reduce becomes an all-gather going in and a
reduce-scatter coming out: the same bytes, but the norms in between work on ``1/tp`` of the tokens.

Every function is the identity on a one-rank group, and records its traffic in
:data:`plait.comm.stats` under axis ``"tp"``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from plait import comm

__all__ = [
    "copy_to_region",
    "reduce_from_region",
    "gather_from_region",
    "gather_from_sequence",
    "reduce_scatter_to_seq",
    "scatter_to_sequence",
    "check_sequence_divisible",
]

AXIS = "tp"


def check_sequence_divisible(length: int, tp: int) -> None:
    """Sequence parallelism cuts the sequence into ``tp`` equal chunks; refuse a ragged cut."""
    if length % tp:
        raise ValueError(
            f"sequence parallelism needs the sequence length to divide by tp: got sequence "
            f"length {length} with tp={tp}; use a multiple of {tp} or sequence_parallel=False"
        )


def _chunk(x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    world = comm.group_size(group)
    return x.chunk(world, dim=dim)[comm.group_rank(group)].contiguous()


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        # clone: autograd may hand the same gradient buffer to other consumers.
        return comm.all_reduce(grad.clone(), ctx.group, axis=AXIS, phase="backward"), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return comm.all_reduce(x.clone(), group, axis=AXIS, phase="forward")

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return comm.all_gather(x, group, dim=dim, axis=AXIS, phase="forward")

    @staticmethod
    def backward(ctx, grad):
        return _chunk(grad, ctx.group, ctx.dim), None, None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return comm.all_gather(x, group, dim, axis=AXIS, phase="forward")

    @staticmethod
    def backward(ctx, grad):
        out = comm.reduce_scatter(grad, ctx.group, ctx.dim, axis=AXIS, phase="backward")
        return out, None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        check_sequence_divisible(x.shape[dim], comm.group_size(group))
        return comm.reduce_scatter(x, group, dim, axis=AXIS, phase="forward")

    @staticmethod
    def backward(ctx, grad):
        return comm.all_gather(grad, ctx.group, ctx.dim, axis=AXIS, phase="backward"), None, None


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        check_sequence_divisible(x.shape[dim], comm.group_size(group))
        return _chunk(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_gather(grad, ctx.group, ctx.dim, axis=AXIS, phase="backward"), None, None


def _trivial(group: dist.ProcessGroup | None) -> bool:
    return comm.group_size(group) == 1


def copy_to_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Enter a tensor-parallel region: identity forward, all-reduce of the gradient backward.

    Example::

        h = copy_to_region(x, group)   # then several column-parallel layers read h
    """
    return x if _trivial(group) else _CopyToRegion.apply(x, group)


def reduce_from_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Leave a region: all-reduce the partial sums forward, identity backward.

    Example::

        y = reduce_from_region(F.linear(x_shard, w_shard), group)
    """
    return x if _trivial(group) else _ReduceFromRegion.apply(x, group)


def gather_from_region(
    x: torch.Tensor, group: dist.ProcessGroup | None, dim: int = -1
) -> torch.Tensor:
    """All-gather a shard along ``dim`` (default the last: column-parallel outputs) into a tensor
    every rank then uses alike; backward keeps this rank's part of the (replicated) gradient.

    Unlike :func:`gather_from_sequence`, whose consumers are column-parallel and so produce
    partial gradients to be reduce-scattered, this one's consumers are replicated (a sequence
    leaving the sequence-parallel region into code every rank runs the same).

    Example::

        full_logits = gather_from_region(local_logits, group)   # (..., V/tp) -> (..., V)
        whole = gather_from_region(h, group, dim=1)             # (B, T/tp, H) -> (B, T, H)
    """
    return x if _trivial(group) else _GatherFromRegion.apply(x, group, dim)


def gather_from_sequence(
    x: torch.Tensor, group: dist.ProcessGroup | None, dim: int = 1
) -> torch.Tensor:
    """All-gather sequence shards (forward), reduce-scatter the gradient (backward).

    Example::

        full = gather_from_sequence(x, group, dim=1)   # (B, T/tp, H) -> (B, T, H)
    """
    return x if _trivial(group) else _GatherFromSequence.apply(x, group, dim)


def reduce_scatter_to_seq(
    x: torch.Tensor, group: dist.ProcessGroup | None, dim: int = 1
) -> torch.Tensor:
    """Sum partial results and keep this rank's sequence chunk; all-gather the gradient.

    Example::

        y = reduce_scatter_to_seq(F.linear(x_shard, w_shard), group)   # (B, T, H) -> (B, T/tp, H)
    """
    return x if _trivial(group) else _ReduceScatterToSequence.apply(x, group, dim)


def scatter_to_sequence(
    x: torch.Tensor, group: dist.ProcessGroup | None, dim: int = 1
) -> torch.Tensor:
    """Keep this rank's sequence chunk of a replicated tensor; all-gather the gradient.

    Example::

        x = scatter_to_sequence(x, group)   # (B, T, H) -> (B, T/tp, H), no communication forward
    """
    return x if _trivial(group) else _ScatterToSequence.apply(x, group, dim)
