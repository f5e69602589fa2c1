"""How a model's blocks are split into pipeline stages: the one rule the partitioner cuts by and
the planner costs. Pure Python (no torch), so the planner can use it without a model.

The units of a model are ``[embed, block 0, ..., block L-1, head]``; a split is the number of
blocks per stage (``embed`` always rides with the first stage and ``head`` with the last).

    "layers"      blocks as even as possible; spare blocks go to the middle stages first, then to
                  the first stage (the edges also carry embed and head); every stage needs a block
    "params"      contiguous split minimising the largest stage's total unit cost (parameters)
    "time"        the same with unit costs in seconds (measured by the partitioner, modelled by
                  the planner)
    [n0, n1, ...] explicit blocks per stage

Example::

    split_blocks(7, 4)                        # [2, 2, 2, 1]
    split_blocks(4, 2, "params", [9, 1, 1, 1, 1, 9])   # [1, 3]
"""

from __future__ import annotations

from collections.abc import Sequence

from plait.config import BALANCES

__all__ = ["BALANCES", "split_blocks", "even_blocks", "min_max_split", "explicit_blocks"]


def split_blocks(
    num_blocks: int,
    num_stages: int,
    balance: str | Sequence[int] = "layers",
    unit_costs: Sequence[float] | None = None,
) -> list[int]:
    """Blocks per stage for ``balance``; ``unit_costs`` (``num_blocks + 2`` numbers: embed, each
    block, head) is needed for ``"params"`` and ``"time"``.

    Raises:
        ValueError: naming the balance, or why the split is impossible.
    """
    if isinstance(balance, str):
        if balance == "layers":
            return even_blocks(num_blocks, num_stages)
        if balance in ("params", "time"):
            if unit_costs is None or len(unit_costs) != num_blocks + 2:
                raise ValueError(
                    f"balance={balance!r} needs one cost per unit (embed, {num_blocks} blocks, "
                    f"head), got {None if unit_costs is None else len(unit_costs)}"
                )
            return min_max_split(list(unit_costs), num_stages)
        raise ValueError(
            f"balance must be 'layers', 'params', 'time' or a list of blocks per stage, "
            f"got {balance!r}"
        )
    return explicit_blocks(list(balance), num_blocks, num_stages)


def even_blocks(L: int, k: int) -> list[int]:
    if k > L:
        raise ValueError(
            f"cannot split {L} blocks into {k} stages by layers: each stage needs at least one "
            f"block; use at most {L} stages, balance='params', or explicit blocks per stage"
        )
    # The remainder goes to the middle stages first (the edge stages also carry embed and head),
    # then to the first stage: an embedding lookup is cheap, the head's projection and loss not.
    base, extra = divmod(L, k)
    order = sorted(range(k), key=lambda i: (i in (0, k - 1), i == k - 1, abs(i - (k - 1) / 2)))
    bonus = set(order[:extra])
    return [base + (i in bonus) for i in range(k)]


def explicit_blocks(counts: list[int], L: int, k: int) -> list[int]:
    if len(counts) != k or any(not isinstance(n, int) or n < 0 for n in counts):
        raise ValueError(
            f"balance as a list gives the number of blocks of each of the {k} stages "
            f"(non-negative integers), got {counts!r}"
        )
    if sum(counts) != L:
        raise ValueError(f"balance {counts} places {sum(counts)} blocks but the model has {L}")
    for i, n in enumerate(counts):
        if n == 0 and 0 < i < k - 1:
            raise ValueError(
                f"balance {counts} leaves stage {i} empty: only the first stage (embed) and the "
                f"last (head) may have no blocks"
            )
    return counts


def min_max_split(costs: list[float], k: int) -> list[int]:
    """Blocks per stage for the contiguous split of units that minimises the largest stage.

    Units are ``[embed, block 0, ..., block L-1, head]``; each stage gets at least one unit.
    """
    n = len(costs)
    if k > n:
        raise ValueError(
            f"cannot split a model of {n - 2} blocks into {k} stages: with embed and head there "
            f"are only {n} units; use at most {n} stages"
        )
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[j][i]: smallest possible max cost splitting units[:i] into j stages.
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for j in range(1, k + 1):
        for i in range(j, n - (k - j) + 1):
            for c in range(j - 1, i):
                value = max(best[j - 1][c], prefix[i] - prefix[c])
                if value < best[j][i]:
                    best[j][i], cut[j][i] = value, c
    bounds, i = [], n
    for j in range(k, 0, -1):
        bounds.append((cut[j][i], i))
        i = cut[j][i]
    bounds.reverse()
    # Units -> blocks: unit 0 is embed and unit n-1 is head, which do not count as blocks.
    return [sum(1 for u in range(a, b) if 0 < u < n - 1) for a, b in bounds]
