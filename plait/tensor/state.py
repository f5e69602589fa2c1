"""Sharded parameters: which they are, and gathering them (and their gradients) back whole.

Every parameter a tensor-parallel layer cut carries ``param._plait_tp_sharded = True`` and
``param._plait_tp`` (a :class:`~plait.tensor.layers.TPShard`: the dim it was cut along and its
true size before padding). Everything else in a parallelized model is replicated: identical on
every rank of the tensor group, gradients included.

For a global gradient norm, count each sharded parameter's local square on every rank and each
replicated one once -- :func:`grad_norm_sq` does that over the tensor group.
"""

from __future__ import annotations

import torch
from torch import nn

from plait import comm

__all__ = ["is_tp_sharded", "gather_state_dict", "gather_grads", "grad_norm_sq"]


def is_tp_sharded(p: torch.Tensor) -> bool:
    """True for a parameter that holds only this rank's slice (not replicated over tp)."""
    return bool(getattr(p, "_plait_tp_sharded", False))


def _full(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    info = p._plait_tp
    whole = comm.all_gather(t.detach(), info.group, info.dim, axis="tp", phase="gather")
    if info.parts:
        # A fused layer: rank r holds [q_r | k_r | v_r]; put the pieces back as [q | k | v].
        tp = comm.group_size(info.group)
        sizes = [n // tp for n in info.parts]
        pieces = [c.split(sizes, dim=info.dim) for c in whole.chunk(tp, dim=info.dim)]
        whole = torch.cat([pieces[r][i] for i in range(len(sizes)) for r in range(tp)], info.dim)
    return whole.narrow(info.dim, 0, info.full_size).contiguous()


def gather_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` in the unsharded layout (collective: every tp rank must call).

    Example::

        full = gather_state_dict(model)    # same keys and shapes as the unsharded model
        Transformer(cfg).load_state_dict(full)
    """
    return {
        k: (_full(v, v) if is_tp_sharded(v) else v.detach().clone())
        for k, v in module.state_dict(keep_vars=True).items()
    }


def gather_grads(module: nn.Module) -> dict[str, torch.Tensor | None]:
    """Every parameter's ``.grad`` in the unsharded layout, by name (collective).

    Example::

        loss.backward()
        grads = gather_grads(model)   # grads["blocks.0.mlp.fc_in.weight"].shape == (ffn, hidden)
    """
    out: dict[str, torch.Tensor | None] = {}
    for name, p in module.named_parameters():
        if p.grad is None:
            if is_tp_sharded(p):
                raise ValueError(f"{name} has no gradient on this rank; run backward first")
            out[name] = None
        else:
            out[name] = _full(p.grad, p) if is_tp_sharded(p) else p.grad.detach().clone()
    return out


def grad_norm_sq(parameters, group) -> torch.Tensor:
    """Squared L2 norm of the gradients over the tensor group, each replicated gradient counted once.

    Example (global clipping over tp; add an all-reduce over pp for a pipeline)::

        total = grad_norm_sq(model.parameters(), mesh.group("tp")).sqrt()
    """
    sharded = replicated = None
    for p in parameters:
        if p.grad is None:
            continue
        sq = p.grad.detach().double().pow(2).sum()
        if is_tp_sharded(p):
            sharded = sq if sharded is None else sharded + sq
        else:
            replicated = sq if replicated is None else replicated + sq
    zero = torch.zeros((), dtype=torch.float64)
    sharded = zero.clone() if sharded is None else sharded
    comm.all_reduce(sharded, group, axis="tp", phase="clip")
    return sharded + (zero if replicated is None else replicated)
