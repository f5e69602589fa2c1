"""``plait.tasks.map`` and ``plait.tasks.stream``: the front door of task parallelism."""

from __future__ import annotations

import concurrent.futures as cf
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from plait.progress import progress_bar
from plait.tasks.executor import executor_results, executor_width
from plait.tasks.pool import LocalPool
from plait.tasks.store import ResultStore
from plait.tasks.worker import dumps_callable

__all__ = ["map", "stream"]


def stream(
    fn: Callable[..., Any],
    items: Iterable[Any],
    workers: int | None = None,
    *,
    setup: Callable[[], Any] | None = None,
    executor: cf.Executor | None = None,
    results_dir: str | os.PathLike | None = None,
    key: Callable[[Any], str] | None = None,
    retries: int = 2,
    timeout: float | None = None,
    threads_per_worker: int | None = None,
    progress: bool = True,
    description: str = "tasks",
) -> Iterator[tuple[int, Any]]:
    """Run ``fn`` over ``items`` in parallel; yield ``(index, result)`` as each one finishes.

    Args:
        fn: called as ``fn(item)``, or ``fn(state, item)`` with ``state = setup()`` when ``setup``
            is given. Module-level functions travel to worker processes by reference (lambdas
            and closures need ``cloudpickle``).
        items: the work; read into a list first (its length drives the progress bar).
        workers: local worker processes (default: the CPU count). With an ``executor``, how many
            items to keep submitted at once (default: the executor's width, when it tells).
        setup: runs once per worker process before its first item (build or load a model); its
            return value is passed to every ``fn`` call in that process.
        executor: any ``concurrent.futures.Executor`` instead of the local pool, e.g. Dask's
            ``distributed.Client(address).get_executor()`` for many machines.
        results_dir: write each result there as it finishes (atomically); a rerun loads what is
            there and computes only the missing items.
        key: with ``results_dir``, name each stored result ``key(item)`` instead of by index,
            so a rerun may reorder or extend ``items``.
        retries: extra attempts for an item whose worker died (fn raising is not retried).
        timeout: seconds an item may run before its worker is killed (and the item retried).
        threads_per_worker: torch threads per local worker (default: CPU cores / workers).
        progress: show a progress bar on stderr.
        description: the progress bar's label.

    Raises:
        TaskError: ``fn`` raised on an item; names the item and carries the worker's traceback.
        WorkerLostError: an item's worker died on every allowed attempt.
        SetupError: ``setup`` raised in a worker.

    Example::

        for index, loss in plait.tasks.stream(score, batches, workers=2):
            print(index, loss)
    """
    items = list(items)
    _validate(fn, workers, setup, executor, retries, timeout, threads_per_worker)
    store = ResultStore(results_dir, fn) if results_dir is not None else None
    if key is not None and store is None:
        raise ValueError("key= names stored results; it needs results_dir= as well")
    keys = [ResultStore.key_for(i, it, key) for i, it in enumerate(items)] if store else []

    todo: list[tuple[int, Any]] = []
    found: list[tuple[int, Any]] = []
    for index, item in enumerate(items):
        hit, value = store.load(keys[index]) if store else (False, None)
        (found if hit else todo).append((index, value) if hit else (index, item))

    with progress_bar(len(items), description, progress and len(items) > 0) as update:
        if found:
            update(len(found), resumed=len(found))
        yield from found
        if not todo:
            return
        if executor is not None:
            results = executor_results(
                executor,
                fn,
                setup,
                todo,
                workers or executor_width(executor),
                retries,
                timeout,
            )
        else:
            n = min(workers or os.cpu_count() or 1, len(todo))
            pool = LocalPool(
                dumps_callable(fn, "fn"),
                dumps_callable(setup, "setup") if setup is not None else None,
                n,
                retries=retries,
                timeout=timeout,
                threads_per_worker=threads_per_worker or max(1, (os.cpu_count() or 1) // n),
            )
            results = pool.results(todo)
        t0, done = time.perf_counter(), 0
        for index, result, _seconds in results:
            if store is not None:
                store.save(keys[index], result)
            done += 1
            update(items_s=f"{done / (time.perf_counter() - t0):.1f}")
            yield index, result


def map(
    fn: Callable[..., Any],
    items: Iterable[Any],
    workers: int | None = None,
    **options: Any,
) -> list[Any]:
    """Run ``fn`` over ``items`` on ``workers`` processes; return the results in input order.

    A free worker takes the next item (dynamic dispatch), so uneven items balance. Takes every
    option of :func:`stream` (``setup``, ``executor``, ``results_dir``, ``retries``, ...).

    Example::

        def load():                       # once per worker
            return Transformer(get_config("tiny"), seed=0)

        def score(model, batch):          # per item
            return model.loss(model(batch[:, :-1]), batch[:, 1:]).item()

        losses = plait.tasks.map(score, batches, workers=2, setup=load, results_dir="out/")
    """
    items = list(items)
    results: list[Any] = [None] * len(items)
    for index, result in stream(fn, items, workers, **options):
        results[index] = result
    return results


def _validate(fn, workers, setup, executor, retries, timeout, threads_per_worker) -> None:
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {fn!r}")
    if setup is not None and not callable(setup):
        raise TypeError(f"setup must be callable or None, got {setup!r}")
    if workers is not None and (
        not isinstance(workers, int) or isinstance(workers, bool) or workers < 1
    ):
        raise ValueError(f"workers must be a positive integer or None, got {workers!r}")
    if executor is not None and not isinstance(executor, cf.Executor):
        raise TypeError(
            f"executor must be a concurrent.futures.Executor (e.g. a ProcessPoolExecutor or "
            f"distributed.Client(...).get_executor()), got {executor!r}"
        )
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise ValueError(f"retries must be a non-negative integer, got {retries!r}")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be positive seconds or None, got {timeout!r}")
    if threads_per_worker is not None and (
        not isinstance(threads_per_worker, int) or threads_per_worker < 1
    ):
        raise ValueError(
            f"threads_per_worker must be a positive integer or None, got {threads_per_worker!r}"
        )
