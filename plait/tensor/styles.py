"""Sharding styles: what to do with one module of a plan.

A plan maps module-name patterns to styles (or their string names)::

    {"*.attn": "region", "*.attn.q_proj": "column", "*.attn.o_proj": "row", "embed.tok": "vocab"}

==========  ===================================================================================
``column``  :class:`Colwise` -- ``nn.Linear`` (or GPT-2's transposed ``Conv1D``) ->
            :class:`ColumnParallelLinear`; ``parts`` cuts fused projections each separately
``row``     :class:`Rowwise` -- ``nn.Linear`` (or ``Conv1D``) -> :class:`RowParallelLinear`
``vocab``   :class:`Vocab` -- ``nn.Embedding`` -> :class:`VocabParallelEmbedding`; an output
            ``nn.Linear`` -> a vocabulary-parallel column layer (padded; use :func:`loss_fn`)
``region``  :class:`Region` -- a module whose column layers share one input: the input enters the
            tensor-parallel region once, at this module, so attention's q, k and v cost one
            all-reduce backward, not three
``norm``    :class:`SequenceNorm` -- under sequence parallelism, a replicated module that sees
            sequence shards: its gradients are all-reduced; otherwise nothing
==========  ===================================================================================

Two more, used by :func:`~plait.tensor.hf.hf_plan`: :class:`Heads` (a region sharded by attention
heads, which also gives the module its local head counts) and :class:`SequenceSpan` (decoder layers
that scatter into, and gather out of, the sequence-sharded layout).

Every style checks the module first (:meth:`Style.check`) so a bad tp fails before anything has
been changed, with a message naming the size and the tp values that would work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from plait.tensor.collectives import (
    copy_to_region,
    gather_from_region,
    gather_from_sequence,
    scatter_to_sequence,
)
from plait.tensor.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    fused_region_entry,
    linear_dims,
    sync_grad_across,
)

__all__ = [
    "Context",
    "Style",
    "Colwise",
    "Rowwise",
    "Vocab",
    "Region",
    "Heads",
    "SequenceNorm",
    "SequenceSpan",
    "LocalConfig",
    "STYLES",
]


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


def _linear(module: nn.Module, style: str, name: str) -> tuple[int, int, bool]:
    dims = linear_dims(module)
    if dims is None:
        raise TypeError(
            f"style {style!r} applies to Linear (or a transposed Conv1D), but "
            f"{name or 'the root'!r} is {type(module).__name__}"
        )
    return dims


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
    """Shard an ``nn.Linear`` by output features; ``what`` names the size in errors.

    ``parts``: the output is fused projections side by side (``(q, k, v)`` or ``(gate, up)``
    sizes); each is cut separately, so this rank holds its share of every one.
    """

    gather_output: bool = False
    what: str = "out_features"
    parts: tuple[int, ...] | None = None

    def check(self, module, name, ctx):
        _, out, _ = _linear(module, "column", name)
        if not self.parts:
            require_divisible(out, ctx.tp, self.what, name)
            return
        if sum(self.parts) != out:
            raise ValueError(
                f"fused parts {self.parts} of {name!r} add up to {sum(self.parts)}, but its "
                f"output has {out} features"
            )
        for n in self.parts:
            require_divisible(n, ctx.tp, self.what, name)

    def apply(self, module, name, ctx):
        return ColumnParallelLinear.from_linear(
            module,
            ctx.group,
            input_mode=_input_mode(ctx),
            gather_output=self.gather_output,
            parts=self.parts,
            sequence_dim=ctx.sequence_dim,
            what=self.what,
        )


@dataclass(frozen=True)
class Rowwise(Style):
    """Shard an ``nn.Linear`` by input features; the output is summed over the group."""

    what: str = "in_features"

    def check(self, module, name, ctx):
        in_features, _, _ = _linear(module, "row", name)
        require_divisible(in_features, ctx.tp, self.what, name)

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

    ``sequence_sharded``: under sequence parallelism the embedding reduce-scatters along the
    sequence and the head all-gathers its input (the reference model); False keeps both on the
    whole sequence (Hugging Face models, whose decoder layers scatter and gather themselves).
    """

    gather_output: bool = False
    sequence_sharded: bool = True

    def check(self, module, name, ctx):
        if not isinstance(module, (nn.Embedding, nn.Linear)):
            _expect(module, nn.Embedding, "vocab", name)

    def apply(self, module, name, ctx):
        sp = ctx.sequence_parallel and self.sequence_sharded
        if isinstance(module, nn.Embedding):
            return VocabParallelEmbedding.from_embedding(
                module,
                ctx.group,
                output_mode="reduce_scatter" if sp else "reduce",
                sequence_dim=ctx.sequence_dim,
            )
        layer = ColumnParallelLinear.from_linear(
            module,
            ctx.group,
            input_mode="none" if ctx.in_region else ("sequence" if sp else "copy"),
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


class LocalConfig:
    """A model config as one sharded attention module sees it: this rank's head counts, everything
    else read through from the shared config (so later changes to it, such as the attention
    implementation, still show).

    Example::

        attn.config = LocalConfig(attn.config, num_attention_heads=2, num_key_value_heads=1)
    """

    def __init__(self, base, **local):
        self.__dict__["_base"] = base
        self.__dict__["_local"] = dict(local)

    def __getattr__(self, name):
        local = self.__dict__.get("_local")
        if local is None:  # half-built (copy, pickle): no delegation yet
            raise AttributeError(name)
        if name in local:
            return local[name]
        return getattr(self.__dict__["_base"], name)

    def __setattr__(self, name, value):
        if name in self._local:
            self._local[name] = value
        else:
            setattr(self._base, name, value)

    def __repr__(self) -> str:
        return f"LocalConfig({type(self._base).__name__}, {self._local})"


# Integer attributes of an attention module that count its heads, or give the width of their
# concatenation, and so are divided by tp when the module is sharded by heads (GPT-2 splits its
# fused output by ``split_size`` and reshapes by ``num_heads``; older Llamas reshape by
# ``num_heads`` and ``hidden_size``). Llama-like modules in transformers 5 reshape with
# ``view(..., -1, head_dim)`` and need none of them; ``head_dim`` and ``num_key_value_groups``
# (a ratio) never change.
HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
KV_HEAD_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
WIDTH_ATTRS = ("split_size", "embed_dim", "hidden_size", "all_head_size", "inner_dim")


def localize_heads(module: nn.Module, heads: int, kv_heads: int, head_dim: int, tp: int) -> None:
    """Give an attention module this rank's head counts: the attributes in :data:`HEAD_ATTRS`,
    :data:`KV_HEAD_ATTRS` and :data:`WIDTH_ATTRS` that equal the full count (or width) are divided
    by tp, and a ``config`` it reads head counts from (Phi-3 slices its fused ``qkv`` at
    ``config.num_attention_heads * head_dim``) is replaced by a :class:`LocalConfig`."""
    full = {**{a: heads for a in HEAD_ATTRS}, **{a: kv_heads for a in KV_HEAD_ATTRS}}
    full.update({a: heads * head_dim for a in WIDTH_ATTRS})
    for attr, n in full.items():
        value = module.__dict__.get(attr)
        if type(value) is int and value == n:
            setattr(module, attr, n // tp)
    config = module.__dict__.get("config")
    if config is None or isinstance(config, LocalConfig):
        return
    local = {}
    for attr in HEAD_ATTRS + KV_HEAD_ATTRS:
        n = full[attr]
        if type(getattr(config, attr, None)) is int and getattr(config, attr) == n:
            local[attr] = n // tp
    if local:
        module.config = LocalConfig(config, **local)


@dataclass(frozen=True)
class Heads(Region):
    """An attention module sharded by heads: a :class:`Region` for its column layers, a check that
    tp divides both the query heads and the key/value heads, and, when applied, the module's own
    head counts made local (:func:`localize_heads`)."""

    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0

    def check(self, module, name, ctx):
        if self.heads % ctx.tp or self.kv_heads % ctx.tp:
            bad, n = (
                ("num_attention_heads", self.heads)
                if self.heads % ctx.tp
                else ("num_key_value_heads", self.kv_heads)
            )
            raise ValueError(
                f"tensor parallel size tp={ctx.tp} does not divide {bad}={n} of {name!r} "
                f"(num_attention_heads={self.heads}, num_key_value_heads={self.kv_heads}: tp "
                f"must divide both); choose tp from {divisors(math.gcd(self.heads, self.kv_heads))}"
            )

    def apply(self, module, name, ctx):
        super().apply(module, name, ctx)
        localize_heads(module, self.heads, self.kv_heads, self.head_dim, ctx.tp)
        return None


def _replace_hidden(args, kwargs, fn, name):
    if args:
        return (fn(args[0]), *args[1:]), kwargs
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
    raise TypeError(f"{name!r} got no positional input and no hidden_states=")


@dataclass(frozen=True)
class SequenceSpan(Style):
    """Consecutive decoder layers whose activations are sequence-sharded under sequence
    parallelism while everything around them stays whole: the first (``scatter_input``) keeps this
    rank's chunk of its input, the last (``gather_output``) all-gathers its output (backward: the
    gradient of the whole input is all-gathered, and this rank's chunk of the output's kept). So the
    model's
    own code outside the layers -- position ids, rotary tables, masks, reshapes -- sees the whole
    sequence. Without sequence parallelism: nothing."""

    scatter_input: bool = False
    gather_output: bool = False

    def apply(self, module, name, ctx):
        if not ctx.sequence_parallel:
            return None
        group, dim = ctx.group, ctx.sequence_dim
        if self.scatter_input:

            def scatter(mod, args, kwargs):
                return _replace_hidden(
                    args, kwargs, lambda x: scatter_to_sequence(x, group, dim), name
                )

            module.register_forward_pre_hook(scatter, with_kwargs=True)
        if self.gather_output:
            # What follows the last layer is replicated (the final norm): its gradient is whole on
            # every rank, so backward keeps this rank's chunk (no reduce-scatter).
            def gather(mod, args, out):
                if isinstance(out, torch.Tensor):
                    return gather_from_region(out, group, dim)
                if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
                    return (gather_from_region(out[0], group, dim), *out[1:])
                raise TypeError(f"{name!r} returned {type(out).__name__}, not hidden states")

            module.register_forward_hook(gather)
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
