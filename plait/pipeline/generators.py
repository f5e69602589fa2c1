"""Schedule generators: ``build_schedule(name, num_ranks, num_microbatches, virtual)``.

Each generator decides only the *order of compute* on every rank (F, B, W, BW); the sends and
receives are then inserted by one rule shared by all of them (:func:`add_communication`): a send
right after the action that produced the tensor, a receive right before the first action that
needs it, with receives on each pair of ranks reordered to match the sender's order (gloo and NCCL
match point-to-point messages between two ranks in posting order).

Generators by CLI name (docs/schedules.md has each one's bubble and memory):

    gpipe             all forwards, then all backwards; m micro-batches in flight
    1f1b              warm up with p - r - 1 forwards, then alternate one forward, one backward;
                      at most p - r in flight on rank r
    interleaved-1f1b  v chunks per rank (stage s on rank s % p), Megatron's order over rounds of
                      at least p micro-batches; the bubble shrinks by v at the price of v times
                      more messages
    zb-h1             zero bubble, "handcrafted 1": backward split into B (input gradient, on the
                      critical path) and W (weight gradient, off it); W fills the bubbles while
                      activations in flight stay within 1F1B's peak of p
    zb-h2             zero bubble, "handcrafted 2": 2p - 1 micro-batches in flight on every rank
                      buy a parallelogram (:mod:`plait.pipeline.zero_bubble`)
    zb-v              zero bubble on a V: rank r holds stages r and 2p-1-r (v = 2), so the first
                      and last stage share rank 0 and the backward turns around without waiting
    v-half, v-min     the V at about a half / a third of 1F1B's activation memory
    dualpipev         DeepSeek's DualPipe on a V: forward and backward of two micro-batches
                      paired in the steady state

Several generators build more than one candidate order and keep the best
(:func:`plait.pipeline.timing.best_order`: the shortest step at ``costs``, then the fewest
micro-batches in flight): interleaved-1f1b over how the micro-batches are cut into rounds, zb-h1
and zb-v over list-scheduled orders built for ``costs`` and for equal costs (and, for zb-v, the
handcrafted ZB-V pattern). So a schedule built for given costs is never slower at those costs
than the one built for equal costs. The list scheduler (:func:`plait.pipeline.listsched.greedy`)
times actions by ``costs`` (the relative durations of F, B and W; equal by default, BW = B + W),
so with the real ratios it fills idle time with work that actually fits there. Its output is the
order, not the timing; :func:`plait.pipeline.validate` proves each one correct.

Example::

    s = build_schedule("1f1b", num_ranks=2, num_microbatches=4)
    print(s)      # rank 0: F0.0 SEND_ACT0.0 F0.1 SEND_ACT0.1 RECV_GRAD0.0 BW0.0 ...
"""

from __future__ import annotations

from collections import defaultdict

from plait.config import (
    SCHEDULE_SPECS,
    SCHEDULES,
    check_schedule_costs,
    resolve_schedule,
    resolve_virtual,
)
from plait.pipeline import zero_bubble
from plait.pipeline.listsched import greedy
from plait.pipeline.schedule import Action, Kind, Schedule
from plait.pipeline.timing import best_order
from plait.pipeline.walk import matching_recv, message_in, message_out

__all__ = ["SCHEDULES", "build_schedule", "add_communication", "stage_to_rank_for"]

Durations = dict  # Kind -> relative duration of one stage's action on one micro-batch


_EQUAL: Durations = {Kind.F: 1.0, Kind.B: 1.0, Kind.W: 1.0, Kind.BW: 2.0}


def _durations(costs) -> Durations:
    """The list scheduler's durations from ``costs = (F, B, W)`` (None: all equal)."""
    vals = check_schedule_costs(costs)
    if vals is None:
        return dict(_EQUAL)
    f, b, w = vals
    return {Kind.F: f, Kind.B: b, Kind.W: w, Kind.BW: b + w}


