"""Walking a schedule: what each action needs, which messages match, and the stepping loop.

Pure Python, no torch. This is the one statement of the schedule's dependency rules: the
validator, the planner's simulator and the runtime's prefetch timing walk a schedule with
:class:`Walk` and differ only in what they do with each action as it runs; the generators take
their list scheduler's dependencies (:func:`inputs`), their messages (:func:`message_in`,
:func:`message_out`) and their feasibility check from here too.

What each action needs (the tensors it consumes, and the action that produces each):

    F(s, i)       the input of stage s: for s > 0 the output of F(s-1, i)
    B/BW(s, i)    F(s, i), and for s < last the output gradient of stage s: the input gradient
                  made by B(s+1, i) (BW(s+1, i) when the schedule has no B for it)
    W(s, i)       B(s, i)
    SEND_ACT      F of its stage (the activation it carries)
    SEND_GRAD     B or BW of its stage (the gradient it carries)
    RECV_*        its matching send (:func:`matching_send`)

A tensor made on another rank arrives through a receive: F(s, i) then needs RECV_ACT(s, i) on its
own rank, B/BW(s, i) needs RECV_GRAD(s, i). In a compute-only order (a message the schedule leaves
implicit: no send for it) the action needs the remote producer itself, with ``implicit=True``.

The model of execution is the runtime's, made conservative: each rank runs its list in order; a
send never blocks (the runtime posts ``isend`` and waits for it at the end of the step); a receive
blocks until the matching send has run; messages between two ranks are matched in posting order,
one queue per (sender, receiver) pair whatever the kind (gloo matches by order per pair and tag,
NCCL by order per pair). Because sends never block and each rank is sequential, the outcome does
not depend on which rank moves first (a Kahn process network), so one walk proves the schedule
free of deadlock for every timing, and an action's inputs have all run when it is visited.

Example::

    for rank, index, action, needs in Walk(build_schedule("1f1b", 2, 3)):
        ...  # needs: the (rank, index) of each action this one depended on
"""

from __future__ import annotations

from collections import deque
from collections.abc import Container, Iterator, Sequence

from plait.pipeline.schedule import COMM, COMPUTE, Action, Kind, Schedule

__all__ = [
    "RECVS",
    "SENDS",
    "ScheduleError",
    "Walk",
    "inputs",
    "message_in",
    "message_out",
    "matching_recv",
    "matching_send",
    "peer_stage",
]

_F, _B, _W, _BW = Kind.F, Kind.B, Kind.W, Kind.BW
_SEND_ACT, _RECV_ACT = Kind.SEND_ACT, Kind.RECV_ACT
_SEND_GRAD, _RECV_GRAD = Kind.SEND_GRAD, Kind.RECV_GRAD
SENDS = frozenset({_SEND_ACT, _SEND_GRAD})
RECVS = frozenset({_RECV_ACT, _RECV_GRAD})

# A communication action's peer is its stage plus this; a send's receive and a receive's send.
_PEER = {_SEND_ACT: 1, _RECV_ACT: -1, _SEND_GRAD: -1, _RECV_GRAD: 1}
_MATCH = {
    _SEND_ACT: _RECV_ACT,
    _RECV_ACT: _SEND_ACT,
    _SEND_GRAD: _RECV_GRAD,
    _RECV_GRAD: _SEND_GRAD,
}
# The send that carries a compute action's output to the neighbouring stage.
_SEND_OF = {_F: _SEND_ACT, _B: _SEND_GRAD, _BW: _SEND_GRAD}
_RECV_OF = {k: _MATCH[v] for k, v in _SEND_OF.items()}  # and the receive of that on the neighbour

Key = tuple  # (kind, stage, microbatch): an Action's fields, cheaper to build and hash


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


# ---------------------------------------------------------------------------------------------
# the rules


def peer_stage(a: Action) -> int | None:
    """The stage a communication action exchanges with (None for compute actions)."""
    d = _PEER.get(a.kind)
    return None if d is None else a.stage + d


