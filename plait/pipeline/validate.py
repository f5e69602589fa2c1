"""The schedule validator: every dependency met, no deadlock, micro-batches in flight counted.

The model of execution is the runtime's, made conservative: each rank runs its list in order; a
send never blocks (the runtime posts ``isend`` and waits for it at the end of the step); a receive
blocks until the matching send has run; messages between two ranks are matched in posting order,
one queue per (sender, receiver) pair whatever the kind (gloo matches by order per pair and tag,
NCCL by order per pair). Because sends never block and each rank is sequential, the outcome does
not depend on which rank moves first (a Kahn process network), so one run of the model proves the
schedule free of deadlock for every timing.

Checks, each failing with a :class:`ScheduleError` naming the rank, the action and its position:

- shape: ``stage_to_rank`` covers the stages; every action's stage lives on the rank that runs it;
  micro-batch indices are in range; no action appears twice;
- completeness: every (stage, micro-batch) has one F and, when training, one BW or one B and one W;
- local order: F after its input is available (received, or the previous stage's F on this rank);
  B/BW after F and after its output gradient is available; W after B; a send after the action that
  produced its tensor; sends and receives only across ranks, towards the right neighbour;
- matching and deadlock: every receive gets exactly the message it names, every send is received,
  and no rank waits forever.

Example::

    report = validate(build_schedule("1f1b", 4, 8))
    report.peak_in_flight  # [4, 3, 2, 1]
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from plait.pipeline.schedule import Action, Kind, Schedule

__all__ = ["ScheduleError", "ValidationReport", "validate"]


class ScheduleError(ValueError):
    """A schedule is malformed, misses a dependency or deadlocks.

    Attributes:
        rank: the pipeline rank whose action fails (None for whole-schedule errors).
        action: the failing action (None when not about one action).
        index: its position in the rank's list.
    """

    def __init__(
        self,
        message: str,
        rank: int | None = None,
        action: Action | None = None,
        index: int | None = None,
    ):
        self.rank, self.action, self.index = rank, action, index
        where = ""
        if rank is not None and action is not None:
            where = f"rank {rank}, action #{index} {action}: "
        super().__init__(where + message)


@dataclass(frozen=True)
class ValidationReport:
    """What :func:`validate` proved and counted.

    Attributes:
        name: the schedule's name.
        forward_only: True for an inference schedule (no backward actions).
        peak_in_flight: per rank, the most (stage, micro-batch) forwards whose activations are held
            at once: from F until the last backward action (BW, or W when split); for a forward-only
            schedule, from F until its output is sent on or consumed.
        num_actions: per rank, the length of its list.
        num_messages: point-to-point messages in the whole schedule.
    """

    name: str
    forward_only: bool
    peak_in_flight: list[int]
    num_actions: list[int]
    num_messages: int

    def __str__(self) -> str:
        mode = "forward-only" if self.forward_only else "training"
        return (
            f"{self.name} ({mode}): valid, {self.num_messages} messages, "
            f"peak micro-batches in flight per rank {self.peak_in_flight}"
        )


def validate(schedule: Schedule) -> ValidationReport:
    """Prove ``schedule`` correct and free of deadlock, or raise :class:`ScheduleError`.

    Example::

        s = Schedule.from_text(["F0.0 SEND_ACT0.0 RECV_GRAD0.0 BW0.0",
                                "RECV_ACT1.0 F1.0 BW1.0 SEND_GRAD1.0"])
        validate(s).peak_in_flight  # [1, 1]
    """
    _check_shape(schedule)
    forward_only = schedule.is_forward_only
    _check_complete(schedule, forward_only)
    return _run(schedule, forward_only)


def _check_shape(s: Schedule) -> None:
    for label, value in (
        ("num_ranks", s.num_ranks),
        ("num_stages", s.num_stages),
        ("num_microbatches", s.num_microbatches),
    ):
        if not isinstance(value, int) or value < 1:
            raise ScheduleError(f"{label} must be a positive integer, got {value!r}")
    if len(s.stage_to_rank) != s.num_stages:
        raise ScheduleError(
            f"stage_to_rank has {len(s.stage_to_rank)} entries but there are {s.num_stages} stages"
        )
    for stage, r in enumerate(s.stage_to_rank):
        if not isinstance(r, int) or not 0 <= r < s.num_ranks:
            raise ScheduleError(
                f"stage {stage} is placed on rank {r!r}, outside 0..{s.num_ranks - 1}"
            )
    if len(s.actions) != s.num_ranks:
        raise ScheduleError(f"{len(s.actions)} action lists for {s.num_ranks} ranks")
    S, rank_of = s.num_stages, s.stage_to_rank
    seen: dict[Action, int] = {}
    for r, acts in enumerate(s.actions):
        for i, a in enumerate(acts):
            if not 0 <= a.stage < S:
                raise ScheduleError(f"stage {a.stage} outside 0..{S - 1}", r, a, i)
            if not 0 <= a.microbatch < s.num_microbatches:
                raise ScheduleError(
                    f"micro-batch {a.microbatch} outside 0..{s.num_microbatches - 1}", r, a, i
                )
            if rank_of[a.stage] != r:
                raise ScheduleError(f"stage {a.stage} lives on rank {rank_of[a.stage]}", r, a, i)
            if a in seen:
                raise ScheduleError(f"appears twice (also on rank {seen[a]})", r, a, i)
            seen[a] = r
            peer = _peer_stage(a)
            if peer is not None:
                if not 0 <= peer < S:
                    raise ScheduleError(f"there is no stage {peer} to exchange with", r, a, i)
                if rank_of[peer] == r:
                    raise ScheduleError(
                        f"stage {peer} is on the same rank: hand over locally, no message", r, a, i
                    )


def _peer_stage(a: Action) -> int | None:
    return {
        Kind.SEND_ACT: a.stage + 1,
        Kind.RECV_ACT: a.stage - 1,
        Kind.SEND_GRAD: a.stage - 1,
        Kind.RECV_GRAD: a.stage + 1,
    }.get(a.kind)


def _check_complete(s: Schedule, forward_only: bool) -> None:
    have = {a for acts in s.actions for a in acts}
    for stage in range(s.num_stages):
        r = s.stage_to_rank[stage]
        for i in range(s.num_microbatches):
            if Action(Kind.F, stage, i) not in have:
                raise ScheduleError(f"rank {r} never runs F{stage}.{i}")
            if forward_only:
                continue
            bw = Action(Kind.BW, stage, i) in have
            b = Action(Kind.B, stage, i) in have
            w = Action(Kind.W, stage, i) in have
            if bw and (b or w):
                raise ScheduleError(f"rank {r} runs BW{stage}.{i} and also B or W of it")
            if not bw and not (b and w):
                missing = f"B{stage}.{i}" if not b else f"W{stage}.{i}"
                raise ScheduleError(
                    f"rank {r} never runs the backward of {stage}.{i}: needs BW{stage}.{i}, "
                    f"or B{stage}.{i} and W{stage}.{i} ({missing} is missing)"
                )


def _run(s: Schedule, forward_only: bool) -> ValidationReport:
    S, rank_of = s.num_stages, s.stage_to_rank
    acts = s.actions
    pc = [0] * s.num_ranks
    done: list[set[Action]] = [set() for _ in range(s.num_ranks)]
    queues: dict[tuple[int, int], deque[Action]] = {}
    in_flight = [0] * s.num_ranks
    peak = [0] * s.num_ranks
    messages = 0

    def has(r: int, kind: Kind, stage: int, mb: int) -> bool:
        return Action(kind, stage, mb) in done[r]

    def backward_done(r: int, stage: int, mb: int) -> bool:
        # The input gradient exists after BW or B.
        return has(r, Kind.BW, stage, mb) or has(r, Kind.B, stage, mb)

    def check_local(r: int, i: int, a: Action) -> None:
        st, mb = a.stage, a.microbatch
        if a.kind is Kind.F and st > 0:
            if rank_of[st - 1] == r:
                if not has(r, Kind.F, st - 1, mb):
                    raise ScheduleError(f"runs before F{st - 1}.{mb} on this rank", r, a, i)
            elif not has(r, Kind.RECV_ACT, st, mb):
                raise ScheduleError(f"runs before its input arrives (RECV_ACT{st}.{mb})", r, a, i)
        elif a.kind in (Kind.B, Kind.BW):
            if not has(r, Kind.F, st, mb):
                raise ScheduleError(f"runs before F{st}.{mb}", r, a, i)
            if st < S - 1:
                if rank_of[st + 1] == r:
                    if not backward_done(r, st + 1, mb):
                        raise ScheduleError(
                            f"runs before the backward of stage {st + 1} on this rank "
                            f"(B{st + 1}.{mb} or BW{st + 1}.{mb})",
                            r,
                            a,
                            i,
                        )
                elif not has(r, Kind.RECV_GRAD, st, mb):
                    raise ScheduleError(
                        f"runs before its output gradient arrives (RECV_GRAD{st}.{mb})", r, a, i
                    )
        elif a.kind is Kind.W and not has(r, Kind.B, st, mb):
            raise ScheduleError(f"runs before B{st}.{mb}", r, a, i)
        elif a.kind is Kind.SEND_ACT and not has(r, Kind.F, st, mb):
            raise ScheduleError(f"sends before F{st}.{mb} produced the activation", r, a, i)
        elif a.kind is Kind.SEND_GRAD and not backward_done(r, st, mb):
            raise ScheduleError(
                f"sends before B{st}.{mb} or BW{st}.{mb} produced the gradient", r, a, i
            )

    def account(r: int, a: Action) -> None:
        # Activations held: training holds them from F to the last backward action; inference
        # from F until the output leaves (sent, handed to the next stage here, or is the result).
        if a.kind is Kind.F:
            in_flight[r] += 1
            peak[r] = max(peak[r], in_flight[r])
            if forward_only and (a.stage == S - 1 or rank_of[a.stage + 1] == r):
                in_flight[r] -= 1
        elif a.kind in (Kind.BW, Kind.W) or (forward_only and a.kind is Kind.SEND_ACT):
            in_flight[r] -= 1

    progress = True
    while progress:
        progress = False
        for r in range(s.num_ranks):
            while pc[r] < len(acts[r]):
                i, a = pc[r], acts[r][pc[r]]
                check_local(r, i, a)
                if a.kind in (Kind.SEND_ACT, Kind.SEND_GRAD):
                    queues.setdefault((r, rank_of[_peer_stage(a)]), deque()).append(a)
                    messages += 1
                elif a.kind in (Kind.RECV_ACT, Kind.RECV_GRAD):
                    src = rank_of[_peer_stage(a)]
                    q = queues.get((src, r))
                    if not q:
                        break  # blocked until rank src sends
                    head = q[0]
                    want = _matching_send(a)
                    if head != want:
                        raise ScheduleError(
                            f"expects {want} from rank {src}, but the next message from rank "
                            f"{src} to rank {r} is {head} (messages between two ranks are matched "
                            f"in order)",
                            r,
                            a,
                            i,
                        )
                    q.popleft()
                done[r].add(a)
                account(r, a)
                pc[r] += 1
                progress = True
    blocked = [r for r in range(s.num_ranks) if pc[r] < len(acts[r])]
    if blocked:
        lines = []
        for r in blocked:
            a = acts[r][pc[r]]
            lines.append(
                f"rank {r} waits at #{pc[r]} {a} for {_matching_send(a)} "
                f"from rank {rank_of[_peer_stage(a)]}"
            )
        r0 = blocked[0]
        raise ScheduleError("deadlock: " + "; ".join(lines), r0, acts[r0][pc[r0]], pc[r0])
    for (src, dst), q in queues.items():
        if q:
            raise ScheduleError(
                f"rank {src} sends {q[0]} to rank {dst}, which never receives it"
                + (f" (and {len(q) - 1} more)" if len(q) > 1 else "")
            )
    return ValidationReport(s.name, forward_only, peak, [len(a) for a in acts], messages)


def _matching_send(recv: Action) -> Action:
    if recv.kind is Kind.RECV_ACT:
        return Action(Kind.SEND_ACT, recv.stage - 1, recv.microbatch)
    return Action(Kind.SEND_GRAD, recv.stage + 1, recv.microbatch)
