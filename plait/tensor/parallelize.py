"""``parallelize(module, mesh)``: shard an unmodified model in place, by a plan.

The plan (default: :func:`~plait.tensor.plans.default_plan`) maps module names to styles. Every
matched module is checked before any is changed, then each is replaced by its tensor-parallel
counterpart built from this rank's slice of its existing weights -- so a model initialised once and
then sharded computes exactly what the unsharded one does.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from plait import comm
from plait.mesh import Mesh
from plait.tensor.collectives import check_sequence_divisible
from plait.tensor.loss import loss_fn, vocab_head
from plait.tensor.plans import default_plan, match
from plait.tensor.styles import STYLES, Context, Region, Style

__all__ = ["parallelize", "validate", "resolve_group"]


def resolve_group(mesh_or_group: Mesh | dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """The tensor-parallel group of a :class:`~plait.Mesh`, or the ProcessGroup itself."""
    if isinstance(mesh_or_group, Mesh):
        return mesh_or_group.group("tp")
    if mesh_or_group is None or isinstance(mesh_or_group, dist.ProcessGroup):
        return mesh_or_group
    raise TypeError(
        f"expected a plait.Mesh or a torch.distributed ProcessGroup, got "
        f"{type(mesh_or_group).__name__}"
    )


def _style(value, pattern: str) -> Style:
    if isinstance(value, Style):
        return value
    if isinstance(value, str) and value in STYLES:
        return STYLES[value]
    raise ValueError(
        f"plan entry {pattern!r}: unknown style {value!r}; use one of {sorted(STYLES)} "
        f"or a plait.tensor Style"
    )


def _match(module: nn.Module, plan) -> list[tuple[str, nn.Module, Style]]:
    if plan is None:
        plan = default_plan(module)
    styles = {pattern: _style(v, pattern) for pattern, v in plan.items()}
    matched = [
        (name, m, s) for name, m in module.named_modules() if (s := match(styles, name)) is not None
    ]
    if not matched:
        raise ValueError(
            f"the plan matched no module of {type(module).__name__}; patterns: {list(styles)}"
        )
    return matched


def validate(
    module: nn.Module,
    tp: int,
    *,
    plan: dict[str, Style | str] | None = None,
    sequence_parallel: bool = False,
    seq_len: int | None = None,
) -> None:
    """Raise ValueError if ``module`` cannot be sharded ``tp`` ways; needs no processes.

    Call it before launching workers so bad sizes fail at once, with a message naming the value.

    Example::

        validate(Transformer(get_config("tiny")), tp=3)
        # ValueError: tensor parallel size tp=3 does not divide n_heads=4 of 'blocks.0.attn'; ...
    """
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp must be a positive integer, got {tp!r}")
    if tp == 1:
        return
    if sequence_parallel and seq_len is not None:
        check_sequence_divisible(seq_len, tp)
    ctx = Context(None, tp, sequence_parallel)
    for name, m, s in _match(module, plan):
        s.check(m, name, ctx)


def parallelize(
    module: nn.Module,
    mesh_or_group: Mesh | dist.ProcessGroup | None,
    *,
    sequence_parallel: bool = False,
    plan: dict[str, Style | str] | None = None,
    sequence_dim: int = 1,
) -> nn.Module:
    """Shard ``module`` in place over the tensor-parallel group; return it.

    Args:
        module: a whole model or a part of one (a pipeline stage); with the default plan every
            recognised submodule present is sharded.
        mesh_or_group: a :class:`plait.Mesh` (its ``tp`` group) or a ProcessGroup. A group of
            one rank leaves the module untouched.
        sequence_parallel: shard the norms' activations along the sequence; blocks then take and
            return ``(B, T/tp, H)`` chunks, and the sequence length must divide by tp.
        plan: ``{name pattern: style}`` (see :mod:`plait.tensor.styles`); default
            :func:`~plait.tensor.plans.default_plan`.
        sequence_dim: the sequence dimension of activations (1 for ``(B, T, H)``).

    Returns:
        ``module`` (or its replacement, when the root itself was matched). When it has a ``loss``
        method and a vocabulary-parallel output, ``module.loss`` becomes :func:`loss_fn`'s.

    Raises:
        ValueError: tp does not divide a head count, hidden or ffn size (names the value and the
            tp that would), or the plan matches nothing.

    Example::

        mesh = plait.Mesh(tp=2)
        model = parallelize(Transformer(cfg, seed=0), mesh)
        loss = model.loss(model(x), y)     # vocabulary-parallel cross-entropy
        loss.backward()
    """
    group = resolve_group(mesh_or_group)
    tp = comm.group_size(group)
    if tp == 1:
        return module
    matched = _match(module, plan)
    base = Context(group, tp, sequence_parallel, sequence_dim)
    for name, m, s in matched:  # every check before any change
        s.check(m, name, base)
    regions = [name for name, _, s in matched if isinstance(s, Region)]
    replaced: list[str] = []
    for name, m, s in matched:
        if any(name.startswith(r + ".") for r in replaced):
            continue  # inside a module that was already replaced whole
        inside = any(r == "" or name.startswith(r + ".") for r in regions if r != name)
        new = s.apply(m, name, Context(group, tp, sequence_parallel, sequence_dim, inside))
        if new is None or new is m:
            continue
        replaced.append(name)
        if name == "":
            module = new
        else:
            parent, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(parent), leaf, new)
    if hasattr(module, "loss") and vocab_head(module) is not None:
        # The trainer keeps calling model.loss(logits, y); the logits are now vocabulary shards.
        module.loss = loss_fn(module)
    return module