def matching_send(recv: Action) -> Action:
    """The send whose message ``recv`` receives: RECV_ACT(s) <- SEND_ACT(s-1), RECV_GRAD(s) <-
    SEND_GRAD(s+1)."""
    return Action(_MATCH[recv.kind], recv.stage + _PEER[recv.kind], recv.microbatch)


def matching_recv(send: Action) -> Action:
    """The receive of ``send``'s message: SEND_ACT(s) -> RECV_ACT(s+1), SEND_GRAD(s) ->
    RECV_GRAD(s-1)."""
    return Action(_MATCH[send.kind], send.stage + _PEER[send.kind], send.microbatch)


def _input_keys(
    kind: Kind, stage: int, mb: int, num_stages: int, split: Container[Key]
) -> tuple[Key, ...]:
    """What an action needs, as the actions that produce it (module docstring), compute-only:
    a compute action's inputs are the compute actions that make them, wherever they run. The
    input gradient of a stage is made by its B where ``(B, stage, mb)`` is in ``split``, else by
    its BW."""
    if kind is _F:
        return ((_F, stage - 1, mb),) if stage > 0 else ()
    if kind is _B or kind is _BW:
        if stage < num_stages - 1:
            nxt = stage + 1
            return (_F, stage, mb), (_B if (_B, nxt, mb) in split else _BW, nxt, mb)
        return ((_F, stage, mb),)
    if kind is _W:
        return ((_B, stage, mb),)
    if kind is _SEND_ACT:
        return ((_F, stage, mb),)
    if kind is _SEND_GRAD:
        return ((_B if (_B, stage, mb) in split else _BW, stage, mb),)
    return ((_MATCH[kind], stage + _PEER[kind], mb),)  # a receive: its send


class _Every:
    """Contains everything: every stage's input gradient comes from its B."""

    def __contains__(self, key: object) -> bool:
        return True


def _send_key(kind: Kind, stage: int, mb: int, num_stages: int) -> Key | None:
    """The send that carries a compute action's output to the next stage along, if there is one."""
    send = _SEND_OF.get(kind)
    if send is None or not 0 <= stage + _PEER[send] < num_stages:
        return None
    return send, stage, mb


def inputs(a: Action, num_stages: int, backward: Kind = Kind.BW) -> list[Action]:
    """The compute actions whose outputs compute action ``a`` needs (the compute-only form of the
    rule), where ``backward`` (B or BW) is the kind that makes each stage's input gradient."""
    split = _Every() if backward is _B else ()
    return [Action(*k) for k in _input_keys(a.kind, a.stage, a.microbatch, num_stages, split)]


def message_out(a: Action, stage_to_rank: Sequence[int]) -> tuple[int, Action] | None:
    """(destination rank, send) for the tensor compute action ``a`` makes, if it leaves a's rank."""
    send = _send_key(a.kind, a.stage, a.microbatch, len(stage_to_rank))
    if send is None:
        return None
    dst = stage_to_rank[send[1] + _PEER[send[0]]]
    return None if dst == stage_to_rank[a.stage] else (dst, Action(*send))


def message_in(a: Action, stage_to_rank: Sequence[int]) -> tuple[int, Action] | None:
    """(source rank, receive) for the tensor compute action ``a`` needs from another rank."""
    S, here = len(stage_to_rank), stage_to_rank[a.stage]
    for kind, stage, _ in _input_keys(a.kind, a.stage, a.microbatch, S, ()):
        if kind in COMPUTE and stage_to_rank[stage] != here:
            return stage_to_rank[stage], Action(_RECV_OF[kind], a.stage, a.microbatch)
    return None


