"""Zero-bubble and V-shaped schedules with a split backward: compute orders. Pure Python, no torch.

Each function returns, per rank, the order of compute actions (F, B, W, BW); the generators
(:func:`plait.pipeline.generators.build_schedule`) add the messages. Times below are in units of
one chunk's forward with F = B = W (B the input gradient, W the weight gradient, a full backward
BW = B + W), messages free; ``p`` is the number of pipeline ranks, ``m`` of micro-batches, and a
rank's work is ``3m`` per chunk it holds. Memory is counted as the validator counts it: a chunk's
activations are held from F until its last backward action (W, or BW).

ZB-H2 (:func:`zb_h2`; Qi et al., "Zero Bubble Pipeline Parallelism", 2024, section 2.2): one
stage per rank; every rank may hold ``2p - 1`` micro-batches, enough for rank 0 to fill with
forwards the ``2p - 1`` units before its first B can arrive, and for the last ranks to defer
their W's to the end. Each rank's busy span is then free of bubbles (the paper's parallelogram):
the bubble ``(p - 1)(T_F + T_B - 2 T_W)`` is 0 at equal costs once ``m >= 2p - 1``, and the step
takes ``3m + (p - 1)``, the lower bound (rank ``p - 1`` cannot start before ``p - 1``).

ZB-V's pattern (:func:`zb_v_pattern`; same paper, section 6): two chunks per rank on a V, rank
``r`` holding stages ``r`` and ``2p - 1 - r``: ``2(p - r) - 1`` forwards of the first chunk, then
alternating chunks with each B followed by its W, the W's of the cool-down last; at most ``2p``
chunks (``p`` micro-batches, 1F1B's peak) in flight. Step ``3m + (p - 1) / 2`` in units of a
whole rank's forward (the lower bound) for ``m >= 2p``.

V-Half and V-Min (:func:`v_shape`; Qi et al., "Pipeline Parallelism with Controllable Memory",
2024): a micro-batch's F's and B's on every rank follow one building block, repeated every 6
units (the rank's work per micro-batch); W's fill the block's two free slots, oldest first; each
rank runs the resulting order as soon as its inputs allow. The memory a rank holds is the sum of
its two chunks' lifespans over the period 6. V-Min starts each F and B as early as the V allows
(first chunk on rank ``r``: F at ``r``, B at ``4p - 1 - r`` (+2 when 3 | p, to avoid clashes);
second chunk: F at ``2p - 1 - r``, B at ``2p + r``): lifespans ``4p - 2r`` and ``2r + 1`` sum to
``4p + 1`` on every rank, so about ``(4p + 1) / 6`` chunks, a third of 1F1B's ``p`` micro-batches
(2p chunks), plus the W's wait: at most ``ceil((2p + 1) / 3) + 2`` chunks. V-Half spaces them
by 2 (first chunk F at ``2r``, B at ``6p - 2 - r`` (+3 for even p); second F at ``3p - 2 - r``,
B at ``3p - 1 + 2r``): lifespans sum to about ``6p``, half of 1F1B's memory: at most ``p + 2``
chunks. Both have a bubble below 1F1B's ``3(p - 1)`` (in units of a whole rank's forward);
docs/schedules.md lists the measured ones.

DualPipeV (:func:`dualpipe_v`; DeepSeek-V3 technical report, 2024, and deepseek-ai/DualPipe;
PyTorch's ``ScheduleDualPipeV``): DualPipe cut in half onto a V of ``p`` ranks, ``2p`` stages
(DeepSeek's "PP" is the stage count ``2p``: their ``PP / 2 - 1`` is ``p - 1``). In the steady state
a rank pairs the forward of one chunk with the full backward of a different micro-batch on its
other chunk (F&B, which a runtime with two streams would overlap; here they are adjacent actions
F then BW); warm-up and cool-down split some backwards into B and W to fill gaps. Bubble, with
F, B (full backward), W of one chunk and F&B a pair's time: ``(p - 1)(F&B + B - 3W)`` (each
rank's idle time, pairs timed as one unit of F&B); peak ``2p + 1`` chunks (DeepSeek's
``PP + 1``). Needs ``m >= 2p``; with fewer micro-batches it is the order for ``2p`` with the
missing micro-batches left out (which keeps it valid: dependencies never cross micro-batches).
"""

