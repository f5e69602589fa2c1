"""The ways a task job fails, each naming the work item it failed on."""

from __future__ import annotations

import functools
import reprlib
from typing import Any

__all__ = ["TaskError", "WorkerLostError", "SetupError", "describe_item", "callable_name"]

_repr = reprlib.Repr()
_repr.maxstring = 80
_repr.maxother = 80


def describe_item(index: int, item: Any) -> str:
    """``item 3 ('abc')``: the index and a short repr, for error messages."""
    return f"item {index} ({_repr.repr(item)})"


def callable_name(fn: Any) -> str:
    """``module.qualname`` of a function (of the function inside a ``functools.partial``)."""
    while isinstance(fn, functools.partial):  # name the function, not "functools.partial"
        fn = fn.func
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


class TaskError(RuntimeError):
    """``fn`` raised on a work item.

    Attributes:
        index: position of the item in the input.
        item: the item itself.
        worker_traceback: the traceback formatted in the worker.
    """

    def __init__(self, index: int, item: Any, message: str, worker_traceback: str = ""):
        self.index = index
        self.item = item
        self.worker_traceback = worker_traceback
        text = f"{describe_item(index, item)} {message}"
        if worker_traceback:
            text += f"\n\n--- traceback in the worker ---\n{worker_traceback.rstrip()}"
        super().__init__(text)


class WorkerLostError(TaskError):
    """The worker running an item died (or timed out) on every allowed attempt.

    Attributes (besides :class:`TaskError`'s): ``attempts``, how many times the item was tried.
    """

    def __init__(self, index: int, item: Any, attempts: int, how: str):
        self.attempts = attempts
        super().__init__(
            index,
            item,
            f"lost its worker on all {attempts} attempts (last: {how}); raise `retries` if "
            "the deaths are transient, otherwise the item itself kills its worker",
        )


class SetupError(RuntimeError):
    """The per-worker ``setup`` raised (or its worker kept dying before running any item)."""

    def __init__(self, message: str, worker_traceback: str = ""):
        self.worker_traceback = worker_traceback
        text = message
        if worker_traceback:
            text += f"\n\n--- traceback in the worker ---\n{worker_traceback.rstrip()}"
        super().__init__(text)