def _order_message(a: Action, need: Key) -> str:
    """Why ``a`` cannot run yet: ``need``, made on its own rank, comes later or not at all."""
    kind, stage, mb = need
    if kind is _RECV_ACT:
        return f"runs before its input arrives (RECV_ACT{stage}.{mb})"
    if kind is _RECV_GRAD:
        return f"runs before its output gradient arrives (RECV_GRAD{stage}.{mb})"
    if a.kind is _SEND_ACT:
        return f"sends before F{stage}.{mb} produced the activation"
    if a.kind is _SEND_GRAD:
        return f"sends before B{stage}.{mb} or BW{stage}.{mb} produced the gradient"
    if stage != a.stage and kind is _F:
        return f"runs before F{stage}.{mb} on this rank"
    if stage != a.stage:
        return (
            f"runs before the backward of stage {stage} on this rank "
            f"(B{stage}.{mb} or BW{stage}.{mb})"
        )
    return f"runs before {kind.value}{stage}.{mb}"


def _index(s: Schedule) -> dict[Key, tuple[int, int]]:
    """Check the schedule's shape; where each action runs, as (rank, index)."""
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
    S, M, rank_of = s.num_stages, s.num_microbatches, s.stage_to_rank
    where: dict[Key, tuple[int, int]] = {}
    for r, acts in enumerate(s.actions):
        for i, a in enumerate(acts):
            kind, stage, mb = key = a.kind, a.stage, a.microbatch
            if not 0 <= stage < S:
                raise ScheduleError(f"stage {stage} outside 0..{S - 1}", r, a, i)
            if not 0 <= mb < M:
                raise ScheduleError(f"micro-batch {mb} outside 0..{M - 1}", r, a, i)
            if rank_of[stage] != r:
                raise ScheduleError(f"stage {stage} lives on rank {rank_of[stage]}", r, a, i)
            if key in where:
                raise ScheduleError(f"appears twice (also on rank {where[key][0]})", r, a, i)
            where[key] = (r, i)
            if kind in COMM:
                peer = stage + _PEER[kind]
                if not 0 <= peer < S:
                    raise ScheduleError(f"there is no stage {peer} to exchange with", r, a, i)
                if rank_of[peer] == r:
                    raise ScheduleError(
                        f"stage {peer} is on the same rank: hand over locally, no message", r, a, i
                    )
    return where


# ---------------------------------------------------------------------------------------------
# the walk


