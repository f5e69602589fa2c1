"""Counted collectives: every byte a parallelism sends is tallied, so its cost shows in the metrics.

Tensor parallelism talks at every layer; pipeline parallelism at stage boundaries; data parallelism
once per step. :class:`CommStats` keeps one tally per ``(axis, op, phase)`` -- e.g.
``("tp", "all_reduce", "forward")`` -- of calls and bytes. The process-wide tally is
:data:`stats`; the collectives below record into it, and code with its own transport (a pipeline
send, say) calls :func:`record`.

Bytes are the size of the full buffer the collective works on, as seen by this rank: the tensor
for ``all_reduce``, the gathered output for ``all_gather``, the unreduced input for
``reduce_scatter``, the message for ``send``/``recv``. That is independent of the algorithm (ring,
tree) and makes ``all_reduce == reduce_scatter + all_gather`` hold in the numbers too.

Example (a training step)::

    from plait import comm

    comm.stats.reset()
    loss = model.loss(model(x), y)
    loss.backward()
    metrics.update(comm.stats.metrics())   # {'comm.tp.all_reduce.calls': 16, ...}
    comm.stats.calls(op="all_reduce", phase="backward")   # 8
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = [
    "CommStats",
    "stats",
    "record",
    "group_size",
    "group_rank",
    "all_reduce",
    "all_reduce_async",
    "all_gather",
    "reduce_scatter",
]

# The single-tensor collectives were renamed in torch 2.13; older versions have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class CommStats:
    """Calls and bytes per ``(axis, op, phase)``; reset and read it once per step.

    Example::

        s = CommStats()
        s.record("all_reduce", 1024, axis="tp", phase="forward")
        s.calls(op="all_reduce")        # 1
        s.bytes(axis="tp")              # 1024
        s.metrics()                     # {'comm.tp.all_reduce.calls': 1, ..., 'comm.bytes': 1024}
    """

    _calls: dict[tuple[str, str, str], int] = field(default_factory=lambda: defaultdict(int))
    _bytes: dict[tuple[str, str, str], int] = field(default_factory=lambda: defaultdict(int))
    enabled: bool = True

    def record(self, op: str, nbytes: int, *, axis: str = "", phase: str = "") -> None:
        """Count one call of ``op`` moving ``nbytes``."""
        if not self.enabled:
            return
        key = (axis, op, phase)
        self._calls[key] += 1
        self._bytes[key] += int(nbytes)

    def reset(self) -> None:
        """Forget every tally (call at the start of a step)."""
        self._calls.clear()
        self._bytes.clear()

    def _sum(self, table: dict, op: str | None, axis: str | None, phase: str | None) -> int:
        return sum(
            v
            for (a, o, p), v in table.items()
            if (op is None or o == op)
            and (axis is None or a == axis)
            and (phase is None or p == phase)
        )

    def calls(
        self, op: str | None = None, *, axis: str | None = None, phase: str | None = None
    ) -> int:
        """Calls matching every given filter (None matches anything)."""
        return self._sum(self._calls, op, axis, phase)

    def bytes(
        self, op: str | None = None, *, axis: str | None = None, phase: str | None = None
    ) -> int:
        """Bytes matching every given filter (None matches anything)."""
        return self._sum(self._bytes, op, axis, phase)

    def table(self) -> dict[tuple[str, str, str], tuple[int, int]]:
        """``{(axis, op, phase): (calls, bytes)}`` for every tally that is not zero."""
        return {k: (self._calls[k], self._bytes[k]) for k in sorted(self._calls)}

    def metrics(self, prefix: str = "comm") -> dict[str, int]:
        """Flat metrics per ``axis.op`` (phases summed) plus the totals, for a metrics record."""
        out: dict[str, int] = {}
        for (axis, op, _), (calls, nbytes) in self.table().items():
            name = f"{prefix}.{axis}.{op}" if axis else f"{prefix}.{op}"
            out[f"{name}.calls"] = out.get(f"{name}.calls", 0) + calls
            out[f"{name}.bytes"] = out.get(f"{name}.bytes", 0) + nbytes
        out[f"{prefix}.calls"] = self.calls()
        out[f"{prefix}.bytes"] = self.bytes()
        return out


stats = CommStats()
"""The process-wide tally that plait's collectives record into."""


