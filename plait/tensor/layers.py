"""Tensor-parallel layers: each rank holds a slice of the weight and talks once per layer.

* :class:`ColumnParallelLinear` holds a slice of the output features (rows of ``weight``); its
  input is replicated, its output sharded along the last dim.
* :class:`RowParallelLinear` holds a slice of the input features (columns of ``weight``); its input
  is sharded along the last dim, its output the all-reduced (or, with sequence parallelism,
  reduce-scattered) sum.
* :class:`VocabParallelEmbedding` holds a slice of the vocabulary; each rank looks up the ids it
  owns and the partial results are summed.

Column then row is the Megatron pairing: the sharded activation between them never travels, so an
MLP or an attention block costs one all-reduce forward and one backward.

Every sharded parameter carries a :class:`TPShard` as ``param._plait_tp`` and
``param._plait_tp_sharded = True`` (see :mod:`plait.tensor.state`); each layer builds itself from
an existing ``nn.Linear`` / ``nn.Embedding`` with ``from_linear`` / ``from_embedding``, taking this
rank's slice of the weights, so a model initialised once and then sharded equals the unsharded one.

Two shapes of linear layer beyond ``nn.Linear`` are understood:

* a *transposed* one, ``y = x W + b`` with ``W`` of shape ``(in, out)`` -- the ``Conv1D`` of
  GPT-2 in transformers (anything with ``nx``, ``nf`` and such a ``weight``). The sharded layer
  keeps that layout (``transposed=True``), so its state dict and gradients still have the
  original shapes.
* a *fused* column layer whose output is several projections side by side (GPT-2's ``c_attn``
  is ``[q | k | v]``, Phi-3's ``gate_up_proj`` ``[gate | up]``): ``parts`` gives their sizes and
  each part is cut separately, so rank ``r`` holds ``[q_r | k_r | v_r]`` -- its own heads of each
  -- and the module's own split of the output still works on the local width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from plait import comm
from plait.tensor.collectives import (
    copy_to_region,
    gather_from_region,
    gather_from_sequence,
    reduce_from_region,
    reduce_scatter_to_seq,
)

__all__ = [
    "TPShard",
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "mark_sharded",
    "sync_grad_across",
    "shard_range",
    "part_ranges",
    "linear_dims",
    "fused_region_entry",
]

InputMode = Literal["copy", "sequence", "none"]
OutputMode = Literal["reduce", "reduce_scatter"]


@dataclass(frozen=True)
class TPShard:
    """How a parameter is cut: along ``dim``, ``full_size`` long before any padding; ``parts``,
    for a fused layer, the sizes of the pieces along ``dim`` that are each cut into tp shards."""

    dim: int
    full_size: int
    group: dist.ProcessGroup | None
    parts: tuple[int, ...] | None = None


def mark_sharded(
    p: nn.Parameter, dim: int, full_size: int, group, parts: tuple[int, ...] | None = None
) -> nn.Parameter:
    p._plait_tp = TPShard(dim, full_size, group, parts)
    p._plait_tp_sharded = True
    return p


def linear_dims(module: nn.Module) -> tuple[int, int, bool] | None:
    """``(in_features, out_features, transposed)`` of an ``nn.Linear`` or of a transposed linear
    layer (transformers' ``Conv1D``: ``nx``, ``nf`` and a ``weight`` of shape ``(nx, nf)``);
    None for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    nx, nf, w = (
        getattr(module, "nx", None),
        getattr(module, "nf", None),
        getattr(module, "weight", None),
    )
    if isinstance(nx, int) and isinstance(nf, int) and isinstance(w, torch.Tensor):
        if tuple(w.shape) == (nx, nf):
            return nx, nf, True
    return None


def sync_grad_across(p: nn.Parameter, group) -> None:
    """All-reduce each gradient contribution to ``p`` over ``group`` before it is accumulated.

    For a replicated parameter applied to sequence-sharded activations (a norm, a row-parallel
    bias under sequence parallelism): each rank sees only its tokens, so its gradient is a partial
    sum. Hooking the contribution (not ``.grad``) stays correct under gradient accumulation and
    pipeline micro-batches.
    """
    if comm.group_size(group) == 1 or getattr(p, "_plait_tp_synced", False):
        return

    def hook(grad: torch.Tensor) -> torch.Tensor:
        return comm.all_reduce(grad.clone(), group, axis="tp", phase="backward")

    p.register_hook(hook)
    p._plait_tp_synced = True
    p._plait_tp_sharded = False


def shard_range(full: int, tp: int, rank: int, *, pad: bool, what: str) -> tuple[int, int, int]:
    """``(start, stop, local_size)`` of rank's slice of ``full``; ``stop - start < local_size``
    only on a padded last shard. Without ``pad`` the size must divide by ``tp``."""
    if full % tp and not pad:
        divisors = [d for d in range(1, full + 1) if full % d == 0 and d <= 64]
        raise ValueError(
            f"tensor parallel size tp={tp} does not divide {what}={full}; choose tp from {divisors}"
        )
    local = -(-full // tp)
    start = min(rank * local, full)
    return start, min(start + local, full), local


def part_ranges(parts: tuple[int, ...], tp: int, rank: int) -> list[tuple[int, int]]:
    """Rank's ``(start, stop)`` in each of the fused ``parts`` (offsets into the whole)."""
    out, offset = [], 0
    for n in parts:
        local = n // tp
        out.append((offset + rank * local, offset + (rank + 1) * local))
        offset += n
    return out


def _take(src: torch.Tensor, dim: int, start: int, stop: int, local: int) -> torch.Tensor:
    """Rows/columns ``start:stop`` of ``src`` along ``dim``, zero-padded to ``local``."""
    part = src.detach().narrow(dim, start, stop - start)
    if stop - start == local:
        return part.clone()
    shape = list(src.shape)
    shape[dim] = local
    out = src.new_zeros(shape)
    out.narrow(dim, 0, stop - start).copy_(part)
    return out


def _take_ranges(src: torch.Tensor, dim: int, ranges: list[tuple[int, int]]) -> torch.Tensor:
    return torch.cat([src.detach().narrow(dim, a, b - a) for a, b in ranges], dim=dim)


def _shaped_like(cls, linear: nn.Module, group, kwargs: dict):
    """A ``cls`` layer with ``linear``'s sizes, layout, bias, dtype and device (weights not set)."""
    dims = linear_dims(linear)
    if dims is None:
        raise TypeError(f"expected an nn.Linear or a transposed linear layer, got {linear!r}")
    in_features, out_features, transposed = dims
    w = linear.weight
    return cls(
        in_features,
        out_features,
        linear.bias is not None,
        group=group,
        transposed=transposed,
        device=w.device,
        dtype=w.dtype,
        **kwargs,
    )


class _CopyThenLinear(torch.autograd.Function):
    """``copy_to_region`` followed by a linear layer, with the all-reduce of the input gradient
    overlapped with the weight gradient (Megatron's async tensor-parallel all-reduce): the weight
    gradient does not need the reduced input gradient, so it is computed while that is in flight."""

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        ctx.save_for_backward(x, weight)
        ctx.group, ctx.has_bias = group, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = work = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.matmul(weight)
            work = comm.all_reduce_async(grad_x, ctx.group, axis="tp", phase="backward")
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_w = g2.t().matmul(x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
        grad_b = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        if work is not None:
            work.wait()
        return grad_x, grad_w, grad_b, None


class _CopyThenLinears(torch.autograd.Function):
    """Several column layers reading one input (attention's q, k, v): ``copy_to_region`` once,
    then each layer; backward sums their input gradients and overlaps that sum's all-reduce with
    every layer's weight gradient."""

    @staticmethod
    def forward(ctx, x, group, *params):
        ctx.save_for_backward(x, *params)
        ctx.group = group
        pairs = list(zip(params[0::2], params[1::2]))
        return tuple(F.linear(x, w, b if b.numel() else None) for w, b in pairs)

    @staticmethod
    def backward(ctx, *grads):
        x, *params = ctx.saved_tensors
        weights, biases = params[0::2], params[1::2]
        grad_x = work = None
        if ctx.needs_input_grad[0]:
            for g, w in zip(grads, weights):
                if g is not None:
                    grad_x = g.matmul(w) if grad_x is None else grad_x.add_(g.matmul(w))
            if grad_x is None:
                grad_x = torch.zeros_like(x)
            work = comm.all_reduce_async(grad_x, ctx.group, axis="tp", phase="backward")
        x2 = x.reshape(-1, x.shape[-1])
        out: list[torch.Tensor | None] = []
        for g, b in zip(grads, biases):
            g2 = None if g is None else g.reshape(-1, g.shape[-1])
            out.append(None if g2 is None else g2.t().matmul(x2))
            out.append(None if g2 is None or b.numel() == 0 else g2.sum(0))
        if work is not None:
            work.wait()
        return (grad_x, None, *out)


def fused_region_entry(x: torch.Tensor, layers: list[ColumnParallelLinear], group) -> None:
    """Compute every layer in ``layers`` on ``x`` in one :class:`_CopyThenLinears` and leave each
    layer its output, to be returned when the enclosing module calls it on ``x``."""
    params: list[torch.Tensor] = []
    for layer in layers:
        params.append(layer.linear_weight())
        # An empty tensor stands for "no bias": autograd Functions take tensors, not None.
        params.append(layer.bias if layer.bias is not None else layer.weight.new_empty(0))
    outs = _CopyThenLinears.apply(x, group, *params)
    for layer, y in zip(layers, outs):
        layer._precomputed = (x, y)


class ColumnParallelLinear(nn.Module):
    """``y = x W^T + b`` with this rank holding rows ``[start, stop)`` of ``W`` and ``b``.

    Args:
        input_mode: how the replicated input arrives. ``"copy"``: identity forward, all-reduce of
            its gradient backward; ``"sequence"``: all-gather sequence shards (sequence
            parallelism); ``"none"``: an enclosing region already did it (several column layers
            reading one input share one collective).
        gather_output: all-gather the output to full width (drops vocabulary padding).
        pad: allow ``out_features`` not divisible by tp (the vocabulary); the last shard is
            zero-padded and ``out_features`` stays the true size.
        parts: the sizes of fused projections side by side in the output (their sum is
            ``out_features``); each is cut separately and this rank holds its slice of each, in
            order. ``start``/``stop`` are then None.
        transposed: ``weight`` is ``(in, out)`` (GPT-2's ``Conv1D``), cut along dim 1.

    Example::

        fc = ColumnParallelLinear.from_linear(nn.Linear(64, 256), group)
        fc(x).shape   # (..., 256 // tp)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        group: dist.ProcessGroup | None,
        input_mode: InputMode = "copy",
        gather_output: bool = False,
        pad: bool = False,
        parts: tuple[int, ...] | None = None,
        transposed: bool = False,
        sequence_dim: int = 1,
        what: str = "out_features",
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group, self.input_mode, self.gather_output = group, input_mode, gather_output
        self.sequence_dim, self.transposed = sequence_dim, transposed
        tp, rank = comm.group_size(group), comm.group_rank(group)
        self.parts = tuple(parts) if parts else None
        if self.parts:
            if sum(self.parts) != out_features or pad or gather_output:
                raise ValueError(
                    f"fused parts {self.parts} must sum to out_features={out_features}, "
                    f"without padding or a gathered output"
                )
            for n in self.parts:
                shard_range(n, tp, rank, pad=False, what=what)  # raises unless tp divides n
            self.start = self.stop = None
            self.ranges = part_ranges(self.parts, tp, rank)
            local = sum(b - a for a, b in self.ranges)
        else:
            self.start, self.stop, local = shard_range(out_features, tp, rank, pad=pad, what=what)
        kw = {"device": device, "dtype": dtype}
        shape = (in_features, local) if transposed else (local, in_features)
        self.weight = mark_sharded(
            nn.Parameter(torch.empty(shape, **kw)),
            1 if transposed else 0,
            out_features,
            group,
            self.parts,
        )
        self.bias = (
            mark_sharded(nn.Parameter(torch.zeros(local, **kw)), 0, out_features, group, self.parts)
            if bias
            else None
        )

    @classmethod
    def from_linear(cls, linear: nn.Module, group, **kwargs) -> ColumnParallelLinear:
        """This rank's rows of an existing ``nn.Linear`` (or columns of a transposed ``Conv1D``),
        same dtype and device."""
        w = linear.weight
        layer = _shaped_like(cls, linear, group, kwargs)
        dim = 1 if layer.transposed else 0
        local = layer.weight.shape[dim]

        def take(t: torch.Tensor, d: int) -> torch.Tensor:
            if layer.parts:
                return _take_ranges(t, d, layer.ranges)
            return _take(t, d, layer.start, layer.stop, local)

        with torch.no_grad():
            layer.weight.copy_(take(w, dim))
            if linear.bias is not None:
                layer.bias.copy_(take(linear.bias, 0))
        layer.weight.requires_grad_(w.requires_grad)
        return layer

    def linear_weight(self) -> torch.Tensor:
        """The weight in ``nn.Linear`` layout, ``(out_local, in)`` (a view when transposed)."""
        return self.weight.t() if self.transposed else self.weight

    _precomputed: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._precomputed is not None:
            # The enclosing region computed this layer together with its siblings.
            src, y = self._precomputed
            self._precomputed = None
            if src is not x:
                raise RuntimeError(
                    "a column layer of a fused tensor-parallel region was called on a tensor "
                    "other than the region's input; shard this module with a plan that does not "
                    "mark its parent 'region'"
                )
            return y
        w = self.linear_weight()
        if self.input_mode == "copy" and comm.group_size(self.group) > 1:
            y = _CopyThenLinear.apply(x, w, self.bias, self.group)
            if self.gather_output:
                y = gather_from_region(y, self.group)[..., : self.out_features]
            return y
        if self.input_mode == "copy":
            x = copy_to_region(x, self.group)
        elif self.input_mode == "sequence":
            x = gather_from_sequence(x, self.group, self.sequence_dim)
        y = F.linear(x, w, self.bias)
        if self.gather_output:
            y = gather_from_region(y, self.group)[..., : self.out_features]
        return y

    def extra_repr(self) -> str:
        where = f"parts {self.parts}" if self.parts else f"rows {self.start}:{self.stop}"
        return (
            f"in={self.in_features}, out={self.out_features} ({where}), "
            f"input={self.input_mode}, gather_output={self.gather_output}"
            + (", transposed" if self.transposed else "")
        )


class RowParallelLinear(nn.Module):
    """``y = sum_r x_r W_r^T + b``: this rank holds columns ``[start, stop)`` of ``W``.

    The input is the last-dim shard a column-parallel layer produced; the partial products are
    all-reduced (``output_mode="reduce"``) or reduce-scattered along the sequence
    (``"reduce_scatter"``, sequence parallelism). The bias is replicated and added once, after.

    Example::

        out = RowParallelLinear.from_linear(nn.Linear(256, 64), group)
        out(h_shard).shape   # (..., 64), the same on every rank
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        group: dist.ProcessGroup | None,
        output_mode: OutputMode = "reduce",
        transposed: bool = False,
        sequence_dim: int = 1,
        what: str = "in_features",
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group, self.output_mode, self.sequence_dim = group, output_mode, sequence_dim
        self.transposed = transposed
        tp, rank = comm.group_size(group), comm.group_rank(group)
        self.start, self.stop, local = shard_range(in_features, tp, rank, pad=False, what=what)
        kw = {"device": device, "dtype": dtype}
        shape = (local, out_features) if transposed else (out_features, local)
        self.weight = mark_sharded(
            nn.Parameter(torch.empty(shape, **kw)), 0 if transposed else 1, in_features, group
        )
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        if self.bias is not None and output_mode == "reduce_scatter":
            sync_grad_across(self.bias, group)  # added to sequence shards: partial gradients

    @classmethod
    def from_linear(cls, linear: nn.Module, group, **kwargs) -> RowParallelLinear:
        """This rank's columns of an existing ``nn.Linear`` (rows of a transposed ``Conv1D``);
        the bias is copied whole."""
        w = linear.weight
        layer = _shaped_like(cls, linear, group, kwargs)
        with torch.no_grad():
            if layer.transposed:
                layer.weight.copy_(w[layer.start : layer.stop])
            else:
                layer.weight.copy_(w[:, layer.start : layer.stop])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight.t() if self.transposed else self.weight)
        if self.output_mode == "reduce":
            y = reduce_from_region(y, self.group)
        else:
            y = reduce_scatter_to_seq(y, self.group, self.sequence_dim)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features} (cols {self.start}:{self.stop}), out={self.out_features}, "
            f"output={self.output_mode}" + (", transposed" if self.transposed else "")
        )