class Walk:
    """Run every rank's list in order, visiting each action once its inputs are there.

    ``Walk(schedule)`` checks the schedule's shape (stages and micro-batches in range, every
    action on the rank that holds its stage, none twice, messages only between ranks); iterating
    it runs the ranks and yields ``(rank, index, action, needs)`` in an order the schedule allows,
    ``needs`` being the ``(rank, index)`` of each action this one depended on by the rule above
    (on its own rank, or another's for a receive's send or an implicit message). Raises
    :class:`ScheduleError`:

    - when a rank reaches an action whose input is made on its own rank but later or never (an
      order error, naming what it runs before);
    - when a receive finds another message first in the queue from its sender;
    - at the end, when ranks are still blocked (a deadlock: each blocked rank's action and what it
      waits for), or when a send was never received.

    With ``implicit=False`` every tensor crossing ranks must be received (the runtime's rule);
    with True a message the schedule does not send is implicit (compute-only orders).

    Attributes:
        implicit_out: ``{(rank, index): destination stage}`` for the compute actions whose output
            goes to another rank without a send (``implicit=True`` only).
    """

    def __init__(self, schedule: Schedule, implicit: bool = True):
        self.schedule = schedule
        self._where = where = _index(schedule)
        self.implicit_out: dict[tuple[int, int], int] = {}
        if implicit:
            S, rank_of = schedule.num_stages, schedule.stage_to_rank
            for key, at in where.items():
                if key[0] not in _SEND_OF:
                    continue
                send = _send_key(*key, S)
                if send is not None and send not in where:
                    dst = send[1] + _PEER[send[0]]
                    if rank_of[dst] != at[0]:
                        self.implicit_out[at] = dst

    def __iter__(self) -> Iterator[tuple[int, int, Action, list[tuple[int, int]]]]:
        s, where, implicit_out = self.schedule, self._where, self.implicit_out
        S, rank_of, acts = s.num_stages, s.stage_to_rank, s.actions
        P = len(acts)

        pc = [0] * P
        # per receiver, per sender: the sends posted and not yet received, in posting order
        inbox: list[dict[int, deque]] = [{} for _ in range(P)]
        pairs: list[tuple[int, int]] = []  # (sender, receiver) in the order first used
        # Waiting ranks, woken when what they wait for happens: a message into an empty queue
        # (so a wrong one shows as soon as it is first in the queue), or a remote compute action.
        recv_wait = [-1] * P  # rank -> the sender it waits on for a message
        remote_waits: list[dict[int, int]] = [{} for _ in range(P)]  # rank -> {index: waiter}
        waiting: dict[int, tuple] = {}  # rank -> (other rank, what it waits for)
        work = list(range(P))  # ranks that may move; the last woken moves first
        while work:
            r = work.pop()
            row, waits, mine = acts[r], remote_waits[r], inbox[r]
            i, n = pc[r], len(row)
            while i < n:
                a = row[i]
                kind, stage = a.kind, a.stage
                needs = []
                wait = None
                for key in _input_keys(kind, stage, a.microbatch, S, where):
                    src = rank_of[key[1]]
                    if src != r:
                        if key[0] in SENDS:  # a receive's message: first in its queue?
                            at = where.get(key)
                            dq = mine.get(src)
                            if not dq:
                                recv_wait[r] = src
                                wait = src, key
                            elif dq[0] != at:
                                head = acts[src][dq[0][1]]
                                raise ScheduleError(
                                    f"expects {Action(*key)} from rank {src}, but the next message "
                                    f"from rank {src} to rank {r} is {head} (messages between two "
                                    f"ranks are matched in order)",
                                    r,
                                    a,
                                    i,
                                )
                            else:
                                dq.popleft()
                                needs.append(at)
                            continue
                        # made on another rank: sent implicitly, or received here
                        if implicit_out:
                            at = where.get(key)
                            if at in implicit_out:
                                if pc[src] <= at[1]:
                                    remote_waits[src][at[1]] = r
                                    wait = src, key
                                else:
                                    needs.append(at)
                                continue
                        key = (_RECV_OF[key[0]], stage, key[2])
                    at = where.get(key)
                    if at is None or at[1] >= i:
                        raise ScheduleError(_order_message(a, key), r, a, i)
                    needs.append(at)
                if wait is not None:
                    waiting[r] = wait
                    break  # until the other rank sends or makes it
                if kind in SENDS:
                    q = rank_of[stage + _PEER[kind]]
                    dq = inbox[q].get(r)
                    if dq is None:
                        dq = inbox[q][r] = deque()
                        pairs.append((r, q))
                    dq.append((r, i))
                    if recv_wait[q] == r:
                        recv_wait[q] = -1
                        work.append(q)
                if waits and i in waits:  # a rank waits for this action
                    work.append(waits.pop(i))
                yield r, i, a, needs
                i += 1
            pc[r] = i  # (other ranks look only when this one stops)
        blocked = [r for r in range(P) if pc[r] < len(acts[r])]
        if blocked:
            lines = []
            for r in blocked:
                q, key = waiting[r]
                how = "from" if key[0] in SENDS else "on"
                a = acts[r][pc[r]]
                lines.append(f"rank {r} at {a} (#{pc[r]}) waits for {Action(*key)} {how} rank {q}")
            r0 = blocked[0]
            raise ScheduleError("deadlock: " + "; ".join(lines), r0, acts[r0][pc[r0]], pc[r0])
        for src, dst in pairs:
            dq = inbox[dst][src]
            if dq:
                first_send = acts[src][dq[0][1]]
                raise ScheduleError(
                    f"rank {src} sends {first_send} to rank {dst}, which never receives it"
                    + (f" (and {len(dq) - 1} more)" if len(dq) > 1 else "")
                )
