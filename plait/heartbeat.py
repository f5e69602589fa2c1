"""Progress beats from launched workers to their launcher: who is stuck, and where.

A worker calls :func:`beat` as it makes progress (each pipeline action, each phase of a training
step). The launcher (:func:`plait.launch`) gives every worker a slot in shared memory; a beat
writes the time, the step and a short label (``RECV_GRAD0.3``, ``all-reduce gradients``) into it.
The launcher's watchdog reads the slots: a rank that is stopped, or whose last *watched* beat is
older than the job's timeout, is named with its last action and the job is brought down
(:class:`Watchdog`). Outside a launched worker, :func:`beat` does nothing.

Phases that may legitimately be long and are not communication (building the model, saving a
checkpoint) are marked ``watched=False``: the watchdog leaves them alone, and a collective inside
them still fails by the process-group timeout.

A beat is a few hundred nanoseconds: two stores and a copy of at most :data:`LABEL_BYTES` bytes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["beat", "set_step", "Slots", "Watchdog", "Stall", "LABEL_BYTES"]

LABEL_BYTES = 48
_WAITS = ("RECV_", "wait ")  # labels of beats taken before waiting on another rank


class Slots:
    """Shared memory with one slot per rank: last beat time (negative: unwatched), step, label.

    Made by the launcher before it starts the workers (it is passed to them on start); lock-free
    (``RawArray``) so that it leaves no named semaphore behind whatever kills the job.
    """

    def __init__(self, ctx, world_size: int):
        self.world_size = world_size
        self.times = ctx.RawArray("d", world_size)
        self.steps = ctx.RawArray("q", world_size)
        self.labels = ctx.RawArray("c", world_size * LABEL_BYTES)

    def read(self, rank: int) -> tuple[float, int, str]:
        raw = bytes(self.labels[rank * LABEL_BYTES : (rank + 1) * LABEL_BYTES])
        return self.times[rank], self.steps[rank], raw.rstrip(b"\0").decode(errors="replace")


_slots: Slots | None = None
_rank = 0


def attach(slots: Slots | None, rank: int) -> None:
    """Make :func:`beat` write to ``rank``'s slot (called once in each launched worker)."""
    global _slots, _rank
    _slots, _rank = slots, rank


def set_step(step: int) -> None:
    """The training step later beats belong to."""
    if _slots is not None:
        _slots.steps[_rank] = step


def beat(label: str, watched: bool = True) -> None:
    """Record progress: this rank is now doing ``label``.

    ``watched=False`` marks a phase the watchdog must not time (e.g. a checkpoint save).
    """
    s = _slots
    if s is None:
        return
    now = time.monotonic()
    data = label.encode()[:LABEL_BYTES]
    start = _rank * LABEL_BYTES
    s.labels[start : start + LABEL_BYTES] = data.ljust(LABEL_BYTES, b"\0")
    s.times[_rank] = now if watched else -now


@dataclass(frozen=True)
class Stall:
    """A rank the watchdog blames: how long it has been silent, at which step, doing what."""

    rank: int
    seconds: float
    step: int
    label: str
    stopped: bool

    def message(self, limit: float) -> str:
        how = "is stopped (SIGSTOP or a debugger)" if self.stopped else "stalled"
        return (
            f"{how} {self.seconds:.1f} s at step {self.step} in {self.label or 'startup'} "
            f"(no progress for longer than the timeout of {limit:g} s)"
        )


class Watchdog:
    """Finds the rank that holds a job up, from the beats and the workers' process states.

    A job is stalled when a rank has been silent for longer than the limit and it is stopped or
    it is waiting on another (its last beat is a receive or a wait): a long computation nobody
    waits on yet is not a stall (and a wait with no labelled beat still fails by the process
    group's timeout, the same limit). Blame, in order: a worker the kernel reports stopped; a
    silent rank that is not itself waiting on another; the rank silent longest.
    """

    def __init__(self, slots: Slots, pids: list[int | None], limit: float):
        self.slots, self.pids, self.limit = slots, pids, limit

    def stalled(self, finished: set[int], now: float | None = None) -> Stall | None:
        """The rank to blame, or None while every unfinished rank made progress in time."""
        now = time.monotonic() if now is None else now
        silent: list[Stall] = []
        for rank in range(self.slots.world_size):
            if rank in finished:
                continue
            t, step, label = self.slots.read(rank)
            if t <= 0:  # no beat yet (starting up) or an unwatched phase
                continue
            if now - t > self.limit:
                silent.append(Stall(rank, now - t, step, label, _stopped(self.pids[rank])))
        stopped = [s for s in silent if s.stopped]
        working = [s for s in silent if not s.label.startswith(_WAITS)]
        if not stopped and len(working) == len(silent):
            return None  # nobody is held up (yet) by the silent ones
        return max(stopped or working or silent, key=lambda s: s.seconds)

    def stopped(self, finished: set[int], now: float | None = None) -> Stall | None:
        """A worker the kernel reports stopped, in whatever phase (for blame once its peers
        have failed waiting on it), or None."""
        now = time.monotonic() if now is None else now
        for rank in range(self.slots.world_size):
            if rank not in finished and _stopped(self.pids[rank]):
                t, step, label = self.slots.read(rank)
                return Stall(rank, now - abs(t) if t else 0.0, step, label, True)
        return None


def _stopped(pid: int | None) -> bool:
    """Whether Linux reports process ``pid`` stopped (``T``) or traced (``t``)."""
    if pid is None:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] in ("T", "t")
