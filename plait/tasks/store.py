"""Resumable results: one file per finished item, written atomically.

A job given ``results_dir`` writes each result the moment it arrives, as ``<key>.pkl`` via a temp
file in the same directory and ``os.replace`` (atomic on POSIX): a file with a result's name is
always a whole result, so after an interruption (Ctrl-C, SIGKILL, power loss) a rerun trusts every
file it finds and computes only the missing items. Temp files left by an interrupted write start
with a dot and are ignored (and cleared on the next open).

A small ``plait-tasks.json`` records the function the results came from; a rerun with another
function is refused instead of silently mixing results of two different jobs.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["ResultStore"]

_MANIFEST = "plait-tasks.json"
_SAFE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def _fn_name(fn: Callable) -> str:
    while isinstance(fn, functools.partial):  # name the function, not "functools.partial"
        fn = fn.func
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


class ResultStore:
    """A directory of finished results, keyed by item index (or by a ``key(item)`` string).

    Example::

        store = ResultStore("out/", fn=score)
        store.save("00000003", 0.25)
        store.load("00000003")   # (True, 0.25)
    """

    def __init__(self, path: str | os.PathLike, fn: Callable):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        manifest = self.path / _MANIFEST
        name = _fn_name(fn)
        if manifest.exists():
            recorded = json.loads(manifest.read_text()).get("fn")
            if recorded != name:
                raise ValueError(
                    f"results_dir {str(self.path)!r} holds results of {recorded!r}, not {name!r}; "
                    "use a fresh directory for a different function"
                )
        else:
            self._write_atomic(manifest, json.dumps({"fn": name, "format": 1}).encode())
        for stale in self.path.glob(".*.tmp"):
            stale.unlink(missing_ok=True)

    @staticmethod
    def key_for(index: int, item: Any, key: Callable[[Any], str] | None) -> str:
        """The file stem for an item: its zero-padded index, or ``key(item)`` when given."""
        if key is None:
            return f"{index:08d}"
        k = key(item)
        if not isinstance(k, str) or not _SAFE_KEY.match(k):
            raise ValueError(
                f"key(item) for item {index} returned {k!r}; keys must be strings of letters, "
                "digits, '.', '_' or '-' (not starting with '.' or '-'), at most 200 characters"
            )
        return k

    def _file(self, key: str) -> Path:
        return self.path / f"{key}.pkl"

    def load(self, key: str) -> tuple[bool, Any]:
        """``(True, result)`` if ``key`` is stored, else ``(False, None)``."""
        try:
            data = self._file(key).read_bytes()
        except FileNotFoundError:
            return False, None
        return True, pickle.loads(data)

    def save(self, key: str, result: Any) -> None:
        self._write_atomic(self._file(key), pickle.dumps(result))

    def _write_atomic(self, target: Path, data: bytes) -> None:
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, target)
