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

import functools
import os
import pickle
import select
import signal
import sys
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from plait.tasks.errors import callable_name, describe_item

__all__ = ["dumps_callable", "check_picklable", "call_item", "local_worker_main"]

_NO_SETUP = object()


def dumps_callable(obj: Callable, what: str) -> bytes:
    """Pickle ``fn`` or ``setup`` up front, so a bad one fails before any process starts.

    Plain pickle first (a module-level function travels by name); then ``cloudpickle``, when
    installed, for lambdas, nested functions and functions of an interactive ``__main__``.

    Raises:
        TypeError: in one line naming the function, why it cannot travel and what can.
    """
    name = f"{what}={callable_name(obj)}"
    if not _in_fileless_main(obj):
        try:
            return pickle.dumps(obj)
        except Exception as exc:  # noqa: BLE001 - PicklingError, AttributeError, TypeError...
            first = exc
    else:
        first = "it is defined in an interactive session, which worker processes cannot import"
    try:
        import cloudpickle  # optional: lambdas and closures (installed with dask)
    except ImportError:
        raise TypeError(
            f"{name} cannot be sent to worker processes ({_one_line(first)}); pass a function "
            "defined at module level (functools.partial for its arguments), or install "
            "cloudpickle for lambdas and nested functions"
        ) from None
    try:
        return cloudpickle.dumps(obj)
    except Exception as exc:  # noqa: BLE001
        raise TypeError(
            f"{name} cannot be sent to worker processes ({_one_line(exc)}): something it refers "
            "to (a closure variable, default or partial argument) cannot be pickled; pass a "
            "module-level function with picklable arguments, and create locks, open files, "
            "connections or models inside it or in setup="
        ) from None


def check_picklable(index: int, item: Any) -> None:
    """Raise ``TypeError`` (one line) if ``item`` cannot be pickled for a worker process."""
    try:
        pickle.Pickler(_Discard(), protocol=pickle.HIGHEST_PROTOCOL).dump(item)
    except Exception as exc:  # noqa: BLE001
        raise TypeError(
            f"{describe_item(index, item)} cannot be sent to worker processes "
            f"({_one_line(exc)}); items must be picklable data (numbers, strings, containers, "
            "arrays, tensors, module-level classes), not locks, open files, generators or "
            "lambdas"
        ) from None


class _Discard:
    """A file that forgets what is written: pickling an item to check it costs no memory."""

    def write(self, data) -> int:
        return len(data)


def _one_line(exc: Any) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _in_fileless_main(obj: Any) -> bool:
    """Whether ``obj`` is a function of a ``__main__`` that has no file (``python -c``, a REPL):
    pickled by name it would fail in every worker, so it must travel by value."""
    while isinstance(obj, functools.partial):
        obj = obj.func
    main = sys.modules.get("__main__")
    return getattr(obj, "__module__", None) == "__main__" and not getattr(main, "__file__", None)


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


_FN_CACHE: OrderedDict[bytes, Callable] = OrderedDict()


def _loads_callable(obj: Callable | bytes) -> Callable:
    """``fn``/``setup`` as :func:`dumps_callable` sent it (bytes), or as given (a thread pool)."""
    if not isinstance(obj, bytes):
        return obj
    with _SETUP_LOCK:
        if obj not in _FN_CACHE:
            _FN_CACHE[obj] = pickle.loads(obj)
            while len(_FN_CACHE) > 2 * _SETUP_CACHE_SIZE:
                _FN_CACHE.popitem(last=False)
        _FN_CACHE.move_to_end(obj)
        return _FN_CACHE[obj]


def call_item(job: str, fn: Callable | bytes, setup: Callable | bytes | None, item: Any) -> tuple:
    """Run one item on an executor's worker: ``("ok", result, seconds, pid)`` or ``("err", ...)``.

    ``fn`` and ``setup`` come pickled by :func:`dumps_callable` (so lambdas travel to any process
    pool the same way), or as plain callables for a thread pool.
    """
    try:
        setup = None if setup is None else _loads_callable(setup)
        state = _NO_SETUP if setup is None else _cached_setup(job, setup)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent as data
        _, message, tb = _failure(exc)
        return ("setup_err", message, tb)
    t0 = time.perf_counter()
    try:
        result = _apply(_loads_callable(fn), state, item)
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

    _watch_parent(conn)
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


def _watch_parent(conn) -> None:
    """SIGKILL this worker the moment the parent's end of its pipe closes, even mid-item.

    The parent is the only process holding that end (workers fork from the forkserver, which
    closes its copy), so the hang-up means the parent died, however it died (SIGKILL, SIGTERM,
    OOM) or closed the pool. (``PR_SET_PDEATHSIG`` would not do: a worker's parent is the
    forkserver, which outlives the launching process while any worker holds its alive pipe.)
    Only hang-ups are polled for (``POLLRDHUP``), so the parent's messages never wake the thread.
    """
    poller = select.poll()
    poller.register(conn.fileno(), getattr(select, "POLLRDHUP", 0))
    gone = getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR

    def watch() -> None:
        while True:
            for _, events in poller.poll():
                if events & select.POLLNVAL:
                    return  # the worker itself closed the pipe: it is exiting anyway
                if events & gone:
                    os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="plait-parent-watch", daemon=True).start()
