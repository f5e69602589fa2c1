"""Execute a schedule with a cost model instead of tensors: a discrete-event simulation.

The simulator runs ``Schedule.actions`` exactly as the runtime does: each rank walks its own list
in order; a compute action starts when the rank is free and its inputs are there; a ``SEND_*``
puts a transfer on the link from this rank to the peer's (one transfer at a time per direction, in
the order the sender posts them); a ``RECV_*`` waits until that transfer has arrived. Where a
schedule leaves a transfer implicit (no send/receive actions), the data travels when it is
produced. Sends run beside compute (GPU copy engines) unless the costs say they occupy the
sender (``p2p_blocks_compute``: gloo on CPU). What waits for what is
:class:`plait.pipeline.walk.Walk`'s rule, the validator's.

The result is a :class:`plait.trace.Timeline` in the same format as a measured run, so the two
can be laid over each other, plus the step time, bubble fraction, and per rank the peak number of
micro-batches whose activations are held (in units of one whole stage's activations, as the
validator counts them) and the peak activation bytes.

Example::

    from plait.pipeline import build_schedule
    res = simulate(build_schedule("1f1b", 4, 8), UniformCosts())
    res.bubble_fraction   # 3/11
    res.timeline.draw("1f1b.png")
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Protocol

from plait.pipeline.schedule import Kind, Schedule
from plait.pipeline.walk import RECVS, SENDS, ScheduleError, Walk, peer_stage
from plait.trace import Event, Timeline

__all__ = ["simulate", "SimResult", "StageCosts", "ScheduleError"]


class StageCosts(Protocol):
    p2p_blocks_compute: bool

    def compute(self, kind: str, stage: int, microbatch: int = 0) -> float: ...

    def transfer(self, src_stage: int, dst_stage: int) -> float: ...


@dataclass
class SimResult:
    """What a simulated pipeline step looks like.

    Attributes:
        timeline: every action as an event (compute and transfers; extra tail events such as the
            gradient all-reduce and optimizer are added by the planner).
        pipeline_time: seconds from the first action to the last.
        bubble_fraction: idle share of the ranks' time over that span.
        peak_in_flight: per rank, the most micro-batches' activations held at once, in units of
            one stage (a chunk of an interleaved schedule counts ``1/v``).
        peak_activation_bytes: per rank, when the costs give activation sizes.
    """

    timeline: Timeline
    pipeline_time: float
    bubble_fraction: float
    peak_in_flight: list[float] = field(default_factory=list)
    peak_activation_bytes: list[float] = field(default_factory=list)
    rank_end: list[float] = field(default_factory=list)


_COMPUTE_NAMES = frozenset({"F", "B", "W", "BW"})
_NAME = {k: k.value for k in Kind}


def simulate(schedule: Schedule, costs: StageCosts, source: str = "simulated") -> SimResult:
    """Run ``schedule`` with ``costs``; see the module docstring.

    Raises:
        ScheduleError: the schedule is malformed (an action on a rank that does not hold its
            stage, ...), an action comes before what it needs, or the ranks wait on each other
            forever: the same rules and messages as :func:`plait.pipeline.validate`, from
            :class:`plait.pipeline.walk.Walk`.
    """
    walk = Walk(schedule)  # checks the shape
    S, P = schedule.num_stages, schedule.num_ranks
    s2r = schedule.stage_to_rank
    virtual = max(1, S // P)
    chunk_bytes = getattr(costs, "stage_activation_bytes", None)
    blocking = bool(getattr(costs, "p2p_blocks_compute", False))
    implicit_out = walk.implicit_out
    # when each action's output is usable on the rank that needs it from here: a send's arrival,
    # or an implicit transfer's
    arrive = [[0.0] * len(acts) for acts in schedule.actions]
    link_free: dict[tuple[int, int], float] = defaultdict(float)
    clock = [0.0] * P
    events: list[Event] = []
    held = [0.0] * P
    held_bytes = [0.0] * P
    peak = [0.0] * P
    peak_bytes = [0.0] * P

    def free(r: int, stage: int, share: float, whole: bool) -> None:
        # A micro-batch counts as in flight until its weights' backward is done (as the
        # validator counts); its bytes go in two halves, at B and at W.
        if whole:
            held[r] -= 1 / virtual
        if chunk_bytes:
            held_bytes[r] -= share * chunk_bytes(stage)

    for r, i, a, needs in walk:
        k, s, mb = a.kind, a.stage, a.microbatch
        name = _NAME[k]
        t = clock[r]
        # Inputs made on this rank are there by t; one from another rank when it arrives.
        dep = 0.0
        for q, j in needs:
            if q != r:
                dep = arrive[q][j]
        if k in RECVS:
            if dep > t:
                events.append(Event(r, f"{name}{s}.{mb}", name, t, dep, s, mb))
            clock[r] = max(t, dep)
        elif k in SENDS:
            # one transfer at a time per link, in the order the sender posts them
            dst = peer_stage(a)
            lk = (r, s2r[dst])
            start = max(t, link_free[lk])
            end = start + costs.transfer(s, dst)
            link_free[lk] = end
            events.append(Event(r, f"{name}{s}.{mb}", name, start, end, s, mb))
            if blocking:
                clock[r] = end
            arrive[r][i] = end
        else:
            start = max(t, dep)
            end = start + costs.compute(name, s, mb)
            events.append(Event(r, f"{name}{s}.{mb}", name, start, end, s, mb))
            clock[r] = end
            if k is Kind.F:
                held[r] += 1 / virtual
                if chunk_bytes:
                    held_bytes[r] += chunk_bytes(s)
                peak[r] = max(peak[r], held[r])
                peak_bytes[r] = max(peak_bytes[r], held_bytes[r])
            elif k is Kind.W:
                free(r, s, 0.5, True)
            else:
                # B frees what only the input gradient needed; W frees the rest.
                free(r, s, 1.0 if k is Kind.BW else 0.5, k is Kind.BW)
            if implicit_out and (r, i) in implicit_out:
                # no send in the schedule: the data travels when it is made
                dst = implicit_out[(r, i)]
                lk = (r, s2r[dst])
                start = max(end, link_free[lk])
                arrive[r][i] = link_free[lk] = start + costs.transfer(s, dst)
    tl = Timeline(P, events, source)
    span = tl.span
    # Compute actions of one rank never overlap, so busy time is a plain sum (Timeline's general
    # merge is quadratic in ranks x events, too slow for thousands of actions).
    busy = sum(e.end - e.start for e in events if e.kind in _COMPUTE_NAMES)
    return SimResult(
        timeline=tl,
        pipeline_time=span,
        bubble_fraction=1.0 - busy / (P * span) if span > 0 else 0.0,
        peak_in_flight=peak,
        peak_activation_bytes=peak_bytes if chunk_bytes else [],
        rank_end=list(clock),
    )
