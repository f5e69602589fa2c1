"""The default executor: local worker processes with dynamic dispatch, retries, and no orphans.

Each worker holds exactly one item at a time and the parent hands the next item to whichever
worker answers first, so uneven items balance themselves, and when a worker dies the parent knows
precisely which item died with it. The parent waits on every worker's pipe *and* its process
sentinel at once (as :func:`plait.launch` does), so a SIGKILLed worker is noticed at once: it is
reaped, a replacement is started (running ``setup`` again), and its item goes back to the front of
the queue, up to ``retries`` extra attempts.

Workers outlive one job: :meth:`LocalPool.results` may be called again with another function, and
idle workers keep their ``setup`` state. A job that ends early (an item raised, the consumer
stopped iterating, Ctrl-C) terminates the workers that were still busy on it, so no stale result
can reach the next job. :meth:`LocalPool.close` stops every worker; workers also die with the
parent process however it ends, SIGKILL included: each watches its pipe for the parent's hang-up
(:func:`~plait.tasks.worker._watch_parent`), so there are no orphans.

Parent and workers talk over pipes and process sentinels only, never a multiprocessing
``Queue``, ``Lock`` or ``Event``: those are named semaphores under forkserver/spawn, and a
SIGKILL of the whole job would leave them in ``/dev/shm``.
"""

from __future__ import annotations

import multiprocessing.connection as mpc
import pickle
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from plait.launch import _context, _describe_exit
from plait.tasks.errors import SetupError, TaskError, WorkerLostError
from plait.tasks.worker import local_worker_main

__all__ = ["LocalPool"]


@dataclass
class _Slot:
    proc: Any
    conn: Any
    index: int | None = None  # the item in flight, None while idle
    started: float = 0.0
    timed_out: bool = False
    eof: bool = False
    done: int = 0  # items this process completed