def stage_to_rank_for(name: str, num_ranks: int, virtual: int = 1) -> list[int]:
    """Where each of the ``num_ranks * virtual`` stages lives for schedule ``name``.

    Looping (``interleaved-1f1b``): stage ``s`` on rank ``s % p``. V-shape (``zb-v``, ``v-half``,
    ``v-min``, ``dualpipev``: ``placement="v"`` in their spec): stages ``0..p-1`` on ranks
    ``0..p-1``, then back ``p-1..0``. ``"none"`` (no pipeline) is one stage.
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
        virtual: chunks per rank ``v``: 1 for gpipe, 1f1b, zb-h1, zb-h2; 2 for the V schedules
            (zb-v, v-half, v-min, dualpipev); any v >= 1 for interleaved-1f1b (default 2). None
            picks the default.
        costs: relative durations ``(F, B, W)`` of one micro-batch on one stage (a chunk), which
            the generators that choose among orders (interleaved-1f1b, zb-h1, zb-h2, zb-v) order
            and rank by; None means equal. The fixed-pattern schedules ignore it. ``plait plan``
            reports the costs it assumed for its choice.

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
    elif name == "zb-v":
        orders = _zb_v(p, m, stage_to_rank, durations)
    elif name == "zb-h2":
        orders = best_order(
            [zero_bubble.zb_h2(p, m, d) for d in _built_for(durations)], stage_to_rank, durations
        )
    elif name in ("v-half", "v-min"):
        orders = zero_bubble.v_shape(name[2:], p, m)
    else:
        orders = zero_bubble.dualpipe_v(p, m)[0]
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
    # Megatron's order, over rounds of micro-batches: within a round every chunk of the rank in
    # turn (forward: chunk 0 first; backward: last chunk first); warm up with
    # 2 (p - r - 1) + (v - 1) g forwards (g: the first round's size), then alternate one forward
    # and one backward. Megatron's rounds hold p micro-batches each; when p does not divide m,
    # rounds of g >= p, as even as they come (the larger first), keep the steady state fed where
    # a short last round would starve it (PyTorch takes m // p rounds and needs them to divide m).
    # Candidates: m // p rounds and one fewer (larger rounds, more warm-up memory), kept by time.
    if v == 1:
        return _one_f_one_b(p, m)  # Megatron's formula is for v > 1; one chunk is plain 1F1B
    most = max(1, m // p)
    candidates = [_megatron(p, m, v, _rounds(m, k)) for k in sorted({max(1, most - 1), most})]
    try:
        return best_order(candidates, stage_to_rank, durations)
    except ValueError:  # no round cut runs: the list scheduler with Megatron's in-flight limit
        pass

    def key(a: Action) -> tuple:
        return (a.microbatch // p, a.stage // p, a.microbatch)

    limits = [min(2 * (p - r - 1) + (v - 1) * p + 1, m * v) for r in range(p)]
    return greedy(p, m, stage_to_rank, durations, split=False, f_key=key, b_key=key, limits=limits)


def _rounds(m: int, k: int) -> list[list[int]]:
    """Micro-batches ``0..m-1`` cut into ``k`` consecutive rounds as even as they come, the
    larger first."""
    size, extra = divmod(m, k)
    out, start = [], 0
    for j in range(k):
        n = size + (j < extra)
        out.append(list(range(start, start + n)))
        start += n
    return out


def _megatron(p: int, m: int, v: int, rounds: list[list[int]]) -> list[list[Action]]:
    """Megatron's interleaved order over ``rounds`` (stage ``c * p + r`` is rank r's chunk c)."""
    warm_base = (v - 1) * len(rounds[0])
    orders = []
    for r in range(p):
        fs = [Action(Kind.F, c * p + r, i) for rnd in rounds for c in range(v) for i in rnd]
        bs = [
            Action(Kind.BW, c * p + r, i) for rnd in rounds for c in reversed(range(v)) for i in rnd
        ]
        warmup = min(warm_base + 2 * (p - r - 1), len(fs))
        acts = fs[:warmup]
        for k in range(len(fs) - warmup):
            acts += [fs[warmup + k], bs[k]]
        acts += bs[len(fs) - warmup :]
        orders.append(acts)
    return orders


def _built_for(durations: Durations) -> list[Durations]:
    """The durations to build candidates for: the given ones and equal ones, so that a schedule
    built for costs is never slower at them than the equal-cost build (which is a candidate)."""
    return [durations] if durations == _EQUAL else [durations, _EQUAL]


def _zb_h1(p: int, m: int, stage_to_rank: list[int], durations: Durations) -> list[list[Action]]:
    # 1F1B's forward/backward rhythm (at most p - r forwards ahead of the B's) with W deferred:
    # an allowed F first (the next rank waits for it), then B (the previous rank waits for it),
    # and W only when neither is ready, filling what would be bubble. Memory is counted until W
    # (the weight gradient needs the saved inputs): at most p per rank, 1F1B's peak. In unit time
    # this gives 3m + (p - 1) against 1F1B's 3m + 3(p - 1).
    def key(a: Action) -> tuple:
        return (a.microbatch,)

    def build(d: Durations) -> list[list[Action]]:
        return greedy(
            p,
            m,
            stage_to_rank,
            d,
            split=True,
            f_key=key,
            b_key=key,
            limits=[min(p, m)] * p,
            fb_limits=[p - r for r in range(p)],
            forward_first=True,
        )

    cands = [build(d) for d in _built_for(durations)]
    return best_order(cands, stage_to_rank, durations, cap=[min(p, m)] * p)


def _zb_v(p: int, m: int, stage_to_rank: list[int], durations: Durations) -> list[list[Action]]:
    # Two chunks per rank on a V. Older micro-batches and later stages first (a micro-batch that
    # has started should reach the loss and turn around); at most 2p chunks in flight per rank,
    # p micro-batches' worth of activations (a chunk is half a rank's layers), 1F1B's peak.
    # Candidates: that list schedule for the costs (and for equal costs), and the handcrafted
    # ZB-V pattern, which reaches the lower bound 3m + (p - 1) / 2 at equal costs once m >= 2p.
    def key(a: Action) -> tuple:
        return (a.microbatch, -a.stage)

    def build(d: Durations) -> list[list[Action]]:
        return greedy(
            p,
            m,
            stage_to_rank,
            d,
            split=True,
            f_key=key,
            b_key=key,
            limits=[min(2 * p, m * 2)] * p,
        )

    cands = [build(d) for d in _built_for(durations)] + [zero_bubble.zb_v_pattern(p, m)]
    return best_order(cands, stage_to_rank, durations, cap=[2 * min(p, m)] * p)


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