from __future__ import annotations

from collections import deque

from plait.pipeline.listsched import Durations, greedy
from plait.pipeline.schedule import Action, Kind

__all__ = ["zb_h2", "zb_v_pattern", "v_shape", "dualpipe_v"]

_F, _B, _W, _BW = Kind.F, Kind.B, Kind.W, Kind.BW


def zb_h2(p: int, m: int, durations: Durations) -> list[list[Action]]:
    """ZB-H2's order (module docstring), list-scheduled for ``durations``: B first, then F while
    fewer than ``min(2p - 1, m)`` micro-batches are held, else the oldest W."""

    def key(a: Action) -> tuple:
        return (a.microbatch,)

    cap = min(2 * p - 1, m)
    return greedy(
        p, m, list(range(p)), durations, split=True, f_key=key, b_key=key, limits=[cap] * p
    )


def zb_v_pattern(p: int, m: int) -> list[list[Action]]:
    """The handcrafted ZB-V order (module docstring), built for ``max(m, 2p - 1)`` micro-batches
    with those past ``m`` left out."""
    n = max(m, 2 * p - 1)
    return [[a for a in _zb_v_rank(p, n, r) if a.microbatch < m] for r in range(p)]


def _zb_v_rank(p: int, n: int, r: int) -> list[Action]:
    chunk = (r, 2 * p - 1 - r)
    nf, nb = [0, 0], [0, 0]
    row: list[Action] = []

    def put(kind: Kind, c: int, count: list[int]) -> None:
        row.append(Action(kind, chunk[c], count[c]))
        count[c] += 1

    def fbw(c: int) -> None:  # F, then B and W of the same chunk
        put(_F, c, nf)
        row.append(Action(_B, chunk[c], nb[c]))
        put(_W, c, nb)

    for _ in range(2 * (p - r) - 1):
        put(_F, 0, nf)
    for _ in range(r):
        put(_F, 1, nf)
        put(_F, 0, nf)
    for _ in range(p - r):
        fbw(1)
    while nf[1] < nf[0] or nf[0] < n:  # steady: chunk 0's F, B, W, then chunk 1's
        if nf[0] < n:
            put(_F, 0, nf)
        row.append(Action(_B, chunk[0], nb[0]))
        put(_W, 0, nb)
        fbw(1)
    nw = list(nb)
    for _ in range(r):
        put(_B, 0, nb)
        put(_B, 1, nb)
    for _ in range(p - r):
        put(_B, 0, nb)
        put(_W, 0, nw)
    for c in (1, 0):
        while nw[c] < nb[c]:
            put(_W, c, nw)
    return row


def _block(kind: str, p: int) -> list[tuple[int, int, int, int]]:
    """Per rank, the building block's start times of (F chunk 0, F chunk 1, B chunk 1, B chunk 0)
    (module docstring); residues mod 6 are distinct on each rank."""
    out = []
    for r in range(p):
        if kind == "min":
            g = 2 if p % 3 == 0 else 0
            out.append((r, 2 * p - 1 - r, 2 * p + g + r, 4 * p + g - 1 - r))
        else:
            g = 3 if p % 2 == 0 else 0
            out.append((2 * r, 3 * p - r - 2, 3 * p + g + 2 * r - 1, 6 * p + g - r - 2))
    return out


