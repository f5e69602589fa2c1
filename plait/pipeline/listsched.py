"""The list scheduler the greedy generators share. Pure Python, no torch.

:func:`greedy` simulates the ranks in time with the durations it is given: every idle rank starts
the most urgent ready action its memory limit allows. Its output is each rank's compute order in
start order, not the timing; :func:`plait.pipeline.validate` proves each schedule correct.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

from plait.pipeline.schedule import Action, Kind
from plait.pipeline.walk import inputs

__all__ = ["greedy"]

Durations = dict  # Kind -> relative duration of one stage's action on one micro-batch


def greedy(
    p: int,
    m: int,
    stage_to_rank: list[int],
    durations: Durations,
    *,
    split: bool,
    f_key: Callable[[Action], tuple],
    b_key: Callable[[Action], tuple],
    limits: list[int],
    fb_limits: list[int] | None = None,
    limited: Callable[[Action], bool] = lambda a: True,
    forward_first: bool = False,
) -> list[list[Action]]:
    """A list scheduler timed by ``durations``; returns each rank's compute actions in start
    order.

    Priority on an idle rank: a ready backward (B or BW) by ``b_key`` (with ``forward_first``,
    after an allowed forward); else a ready forward by ``f_key`` if the rank's in-flight count (forwards whose last backward action has not run) is
    below ``limits[r]`` (forwards for which ``limited`` is False are exempt) and, with
    ``fb_limits``, forwards minus B's are below ``fb_limits[r]``; else the oldest ready W. If every
    rank is idle and nothing may start, the limits are waived for the most urgent forward: the
    scheduler never stalls, and the validator reports the peak that resulted.
    """
    S = len(stage_to_rank)
    bwd = Kind.B if split else Kind.BW
    done_at: dict[Action, int] = {}
    todo = [
        {
            Action(k, s, i)
            for s in range(S)
            if stage_to_rank[s] == r
            for i in range(m)
            for k in ((Kind.F, Kind.B, Kind.W) if split else (Kind.F, Kind.BW))
        }
        for r in range(p)
    ]
    busy_until = [0] * p
    in_flight = [0] * p
    ahead = [0] * p  # forwards minus input-backwards
    orders: list[list[Action]] = [[] for _ in range(p)]

    # The dependency rule of plait.pipeline.walk (compute-only form), and its inverse.
    needs = {a: inputs(a, S, bwd) for acts in todo for a in acts}
    needed_by: dict[Action, list[Action]] = defaultdict(list)
    for a, ds in needs.items():
        for d in ds:
            needed_by[d].append(a)

    def deps(a: Action) -> list[Action]:
        return needs[a]

    def dependents(a: Action) -> list[Action]:
        return needed_by[a]

    def ready(a: Action, t: int) -> bool:
        return all(d in done_at and done_at[d] <= t for d in deps(a))

    # Actions not started whose dependencies have all started: the only ones worth checking.
    frontier: list[set[Action]] = [set() for _ in range(p)]
    for i in range(m):
        frontier[stage_to_rank[0]].add(Action(Kind.F, 0, i))

    def start(r: int, a: Action, t: int) -> None:
        todo[r].discard(a)
        frontier[r].discard(a)
        for d in dependents(a):
            if all(x in done_at or x == a for x in deps(d)):
                frontier[stage_to_rank[d.stage]].add(d)
        orders[r].append(a)
        busy_until[r] = t + durations[a.kind]
        done_at[a] = busy_until[r]
        if a.kind is Kind.F:
            in_flight[r] += 1
            ahead[r] += 1
        elif a.kind in (Kind.B, Kind.BW):
            ahead[r] -= 1
        if a.kind in (Kind.W, Kind.BW):
            in_flight[r] -= 1

    def may_forward(r: int, a: Action) -> bool:
        if not limited(a):
            return True
        if in_flight[r] >= limits[r]:
            return False
        return fb_limits is None or ahead[r] < fb_limits[r]

    t = 0
    while any(todo):
        started = False
        for r in range(p):
            if busy_until[r] > t or not todo[r]:
                continue
            cands = [a for a in frontier[r] if ready(a, t)]
            backs = [a for a in cands if a.kind is bwd]
            fwds = [a for a in cands if a.kind is Kind.F and may_forward(r, a)]
            ws = [a for a in cands if a.kind is Kind.W]
            if fwds and forward_first:
                pick = min(fwds, key=f_key)
            elif backs:
                pick = min(backs, key=b_key)
            elif fwds:
                pick = min(fwds, key=f_key)
            elif ws:
                pick = min(ws, key=lambda a: (a.microbatch, a.stage))
            else:
                continue
            start(r, pick, t)
            started = True
        if not started and all(b <= t for b in busy_until):
            # Nothing running, nothing allowed: waive the limit for the most urgent forward.
            waiting = [
                (f_key(a), r, a)
                for r in range(p)
                for a in frontier[r]
                if a.kind is Kind.F and ready(a, t)
            ]
            if not waiting:  # cannot happen for well-formed dependencies; fail loudly
                raise RuntimeError(f"schedule generator stalled at t={t}: {todo}")
            _, r, a = min(waiting)
            start(r, a, t)
        future = [b for b in busy_until if b > t]
        t = min(future) if future else t + 1
    return orders
