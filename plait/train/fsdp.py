"""Fully sharded data parallelism on the dp axis, with PyTorch's own FSDP2 (``fully_shard``).

``--fsdp`` shards every parameter, its gradient and its AdamW state over the data-parallel group
(ZeRO-3), so each replica keeps about ``1/dp`` of them between uses. As in torchtitan, each
transformer block is one :func:`torch.distributed.fsdp.fully_shard` unit and the rest of a stage
(embeddings, final norm, head) is the root unit -- the whole model when ``pp == 1``, else each
pipeline stage (chunk) this rank runs -- over a 1-D :class:`DeviceMesh` built from the dp process
group. A block's parameters are all-gathered for its forward and again for its backward,
resharded after each, and its gradients reduce-scattered (averaged) over dp in every micro-batch's
backward and accumulated into the sharded ``.grad``. On a GPU FSDP2 runs the collectives on their
own streams and prefetches the next block's gather while this one computes; on CPU with gloo they
block, so nothing overlaps. The root stays gathered from its forward to its backward (FSDP2's
default for the root, since its backward comes right after).

Mixed precision (``--precision bf16-mixed | fp16-mixed``) uses FSDP2's ``MixedPrecisionPolicy``:
the sharded masters stay float32, the gathers are in the low dtype (half the bytes), gradients
are reduce-scattered and accumulated in float32.

Tensor parallelism composes: plait's tp shards are plain tensors of their local shape, and FSDP
shards those again along dim 0 over dp only (the DTensor's "global" shape is the tp-local one).

What cannot work is refused by :class:`plait.config.ParallelConfig` before any process starts:
``zero1`` with it (FSDP already shards optimizer state), a schedule that splits the backward into
B and W (zero-bubble: W forms weight gradients outside autograd, where FSDP's hooks never see
them), and ``dp == 1``.

Helpers for the rest of the trainer: :func:`local` (a gradient's or state's local shard),
:func:`full` (the unsharded tensor, collective over dp), :func:`shard_like` (a full tensor cut as
a parameter is), :func:`state_bytes` (the bytes of parameters, gradients and optimizer state this
rank holds).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads only where FSDP runs: checking a config stays fast
    import torch
    from torch import nn

__all__ = ["shard_over_dp", "local", "full", "shard_like", "state_bytes"]


def shard_over_dp(
    module: nn.Module, mesh, blocks=(), param_dtype: torch.dtype | None = None
) -> nn.Module:
    """Shard ``module`` over this rank's dp group (in place): ``fully_shard`` each of ``blocks``
    (its transformer blocks), then ``module`` itself as the root over the rest; returns it.

    ``param_dtype``: the dtype parameters are gathered and computed in (mixed precision; the
    shards stay in their own dtype and gradients are reduced in float32), None for their own.

    FSDP replaces each parameter by a new one holding a DTensor; plait's markers on the old
    parameters (``_plait_tp``: which are tensor-parallel shards) are carried over by name.
    """
    import torch
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    params = dict(module.named_parameters(remove_duplicate=False))
    marks = {
        n: {k: v for k, v in vars(p).items() if k.startswith("_plait")} for n, p in params.items()
    }
    device = next(iter(params.values())).device.type if params else "cpu"
    dp_mesh = DeviceMesh.from_group(mesh.group("dp"), device_type=device)
    kw = {}
    if param_dtype is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=True, **kw)
        _count_collectives(block)
    fully_shard(module, mesh=dp_mesh, **kw)  # the root's default: kept for its backward
    _count_collectives(module)
    for name, p in module.named_parameters(remove_duplicate=False):
        for k, v in marks.get(name, {}).items():
            setattr(p, k, v)
    return module


def _count_collectives(unit) -> None:
    """Count the unit's all-gathers (output bytes) and reduce-scatters (input bytes) on the dp
    axis of :data:`plait.comm.stats`, as plait's own collectives are: FSDP's defaults, wrapped."""
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import (
            DefaultAllGather,
            DefaultReduceScatter,
        )
    except ImportError:  # a metric only: FSDP runs the same without it
        return
    from plait import comm

    def phase() -> str:
        import torch

        return "backward" if torch._C._current_graph_task_id() >= 0 else "forward"

    class AllGather(DefaultAllGather):
        def __call__(self, output_tensor, *args, **kwargs):
            nbytes = output_tensor.numel() * output_tensor.element_size()
            comm.record("all_gather", nbytes, axis="dp", phase=phase())
            return super().__call__(output_tensor, *args, **kwargs)

    class ReduceScatter(DefaultReduceScatter):
        def __call__(self, output_tensor, input_tensor, *args, **kwargs):
            nbytes = input_tensor.numel() * input_tensor.element_size()
            comm.record("reduce_scatter", nbytes, axis="dp", phase="backward")
            return super().__call__(output_tensor, input_tensor, *args, **kwargs)

    unit.set_custom_all_gather(AllGather())
    unit.set_custom_reduce_scatter(ReduceScatter())


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: in-place changes reach it); other tensors as
    they are."""
    return t.to_local() if _is_dtensor(t) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The unsharded tensor of a DTensor (an all-gather over its mesh: every rank must call);
    other tensors as they are."""
    return t.full_tensor() if _is_dtensor(t) else t


def shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``whole`` cut as the DTensor ``like`` is (this rank's slice, no communication: every rank
    holds ``whole``); ``whole`` itself when ``like`` is a plain tensor."""
    if not _is_dtensor(like):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(
        whole.to(like.dtype), like.device_mesh, like.placements, src_data_rank=None
    )


def state_bytes(params, opt, extra=()) -> int:
    """Bytes of the training state this rank holds: parameters, gradients, optimizer state (and
    ``extra`` buffers), counting local shards only and each storage once."""
    import torch

    seen: dict[int, int] = {}

    def add(t) -> None:
        if isinstance(t, torch.Tensor):
            s = local(t.detach()).untyped_storage()
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())

    for p in params:
        add(p)
        add(p.grad)
    for st in getattr(opt, "state", {}).values():
        for v in st.values():
            add(v)
    for t in extra:
        add(t)
    return sum(seen.values())
