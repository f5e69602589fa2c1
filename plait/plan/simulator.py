"""Execute a schedule with a cost model instead of tensors: a discrete-event simulation.

The simulator runs ``Schedule.actions`` exactly as the runtime does: each rank walks its own list
in order; a compute action starts when the rank is free and its inputs are there; a ``SEND_*``
puts a transfer on the link from this rank to the peer's (one transfer at a time per direction, in
the order the sender posts them); a ``RECV_*`` waits until that transfer has arrived. Where a
schedule leaves a transfer implicit (no send/receive actions), the data travels when it is
produced. Sends run beside compute (GPU copy engines) unless the costs say they occupy the
sender (``p2p_blocks_compute``: gloo on CPU).

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
from plait.trace import Event, Timeline

__all__ = ["simulate", "SimResult", "StageCosts", "ScheduleError"]


class ScheduleError(ValueError):
    """The schedule cannot run: an action on the wrong rank, out of order, or a deadlock."""


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


_SENDS = {Kind.SEND_ACT: ("act", 1), Kind.SEND_GRAD: ("grad", -1)}
_RECVS = {Kind.RECV_ACT: "act", Kind.RECV_GRAD: "grad"}
_COMPUTE_NAMES = frozenset({"F", "B", "W", "BW"})


def simulate(schedule: Schedule, costs: StageCosts, source: str = "simulated") -> SimResult:
    """Run ``schedule`` with ``costs``; see the module docstring.

    Raises:
        ScheduleError: an action sits on a rank that does not hold its stage, a backward comes
            before its forward, or the ranks wait on each other forever (named in the message).
    """
    S, P = schedule.num_stages, schedule.num_ranks
    s2r = schedule.stage_to_rank
    if len(s2r) != S or any(not 0 <= r < P for r in s2r):
        raise ScheduleError(
            f"stage_to_rank {s2r} must name a rank in 0..{P - 1} for each of {S} stages"
        )
    if len(schedule.actions) != P:
        raise ScheduleError(f"schedule has {len(schedule.actions)} action lists for {P} ranks")
    virtual = max(1, S // P)
    chunk_bytes = getattr(costs, "stage_activation_bytes", None)
    blocking = bool(getattr(costs, "p2p_blocks_compute", False))

    explicit = set()  # (what, dst_stage, mb) that travel by an explicit SEND
    for acts in schedule.actions:
        for a in acts:
            if a.kind in _SENDS:
                what, d = _SENDS[a.kind]
                explicit.add((what, a.stage + d, a.microbatch))

    ready: dict[tuple, float] = {}  # (what, stage, mb) -> time it is usable on the stage's rank
    waiters: dict[tuple, list[int]] = defaultdict(list)
    done_f: dict[tuple[int, int], float] = {}
    done_b: dict[tuple[int, int], float] = {}
    link_free: dict[tuple[int, int], float] = defaultdict(float)
    clock = [0.0] * P
    pc = [0] * P
    events: list[Event] = []
    held = [0.0] * P
    held_bytes = [0.0] * P
    peak = [0.0] * P
    peak_bytes = [0.0] * P

    def publish(key: tuple, t: float, queue: list[int]) -> None:
        ready[key] = t
        queue.extend(waiters.pop(key, ()))

    def implicit(what: str, src: int, dst: int, mb: int, t: float, queue: list[int]) -> None:
        """Data produced at ``t`` on ``src`` for ``dst`` without an explicit send."""
        if not 0 <= dst < S or (what, dst, mb) in explicit:
            return
        if s2r[src] == s2r[dst]:
            publish((what, dst, mb), t, queue)
            return
        lk = (s2r[src], s2r[dst])
        start = max(t, link_free[lk])
        end = start + costs.transfer(src, dst)
        link_free[lk] = end
        publish((what, dst, mb), end, queue)

    def free(r: int, stage: int, share: float, whole: bool) -> None:
        # A micro-batch counts as in flight until its weights' backward is done (as the
        # validator counts); its bytes go in two halves, at B and at W.
        if whole:
            held[r] -= 1 / virtual
        if chunk_bytes:
            held_bytes[r] -= share * chunk_bytes(stage)

    queue = list(range(P))
    while queue:
        r = queue.pop()
        acts = schedule.actions[r]
        while pc[r] < len(acts):
            a = acts[pc[r]]
            k, s, mb = a.kind, a.stage, a.microbatch
            if not 0 <= s < S:
                raise ScheduleError(f"rank {r}: action {a} names stage {s}; stages are 0..{S - 1}")
            if a.is_compute and s2r[s] != r:
                raise ScheduleError(f"rank {r}: action {a} but stage {s} lives on rank {s2r[s]}")
            # what this action waits for (None: nothing from elsewhere)
            need = None
            if k == Kind.F and s > 0:
                need = ("act", s, mb)
            elif k in (Kind.B, Kind.BW) and s < S - 1:
                need = ("grad", s, mb)
            elif k in _RECVS:
                need = (_RECVS[k], s, mb)
            if need is not None and need not in ready:
                waiters[need].append(r)
                break
            t = clock[r]
            dep = ready[need] if need is not None else 0.0
            if k in _RECVS:
                if dep > t:
                    events.append(Event(r, str(a), k.value, t, dep, s, mb))
                clock[r] = max(t, dep)
            elif k in _SENDS:
                what, d = _SENDS[k]
                produced = done_f.get((s, mb)) if what == "act" else done_b.get((s, mb))
                if produced is None:
                    raise ScheduleError(f"rank {r}: {a} before the action that produces it")
                dst = s + d
                if not 0 <= dst < S:
                    raise ScheduleError(f"rank {r}: {a} sends to stage {dst}, which does not exist")
                lk = (r, s2r[dst])
                start = max(t, produced, link_free[lk])
                end = start + (costs.transfer(s, dst) if s2r[dst] != r else 0.0)
                link_free[lk] = end
                events.append(Event(r, str(a), k.value, start, end, s, mb))
                if blocking:
                    clock[r] = end
                publish((what, dst, mb), end, queue)
            else:
                if k in (Kind.B, Kind.BW, Kind.W) and (s, mb) not in done_f:
                    raise ScheduleError(f"rank {r}: {a} comes before F{s}.{mb}")
                if k == Kind.W and (s, mb) not in done_b:
                    raise ScheduleError(f"rank {r}: {a} comes before B{s}.{mb}")
                start = max(t, dep)
                end = start + costs.compute(k.value, s, mb)
                events.append(Event(r, str(a), k.value, start, end, s, mb))
                clock[r] = end
                if k == Kind.F:
                    done_f[(s, mb)] = end
                    held[r] += 1 / virtual
                    if chunk_bytes:
                        held_bytes[r] += chunk_bytes(s)
                    peak[r] = max(peak[r], held[r])
                    peak_bytes[r] = max(peak_bytes[r], held_bytes[r])
                    implicit("act", s, s + 1, mb, end, queue)
                elif k in (Kind.B, Kind.BW):
                    done_b[(s, mb)] = end
                    # B frees what only the input gradient needed; W frees the rest.
                    free(r, s, 1.0 if k == Kind.BW else 0.5, k == Kind.BW)
                    implicit("grad", s, s - 1, mb, end, queue)
                else:
                    free(r, s, 0.5, True)
            pc[r] += 1
    stuck = [
        f"rank {r} at {schedule.actions[r][pc[r]]}"
        for r in range(P)
        if pc[r] < len(schedule.actions[r])
    ]
    if stuck:
        raise ScheduleError("deadlock: every rank waits on another: " + "; ".join(stuck))
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
