"""Run items on any ``concurrent.futures.Executor``: a process pool, threads, or Dask.

Dask's distributed client is the multi-machine path: ``distributed.Client(address).get_executor()``
is a ``concurrent.futures.Executor`` over a cluster, so the same job runs on one laptop or many
machines. Each item is submitted as :func:`~plait.tasks.worker.call_item`, which runs ``setup`` once
per worker process (cached per job) and returns ``fn``'s outcome as data.

Dispatch stays dynamic: at most ``in_flight`` items are submitted at a time and the next one goes
out as soon as any finishes. An exception raised by the *future itself* (not by ``fn``) means the
executor lost the work (a dead process, a lost Dask worker): the item is resubmitted, up to
``retries`` times. (A ``ProcessPoolExecutor`` cannot recover from a dead worker, it is "broken" for
good; Dask reschedules on its own and, after its own limit, raises ``KilledWorker`` here.)
"""

from __future__ import annotations

import concurrent.futures as cf
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from plait.tasks.errors import SetupError, TaskError, WorkerLostError
from plait.tasks.worker import call_item

__all__ = ["executor_results", "executor_width"]


def executor_width(executor: cf.Executor) -> int | None:
    """How many items the executor runs at once, when it says (process and thread pools do)."""
    width = getattr(executor, "_max_workers", None)
    if isinstance(width, int) and width > 0:
        return width
    client = getattr(executor, "_client", None)  # distributed's ClientExecutor
    if client is not None:
        try:
            return sum(client.nthreads().values()) or None
        except Exception:  # noqa: BLE001 - only a hint for how many to keep in flight
            return None
    return None


def executor_results(
    executor: cf.Executor,
    fn: Callable | bytes,
    setup: Callable | bytes | None,
    todo: list[tuple[int, Any]],
    in_flight: int | None,
    retries: int,
    timeout: float | None,
) -> Iterator[tuple[int, Any, float]]:
    """Yield ``(index, result, seconds)`` as items finish on ``executor``.

    ``fn`` and ``setup`` are pickled bytes from :func:`~plait.tasks.worker.dumps_callable` (so a
    lambda reaches a ``ProcessPoolExecutor`` as it reaches Dask), or callables for a thread pool.
    """
    job = uuid.uuid4().hex  # the setup cache key: one setup per worker process per job
    queue = deque(todo)
    items = dict(todo)
    attempts: dict[int, int] = {}
    running: dict[cf.Future, int] = {}
    limit = in_flight or len(todo) or 1

    def submit(index: int) -> None:
        attempts[index] = attempts.get(index, 0) + 1
        try:
            running[executor.submit(call_item, job, fn, setup, items[index])] = index
        except Exception as exc:  # a broken or shut-down executor
            raise WorkerLostError(index, items[index], attempts[index], repr(exc)) from exc

    try:
        while queue or running:
            while queue and len(running) < limit:
                submit(queue.popleft()[0])
            done, _ = cf.wait(running, timeout=timeout, return_when=cf.FIRST_COMPLETED)
            if not done:
                index = next(iter(running.values()))
                raise WorkerLostError(
                    index, items[index], attempts[index], f"no item finished in {timeout}s"
                )
            for future in done:
                index = running.pop(future)
                try:
                    outcome = future.result()
                except Exception as exc:  # the executor lost it, fn did not raise
                    if attempts[index] > retries:
                        raise WorkerLostError(
                            index, items[index], attempts[index], repr(exc)
                        ) from exc
                    queue.appendleft((index, items[index]))
                    continue
                kind = outcome[0]
                if kind == "setup_err":
                    raise SetupError("the per-worker setup raised " + outcome[1], outcome[2])
                if kind == "err":
                    raise TaskError(index, items[index], outcome[1], outcome[2])
                yield index, outcome[1], outcome[2]
    finally:
        for future in running:
            future.cancel()
