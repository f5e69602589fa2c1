"""The schedule IR: for each rank, an ordered list of actions. Pure Python, no torch.

A pipeline of ``num_stages`` stages (``p * v`` model chunks) runs ``num_microbatches``
micro-batches. Each rank executes its own list in order. Compute actions:

    F   forward of (stage, microbatch)
    B   backward for inputs only (the activation gradient; zero-bubble schedules)
    W   backward for weights only (runs after the B of the same stage and microbatch)
    BW  full backward (B and W at once)

and communication actions, always between consecutive stages (``stage`` is the stage that owns the
action; the peer is ``stage + 1`` for activations going forward, ``stage - 1`` for gradients):

    SEND_ACT / RECV_ACT    the output activation of ``stage - 1`` received by ``stage`` (RECV_ACT
                           on stage s) or sent by ``stage`` to ``stage + 1`` (SEND_ACT on stage s)
    SEND_GRAD / RECV_GRAD  the input gradient of ``stage + 1`` received by ``stage`` (RECV_GRAD on
                           stage s) or sent by ``stage`` to ``stage - 1`` (SEND_GRAD on stage s)

The text form of an action is ``<kind><stage>.<microbatch>``, e.g. ``F0.3``, ``BW1.2``,
``SEND_ACT0.3``; a rank's list prints as those tokens separated by spaces. The runtime executes
these lists with torch.distributed; the planner's simulator executes the same lists with a cost
model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

__all__ = [
    "Kind",
    "Action",
    "Schedule",
    "COMPUTE",
    "COMM",
    "BACKWARD",
    "parse_actions",
    "format_actions",
]


class Kind(str, Enum):
    F = "F"
    B = "B"
    W = "W"
    BW = "BW"
    SEND_ACT = "SEND_ACT"
    RECV_ACT = "RECV_ACT"
    SEND_GRAD = "SEND_GRAD"
    RECV_GRAD = "RECV_GRAD"

    def __str__(self) -> str:
        return self.value


COMPUTE = frozenset({Kind.F, Kind.B, Kind.W, Kind.BW})
COMM = frozenset({Kind.SEND_ACT, Kind.RECV_ACT, Kind.SEND_GRAD, Kind.RECV_GRAD})
# Actions that only a training step has: dropping them (and the gradient messages) from a training
# schedule gives its forward-only (inference) schedule.
BACKWARD = frozenset({Kind.B, Kind.W, Kind.BW, Kind.SEND_GRAD, Kind.RECV_GRAD})

_TOKEN = re.compile(r"^(SEND_ACT|RECV_ACT|SEND_GRAD|RECV_GRAD|BW|F|B|W)(\d+)\.(\d+)$")


@dataclass(frozen=True, order=True)
class Action:
    """One step of one rank's schedule: ``kind`` on ``(stage, microbatch)``."""

    kind: Kind
    stage: int
    microbatch: int

    def __str__(self) -> str:
        return f"{self.kind.value}{self.stage}.{self.microbatch}"

    @classmethod
    def parse(cls, token: str) -> Action:
        m = _TOKEN.match(token.strip())
        if not m:
            raise ValueError(
                f"cannot parse action {token!r}; expected <kind><stage>.<microbatch> with kind in "
                f"{[k.value for k in Kind]}, e.g. 'F0.3' or 'SEND_ACT1.0'"
            )
        return cls(Kind(m.group(1)), int(m.group(2)), int(m.group(3)))

    @property
    def is_compute(self) -> bool:
        return self.kind in COMPUTE


def parse_actions(text: str) -> list[Action]:
    """Parse a space-separated action list, e.g. ``"F0.0 F0.1 BW0.0 BW0.1"``."""
    return [Action.parse(tok) for tok in text.split()]


def format_actions(actions: list[Action]) -> str:
    return " ".join(str(a) for a in actions)


@dataclass
class Schedule:
    """A complete pipeline schedule: per-rank action lists and where each stage lives.

    Attributes:
        name: generator name (``gpipe``, ``1f1b``, ...) or ``custom``.
        num_ranks: pipeline ranks ``p``.
        num_stages: model chunks ``p * v`` (``v`` virtual stages per rank).
        num_microbatches: ``m``.
        stage_to_rank: ``stage_to_rank[s]`` is the pipeline rank that holds stage ``s``.
        actions: ``actions[r]`` is rank ``r``'s ordered list.

    Example::

        s = Schedule("custom", 2, 2, 2, [0, 1], [parse_actions("F0.0 SEND_ACT0.0 ..."), ...])
        print(s)  # one line per rank
    """

    name: str
    num_ranks: int
    num_stages: int
    num_microbatches: int
    stage_to_rank: list[int]
    actions: list[list[Action]] = field(default_factory=list)

    @property
    def virtual(self) -> int:
        return self.num_stages // self.num_ranks

    def stages_of(self, rank: int) -> list[int]:
        return [s for s, r in enumerate(self.stage_to_rank) if r == rank]

    def compute_only(self) -> list[list[Action]]:
        return [[a for a in acts if a.is_compute] for acts in self.actions]

    @property
    def is_forward_only(self) -> bool:
        """True when no rank runs a backward action (an inference schedule)."""
        return not any(a.kind in BACKWARD for acts in self.actions for a in acts)

    def forward_only(self) -> Schedule:
        """The inference schedule: the same forwards and activation messages, in the same order.

        Dropping every backward action and gradient message keeps each pair of ranks' message
        order, so a valid training schedule gives a valid inference schedule.
        """
        return Schedule(
            self.name,
            self.num_ranks,
            self.num_stages,
            self.num_microbatches,
            list(self.stage_to_rank),
            [[a for a in acts if a.kind not in BACKWARD] for acts in self.actions],
        )

    @classmethod
    def from_text(
        cls,
        rows: list[str],
        stage_to_rank: list[int] | None = None,
        num_microbatches: int | None = None,
        name: str = "custom",
    ) -> Schedule:
        """Build a schedule from one text row per rank, e.g. ``["F0.0 SEND_ACT0.0", "RECV_ACT1.0 F1.0"]``.

        ``stage_to_rank`` defaults to stage ``s`` on rank ``s``; ``num_microbatches`` defaults to
        one more than the largest micro-batch index used.
        """
        actions = [parse_actions(row) for row in rows]
        every = [a for acts in actions for a in acts]
        if stage_to_rank is None:
            stage_to_rank = list(range(len(rows)))
        if num_microbatches is None:
            num_microbatches = 1 + max((a.microbatch for a in every), default=0)
        return cls(
            name, len(rows), len(stage_to_rank), num_microbatches, list(stage_to_rank), actions
        )

    def __str__(self) -> str:
        head = f"{self.name}: p={self.num_ranks} stages={self.num_stages} m={self.num_microbatches}"
        rows = [f"rank {r}: {format_actions(a)}" for r, a in enumerate(self.actions)]
        return "\n".join([head, *rows])
