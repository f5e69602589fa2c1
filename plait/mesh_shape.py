"""The mesh's arithmetic alone: world = dp x pp x tp, rank <-> coordinates (no torch, no
processes); :class:`plait.Mesh` adds the process groups."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

__all__ = ["MeshShape", "AXES", "Axis"]

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