class LocalPool:
    """Up to ``workers`` local processes, each running ``setup`` once, reused across jobs.

    The mechanism under :func:`plait.tasks.map` and :class:`plait.tasks.Pool`.
    :meth:`results` yields ``(index, result, seconds)`` as the items of one job finish.

    Attributes:
        attempts: ``{index: times dispatched}`` for the last job.
        lost: worker processes that died (and were replaced when work remained).
        completed_per_worker: ``{pid: items completed}`` over the pool's life.
    """

    def __init__(
        self,
        workers: int,
        setup_bytes: bytes | None = None,
        retries: int = 2,
        timeout: float | None = None,
        threads_per_worker: int | None = None,
        grace: float = 3.0,
    ):
        self.workers = workers
        self.setup_bytes = setup_bytes
        self.retries = retries
        self.timeout = timeout
        self.threads_per_worker = threads_per_worker
        self.grace = grace
        self.attempts: dict[int, int] = {}
        self.lost = 0
        self.completed_per_worker: dict[int, int] = {}
        self._slots: list[_Slot] = []
        self._closed = False

    def _start(self) -> _Slot:
        ctx = _context()
        parent_end, child_end = ctx.Pipe(duplex=True)
        proc = ctx.Process(
            target=local_worker_main,
            args=(self.setup_bytes, self.threads_per_worker, child_end),
            name="plait-task-worker",
        )
        proc.start()
        child_end.close()  # so the parent sees EOF if the worker dies
        return _Slot(proc, parent_end)

    def results(
        self, fn_bytes: bytes, todo: list[tuple[int, Any]]
    ) -> Iterator[tuple[int, Any, float]]:
        """Run pickled ``fn`` over ``todo`` (``(index, item)`` pairs); yield as items finish."""
        if self._closed:
            raise RuntimeError("this pool is closed; create a new one")
        queue = deque(todo)
        items = dict(todo)
        slots = self._slots
        self.attempts = {}
        # A worker that keeps dying before finishing anything (in setup, say) is not replaced
        # forever: past this budget the job fails with SetupError.
        idle_deaths_left = self.workers * (self.retries + 1)
        finished = False
        try:
            while queue or any(s.index is not None for s in slots):
                # Keep every live worker busy, and the pool at full size while work remains.
                for slot in slots:
                    self._feed(slot, fn_bytes, queue, items)
                while queue and len(slots) < self.workers:
                    fresh = self._start()
                    slots.append(fresh)
                    self._feed(fresh, fn_bytes, queue, items)
                by_handle = {s.proc.sentinel: s for s in slots}
                by_handle.update({s.conn: s for s in slots if not s.eof})
                ready = mpc.wait(list(by_handle), timeout=self._wait_timeout(slots))
                self._kill_overdue(slots)
                touched = {id(by_handle[h]): by_handle[h] for h in ready}
                for slot in touched.values():
                    yield from self._drain(slot, items)
                    if slot.proc.is_alive():
                        continue
                    # Dead: whatever it sent before dying has been drained above.
                    slot.proc.join()
                    slot.conn.close()
                    slots.remove(slot)
                    self.lost += 1
                    how = (
                        f"timed out after {self.timeout}s"
                        if slot.timed_out
                        else _describe_exit(slot.proc.exitcode)
                    )
                    if slot.index is not None:
                        if self.attempts[slot.index] > self.retries:
                            index = slot.index
                            raise WorkerLostError(index, items[index], self.attempts[index], how)
                        queue.appendleft((slot.index, items[slot.index]))
                    elif slot.done == 0:
                        idle_deaths_left -= 1
                        if idle_deaths_left < 0:
                            raise SetupError(f"task workers keep dying before any item: {how}")
            finished = True
        finally:
            if not finished:  # error, early exit or Ctrl-C: drop the workers busy on this job
                busy = [s for s in slots if s.index is not None]
                self._stop(busy)
                for s in busy:
                    slots.remove(s)

    def close(self) -> None:
        """Stop every worker (idempotent)."""
        self._closed = True
        self._stop(self._slots)
        self._slots.clear()

    def _feed(self, slot: _Slot, fn_bytes: bytes, queue: deque, items: dict) -> None:
        if slot.index is not None or not queue:
            return
        index, item = queue.popleft()
        try:
            payload = pickle.dumps((fn_bytes, index, item))
        except Exception as exc:
            raise TaskError(index, item, f"cannot be pickled for a worker: {exc}") from None
        slot.index, slot.started, slot.timed_out = index, time.monotonic(), False
        self.attempts[index] = self.attempts.get(index, 0) + 1
        try:
            slot.conn.send_bytes(payload)
        except OSError:
            pass  # the worker is dead: its sentinel fires next and the item is retried

    def _drain(self, slot: _Slot, items: dict) -> Iterator[tuple[int, Any, float]]:
        """Yield every finished item the worker has sent (it may have died just after)."""
        while True:
            try:
                if not slot.conn.poll():
                    return
                msg = pickle.loads(slot.conn.recv_bytes())
            except (EOFError, OSError):
                # The worker is gone (its sentinel may lag behind the pipe's EOF): stop
                # waiting on the pipe, and let the sentinel report the death.
                slot.eof = True
                return
            kind, index, *rest = msg
            if kind == "setup_err":
                raise SetupError("the per-worker setup raised " + rest[0], rest[1])
            if kind == "err":
                index = slot.index if index is None else index
                raise TaskError(index, items.get(index), rest[0], rest[1])
            slot.index = None
            slot.done += 1
            pid = slot.proc.pid
            self.completed_per_worker[pid] = self.completed_per_worker.get(pid, 0) + 1
            yield index, rest[0], rest[1]

    def _wait_timeout(self, slots: list[_Slot]) -> float | None:
        if self.timeout is None:
            return None
        busy = [s.started + self.timeout for s in slots if s.index is not None and not s.timed_out]
        return max(0.0, min(busy) - time.monotonic()) if busy else None

    def _kill_overdue(self, slots: list[_Slot]) -> None:
        if self.timeout is None:
            return
        now = time.monotonic()
        for s in slots:
            if s.index is not None and not s.timed_out and now - s.started > self.timeout:
                s.timed_out = True
                s.proc.kill()  # its sentinel fires on the next wait; the item is retried

    def _stop(self, slots: list[_Slot]) -> None:
        for s in slots:
            if s.index is None:
                try:
                    s.conn.send_bytes(b"")  # ask idle workers to finish
                except OSError:
                    pass
            else:
                s.proc.terminate()  # busy ones are not waited for
        deadline = time.monotonic() + self.grace
        for s in slots:
            s.proc.join(max(0.0, deadline - time.monotonic()))
        for s in slots:
            if s.proc.is_alive():
                s.proc.kill()
                s.proc.join()
            s.conn.close()
