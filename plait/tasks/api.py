"""``plait.tasks.map`` and ``plait.tasks.stream``: the front door of task parallelism."""

from __future__ import annotations

import concurrent.futures as cf
import numbers
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from plait.progress import progress_bar
from plait.tasks.errors import TaskError
from plait.tasks.executor import executor_results, executor_width
from plait.tasks.pool import LocalPool
from plait.tasks.store import _SUFFIX, ResultStore
from plait.tasks.worker import check_picklable, dumps_callable

__all__ = ["map", "stream", "Pool", "ResultsRejectedWarning"]


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
            and closures need ``cloudpickle``); ``fn``, ``setup`` and the items must pickle
            (except on a thread pool), which is checked before any worker starts.
        items: the work; read into a list first (its length drives the progress bar).
        workers: local worker processes (default: the CPU count). With an ``executor``, how many
            items to keep submitted at once (default: the executor's width, when it tells).
        setup: runs once per worker process before its first item (build or load a model); its
            return value is passed to every ``fn`` call in that process.
        executor: any ``concurrent.futures.Executor`` instead of the local pool, e.g. Dask's
            ``distributed.Client(address).get_executor()`` for many machines.
        results_dir: write each result there as it finishes (atomically, signed), named by a
            fingerprint of ``fn``'s name and the item's content; a rerun loads the results of
            the items it still has (in any order) and computes the rest. Files that fail
            verification are never unpickled: they are recomputed, with a
            :class:`ResultsRejectedWarning` (see :mod:`plait.tasks.store` for the design).
        key: with ``results_dir``, name each stored result ``key(item)`` (unique strings)
            instead of by fingerprint: for items whose content plait cannot hash, or to keep
            results of items that change in ways that do not matter.
        retries: extra attempts for an item whose worker died (fn raising is not retried).
        timeout: local pool: seconds an item may run before its worker is killed (and the item
            retried). With an ``executor``: seconds to wait for any item to finish before
            giving up with :class:`WorkerLostError` (an executor's workers cannot be killed
            from here).
        threads_per_worker: torch threads per local worker (default: CPU cores / workers).
        progress: show a progress bar on stderr.
        description: the progress bar's label.

    Raises:
        TypeError, ValueError: a bad argument, an unpicklable ``fn``/``setup``/item, or an item
            that cannot be fingerprinted, in one line, before any worker starts.
        TaskError: ``fn`` raised on an item; names the item and carries the worker's traceback.
        WorkerLostError: an item's worker died on every allowed attempt.
        SetupError: ``setup`` raised in a worker.

    Example::

        for index, loss in plait.tasks.stream(score, batches, workers=2):
            print(index, loss)
    """
    items = _as_list(items)
    _validate(fn, workers, setup, executor, retries, timeout, threads_per_worker)
    if key is not None and results_dir is None:
        raise ValueError("key= names stored results; it needs results_dir= as well")
    if key is not None and not callable(key):
        raise TypeError(f"key must be a function of an item returning a string, got {key!r}")
    # Everything that can be refused is refused here, before any worker process starts.
    threads = isinstance(executor, cf.ThreadPoolExecutor)  # nothing is pickled for threads
    fn_sent = fn if threads else dumps_callable(fn, "fn")
    setup_sent = setup if threads or setup is None else dumps_callable(setup, "setup")
    store = ResultStore(results_dir, fn) if results_dir is not None else None
    keys = [store.key_for(i, it, key) for i, it in enumerate(items)] if store else []
    if key is not None:
        _refuse_duplicate_keys(keys)

    todo: list[tuple[int, Any]] = []
    found: list[tuple[int, Any]] = []
    for index, item in enumerate(items):
        hit, value = store.load(keys[index]) if store else (False, None)
        (found if hit else todo).append((index, value) if hit else (index, item))
    if store is not None and store.rejected:
        shown = ", ".join(f"{k[:12]}{_SUFFIX}" for k in store.rejected[:3])
        more = f" and {len(store.rejected) - 3} more" if len(store.rejected) > 3 else ""
        warnings.warn(
            f"results_dir {str(store.path)!r}: {len(store.rejected)} stored result(s) failed "
            f"verification and are recomputed ({shown}{more}): altered, or written with another "
            "user's key",
            ResultsRejectedWarning,
            stacklevel=2,
        )
    if executor is None or isinstance(executor, cf.ProcessPoolExecutor):
        for index, item in todo:  # the local pool and process pools send items by pickle
            check_picklable(index, item)

    with progress_bar(len(items), description, progress and len(items) > 0) as update:
        if found:
            update(len(found), resumed=len(found))
        yield from found
        if not todo:
            return
        if executor is not None:
            results = executor_results(
                executor,
                fn_sent,
                setup_sent,
                todo,
                workers or executor_width(executor),
                retries,
                timeout,
            )
        elif _pool is not None:
            results = _pool.results(fn_sent, todo)
        else:
            n = min(workers or os.cpu_count() or 1, len(todo))
            pool = LocalPool(
                n,
                setup_sent,
                retries=retries,
                timeout=timeout,
                threads_per_worker=threads_per_worker or max(1, (os.cpu_count() or 1) // n),
            )
            results = _closing(pool, pool.results(fn_sent, todo))
        t0, done = time.perf_counter(), 0
        for index, result, _seconds in results:
            if store is not None:
                try:
                    store.save(keys[index], result)
                except Exception as exc:  # noqa: BLE001 - e.g. a thread pool's unpicklable result
                    raise TaskError(
                        index, items[index], f"returned a result results_dir cannot store: {exc}"
                    ) from None
            done += 1
            update(items_s=f"{done / (time.perf_counter() - t0):.1f}")
            yield index, result


class ResultsRejectedWarning(UserWarning):
    """Stored results in a ``results_dir`` failed verification; those items are recomputed."""


def _as_list(items: Iterable[Any]) -> list[Any]:
    # A string is iterable, but mapping over its characters is never what was meant.
    if isinstance(items, (str, bytes)) or not hasattr(items, "__iter__"):
        hint = " (for one item, pass [item])" if isinstance(items, (str, bytes)) else ""
        raise TypeError(
            f"items must be an iterable of work items (a list, range, generator...), got "
            f"{type(items).__name__} {items!r:.80}{hint}"
        )
    return list(items)


def _refuse_duplicate_keys(keys: list[str]) -> None:
    first: dict[str, int] = {}
    for index, k in enumerate(keys):
        if k in first:
            raise ValueError(
                f"key(item) returned {k!r} for both item {first[k]} and item {index}; keys name "
                "stored results, so each item needs its own"
            )
        first[k] = index


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
    items = _as_list(items)
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
    if timeout is not None and (
        not isinstance(timeout, numbers.Real) or isinstance(timeout, bool) or not timeout > 0
    ):
        raise ValueError(f"timeout must be positive seconds or None, got {timeout!r}")
    if threads_per_worker is not None and (
        not isinstance(threads_per_worker, int)
        or isinstance(threads_per_worker, bool)
        or threads_per_worker < 1
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
        items = _as_list(items)
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
