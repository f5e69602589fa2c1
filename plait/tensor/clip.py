"""Gradient clipping by the global norm of a model sharded over a mesh.

Every rank of a tensor group holds a different slice of each sharded parameter's gradient and the
same copy of each replicated one, and every pipeline stage holds different parameters. The global
norm therefore sums the squares of sharded gradients over the tensor group, counts replicated ones
once, and sums over the pipeline group; data-parallel replicas already hold the same averaged
gradients. :func:`plait.train.grads.clip_grad_norm` does exactly that; this is its public face,
taking the :class:`~plait.Mesh`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from plait.mesh import Mesh

__all__ = ["clip_grad_norm_"]


def clip_grad_norm_(
    parameters: Iterable[nn.Parameter] | nn.Parameter, max_norm: float, mesh: Mesh
) -> torch.Tensor:
    """Scale this rank's gradients in place so the whole model's gradient norm is at most
    ``max_norm``; return that global norm (before clipping) as a float64 scalar tensor, the same
    on every rank.

    Like ``torch.nn.utils.clip_grad_norm_`` on the unsharded model (which it equals), with the
    mesh saying which ranks share what. Collective over the mesh's tp and pp groups: every rank
    calls it, with the parameters it holds. ``max_norm`` of 0 or None only measures.

    Example::

        loss.backward()
        norm = plait.tensor.clip_grad_norm_(model.parameters(), 1.0, mesh)
        optimizer.step()
    """
    from plait.train.grads import clip_grad_norm

    if not isinstance(mesh, Mesh):
        raise TypeError(f"clip_grad_norm_ needs a plait.Mesh, got {type(mesh).__name__}")
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    norm = clip_grad_norm(
        list(parameters), max_norm, mesh.group("tp"), mesh.tp_rank, mesh.group("pp")
    )
    return torch.tensor(norm, dtype=torch.float64)
