"""Resumable results: one signed file per finished item, named by a fingerprint of the item.

**Keys.** A result is stored as ``<fingerprint>.result``, where the fingerprint is a SHA-256 of
the function's qualified name and of the item's *content* (:func:`fingerprint`), not of its
position: a rerun with items changed, reordered or extended reuses exactly the results of items
that are still there and computes the rest, and never returns a result of another item. Content
is read for the values work items are made of (None, bool, int, float, complex, str, bytes,
tuples, lists, dicts, sets, dataclasses, named tuples, enums, paths, numpy arrays, torch tensors),
canonically (dict and set order, ``PYTHONHASHSEED`` and tensor device do not matter); any other
type is refused before the job starts, with ``key=`` as the way out (``key(item)`` names each
result; then the caller promises that equal keys mean equal items). The fingerprint covers the
function's *name* only: after changing what a function computes (its code, or the arguments of
a ``functools.partial``), use a fresh ``results_dir``.

**Integrity, and why results are safe to load.** Results are arbitrary Python objects, so they are
pickled, and unpickling runs code named in the file. A file is therefore unpickled only if it
carries a valid HMAC-SHA256 made with a secret key that does not live in ``results_dir``: 32
random bytes in ``$PLAIT_STATE_DIR/tasks-results.key`` (default ``$XDG_STATE_HOME/plait``, else
``~/.local/state/plait``), created on first use in a directory and file only the user may read
(0700 / 0600, checked on every use). The MAC covers the function name, the file's key and the
pickle bytes, so someone who can write to ``results_dir`` but cannot read that key cannot make
plait unpickle anything: a planted, altered, renamed or truncated file fails the check *before*
any byte of it is unpickled, and is recomputed (and overwritten) with one warning line. Someone
who can read the key file is already the user. The price: results are trusted only by runs that
use the same key, i.e. the same user and state directory; a ``results_dir`` copied to another
user or machine (without the key file), or written by plait before this format, is recomputed.
Deleting the key file invalidates every stored result. (Safe-by-format alternatives such as JSON
and ``torch.load(weights_only=True)`` would restrict what ``fn`` may return; the MAC does not.)

**Atomicity.** Each result is written the moment it arrives, via a dot-named temp file in the same
directory and ``os.replace`` (atomic on POSIX): a file with a result's name is always a whole
result, so after an interruption (Ctrl-C, SIGKILL, power loss) a rerun loads every file that
verifies and computes only the missing items. Temp files left by an interrupted write are
ignored (and cleared on the next open).

A small ``plait-tasks.json`` records the function the results came from; a rerun with another
function is refused instead of silently mixing results of two different jobs.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import json
import os
import pathlib
import pickle
import re
import secrets
import stat
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from plait.tasks.errors import callable_name, describe_item

__all__ = ["ResultStore", "fingerprint", "results_key", "UnfingerprintableError"]

_MANIFEST = "plait-tasks.json"
_FORMAT = 2
_SUFFIX = ".result"
_MAGIC = b"plait-task-result-2\n"
_TAG = 32  # bytes of HMAC-SHA256
_KEY_FILE = "tasks-results.key"
_SAFE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


# ---- fingerprints -----------------------------------------------------------------------------


class UnfingerprintableError(TypeError):
    """An item holds a value whose content plait cannot hash stably (pass ``key=`` instead)."""


def fingerprint(fn: Callable | str, item: Any) -> str:
    """A stable hex digest of ``fn``'s qualified name and ``item``'s content.

    Equal content gives equal fingerprints in every process and on every run (dict and set
    order, hash seeds and tensor devices do not enter); ``1``, ``1.0`` and ``True`` differ, as do
    tensors of another dtype or shape. Raises :class:`UnfingerprintableError` for a type whose
    content is not read (see the module docstring), naming where in the item it sits.

    Example::

        fingerprint(score, {"prompt": "hi", "ids": torch.tensor([1, 2])})  # '3f0c...'
    """
    name = fn if isinstance(fn, str) else callable_name(fn)
    h = hashlib.sha256(b"plait-tasks-item-1\0" + name.encode() + b"\0")
    _encode(h, item, "item", set())
    return h.hexdigest()


def _put(h, tag: bytes, data: bytes | memoryview = b"") -> None:
    h.update(tag + len(data).to_bytes(8, "little"))
    h.update(data)


def _sub(x: Any, where: str, active: set) -> bytes:
    h = hashlib.sha256()
    _encode(h, x, where, active)
    return h.digest()


def _encode(h, x: Any, where: str, active: set) -> None:  # noqa: C901 - one case per type
    t = type(x)
    if x is None:
        _put(h, b"N")
    elif t is bool:
        _put(h, b"B", b"1" if x else b"0")
    elif t is int:
        _put(h, b"I", str(x).encode())
    elif t is float:
        _put(h, b"F", struct.pack("<d", x))
    elif t is complex:
        _put(h, b"C", struct.pack("<dd", x.real, x.imag))
    elif t is str:
        _put(h, b"S", x.encode("utf-8", "surrogatepass"))
    elif t is bytes or t is bytearray:
        _put(h, b"Y" if t is bytes else b"A", bytes(x))
    elif isinstance(x, enum.Enum):
        _put(h, b"E", f"{t.__module__}.{t.__qualname__}.{x.name}".encode())
    elif isinstance(x, pathlib.PurePath):
        _put(h, b"P", f"{t.__name__}:{x}".encode())
    elif t in (tuple, list) or (isinstance(x, tuple) and hasattr(t, "_fields")):
        with _visiting(x, where, active):
            tag = b"T" if t is tuple else b"L" if t is list else b"n" + _qualname(t)
            _put(h, tag, len(x).to_bytes(8, "little"))
            for i, v in enumerate(x):
                _encode(h, v, f"{where}[{i}]", active)
    elif t is dict:
        with _visiting(x, where, active):
            entries = sorted(
                _sub(k, f"{where} key {k!r}", active) + _sub(v, f"{where}[{k!r}]", active)
                for k, v in x.items()
            )
            _put(h, b"D", b"".join(entries))
    elif t is set or t is frozenset:
        with _visiting(x, where, active):
            parts = sorted(_sub(v, f"{where} element", active) for v in x)
            _put(h, b"s" if t is set else b"f", b"".join(parts))
    elif dataclasses.is_dataclass(x) and not isinstance(x, type):
        with _visiting(x, where, active):
            _put(h, b"K", _qualname(t))
            for f in dataclasses.fields(x):
                _put(h, b"k", f.name.encode())
                _encode(h, getattr(x, f.name), f"{where}.{f.name}", active)
    elif _is_tensor(x):
        _encode_tensor(h, x, where)
    elif _is_numpy(x):
        _encode_numpy(h, x, where)
    else:
        raise UnfingerprintableError(
            f"cannot fingerprint {where}, a {t.__module__}.{t.__qualname__}"
        )


class _visiting:
    """Refuse reference cycles (``a = []; a.append(a)``) instead of recursing forever."""

    def __init__(self, x, where, active):
        self.key, self.where, self.active = id(x), where, active

    def __enter__(self):
        if self.key in self.active:
            raise UnfingerprintableError(f"cannot fingerprint {self.where}: it contains itself")
        self.active.add(self.key)

    def __exit__(self, *exc):
        self.active.discard(self.key)


def _qualname(t: type) -> bytes:
    return f"{t.__module__}.{t.__qualname__}".encode()


def _is_tensor(x) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _is_numpy(x) -> bool:
    np = sys.modules.get("numpy")
    return np is not None and isinstance(x, (np.ndarray, np.generic))


def _encode_tensor(h, x, where: str) -> None:
    import torch

    if x.layout != torch.strided or x.is_quantized or x.device.type == "meta":
        raise UnfingerprintableError(
            f"cannot fingerprint {where}, a {x.layout} {x.device.type} tensor (only dense "
            "tensors with data are read)"
        )
    flat = x.detach().resolve_conj().resolve_neg().cpu().contiguous().reshape(-1)
    raw = memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else b""
    _put(h, b"t", f"{x.dtype}:{tuple(x.shape)}".encode())
    _put(h, b"d", raw)


def _encode_numpy(h, x, where: str) -> None:
    import numpy as np

    if x.dtype.hasobject:
        raise UnfingerprintableError(f"cannot fingerprint {where}, a numpy array of Python objects")
    a = np.ascontiguousarray(x)
    _put(h, b"a" if isinstance(x, np.ndarray) else b"g", f"{a.dtype.str}:{a.shape}".encode())
    _put(h, b"d", a.tobytes())


# ---- the key ----------------------------------------------------------------------------------


def _state_dir() -> Path:
    env = os.environ.get("PLAIT_STATE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "plait"


def results_key() -> bytes:
    """The user's secret key for signing stored results (created on first use; see module doc).

    Raises:
        PermissionError: the key or its directory could be read or replaced by other users, in
            one line saying which and how to fix it.
    """
    folder = _state_dir()
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.stat(folder)
    except OSError as exc:
        raise PermissionError(
            f"cannot create plait's state directory {str(folder)!r} for the key that signs task "
            f"results ({exc.strerror or exc}); set PLAIT_STATE_DIR to a private writable directory"
        ) from None
    if _others_may_touch(st, 0o022):
        raise PermissionError(
            f"plait's state directory {str(folder)!r} is writable by other users or not yours, "
            "so the key that signs task results there could be replaced; `chmod 700` it, or set "
            "PLAIT_STATE_DIR to a private directory"
        )
    path = folder / _KEY_FILE
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        _create_key(path)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        key = f.read(_TAG + 1)
    if not stat.S_ISREG(st.st_mode) or _others_may_touch(st, 0o077) or len(key) != _TAG:
        raise PermissionError(
            f"the key that signs task results, {str(path)!r}, must be a {_TAG}-byte file only you "
            "can read (chmod 600); delete it to make a new one (stored results are then recomputed)"
        )
    return key


def _others_may_touch(st: os.stat_result, mask: int) -> bool:
    mine = not hasattr(os, "getuid") or st.st_uid == os.getuid()
    return not mine or bool(st.st_mode & mask)


def _create_key(path: Path) -> None:
    # Written whole to a private temp file, then linked into place: a concurrent job that wins
    # the race keeps its key, and nobody ever reads a half-written one.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(_TAG))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # a concurrent job made the key first: use that one
        except OSError:  # a file system without hard links
            if not path.exists():
                os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---- the store --------------------------------------------------------------------------------


class ResultStore:
    """A directory of finished results, keyed by item fingerprint (or by a ``key(item)`` string).

    Example::

        store = ResultStore("out/", fn=score)
        k = store.key_for(3, batch)        # the fingerprint of (score, batch)
        store.save(k, 0.25)
        store.load(k)                      # (True, 0.25)

    Attributes:
        rejected: keys of stored files that failed verification in :meth:`load` (they are
            treated as missing, so the item is recomputed and the file overwritten).
    """

    def __init__(self, path: str | os.PathLike, fn: Callable):
        self.path = Path(path)
        self.fn_name = callable_name(fn)
        self.rejected: list[str] = []
        self._key = results_key()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".probe.{os.getpid()}.tmp"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ValueError(
                f"results_dir {str(self.path)!r} is not a writable directory "
                f"({exc.strerror or exc})"
            ) from None
        manifest = self.path / _MANIFEST
        if manifest.exists():
            try:
                recorded = json.loads(manifest.read_text())
                recorded_fn, recorded_format = recorded.get("fn"), recorded.get("format")
            except (ValueError, AttributeError, UnicodeDecodeError):
                raise ValueError(
                    f"results_dir {str(self.path)!r} has an unreadable {_MANIFEST}; use a fresh "
                    "directory (or delete that file to reuse this one)"
                ) from None
            if recorded_fn != self.fn_name:
                raise ValueError(
                    f"results_dir {str(self.path)!r} holds results of {recorded_fn!r}, not "
                    f"{self.fn_name!r}; use a fresh directory for a different function"
                )
            if recorded_format != _FORMAT:  # older files (index-keyed, unsigned) are not read
                self._write_manifest(manifest)
        else:
            self._write_manifest(manifest)
        for stale in self.path.glob(".*.tmp"):
            stale.unlink(missing_ok=True)

    def _write_manifest(self, manifest: Path) -> None:
        self._write_atomic(manifest, json.dumps({"fn": self.fn_name, "format": _FORMAT}).encode())

    def key_for(self, index: int, item: Any, key: Callable[[Any], str] | None = None) -> str:
        """The file stem for an item: its fingerprint, or ``key(item)`` when given.

        Raises:
            ValueError: ``key(item)`` is not a safe file name, or ``item`` cannot be fingerprinted
                (one line naming the item, the offending value and the way out).
        """
        if key is None:
            try:
                return fingerprint(self.fn_name, item)
            except (UnfingerprintableError, RecursionError) as exc:
                why = str(exc) if isinstance(exc, UnfingerprintableError) else "nested too deep"
                raise ValueError(
                    f"results_dir keys each result by a hash of its item's content, but "
                    f"{describe_item(index, item)}: {why}; items may hold None, bool, int, float, "
                    "complex, str, bytes, tuples, lists, dicts, sets, dataclasses, enums, paths, "
                    "numpy arrays and torch tensors; otherwise pass key= to name each result"
                ) from None
        k = key(item)
        if not isinstance(k, str) or not _SAFE_KEY.match(k):
            raise ValueError(
                f"key(item) for item {index} returned {k!r}; keys must be strings of letters, "
                "digits, '.', '_' or '-' (not starting with '.' or '-'), at most 200 characters"
            )
        return k

    def _file(self, key: str) -> Path:
        return self.path / f"{key}{_SUFFIX}"

    def _mac(self, key: str, payload: bytes) -> bytes:
        message = b"\0".join([_MAGIC, self.fn_name.encode(), key.encode(), payload])
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def load(self, key: str) -> tuple[bool, Any]:
        """``(True, result)`` if ``key`` is stored and verifies, else ``(False, None)``.

        Nothing is unpickled unless the file's MAC verifies; a file that fails is recorded in
        :attr:`rejected` and reported as missing.
        """
        try:
            data = self._file(key).read_bytes()
        except FileNotFoundError:
            return False, None
        head = len(_MAGIC) + _TAG
        tag, payload = data[len(_MAGIC) : head], data[head:]
        if not data.startswith(_MAGIC) or not hmac.compare_digest(tag, self._mac(key, payload)):
            self.rejected.append(key)
            return False, None
        return True, pickle.loads(payload)  # verified: written by this user's plait

    def save(self, key: str, result: Any) -> None:
        """Store ``result`` under ``key``, signed, atomically."""
        payload = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
        self._write_atomic(self._file(key), _MAGIC + self._mac(key, payload) + payload)

    def _write_atomic(self, target: Path, data: bytes) -> None:
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, target)