def v_shape(kind: str, p: int, m: int) -> list[list[Action]]:
    """V-Half (``kind="half"``) or V-Min (``"min"``): the building block repeated every 6 units,
    W's in the free slots oldest first (module docstring)."""
    if kind not in ("half", "min"):
        raise ValueError(f"kind must be 'half' or 'min', got {kind!r}")
    S = 2 * p
    orders = []
    for r, (f0, f1, b1, b0) in enumerate(_block(kind, p)):
        c0, c1 = r, S - 1 - r
        timed: dict[int, Action] = {}
        for k in range(m):
            t = 6 * k
            timed[f0 + t] = Action(_F, c0, k)
            timed[f1 + t] = Action(_F, c1, k)
            timed[b1 + t] = Action(_B, c1, k)
            timed[b0 + t] = Action(_B, c0, k)
        assert len(timed) == 4 * m, "building block slots clash"
        row: list[Action] = []
        pending: deque[Action] = deque()
        for t in range(max(timed) + 1):
            a = timed.get(t)
            if a is not None:
                row.append(a)
                if a.kind is _B:
                    pending.append(Action(_W, a.stage, a.microbatch))
            elif pending:
                row.append(pending.popleft())
        row.extend(pending)
        orders.append(row)
    return orders


def dualpipe_v(p: int, m: int) -> tuple[list[list[Action]], set[tuple[int, int]]]:
    """DualPipeV's order (module docstring) and its overlapped pairs: ``(rank, index)`` of each
    forward that is paired with the full backward right after it."""
    n = max(m, 2 * p)
    orders: list[list[Action]] = []
    pairs: set[tuple[int, int]] = set()
    for r in range(p):
        kept = [(a, paired) for a, paired in _dualpipe_v_rank(p, n, r) if a.microbatch < m]
        for i, (a, paired) in enumerate(kept):
            nxt = kept[i + 1][0] if i + 1 < len(kept) else None
            if paired and nxt is not None and nxt.kind is _BW and nxt.microbatch != a.microbatch:
                pairs.add((r, i))
        orders.append([a for a, _ in kept])
    return orders, pairs


def _dualpipe_v_rank(p: int, n: int, r: int) -> list[tuple[Action, bool]]:
    """Rank ``r``'s actions for ``n >= 2p`` micro-batches, each with whether it is a forward
    paired with the backward after it."""
    chunk = (r, 2 * p - 1 - r)
    nf, nb, nw = [0, 0], [0, 0], [0, 0]
    row: list[tuple[Action, bool]] = []
    weights: deque[int] = deque()  # chunks whose B ran and W did not, oldest first

    def f(c: int, paired: bool = False) -> None:
        row.append((Action(_F, chunk[c], nf[c]), paired))
        nf[c] += 1

    def back(c: int, split: bool) -> None:
        row.append((Action(_B if split else _BW, chunk[c], nb[c]), False))
        nb[c] += 1
        if split:
            weights.append(c)
        else:
            nw[c] += 1

    def w() -> None:
        if weights:
            c = weights.popleft()
            row.append((Action(_W, chunk[c], nw[c]), False))
            nw[c] += 1

    def pair(fc: int, bc: int) -> None:
        f(fc, paired=True)
        back(bc, split=False)

    for _ in range(2 * (p - r - 1)):  # 1: first chunk's forwards
        f(0)
    for _ in range(r + 1):  # 2: both chunks' forwards
        f(0)
        f(1)
    for _ in range(p - r - 1):  # 3: zero-bubble steps on the second chunk
        back(1, split=True)
        w()
        f(1)
    for i in range(n - 2 * p + r + 1):  # 4: the steady state, two F&B pairs per step
        if i == 0 and r == p - 1:  # the turn of the V: not overlapped, a shorter bubble
            f(0)
            back(1, split=False)
        else:
            pair(0, 1)
        pair(1, 0)
    for _ in range(p - r - 1):  # 5: second chunk's backward, then a pair
        back(1, split=False)
        pair(1, 0)
    split = False
    for i in range(r + 1):  # 6: both backwards, zero bubble from the middle on
        if i == (r + 1) // 2 and r % 2 == 1:
            split = True
        back(1, split)
        if i == (r + 1) // 2 and r % 2 == 0:
            split = True
        back(0, split)
    for _ in range(p - r - 1):  # 7: weights and the first chunk's last backwards
        w()
        back(0, split)
    while weights:  # 8: the remaining weights
        w()
    assert nf == nb == nw == [n, n], (r, nf, nb, nw)
    return row
