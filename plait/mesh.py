"""The device mesh: world = dp x pp x tp, tp innermost.

Rank ``r`` sits at coordinates ``(d, p, t)`` with ``r = (d * pp + p) * tp + t``: consecutive ranks
form a tensor group (as GPUs on one node, where the link is fastest), then pipeline stages, then
data-parallel replicas. :class:`MeshShape` is that arithmetic alone (no processes needed);
:class:`Mesh` adds this rank's process groups once torch.distributed is initialised.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from plait.mesh_shape import AXES, Axis, MeshShape

__all__ = ["Mesh", "MeshShape", "AXES", "new_group", "world_timeout"]


def new_group(ranks: list[int], timeout: datetime.timedelta | None = None):
    """``dist.new_group(ranks)`` with the world group's timeout (collective over the world).

    torch gives a new group a default of 30 minutes whatever the world was given; every group
    plait creates goes through here, so a stalled peer fails every collective and pipeline
    receive after the job's ``timeout``.
    """
    return dist.new_group(ranks, timeout=timeout or world_timeout())


def world_timeout() -> datetime.timedelta | None:
    """The timeout the default process group was created with (None if it cannot be read)."""
    pg = dist.distributed_c10d._get_default_group()
    for device in ("cpu", "cuda"):
        try:
            return pg._get_backend(torch.device(device)).options._timeout
        except (RuntimeError, AttributeError):
            continue
    return None


class Mesh:
    """This rank's place in a dp x pp x tp mesh, with one process group per axis.

    Every rank must construct the same Mesh (group creation is collective). With a world of one
    process, or before torch.distributed is initialised with ``world_size == 1``, the groups are
    None and every coordinate is 0.

    Example (inside :func:`plait.launch` with 8 workers)::

        mesh = Mesh(dp=2, pp=2, tp=2)
        mesh.tp_rank, mesh.pp_rank, mesh.dp_rank
        dist.all_reduce(t, group=mesh.group("tp"))
        mesh.pp_next  # global rank of the next pipeline stage, or None on the last stage
    """

    def __init__(self, dp: int = 1, pp: int = 1, tp: int = 1):
        """Every axis group gets the world group's timeout (see :func:`new_group`)."""
        self.shape = MeshShape(dp, pp, tp)
        initialised = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if initialised else 1
        if world != self.shape.world_size:
            raise ValueError(
                f"mesh dp={dp} x pp={pp} x tp={tp} needs {self.shape.world_size} ranks but the "
                f"world has {world}; choose sizes whose product is {world}"
            )
        self.rank = dist.get_rank() if initialised else 0
        self._groups: dict[str, dist.ProcessGroup | None] = {}
        timeout = world_timeout() if initialised and world > 1 else None
        for axis in AXES:
            mine = None
            for ranks in self.shape.all_groups(axis):
                # new_group is collective over the whole world: every rank creates every group.
                g = new_group(ranks, timeout) if initialised and world > 1 else None
                if self.rank in ranks:
                    mine = g
            self._groups[axis] = mine

    # coordinates
    @property
    def coords(self) -> dict[str, int]:
        return self.shape.coords(self.rank)

    @property
    def dp_rank(self) -> int:
        return self.coords["dp"]

    @property
    def pp_rank(self) -> int:
        return self.coords["pp"]

    @property
    def tp_rank(self) -> int:
        return self.coords["tp"]

    def size(self, axis: Axis) -> int:
        return self.shape.size(axis)

    def group(self, axis: Axis) -> dist.ProcessGroup | None:
        """The process group of this rank along ``axis`` (None in a one-process world)."""
        self.shape.size(axis)  # validates the name
        return self._groups[axis]

    def group_ranks(self, axis: Axis) -> list[int]:
        return self.shape.group_ranks(axis, self.rank)

    # pipeline neighbours
    def pp_peer(self, stage: int) -> int:
        """Global rank of pipeline stage ``stage`` in this rank's pipeline (same dp and tp)."""
        return self.group_ranks("pp")[stage]

    @property
    def pp_prev(self) -> int | None:
        """Global rank of the previous pipeline stage, None on the first stage."""
        return self.pp_peer(self.pp_rank - 1) if self.pp_rank > 0 else None

    @property
    def pp_next(self) -> int | None:
        """Global rank of the next pipeline stage, None on the last stage."""
        return self.pp_peer(self.pp_rank + 1) if self.pp_rank < self.shape.pp - 1 else None

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.shape.pp - 1

    def __repr__(self) -> str:
        s = self.shape
        return f"Mesh(dp={s.dp}, pp={s.pp}, tp={s.tp}, rank={self.rank}, coords={self.coords})"
