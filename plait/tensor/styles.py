"""Sharding styles: what to do with one module of a plan.

A plan maps module-name patterns to styles (or their string names)::

    {"*.attn": "region", "*.attn.q_proj": "column", "*.attn.o_proj": "row", "embed.tok": "vocab"}

==========  ===================================================================================
``column``  :class:`Colwise` -- ``nn.Linear`` -> :class:`ColumnParallelLinear`
``row``     :class:`Rowwise` -- ``nn.Linear`` -> :class:`RowParallelLinear`
``vocab``   :class:`Vocab` -- ``nn.Embedding`` -> :class:`VocabParallelEmbedding`; an output
            ``nn.Linear`` -> a vocabulary-parallel column layer (padded; use :func:`loss_fn`)
``region``  :class:`Region` -- a module whose column layers share one input: the input enters the
            tensor-parallel region once, at this module, so attention's q, k and v cost one
            all-reduce backward, not three
``norm``    :class:`SequenceNorm` -- under sequence parallelism, a replicated module that sees
            sequence shards: its gradients are all-reduced; otherwise nothing
==========  ===================================================================================

Every style checks the module first (:meth:`Style.check`) so a bad tp fails before anything has
been changed, with a message naming the size and the tp values that would work.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from plait.tensor.collectives import copy_to_region, gather_from_sequence
from plait.tensor.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    fused_region_entry,
    sync_grad_across,
)

__all__ = ["Context", "Style", "Colwise", "Rowwise", "Vocab", "Region", "SequenceNorm", "STYLES"]


@dataclass(frozen=True)
class Context:
    """What a style needs to know besides the module."""

    group: dist.ProcessGroup | None
    tp: int
    sequence_parallel: bool = False
    sequence_dim: int = 1
    in_region: bool = False  # an enclosing Region already brought the input into the region


def divisors(n: int) -> list[int]:
    return [d for d in range(1, min(n, 64) + 1) if n % d == 0]


def require_divisible(n: int, tp: int, what: str, name: str) -> None:
    if n % tp:
        where = f" of {name!r}" if name else ""
        raise ValueError(
            f"tensor parallel size tp={tp} does not divide {what}={n}{where}; "
            f"choose tp from {divisors(n)}"
        )


def _expect(module: nn.Module, kind: type, style: str, name: str) -> None:
    if not isinstance(module, kind):
        raise TypeError(
            f"style {style!r} applies to {kind.__name__}, but {name or 'the root'!r} is "
            f"{type(module).__name__}"
        )


class Style:
    """Base class: ``check`` raises on a module this style cannot shard at ``ctx.tp``; ``apply``
    returns the replacement module (or None when the module was changed in place)."""

    def check(self, module: nn.Module, name: str, ctx: Context) -> None:
        pass

    def apply(self, module: nn.Module, name: str, ctx: Context) -> nn.Module | None:
        raise NotImplementedError


def _input_mode(ctx: Context) -> str:
    if ctx.in_region:
        return "none"
    return "sequence" if ctx.sequence_parallel else "copy"


@dataclass(frozen=True)
class Colwise(Style):
    """Shard an ``nn.Linear`` by output features; ``what`` names the size in errors."""

    gather_output: bool = False
    what: str = "out_features"

    def check(self, module, name, ctx):
        _expect(module, nn.Linear, "column", name)
        require_divisible(module.out_features, ctx.tp, self.what, name)

    def apply(self, module, name, ctx):
        return ColumnParallelLinear.from_linear(
            module,
            ctx.group,
            input_mode=_input_mode(ctx),
            gather_output=self.gather_output,
            sequence_dim=ctx.sequence_dim,
            what=self.what,
        )


@dataclass(frozen=True)
class Rowwise(Style):
    """Shard an ``nn.Linear`` by input features; the output is summed over the group."""

    what: str = "in_features"

    def check(self, module, name, ctx):
        _expect(module, nn.Linear, "row", name)
        require_divisible(module.in_features, ctx.tp, self.what, name)

    def apply(self, module, name, ctx):
        return RowParallelLinear.from_linear(
            module,
            ctx.group,
            output_mode="reduce_scatter" if ctx.sequence_parallel else "reduce",
            sequence_dim=ctx.sequence_dim,
            what=self.what,
        )


@dataclass(frozen=True)
class Vocab(Style):
    """Shard along the vocabulary (padded when tp does not divide it).

    On an ``nn.Embedding``: a :class:`VocabParallelEmbedding`. On an output ``nn.Linear``: a column
    layer whose logits stay sharded -- compute the loss with :func:`plait.tensor.loss_fn` -- or,
    with ``gather_output=True``, are gathered to the full vocabulary.
    """

    gather_output: bool = False

    def check(self, module, name, ctx):
        if not isinstance(module, (nn.Embedding, nn.Linear)):
            _expect(module, nn.Embedding, "vocab", name)

    def apply(self, module, name, ctx):
        if isinstance(module, nn.Embedding):
            return VocabParallelEmbedding.from_embedding(
                module,
                ctx.group,
                output_mode="reduce_scatter" if ctx.sequence_parallel else "reduce",
                sequence_dim=ctx.sequence_dim,
            )
        layer = ColumnParallelLinear.from_linear(
            module,
            ctx.group,
            input_mode=_input_mode(ctx),
            gather_output=self.gather_output,
            pad=True,
            sequence_dim=ctx.sequence_dim,
            what="vocab_size",
        )
        layer.vocab_parallel = not self.gather_output
        return layer


@dataclass(frozen=True)
class Region(Style):
    """Bring the module's (first) input into the tensor-parallel region once, for all the column
    layers inside it; ``counts`` are sizes that must divide by tp, e.g. ``{"n_heads": 8}``."""

    counts: dict[str, int] = field(default_factory=dict)

    def check(self, module, name, ctx):
        for what, n in self.counts.items():
            require_divisible(n, ctx.tp, what, name)

    def apply(self, module, name, ctx):
        group, sp, dim = ctx.group, ctx.sequence_parallel, ctx.sequence_dim

        def enter(x: torch.Tensor) -> torch.Tensor:
            if sp:
                return gather_from_sequence(x, group, dim)
            # Without sequence parallelism the column layers directly inside are computed here,
            # together, so that backward overlaps the one all-reduce with their weight gradients.
            layers = [
                m
                for m in module.modules()
                if isinstance(m, ColumnParallelLinear) and m.input_mode == "none"
            ]
            if layers:
                fused_region_entry(x, layers, group)
                return x
            return copy_to_region(x, group)

        def hook(mod, args, kwargs):
            # Hugging Face layers call attention with keywords (hidden_states=...).
            if args:
                return (enter(args[0]), *args[1:]), kwargs
            if "hidden_states" in kwargs:
                return args, {**kwargs, "hidden_states": enter(kwargs["hidden_states"])}
            raise TypeError(f"region {name!r} got no positional input and no hidden_states=")

        module.register_forward_pre_hook(hook, with_kwargs=True)
        return None


@dataclass(frozen=True)
class SequenceNorm(Style):
    """A replicated module between regions (a norm): with sequence parallelism it sees only this
    rank's tokens, so each gradient contribution is all-reduced; without, nothing to do."""

    def apply(self, module, name, ctx):
        if ctx.sequence_parallel:
            for p in module.parameters():
                sync_grad_across(p, ctx.group)
        return None


STYLES: dict[str, Style] = {
    "column": Colwise(),
    "colwise": Colwise(),
    "row": Rowwise(),
    "rowwise": Rowwise(),
    "vocab": Vocab(),
    "region": Region(),
    "norm": SequenceNorm(),
}
