"""Schedule generators: ``build_schedule(name, num_ranks, num_microbatches, virtual)``.

Each generator decides only the *order of compute* on every rank (F, B, W, BW); the sends and
receives are then inserted by one rule shared by all of them (:func:`add_communication`): a send
right after the action that produced the tensor, a receive right before the first action that
needs it, with receives on each pair of ranks reordered to match the sender's order (gloo and NCCL
match point-to-point messages between two ranks in posting order).

Generators by CLI name:

    gpipe             all forwards, then all backwards; m micro-batches in flight
    1f1b              warm up with p - r - 1 forwards, then alternate one forward, one backward;
                      at most p - r in flight on rank r
    interleaved-1f1b  v chunks per rank (stage s on rank s % p), Megatron's order; the bubble
                      shrinks by v at the price of v times more messages
    zb-h1             zero bubble, "handcrafted 1": backward split into B (input gradient, on the
                      critical path) and W (weight gradient, off it); W fills the bubbles while
                      activations in flight stay within 1F1B's peak of p
    zb-v              zero bubble on a V: rank r holds stages r and 2p-1-r (v = 2), so the first
                      and last stage share rank 0 and the backward turns around without waiting

The greedy generators (interleaved when m is not a multiple of p, zb-h1, zb-v) run a list
scheduler: every rank, when idle, starts the most urgent ready action its memory limit allows.
It times actions by ``costs`` (the relative durations of F, B and W; equal by default, BW = B + W),
so with the real ratios it fills idle time with work that actually fits there (at p = 4, m = 16
and F : B : W = 1 : 1.18 : 0.7, ZB-V built for those costs simulates 13% faster than built for
equal ones). Its output is the order, not the timing; :func:`plait.pipeline.validate` proves
each one correct.

Example::

    s = build_schedule("1f1b", num_ranks=2, num_microbatches=4)
    print(s)      # rank 0: F0.0 SEND_ACT0.0 F0.1 SEND_ACT0.1 RECV_GRAD0.0 BW0.0 ...
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

from plait.config import (
    SCHEDULE_SPECS,
    SCHEDULES,
    check_schedule_costs,
    resolve_schedule,
    resolve_virtual,
)
from plait.pipeline.schedule import Action, Kind, Schedule
from plait.pipeline.walk import ScheduleError, Walk, inputs, matching_recv, message_in, message_out

__all__ = ["SCHEDULES", "build_schedule", "add_communication", "stage_to_rank_for"]

Durations = dict  # Kind -> relative duration of one stage's action on one micro-batch


def _durations(costs) -> Durations:
    """The list scheduler's durations from ``costs = (F, B, W)`` (None: all equal)."""
    vals = check_schedule_costs(costs)
    if vals is None:
        return {Kind.F: 1.0, Kind.B: 1.0, Kind.W: 1.0, Kind.BW: 2.0}
    f, b, w = vals
    return {Kind.F: f, Kind.B: b, Kind.W: w, Kind.BW: b + w}


def stage_to_rank_for(name: str, num_ranks: int, virtual: int = 1) -> list[int]:
    """Where each of the ``num_ranks * virtual`` stages lives for schedule ``name``.

    Looping (``interleaved-1f1b``): stage ``s`` on rank ``s % p``. V-shape (``zb-v``): stages
    ``0..p-1`` on ranks ``0..p-1``, then back ``p-1..0``. ``"none"`` (no pipeline) is one stage.
    """
    p = num_ranks
    if name == "none":
        return [0] * virtual
    if SCHEDULE_SPECS[resolve_schedule(name)].placement == "v":
        return list(range(p)) + list(range(p - 1, -1, -1))
    return [s % p for s in range(p * virtual)]


