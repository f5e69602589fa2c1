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

__all__ = ["map", "stream", "Pool"]


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
    _pool: LocalPool | None = None,
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
        timeout: local pool: seconds an item may run before its worker is killed (and the item
            retried). With an ``executor``: seconds to wait for any item to finish before
            giving up with :class:`WorkerLostError` (an executor's workers cannot be killed
            from here).
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
        elif _pool is not None:
            results = _pool.results(dumps_callable(fn, "fn"), todo)
        else:
            n = min(workers or os.cpu_count() or 1, len(todo))
            pool = LocalPool(
                n,
                dumps_callable(setup, "setup") if setup is not None else None,
                retries=retries,
                timeout=timeout,
                threads_per_worker=threads_per_worker or max(1, (os.cpu_count() or 1) // n),
            )
            results = _closing(pool, pool.results(dumps_callable(fn, "fn"), todo))
        t0, done = time.perf_counter(), 0
        for index, result, _seconds in results:
            if store is not None:
                store.save(keys[index], result)
            done += 1
            update(items_s=f"{done / (time.perf_counter() - t0):.1f}")
            yield index, result


def _closing(pool: LocalPool, results: Iterator) -> Iterator:
    try:
        yield from results
    finally:
        pool.close()


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
    _validate_options(workers, setup, executor, retries, timeout, threads_per_worker)


def _validate_options(workers, setup, executor, retries, timeout, threads_per_worker) -> None:
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


class Pool:
    """Local worker processes kept across jobs: ``setup`` runs once per worker, not once per map.

    :func:`map` starts its workers for one call; a Pool starts them once (lazily, at the first
    job) and serves many, like a warm ``joblib`` or Dask worker. Options are :func:`stream`'s.

    Example::

        with plait.tasks.Pool(2, setup=load_model) as pool:
            for batch_list in jobs:
                losses = pool.map(score, batch_list)    # score(model, batch)
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        setup: Callable[[], Any] | None = None,
        retries: int = 2,
        timeout: float | None = None,
        threads_per_worker: int | None = None,
    ):
        _validate_options(workers, setup, None, retries, timeout, threads_per_worker)
        n = workers or os.cpu_count() or 1
        self._pool = LocalPool(
            n,
            dumps_callable(setup, "setup") if setup is not None else None,
            retries=retries,
            timeout=timeout,
            threads_per_worker=threads_per_worker or max(1, (os.cpu_count() or 1) // n),
        )
        self._setup = setup

    def stream(self, fn: Callable[..., Any], items: Iterable[Any], **options: Any):
        """:func:`stream` on this pool's workers (``results_dir``, ``key``, ``progress``...)."""
        for name in ("setup", "executor", "workers", "retries", "timeout", "threads_per_worker"):
            if name in options:
                raise TypeError(f"{name}= is fixed when the Pool is created, not per job")
        return stream(fn, items, setup=self._setup, _pool=self._pool, **options)

    def map(self, fn: Callable[..., Any], items: Iterable[Any], **options: Any) -> list[Any]:
        """:func:`map` on this pool's workers; results in input order."""
        items = list(items)
        results: list[Any] = [None] * len(items)
        for index, result in self.stream(fn, items, **options):
            results[index] = result
        return results

    @property
    def completed_per_worker(self) -> dict[int, int]:
        """``{worker pid: items completed}`` over the pool's life."""
        return dict(self._pool.completed_per_worker)

    def close(self) -> None:
        """Stop the workers (also done on leaving a ``with`` block)."""
        self._pool.close()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
