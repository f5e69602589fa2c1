"""The device mesh: world = dp x pp x tp, tp innermost.

Rank ``r`` sits at coordinates ``(d, p, t)`` with ``r = (d * pp + p) * tp + t``: consecutive ranks
form a tensor group (as GPUs on one node, where the link is fastest), then pipeline stages, then
data-parallel replicas. :class:`MeshShape` is that arithmetic alone (no processes needed);
:class:`Mesh` adds this rank's process groups once torch.distributed is initialised.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

import torch.distributed as dist

__all__ = ["Mesh", "MeshShape", "AXES"]

Axis = Literal["dp", "pp", "tp"]
AXES: tuple[Axis, ...] = ("dp", "pp", "tp")


@dataclass(frozen=True)
class MeshShape:
    """Sizes of the three axes and the rank <-> coordinate arithmetic.

    Example::

        shape = MeshShape(dp=2, pp=2, tp=2)
        shape.coords(5)             # {'dp': 1, 'pp': 0, 'tp': 1}
        shape.group_ranks("pp", 5)  # [5, 7]
    """

    dp: int = 1
    pp: int = 1
    tp: int = 1

    def __post_init__(self) -> None:
        for axis in AXES:
            size = getattr(self, axis)
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise ValueError(f"mesh axis {axis} must be a positive integer, got {size!r}")

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp

    def size(self, axis: Axis) -> int:
        if axis not in AXES:
            raise ValueError(f"unknown mesh axis {axis!r}; valid axes are {AXES}")
        return getattr(self, axis)

    def coords(self, rank: int) -> dict[str, int]:
        """The (dp, pp, tp) coordinates of ``rank``."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a mesh of {self.world_size} ranks")
        return {
            "dp": rank // (self.pp * self.tp),
            "pp": (rank // self.tp) % self.pp,
            "tp": rank % self.tp,
        }

    def rank(self, dp: int = 0, pp: int = 0, tp: int = 0) -> int:
        """The rank at coordinates ``(dp, pp, tp)``."""
        for axis, value in zip(AXES, (dp, pp, tp)):
            if not 0 <= value < self.size(axis):
                raise ValueError(f"{axis} coordinate {value} outside 0..{self.size(axis) - 1}")
        return (dp * self.pp + pp) * self.tp + tp

    def group_ranks(self, axis: Axis, rank: int) -> list[int]:
        """Ranks that share every coordinate with ``rank`` except ``axis``, in axis order."""
        c = self.coords(rank)
        return [self.rank(**{**c, axis: i}) for i in range(self.size(axis))]

    def all_groups(self, axis: Axis) -> list[list[int]]:
        """Every group along ``axis``, ordered by the first rank of each."""
        groups: dict[int, list[int]] = {}
        for r in range(self.world_size):
            g = self.group_ranks(axis, r)
            groups.setdefault(g[0], g)
        return [groups[k] for k in sorted(groups)]

    @staticmethod
    def factorisations(world_size: int) -> list[MeshShape]:
        """Every (dp, pp, tp) whose product is ``world_size``."""
        divs = [d for d in range(1, world_size + 1) if world_size % d == 0]
        return [
            MeshShape(d, p, world_size // (d * p))
            for d, p in itertools.product(divs, divs)
            if world_size % (d * p) == 0
        ]


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
        for axis in AXES:
            mine = None
            for ranks in self.shape.all_groups(axis):
                # new_group is collective over the whole world: every rank creates every group.
                g = dist.new_group(ranks) if initialised and world > 1 else None
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