class VocabParallelEmbedding(nn.Module):
    """An embedding table cut along the vocabulary: rank ``r`` owns ids ``[start, stop)``.

    Each rank looks up the ids it owns (zeros for the rest) and the partial results are summed:
    all-reduced (``output_mode="reduce"``) or reduce-scattered along the sequence (sequence
    parallelism). A vocabulary that does not divide by tp is padded on the last rank.

    Example::

        tok = VocabParallelEmbedding.from_embedding(nn.Embedding(50257, 64), group)
        tok(ids).shape   # (B, T, 64)
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        group: dist.ProcessGroup | None,
        padding_idx: int | None = None,
        output_mode: OutputMode = "reduce",
        sequence_dim: int = 1,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.group, self.output_mode, self.sequence_dim = group, output_mode, sequence_dim
        tp, rank = comm.group_size(group), comm.group_rank(group)
        self.start, self.stop, local = shard_range(
            num_embeddings, tp, rank, pad=True, what="vocab_size"
        )
        self.padding_idx = padding_idx
        self.local_padding_idx = (
            padding_idx - self.start
            if padding_idx is not None and self.start <= padding_idx < self.stop
            else None
        )
        self.weight = mark_sharded(
            nn.Parameter(torch.empty(local, embedding_dim, device=device, dtype=dtype)),
            0,
            num_embeddings,
            group,
        )

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, group, **kwargs) -> VocabParallelEmbedding:
        """This rank's rows of an existing ``nn.Embedding``."""
        w = emb.weight
        layer = cls(
            emb.num_embeddings,
            emb.embedding_dim,
            group=group,
            padding_idx=emb.padding_idx,
            device=w.device,
            dtype=w.dtype,
            **kwargs,
        )
        with torch.no_grad():
            layer.weight.copy_(_take(w, 0, layer.start, layer.stop, layer.weight.shape[0]))
        return layer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.start) | (ids >= self.stop)
        local_ids = (ids - self.start).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight, self.local_padding_idx)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.output_mode == "reduce":
            return reduce_from_region(out, self.group)
        return reduce_scatter_to_seq(out, self.group, self.sequence_dim)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim} (ids {self.start}:{self.stop}), "
            f"output={self.output_mode}"
        )
