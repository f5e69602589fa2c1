"""Time compute orders fast, and keep the best of several: how generators choose. Pure Python.

A generator that has several candidate orders (a handcrafted pattern with different warm-ups, a
list scheduler with different memory limits) times each with :func:`order_time` and keeps the one
:func:`best_order` ranks first: the shortest step, then the fewest micro-batches in flight, then
the earliest candidate. The rule is deterministic and cheap (one pass over the actions per
candidate), so a schedule is a function of ``(name, p, m, v, costs)`` alone.

:func:`order_time` runs compute-only orders (messages implicit, free) with the dependency rule of
:mod:`plait.pipeline.walk`: each rank runs its list in order, an action starts when its rank is
free and what it needs has finished. At zero communication cost this is the planner's simulator's
step time for the same orders with sends and receives added by
:func:`plait.pipeline.generators.add_communication` (a receive never waits longer than the message
it needs); the simulator stays the judge of a finished schedule, this is the generators' quick
look.

Example::

    orders = [[F0.0, BW0.0], [F1.0, BW1.0]]     # Action objects
    order_time(orders, [0, 1], {Kind.F: 1, Kind.BW: 2})   # 6.0
"""

from __future__ import annotations

from collections.abc import Container, Mapping, Sequence

from plait.pipeline.schedule import Action, Kind

__all__ = ["order_time", "peak_in_flight", "best_order"]

_F, _B, _W, _BW = Kind.F, Kind.B, Kind.W, Kind.BW


def peak_in_flight(orders: Sequence[Sequence[Action]]) -> list[int]:
    """Per rank, the most (stage, micro-batch) activations held at once along its order: from F
    until its last backward action (W, or BW), as :func:`plait.pipeline.validate` counts them."""
    peaks = []
    for row in orders:
        held = peak = 0
        for a in row:
            if a.kind is _F:
                held += 1
                peak = max(peak, held)
            elif a.kind is _W or a.kind is _BW:
                held -= 1
        peaks.append(peak)
    return peaks


def order_time(
    orders: Sequence[Sequence[Action]],
    stage_to_rank: Sequence[int],
    durations: Mapping[Kind, float],
    pairs: Container[tuple[int, int]] = (),
    overlap: float = 0.0,
) -> float | None:
    """Step time of compute-only ``orders`` (free messages), None if they cannot run to the end.

    ``durations`` maps F, B, W and BW to one chunk's time. ``pairs`` holds ``(rank, index)`` of
    forwards that run overlapped with the action after them (DualPipe's F&B, a backward of another
    micro-batch): the pair starts when both can, lasts ``overlap`` and both finish with it. The
    runtime runs such pairs one after the other; this models a runtime that overlaps them.
    """
    S = len(stage_to_rank)
    split = {(a.stage, a.microbatch) for row in orders for a in row if a.kind is _B}
    rows = [[(a.kind, a.stage, a.microbatch) for a in row] for row in orders]
    end: dict[tuple, float] = {}
    waiting: dict[tuple, list[int]] = {}
    P = len(rows)
    pc = [0] * P
    clock = [0.0] * P

    def needs(key: tuple) -> tuple:
        kind, s, i = key
        if kind is _F:
            return ((_F, s - 1, i),) if s > 0 else ()
        if kind is _W:
            return ((_B, s, i),)
        if s < S - 1:
            return (_F, s, i), (_B if (s + 1, i) in split else _BW, s + 1, i)
        return ((_F, s, i),)

    work = list(range(P))
    while work:
        r = work.pop()
        row, i, t = rows[r], pc[r], clock[r]
        n = len(row)
        while i < n:
            key = row[i]
            group = [key]
            if pairs and (r, i) in pairs and i + 1 < n:
                group.append(row[i + 1])
            start, blocked = t, None
            for k in group:
                for d in needs(k):
                    e = end.get(d)
                    if e is None:
                        if d not in group:
                            blocked = d
                            break
                    elif e > start:
                        start = e
                if blocked is not None:
                    break
            if blocked is not None:
                waiting.setdefault(blocked, []).append(r)
                break
            if len(group) == 2:
                t = start + overlap
            else:
                t = start + durations[key[0]]
            for k in group:
                end[k] = t
                woken = waiting.pop(k, None)
                if woken:
                    work.extend(woken)
            i += len(group)
        pc[r], clock[r] = i, t
    if any(pc[r] < len(rows[r]) for r in range(P)):
        return None
    return max(clock, default=0.0)


def best_order(
    candidates: Sequence[list[list[Action]]],
    stage_to_rank: Sequence[int],
    durations: Mapping[Kind, float],
    cap: Sequence[int] | None = None,
) -> list[list[Action]]:
    """The candidate that runs (:func:`order_time`) in the least time, then with the lowest peak
    of micro-batches in flight (the largest rank's, then the sum), then the earliest given.

    Candidates whose peak exceeds ``cap[r]`` on some rank ``r`` are passed over while any other
    fits. Raises ValueError when no candidate can run.
    """
    best, best_key = None, None
    for index, orders in enumerate(candidates):
        t = order_time(orders, stage_to_rank, durations)
        if t is None:
            continue
        peaks = peak_in_flight(orders)
        over = cap is not None and any(pk > c for pk, c in zip(peaks, cap))
        key = (over, round(t, 9), max(peaks, default=0), sum(peaks), index)
        if best_key is None or key < best_key:
            best, best_key = orders, key
    if best is None:
        raise ValueError("no candidate order can run to the end")
    return best
