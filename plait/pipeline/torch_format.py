"""Convert schedules to and from torch.distributed.pipelining's action format. Pure Python.

PyTorch's pipelining runtime (``torch.distributed.pipelining.schedules``, ``_PipelineScheduleRuntime``)
and torchtitan's ``--parallelism.pipeline_parallel_schedule_csv`` describe a schedule as one list
of actions per rank, each written ``<stage><type><microbatch>`` (``0F3``, ``1I2``, ``2W0``,
``1SEND_F1``), one CSV row per rank. The names map one to one:

    plait       torch                       plait       torch
    F s.i       sF i   FORWARD              SEND_ACT    sSEND_F i   (stage s sends to s + 1)
    B s.i       sI i   BACKWARD_INPUT       RECV_ACT    sRECV_F i   (stage s receives from s - 1)
    W s.i       sW i   BACKWARD_WEIGHT      SEND_GRAD   sSEND_B i   (stage s sends to s - 1)
    BW s.i      sB i   FULL_BACKWARD        RECV_GRAD   sRECV_B i   (stage s receives from s + 1)

Both sides name a message by the stage that runs the action (torch's ``_add_send_recv`` puts
``SEND_F`` on stage ``s`` and the matching ``RECV_F`` on stage ``s + 1``, ``SEND_B`` on ``s`` and
``RECV_B`` on ``s - 1``), so stage and micro-batch indices carry over unchanged.

Torch actions plait has no counterpart for:

- ``UNSHARD``, ``RESHARD`` (FSDP all-gather / free of a stage's parameters) and ``REDUCE_GRAD``
  (the data-parallel gradient reduction and scaling after a stage's last backward) are dropped on
  import: they talk to the data-parallel group, not to a pipeline neighbour, so they add no
  pipeline dependency and no point-to-point message. ``strict=True`` rejects them instead.
- ``OVERLAP_F_B`` (``(0F1;1B0)OVERLAP_F_B``: several actions in one step, DualPipeV) is rejected
  with a ValueError; ``expand_overlap=True`` imports its sub-actions one after another in the
  listed order, which is how ``_PipelineScheduleRuntime`` runs it when no custom function is
  registered for ``OVERLAP_F_B``.
- anything else (a token that is not ``<stage><type>[<microbatch>]`` with one of the types above,
  e.g. batched send/receive tokens, which torch 2.13 does not have) is a ValueError naming it.

``None`` and empty CSV fields are torch's idle steps; plait's lists have no idle steps (a rank
just waits for its next action's input), so they are dropped on import and never written.

Example::

    s = build_schedule("1f1b", 2, 4)
    to_torch_actions(s)[1][:3]                # ['1RECV_F0', '1F0', '1B0']
    to_torch_csv(s, "1f1b.csv", compute_only=True)   # for torchtitan / _PipelineScheduleRuntime
    validate(from_torch_csv("custom.csv"))    # prove a torch/torchtitan CSV schedule correct
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from plait.pipeline.generators import add_communication
from plait.pipeline.schedule import COMM, Action, Kind, Schedule

__all__ = [
    "TORCH_TYPE",
    "from_torch_actions",
    "from_torch_csv",
    "to_torch_actions",
    "to_torch_csv",
    "to_torch_pipeline_order",
]

# plait kind -> torch computation type (the value of torch's _ComputationType).
TORCH_TYPE: dict[Kind, str] = {
    Kind.F: "F",
    Kind.B: "I",
    Kind.W: "W",
    Kind.BW: "B",
    Kind.SEND_ACT: "SEND_F",
    Kind.RECV_ACT: "RECV_F",
    Kind.SEND_GRAD: "SEND_B",
    Kind.RECV_GRAD: "RECV_B",
}
_PLAIT_KIND: dict[str, Kind] = {t: k for k, t in TORCH_TYPE.items()}
_DROPPED = ("UNSHARD", "RESHARD", "REDUCE_GRAD")

# Longest names first so that e.g. SEND_F is not read as S + ...; fullmatch rejects trailing junk
# (torch's own regex uses match, so it would read '0F1x' as 0F1).
_TOKEN = re.compile(r"(\d+)(SEND_F|RECV_F|SEND_B|RECV_B|UNSHARD|RESHARD|REDUCE_GRAD|F|I|B|W)(\d*)")
_GROUP = re.compile(r"\((.*)\)([A-Za-z_]+)")
_SUPPORTED = (
    "expected <stage><type><microbatch> with type in F, I, W, B, SEND_F, RECV_F, SEND_B, RECV_B "
    "(e.g. '0F3', '1SEND_F2'); UNSHARD, RESHARD and REDUCE_GRAD are dropped, OVERLAP_F_B needs "
    "expand_overlap=True"
)


# ---------------------------------------------------------------------------------------------
# plait -> torch


def to_torch_actions(
    schedule: Schedule, compute_only: bool = False, reduce_grad: bool = False
) -> dict[int, list[str]]:
    """Each rank's actions as torch action strings: ``{rank: ['0F0', '0SEND_F0', ...]}``.

    Args:
        schedule: a plait schedule.
        compute_only: emit only F, I, W and B: the form torch keeps in ``pipeline_order`` and that
            ``_add_send_recv`` (run by ``_PipelineScheduleRuntime._load_csv`` in its default
            ``compute_only`` format) expands with its own sends and receives. False keeps plait's
            explicit sends and receives as SEND_F/RECV_F/SEND_B/RECV_B, in plait's order.
        reduce_grad: add ``<stage>REDUCE_GRAD`` after each stage's last backward (its
            ``num_microbatches``-th B or W, after that action's send), where torch's
            ``_add_reduce_grad`` puts it. ``_PipelineScheduleRuntime`` loads a ``compute_comms``
            schedule as given, and only a REDUCE_GRAD action makes it scale the gradients and
            finish FSDP's reduction, so set this for that format (``compute_only`` loading adds
            them itself).

    Example::

        to_torch_actions(build_schedule("gpipe", 2, 1))
        # {0: ['0F0', '0SEND_F0', '0RECV_B0', '0B0'], 1: ['1RECV_F0', '1F0', '1B0', '1SEND_B0']}
    """
    return {
        r: _torch_row(acts, schedule.num_microbatches, compute_only, reduce_grad)
        for r, acts in enumerate(schedule.actions)
    }


def _torch_row(acts: list[Action], m: int, compute_only: bool, reduce_grad: bool) -> list[str]:
    row: list[str] = []
    backwards: Counter[int] = Counter()
    pending: Action | None = None  # a stage's last backward whose REDUCE_GRAD is not written yet
    for a in acts:
        if compute_only and a.kind in COMM:
            continue
        if pending is not None and not (
            a.kind is Kind.SEND_GRAD
            and (a.stage, a.microbatch) == (pending.stage, pending.microbatch)
        ):
            row.append(f"{pending.stage}REDUCE_GRAD")
            pending = None
        row.append(_torch_token(a))
        if reduce_grad and a.kind in (Kind.W, Kind.BW):
            backwards[a.stage] += 1
            if backwards[a.stage] == m:
                pending = a
    if pending is not None:
        row.append(f"{pending.stage}REDUCE_GRAD")
    return row


def to_torch_csv(
    schedule: Schedule,
    path: str | os.PathLike | None = None,
    compute_only: bool = False,
    reduce_grad: bool = False,
) -> str:
    """The schedule as torch's CSV: one row per rank (row ``r`` is rank ``r``), comma-separated.

    Written with Python's ``csv`` module in its default dialect (``\\r\\n`` line ends), as torch's
    ``_dump_csv`` writes it; ``_load_csv`` and torchtitan's ``pipeline_parallel_schedule_csv``
    read it. Use ``compute_only=True`` for those (their default format); see
    :func:`to_torch_actions` for the options. Writes ``path`` when given; returns the text.
    """
    rows = to_torch_actions(schedule, compute_only=compute_only, reduce_grad=reduce_grad)
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    for r in range(schedule.num_ranks):
        writer.writerow(rows[r])
    text = buf.getvalue()
    if path is not None:
        with open(path, "w", newline="") as f:
            f.write(text)
    return text


def to_torch_pipeline_order(
    schedule: Schedule, compute_only: bool = True, reduce_grad: bool = False
) -> dict:
    """The schedule as torch ``_Action`` objects, ``{rank: [_Action, ...]}`` (imports torch).

    With ``compute_only=True`` (the default) this is what torch keeps in ``pipeline_order`` and
    checks with ``_validate_schedule``; with False, the ``pipeline_order_with_comms`` form.
    """
    from torch.distributed.pipelining.schedules import _Action

    rows = to_torch_actions(schedule, compute_only=compute_only, reduce_grad=reduce_grad)
    return {r: [_Action.from_str(tok) for tok in row] for r, row in rows.items()}


def _torch_token(a: Action) -> str:
    return f"{a.stage}{TORCH_TYPE[a.kind]}{a.microbatch}"


# ---------------------------------------------------------------------------------------------
# torch -> plait


def from_torch_actions(
    rows: Mapping[int, Iterable] | Sequence[Iterable],
    num_microbatches: int | None = None,
    stage_to_rank: Sequence[int] | Mapping[int, int] | None = None,
    name: str = "torch",
    *,
    strict: bool = False,
    expand_overlap: bool = False,
) -> Schedule:
    """A plait :class:`Schedule` from torch's per-rank action lists.

    Args:
        rows: ``{rank: [action, ...]}`` for ranks ``0..p-1`` (or a list, row ``r`` being rank
            ``r``), as torch's ``pipeline_order`` or ``pipeline_order_with_comms``. Each action is
            a torch action string (``'0F3'``), a torch ``_Action`` (read through its string form,
            so torch need not be imported here) or ``None``/``''`` for an idle step (dropped). A
            row may also be one string of actions separated by commas or spaces.
        num_microbatches: ``m``; default one more than the largest micro-batch index used.
        stage_to_rank: where each stage lives (a list, or torch's ``{stage: rank}`` dict); default
            inferred from which rank runs each stage (every stage must then appear somewhere).
        name: the schedule's name.
        strict: reject UNSHARD, RESHARD and REDUCE_GRAD instead of dropping them.
        expand_overlap: import ``(a;b)OVERLAP_F_B`` as ``a`` then ``b`` instead of rejecting it.

    If no rank has a send or receive, the rows are compute-only (torch's ``pipeline_order``) and
    plait's :func:`~plait.pipeline.generators.add_communication` inserts the messages; otherwise
    the sends and receives are kept exactly as given. The result is not validated: call
    :func:`plait.pipeline.validate` on it.

    Raises:
        ValueError: a token plait cannot read or represent (one line, naming it, its rank and
            step), a stage run by two ranks, or a stage that never appears with no
            ``stage_to_rank``.

    Example::

        s = from_torch_actions({0: ["0F0", None, "0B0"], 1: ["1F0", "1B0"]})
        str(s).splitlines()[1]   # 'rank 0: F0.0 SEND_ACT0.0 RECV_GRAD0.0 BW0.0'
    """
    if isinstance(rows, Mapping):
        ranks = sorted(rows)
        if ranks != list(range(len(ranks))):
            raise ValueError(f"torch schedule ranks must be 0..{len(ranks) - 1}, got {ranks}")
        raw = [rows[r] for r in ranks]
    else:
        raw = list(rows)
    actions: list[list[Action]] = []
    for r, row in enumerate(raw):
        if isinstance(row, str):
            row = [t for t in re.split(r"[,\s]+", row) if t]
        acts: list[Action] = []
        for step, item in enumerate(row):
            acts.extend(_parse_item(item, r, step, strict, expand_overlap))
        actions.append(acts)
    every = [a for acts in actions for a in acts]

    if stage_to_rank is None:
        placed = _infer_stage_to_rank(actions)
    elif isinstance(stage_to_rank, Mapping):
        if sorted(stage_to_rank) != list(range(len(stage_to_rank))):
            raise ValueError(
                f"stage_to_rank must map stages 0..{len(stage_to_rank) - 1}, got "
                f"{sorted(stage_to_rank)}"
            )
        placed = [int(stage_to_rank[s]) for s in range(len(stage_to_rank))]
    else:
        placed = [int(x) for x in stage_to_rank]
    if num_microbatches is None:
        num_microbatches = 1 + max((a.microbatch for a in every), default=0)
    if not any(a.kind in COMM for a in every):
        try:
            actions = add_communication(actions, placed)
        except ValueError as e:
            raise ValueError(
                f"cannot add sends and receives to this compute-only torch schedule: {e}"
            ) from e
    return Schedule(name, len(actions), len(placed), num_microbatches, placed, actions)


def from_torch_csv(
    path_or_text: str | os.PathLike,
    num_microbatches: int | None = None,
    stage_to_rank: Sequence[int] | Mapping[int, int] | None = None,
    name: str = "torch",
    *,
    strict: bool = False,
    expand_overlap: bool = False,
) -> Schedule:
    """A plait :class:`Schedule` from a torch CSV schedule (a file, or the CSV text itself).

    Row ``r`` is rank ``r``, as torch's ``_load_csv`` reads it (a blank line is a rank with no
    actions); an empty field is an idle step. A string with a newline or a comma (or a single
    action token) is taken as CSV text, any other string or path as a file name. The options are
    :func:`from_torch_actions`'s.

    Example::

        validate(from_torch_csv("custom_schedule.csv"))   # raises ScheduleError if it is wrong
    """
    text = _read_csv_source(path_or_text)
    rows = [list(row) for row in csv.reader(io.StringIO(text, newline=""))]
    return from_torch_actions(
        rows,
        num_microbatches=num_microbatches,
        stage_to_rank=stage_to_rank,
        name=name,
        strict=strict,
        expand_overlap=expand_overlap,
    )


def _read_csv_source(src: str | os.PathLike) -> str:
    if isinstance(src, os.PathLike) or (
        isinstance(src, str) and "\n" not in src and "," not in src and not _is_token(src)
    ):
        with open(src, newline="") as f:
            return f.read()
    if not isinstance(src, str):
        raise TypeError(f"expected a path or CSV text, got {type(src).__name__}")
    return src


def _is_token(text: str) -> bool:
    t = text.strip()
    return t == "" or bool(_TOKEN.fullmatch(t) or _GROUP.fullmatch(t))


def _parse_item(item, rank: int, step: int, strict: bool, expand_overlap: bool) -> list[Action]:
    if item is None:
        return []
    if isinstance(item, str):
        token = item.strip()
    elif hasattr(item, "computation_type"):  # torch's _Action; its str() is the token
        token = str(item).strip()
    else:
        raise ValueError(
            f"rank {rank}, step {step}: expected a torch action string, a torch _Action or "
            f"None, got {type(item).__name__} {item!r}"
        )
    if token == "":
        return []
    where = f"rank {rank}, step {step}"
    group = _GROUP.fullmatch(token)
    if group is not None:
        if group.group(2) != "OVERLAP_F_B":
            raise ValueError(f"unknown torch action {token!r} at {where}; {_SUPPORTED}")
        if not expand_overlap:
            raise ValueError(
                f"torch action {token!r} at {where} runs several actions in one step "
                f"(OVERLAP_F_B), which plait's schedules cannot represent; pass "
                f"expand_overlap=True to run its sub-actions in order, as _PipelineScheduleRuntime "
                f"does without a custom OVERLAP_F_B function"
            )
        out: list[Action] = []
        for sub in group.group(1).split(";"):
            if sub.strip().startswith("("):
                raise ValueError(f"nested torch action {token!r} at {where}; {_SUPPORTED}")
            out.extend(_parse_item(sub, rank, step, strict, expand_overlap))
        return out
    m = _TOKEN.fullmatch(token)
    if m is None:
        what = "batched communication" if "BATCHED" in token.upper() else "unknown torch action"
        raise ValueError(f"{what} {token!r} at {where}; {_SUPPORTED}")
    stage, ctype, mb = int(m.group(1)), m.group(2), m.group(3)
    if ctype in _DROPPED:
        if strict:
            raise ValueError(
                f"torch action {token!r} at {where} ({ctype}) has no plait counterpart; "
                f"strict=False drops UNSHARD, RESHARD and REDUCE_GRAD (no pipeline dependency)"
            )
        return []
    if mb == "":
        raise ValueError(
            f"torch action {token!r} at {where} needs a micro-batch index; {_SUPPORTED}"
        )
    return [Action(_PLAIT_KIND[ctype], stage, int(mb))]


def _infer_stage_to_rank(actions: list[list[Action]]) -> list[int]:
    owner: dict[int, int] = {}
    for r, acts in enumerate(actions):
        for a in acts:
            prev = owner.setdefault(a.stage, r)
            if prev != r:
                raise ValueError(
                    f"stage {a.stage} is run by rank {prev} and by rank {r} ({a}); a stage lives "
                    f"on one rank"
                )
    num_stages = 1 + max(owner, default=-1)
    missing = [s for s in range(num_stages) if s not in owner]
    if missing or not owner:
        raise ValueError(
            f"cannot infer stage_to_rank: stages {missing or [0]} never appear; pass stage_to_rank"
        )
    return [owner[s] for s in range(num_stages)]
