"""What runs inside a worker: call ``fn`` on items, once ``setup`` has run in that process.

Two entry points share one rule, *setup runs once per worker process and is reused*:

- :func:`local_worker_main`, the loop of a :class:`~plait.tasks.pool.LocalPool` process: it gets
  one pickled item at a time over its pipe and answers with the pickled result or the traceback.
- :func:`call_item`, what is submitted to any ``concurrent.futures.Executor`` (Dask included): it
  keeps setup's value in a per-process cache keyed by the job, so a process that serves many items
  of a job builds its model once.

Results and errors travel as plain data (``("ok", value)`` / ``("err", message, traceback)``) so
the parent can tell "fn raised" (reported, not retried) from "the worker died" (retried).
"""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

__all__ = ["dumps_callable", "call_item", "local_worker_main"]

_NO_SETUP = object()


def dumps_callable(obj: Callable, what: str) -> bytes:
    """Pickle ``fn`` or ``setup`` up front, so a bad one fails before any process starts."""
    try:
        return pickle.dumps(obj)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        try:
            import cloudpickle  # optional: lambdas and closures (installed with dask)
        except ImportError:
            raise TypeError(
                f"{what}={obj!r} cannot be pickled for worker processes ({exc}); define it at "
                "module level, or install cloudpickle for lambdas and nested functions"
            ) from None
        return cloudpickle.dumps(obj)


def _apply(fn: Callable, state: Any, item: Any) -> Any:
    return fn(item) if state is _NO_SETUP else fn(state, item)


def _failure(exc: BaseException) -> tuple[str, str, str]:
    return ("err", f"raised {type(exc).__name__}: {exc}", traceback.format_exc())


# ---- executor path -------------------------------------------------------------------------

# job id -> setup's value. Small and LRU: a long-lived Dask worker serves many jobs, and only
# the few most recent are worth keeping a model around for.
_SETUP_CACHE: OrderedDict[str, Any] = OrderedDict()
_SETUP_CACHE_SIZE = 4
_SETUP_LOCK = threading.Lock()  # a Dask worker runs tasks on several threads


def _cached_setup(job: str, setup: Callable[[], Any]) -> Any:
    with _SETUP_LOCK:
        if job in _SETUP_CACHE:
            _SETUP_CACHE.move_to_end(job)
            return _SETUP_CACHE[job]
        state = setup()
        _SETUP_CACHE[job] = state
        while len(_SETUP_CACHE) > _SETUP_CACHE_SIZE:
            _SETUP_CACHE.popitem(last=False)
        return state


def call_item(job: str, fn: Callable, setup: Callable | None, item: Any) -> tuple:
    """Run one item on an executor's worker: ``("ok", result, seconds, pid)`` or ``("err", ...)``."""
    try:
        state = _NO_SETUP if setup is None else _cached_setup(job, setup)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent as data
        _, message, tb = _failure(exc)
        return ("setup_err", message, tb)
    t0 = time.perf_counter()
    try:
        result = _apply(fn, state, item)
    except BaseException as exc:  # noqa: BLE001
        return _failure(exc)
    return ("ok", result, time.perf_counter() - t0, os.getpid())


# ---- local pool path -----------------------------------------------------------------------


def local_worker_main(setup_bytes: bytes | None, threads: int | None, conn) -> None:
    """The loop of one local pool worker.

    Messages in: pickled ``(fn_bytes, index, item)``, or ``b""`` to stop. ``fn`` travels with
    every item (a module-level function pickles to a few dozen bytes) and is unpickled only when
    it changes, so one pool serves job after job while ``setup``'s state stays built.

    Messages out (pickled): ``("ok", index, result, seconds)``, ``("err", index, message, tb)``
    or ``("setup_err", None, message, tb)``.
    """
    from plait.alloc import keep_freed_memory
    from plait.launch import _die_with_parent

    _die_with_parent()
    keep_freed_memory()
    # Ctrl-C reaches the whole process group; the parent decides what happens, not each worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    try:
        state = _NO_SETUP if setup_bytes is None else pickle.loads(setup_bytes)()
    except BaseException as exc:  # noqa: BLE001
        _, message, tb = _failure(exc)
        conn.send_bytes(pickle.dumps(("setup_err", None, message, tb)))
        return
    fn_bytes, fn = b"", None
    while True:
        try:
            msg = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the parent is gone or closed the pipe
        if not msg:
            return
        t0 = time.perf_counter()
        index = None
        try:
            new_fn_bytes, index, item = pickle.loads(msg)
            if new_fn_bytes != fn_bytes:
                fn, fn_bytes = pickle.loads(new_fn_bytes), new_fn_bytes
            result = _apply(fn, state, item)
            reply = pickle.dumps(("ok", index, result, time.perf_counter() - t0))
        except BaseException as exc:  # noqa: BLE001 - includes an unpicklable result
            _, message, tb = _failure(exc)
            reply = pickle.dumps(("err", index, message, tb))
        conn.send_bytes(reply)
