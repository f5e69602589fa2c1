"""Fully sharded data parallelism on the dp axis, with PyTorch's own FSDP2 (``fully_shard``).

``--fsdp`` shards every parameter, its gradient and its AdamW state over the data-parallel group
(ZeRO-3), so each replica keeps about ``1/dp`` of them between uses. Each unit -- the whole model
when ``pp == 1``, else each pipeline stage (chunk) this rank runs -- is one
:func:`torch.distributed.fsdp.fully_shard` root over a 1-D :class:`DeviceMesh` built from the dp
process group: its parameters are all-gathered for its forward and again for its backward,
resharded after each, and its gradients reduce-scattered (averaged) over dp in every
micro-batch's backward and accumulated into the sharded ``.grad``.

Tensor parallelism composes: plait's tp shards are plain tensors of their local shape, and FSDP
shards those again along dim 0 over dp only (the DTensor's "global" shape is the tp-local one).

What cannot work is refused before any process starts (:func:`check_fsdp`): ``--zero1`` (FSDP
already shards optimizer state), a schedule that splits the backward into B and W (zero-bubble:
W forms weight gradients outside autograd, where FSDP's hooks never see them), and ``--dp 1``.

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

__all__ = ["check_fsdp", "shard_over_dp", "local", "full", "shard_like", "state_bytes"]


def check_fsdp(cfg) -> None:
    """Raise ValueError (one line) for a TrainConfig that asks for FSDP where it cannot work."""
    pc = cfg.parallel
    if cfg.zero1:
        raise ValueError(
            "--fsdp and --zero1 are exclusive: FSDP already shards the optimizer state (with the "
            "parameters and gradients); choose one"
        )
    if pc.dp < 2:
        raise ValueError(
            f"--fsdp shards over the data-parallel replicas: needs --dp >= 2, got {pc.dp}"
        )
    precision = getattr(pc, "precision", "fp32")
    if precision != "fp32":
        raise ValueError(
            f"--fsdp with --precision {precision} is not built yet (it needs FSDP2's "
            f"MixedPrecisionPolicy over the float32 masters); use --precision fp32 with --fsdp"
        )
    if pc.pp > 1:
        from plait.pipeline import build_schedule
        from plait.pipeline.schedule import Kind

        schedule = build_schedule(
            pc.schedule, pc.pp, pc.num_microbatches, pc.virtual, pc.schedule_costs
        )
        if any(a.kind is Kind.W for actions in schedule.actions for a in actions):
            raise ValueError(
                f"--fsdp cannot run schedule {pc.schedule!r}: its split backward (B, then W) forms "
                f"weight gradients outside autograd, where FSDP cannot reduce-scatter them; use "
                f"gpipe, 1f1b or interleaved-1f1b"
            )


def shard_over_dp(module: nn.Module, mesh) -> nn.Module:
    """``fully_shard(module)`` over this rank's dp group (in place); returns ``module``.

    FSDP replaces each parameter by a new one holding a DTensor; plait's markers on the old
    parameters (``_plait_tp``: which are tensor-parallel shards) are carried over by name.
    """
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    params = dict(module.named_parameters(remove_duplicate=False))
    marks = {
        n: {k: v for k, v in vars(p).items() if k.startswith("_plait")} for n, p in params.items()
    }
    device = next(iter(params.values())).device.type if params else "cpu"
    dp_mesh = DeviceMesh.from_group(mesh.group("dp"), device_type=device)
    fully_shard(module, mesh=dp_mesh, reshard_after_forward=True)
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
