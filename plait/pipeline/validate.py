"""The schedule validator: every dependency met, no deadlock, micro-batches in flight counted.

The model of execution is the runtime's, made conservative, and the dependency rules are those of
:mod:`plait.pipeline.walk`, which the simulator walks by too: each rank runs its list in order; a
send never blocks; a receive blocks until the matching send has run; messages between two ranks
are matched in posting order. The outcome does not depend on which rank moves first (a Kahn
process network), so one walk proves the schedule free of deadlock for every timing.

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

from dataclasses import dataclass

from plait.pipeline.schedule import Action, Kind, Schedule
from plait.pipeline.walk import SENDS, ScheduleError, Walk

__all__ = ["ScheduleError", "ValidationReport", "validate"]


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
    walk = Walk(schedule, implicit=False)  # checks the shape
    forward_only = schedule.is_forward_only
    _check_complete(schedule, forward_only)
    return _run(walk, forward_only)


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


def _run(walk: Walk, forward_only: bool) -> ValidationReport:
    s = walk.schedule
    S, rank_of = s.num_stages, s.stage_to_rank
    in_flight = [0] * s.num_ranks
    peak = [0] * s.num_ranks
    messages = 0
    for r, _, a, _ in walk:
        # Activations held: training holds them from F to the last backward action; inference
        # from F until the output leaves (sent, handed to the next stage here, or is the result).
        if a.kind is Kind.F:
            in_flight[r] += 1
            peak[r] = max(peak[r], in_flight[r])
            if forward_only and (a.stage == S - 1 or rank_of[a.stage + 1] == r):
                in_flight[r] -= 1
        elif a.kind in (Kind.BW, Kind.W) or (forward_only and a.kind is Kind.SEND_ACT):
            in_flight[r] -= 1
        if a.kind in SENDS:
            messages += 1
    return ValidationReport(s.name, forward_only, peak, [len(a) for a in s.actions], messages)
