"""``parallelize(module, mesh)``: shard an unmodified model in place, by a plan.

The plan (default: :func:`~plait.tensor.plans.default_plan`) maps module names to styles. Every
matched module is checked before any is changed, then each is replaced by its tensor-parallel
counterpart built from this rank's slice of its existing weights -- so a model initialised once and
then sharded computes exactly what the unsharded one does. Every pattern of a plan must match some
module: a typo is an error, not a layer silently left whole.

A parameter two sharded modules share (a head tied to the embedding) is cut once: the second
module gets the first one's shard, so they stay tied.
"""

from __future__ import annotations

import difflib

import torch.distributed as dist
from torch import nn

from plait import comm
from plait.mesh import Mesh
from plait.tensor.collectives import check_sequence_divisible
from plait.tensor.loss import causal_lm_loss_function, loss_fn, vocab_head
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
    order = {pattern: i for i, pattern in enumerate(styles)}
    # Exact names (what the ready-made plans use) by lookup, wildcards by fnmatch; as in
    # plans.match, the first pattern of the plan that matches a name wins.
    wild = [p for p in styles if any(c in p for c in "*?[")]
    modules = list(module.named_modules())
    matched, used = [], set()
    for name, m in modules:
        hits = [p for p in wild if match({p: True}, name)]
        if name in styles:
            hits.append(name)
        if hits:
            first = min(hits, key=order.__getitem__)
            matched.append((name, m, styles[first]))
            used.update(hits)
    names = [name for name, _ in modules]
    for pattern in styles:
        if pattern not in used:
            near = difflib.get_close_matches(pattern, names, n=3, cutoff=0.3)
            shown = near or [n for n in names if n][:3]
            raise ValueError(
                f"plan pattern {pattern!r} matches no module of {type(module).__name__}; modules "
                f"include {', '.join(map(repr, shown))} (fnmatch: '*' spans dots)"
            )
    return matched


def _share_tied(old: nn.Module, new: nn.Module, name: str, shared: dict) -> None:
    """Make ``new`` use the shard of any parameter ``old`` shared with a module already replaced
    (a tied head and embedding); remember the rest."""
    new_params = dict(new.named_parameters())
    for pname, p in old.named_parameters():
        q = new_params.get(pname)
        if q is None or q is p:  # gone, or carried over whole (the reference's positions)
            continue
        if id(p) not in shared:
            shared[id(p)] = (p, q, name)  # p kept alive: its id stays unique
            continue
        _, first, where = shared[id(p)]
        if first.shape != q.shape or getattr(first, "_plait_tp", None) != getattr(
            q, "_plait_tp", None
        ):
            raise ValueError(
                f"{name!r} shares its {pname} with {where!r}, but the plan shards them "
                f"differently ({tuple(first.shape)} vs {tuple(q.shape)}); give both one style"
            )
        owner, _, leaf = pname.rpartition(".")
        setattr(new.get_submodule(owner), leaf, first)


def _check_ties(module: nn.Module, shared: dict) -> None:
    for pname, p in module.named_parameters():
        if id(p) in shared and shared[id(p)][0] is p:
            raise ValueError(
                f"{pname} is shared with {shared[id(p)][2]!r}, which was sharded, but is itself "
                f"left whole; add its module to the plan with the same style"
            )


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
    shared: dict[int, tuple] = {}
    for name, m, s in matched:
        if any(name.startswith(r + ".") for r in replaced):
            continue  # inside a module that was already replaced whole
        inside = any(r == "" or name.startswith(r + ".") for r in regions if r != name)
        new = s.apply(m, name, Context(group, tp, sequence_parallel, sequence_dim, inside))
        if new is None or new is m:
            continue
        _share_tied(m, new, name, shared)
        replaced.append(name)
        if name == "":
            module = new
        else:
            parent, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(parent), leaf, new)
    _check_ties(module, shared)
    if hasattr(module, "loss") and vocab_head(module) is not None:
        # The trainer keeps calling model.loss(logits, y); the logits are now vocabulary shards.
        module.loss = loss_fn(module)
    if _is_causal_lm(module) and vocab_head(module) is not None:
        # A Hugging Face causal LM computes model(ids, labels=ids).loss with its loss_function.
        module.loss_function = causal_lm_loss_function(module)
    if callable(getattr(module, "save_pretrained", None)):
        module.save_pretrained = _sharded_save(tp)
    return module


def _sharded_save(tp: int):
    def save_pretrained(*args, **kwargs):
        raise ValueError(
            f"this model is sharded over tp={tp}: save_pretrained would write shard shapes that "
            f"from_pretrained refuses; save plait.tensor.gather_state_dict(model) on one rank, "
            f"or train with plait train --checkpoint-dir and run plait export"
        )

    return save_pretrained


def _is_causal_lm(module: nn.Module) -> bool:
    return hasattr(type(module), "loss_function") and getattr(module, "loss_type", None) in (
        None,
        "ForCausalLM",
    )