def build_schedule(
    name: str,
    num_ranks: int,
    num_microbatches: int,
    virtual: int | None = None,
    costs: tuple[float, float, float] | None = None,
) -> Schedule:
    """Generate schedule ``name`` for ``num_ranks`` pipeline ranks and ``num_microbatches``.

    Args:
        name: one of :data:`SCHEDULES`.
        num_ranks: pipeline ranks ``p`` (>= 1).
        num_microbatches: ``m`` (>= 1); ``m < p`` is allowed (some ranks idle longer).
        virtual: chunks per rank ``v``: 1 for gpipe, 1f1b, zb-h1; 2 for zb-v; any v >= 1 for
            interleaved-1f1b (default 2). None picks the default.
        costs: relative durations ``(F, B, W)`` of one micro-batch on one stage (a chunk), which
            the list-scheduling generators order by; None means equal. The fixed-pattern
            schedules ignore it. ``plait plan`` reports the costs it assumed for its choice.

    Returns:
        A :class:`Schedule` with compute and communication actions for every rank.

    Example::

        s = build_schedule("interleaved-1f1b", 2, 4, virtual=2)
        s.stage_to_rank  # [0, 1, 0, 1]
    """
    name = resolve_schedule(name)
    if name == "none":
        raise ValueError(f"build_schedule needs a pipeline schedule, one of {list(SCHEDULES)}")
    for label, value in (("num_ranks", num_ranks), ("num_microbatches", num_microbatches)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    if virtual is not None and (
        not isinstance(virtual, int) or isinstance(virtual, bool) or virtual < 1
    ):
        raise ValueError(f"virtual must be a positive integer, got {virtual!r}")
    virtual = resolve_virtual(name, virtual)
    durations = _durations(costs)
    p, m, v = num_ranks, num_microbatches, virtual
    stage_to_rank = stage_to_rank_for(name, p, v)
    if name == "gpipe":
        orders = _gpipe(p, m)
    elif name == "1f1b":
        orders = _one_f_one_b(p, m)
    elif name == "interleaved-1f1b":
        orders = _interleaved(p, m, v, stage_to_rank, durations)
    elif name == "zb-h1":
        orders = _zb_h1(p, m, stage_to_rank, durations)
    else:
        orders = _zb_v(p, m, stage_to_rank, durations)
    return Schedule(
        name, p, len(stage_to_rank), m, stage_to_rank, add_communication(orders, stage_to_rank)
    )


# ---------------------------------------------------------------------------------------------
# compute orders


def _gpipe(p: int, m: int) -> list[list[Action]]:
    return [
        [Action(Kind.F, r, i) for i in range(m)] + [Action(Kind.BW, r, i) for i in range(m)]
        for r in range(p)
    ]


def _one_f_one_b(p: int, m: int) -> list[list[Action]]:
    orders = []
    for r in range(p):
        warmup = min(p - r - 1, m)
        acts = [Action(Kind.F, r, i) for i in range(warmup)]
        for i in range(m - warmup):  # steady state: one forward, one backward
            acts += [Action(Kind.F, r, warmup + i), Action(Kind.BW, r, i)]
        acts += [Action(Kind.BW, r, i) for i in range(m - warmup, m)]  # cool-down
        orders.append(acts)
    return orders


def _interleaved(
    p: int, m: int, v: int, stage_to_rank: list[int], durations: Durations
) -> list[list[Action]]:
    # Megatron's order: micro-batches in groups of p; within a group every chunk of the rank in
    # turn (forward: chunk 0 first; backward: last chunk first); warm up with
    # 2 (p - r - 1) + (v - 1) p forwards, then alternate one forward and one backward.
    if v == 1:
        return _one_f_one_b(p, m)  # Megatron's formula is for v > 1; one chunk is plain 1F1B

    def f_key(a: Action) -> tuple:
        return (a.microbatch // p, a.stage // p, a.microbatch)

    def b_key(a: Action) -> tuple:
        return (a.microbatch // p, -(a.stage // p), a.microbatch)

    orders = []
    for r in range(p):
        stages = [s for s in range(len(stage_to_rank)) if stage_to_rank[s] == r]
        fs = sorted((Action(Kind.F, s, i) for s in stages for i in range(m)), key=f_key)
        bs = sorted((Action(Kind.BW, s, i) for s in stages for i in range(m)), key=b_key)
        warmup = min(2 * (p - r - 1) + (v - 1) * p, len(fs))
        acts = fs[:warmup]
        for k in range(len(fs) - warmup):
            acts += [fs[warmup + k], bs[k]]
        acts += bs[len(fs) - warmup :]
        orders.append(acts)
    if _feasible(orders, stage_to_rank, m):
        return orders
    # When m is not a multiple of p the group order can ask a rank for a backward whose
    # forward waits behind it elsewhere; the list scheduler with Megatron's in-flight limit
    # gives a valid order with the same priorities.
    limits = [min(2 * (p - r - 1) + (v - 1) * p + 1, m * v) for r in range(p)]
    return _greedy(
        p, m, stage_to_rank, durations, split=False, f_key=f_key, b_key=b_key, limits=limits
    )


def _feasible(orders: list[list[Action]], stage_to_rank: list[int], m: int) -> bool:
    """Whether every rank can run its compute order to the end (dependencies only)."""
    p = len(orders)
    try:
        for _ in Walk(Schedule("custom", p, len(stage_to_rank), m, stage_to_rank, orders)):
            pass
    except ScheduleError:
        return False
    return True


def _zb_h1(p: int, m: int, stage_to_rank: list[int], durations: Durations) -> list[list[Action]]:
    # 1F1B's forward/backward rhythm (at most p - r forwards ahead of the B's) with W deferred:
    # an allowed F first (the next rank waits for it), then B (the previous rank waits for it),
    # and W only when neither is ready, filling what would be bubble. Memory is counted until W
    # (the weight gradient needs the saved inputs): at most p per rank, 1F1B's peak. In unit time
    # this gives 3m + (p - 1) against 1F1B's 3m + 3(p - 1).
    def key(a: Action) -> tuple:
        return (a.microbatch,)

    return _greedy(
        p,
        m,
        stage_to_rank,
        durations,
        split=True,
        f_key=key,
        b_key=key,
        limits=[min(p, m)] * p,
        fb_limits=[p - r for r in range(p)],
        forward_first=True,
    )


def _zb_v(p: int, m: int, stage_to_rank: list[int], durations: Durations) -> list[list[Action]]:
    # Two chunks per rank on a V. Older micro-batches and later stages first (a micro-batch that
    # has started should reach the loss and turn around); at most 2p chunks in flight per rank,
    # p micro-batches' worth of activations (a chunk is half a rank's layers), 1F1B's peak.
    def f_key(a: Action) -> tuple:
        return (a.microbatch, -a.stage)

    def b_key(a: Action) -> tuple:
        return (a.microbatch, -a.stage)

    return _greedy(
        p,
        m,
        stage_to_rank,
        durations,
        split=True,
        f_key=f_key,
        b_key=b_key,
        limits=[min(2 * p, m * 2)] * p,
    )


def _greedy(
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


# ---------------------------------------------------------------------------------------------
# communication


def add_communication(orders: list[list[Action]], stage_to_rank: list[int]) -> list[list[Action]]:
    """Insert sends and receives around per-rank compute orders.

    A tensor crossing ranks is sent right after the action that made it and received right
    before the first action that needs it. Messages between two ranks are matched in posting
    order, so on each receiver the receives from one sender follow that sender's send order: when
    a message is needed, every earlier message from the same sender is received first (it was
    sent first, so this never waits longer than the needed message does).

    Example::

        add_communication([[F0.0], [F1.0]], [0, 1])
        # [[F0.0, SEND_ACT0.0], [RECV_ACT1.0, F1.0]]
    """
    # Each sender's order of messages to each receiver, as the receive actions that match them
    # (which tensors cross ranks, by which messages: plait.pipeline.walk's rule).
    sent: dict[tuple[int, int], list[Action]] = defaultdict(list)
    for r, acts in enumerate(orders):
        for a in acts:
            out = message_out(a, stage_to_rank)
            if out is not None:
                dst, send = out
                sent[(r, dst)].append(matching_recv(send))
    result = []
    for r, acts in enumerate(orders):
        cursor: dict[int, int] = defaultdict(int)  # per source: messages received so far
        received: set[Action] = set()
        row: list[Action] = []
        for a in acts:
            need = message_in(a, stage_to_rank)
            if need is not None and need[1] not in received:
                src, recv = need
                queue = sent[(src, r)]
                while True:
                    if cursor[src] >= len(queue):
                        raise ValueError(f"rank {r} needs {recv} but rank {src} never sends it")
                    nxt = queue[cursor[src]]
                    cursor[src] += 1
                    row.append(nxt)
                    received.add(nxt)
                    if nxt == recv:
                        break
            row.append(a)
            out = message_out(a, stage_to_rank)
            if out is not None:
                row.append(out[1])
        result.append(row)
    return result