def record(op: str, nbytes: int, *, axis: str = "", phase: str = "") -> None:
    """Record a call in :data:`stats` (for transports that are not the functions below)."""
    stats.record(op, nbytes, axis=axis, phase=phase)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def group_size(group: dist.ProcessGroup | None) -> int:
    """Ranks in ``group``; None stands for a one-process group (as :class:`plait.Mesh` gives)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    """This rank's index in ``group`` (0 for None)."""
    return 0 if group is None else dist.get_rank(group)


def all_reduce(
    t: torch.Tensor,
    group: dist.ProcessGroup | None,
    *,
    op: dist.ReduceOp = dist.ReduceOp.SUM,
    axis: str = "",
    phase: str = "",
) -> torch.Tensor:
    """Reduce ``t`` in place over ``group`` and return it.

    Example::

        comm.all_reduce(grad, mesh.group("dp"), axis="dp", phase="backward")
    """
    if group_size(group) == 1:
        return t
    record("all_reduce", _nbytes(t), axis=axis, phase=phase)
    dist.all_reduce(t, op=op, group=group)
    return t


def all_reduce_async(
    t: torch.Tensor, group: dist.ProcessGroup | None, *, axis: str = "", phase: str = ""
):
    """Start summing ``t`` in place over ``group``; returns the work handle (``.wait()``), or None
    on a one-rank group. Overlap it with computation that does not need ``t``.

    Example::

        work = comm.all_reduce_async(grad_input, group, axis="tp", phase="backward")
        grad_weight = grad_out.T @ x    # runs while the all-reduce is in flight
        work.wait()
    """
    if group_size(group) == 1:
        return None
    record("all_reduce", _nbytes(t), axis=axis, phase=phase)
    return dist.all_reduce(t, group=group, async_op=True)


def all_gather(
    t: torch.Tensor, group: dist.ProcessGroup | None, dim: int, *, axis: str = "", phase: str = ""
) -> torch.Tensor:
    """Concatenate every rank's ``t`` along ``dim`` in rank order (a new tensor).

    Example::

        full = comm.all_gather(shard, group, dim=1)   # (B, T/tp, H) -> (B, T, H)
    """
    world = group_size(group)
    if world == 1:
        return t
    # The collective concatenates along dim 0; move `dim` there and back (a copy unless dim == 0).
    src = t.movedim(dim, 0).contiguous()
    out = src.new_empty((world * src.shape[0], *src.shape[1:]))
    record("all_gather", _nbytes(out), axis=axis, phase=phase)
    _all_gather_single(out, src, group=group)
    return out.movedim(0, dim)


def reduce_scatter(
    t: torch.Tensor, group: dist.ProcessGroup | None, dim: int, *, axis: str = "", phase: str = ""
) -> torch.Tensor:
    """Sum ``t`` over ``group`` and keep this rank's chunk along ``dim`` (a new tensor).

    ``t.shape[dim]`` must divide by the group size.

    Example::

        shard = comm.reduce_scatter(partial, group, dim=1)   # (B, T, H) -> (B, T/tp, H)
    """
    world = group_size(group)
    if world == 1:
        return t
    if t.shape[dim] % world:
        raise ValueError(
            f"reduce_scatter along dim {dim} needs its size {t.shape[dim]} to divide by the group "
            f"size {world}"
        )
    src = t.movedim(dim, 0).contiguous()
    out = src.new_empty((src.shape[0] // world, *src.shape[1:]))
    record("reduce_scatter", _nbytes(src), axis=axis, phase=phase)
    _reduce_scatter_single(out, src, group=group)
    return out.movedim(0, dim)
