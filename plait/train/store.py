"""Checkpoint files: safetensors shards and a JSON manifest, verified before anything is loaded.

A checkpoint is a directory ``step-NNNNNNNN/`` holding

- ``rankNNNNN.safetensors``: the tensors one rank wrote (each key is written by exactly one rank:
  the lowest that holds it), and
- ``plait.json``, the manifest: the format number, the step, every file's SHA-256 and size, where
  each tensor is (file, shape, dtype), plain values (JSON), and what the caller records about the
  run (:func:`plait.train.loop.checkpoint_record`: model, layers, dtype, mesh, the run's
  settings and the model's parameter shapes).

Nothing in it is unpickled: tensors are read by safetensors, everything else is JSON. Loading
verifies the manifest and each file's checksum first (:func:`verify_checkpoint`), so a flipped
byte, a truncated or missing file is refused with one line naming the file, and
:func:`newest_verified` falls back to the newest checkpoint that verifies.

Atomicity: files are written into ``step-NNNNNNNN.partial/`` (each fsynced) and the directory is
renamed only after every rank has finished and the manifest is on disk. A save that fails
(disk full, permissions) removes its ``.partial`` and raises :class:`CheckpointError`, on every
rank alike: each rank's outcome travels with the collective that follows it, so a failure on one
rank never leaves the others waiting in a collective it has left.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

__all__ = [
    "CheckpointError",
    "FORMAT",
    "META_FILE",
    "save_checkpoint",
    "load_checkpoint",
    "verify_checkpoint",
    "latest_checkpoint",
    "newest_verified",
    "find_checkpoint",
    "checkpoint_meta",
    "checkpoint_keys",
    "checkpoint_tensors",
    "check_checkpoint_dir",
    "write_manifest",
]

FORMAT = 2
META_FILE = "plait.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_SHARD = "rank{:05d}.safetensors"


class CheckpointError(ValueError):
    """A checkpoint cannot be written, or is not what its manifest says (one line, naming it)."""


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"unknown tensor dtype {name!r} in the manifest")
    return dtype


# --- writing -------------------------------------------------------------------------------


def save_checkpoint(
    directory: str | os.PathLike, step: int, state: dict, keep: int = 3, meta: dict | None = None
) -> Path:
    """Save ``state`` (tensors, and JSON values) as ``directory/step-<step>`` on every rank.

    Collective: every rank calls it with its own part of the state; a key held by several ranks
    must hold the same value on each (the lowest rank writes it). ``meta`` (rank 0's) goes into
    the manifest. Keeps the newest ``keep`` checkpoints up to this step. Checkpoints of later
    steps belong to a run this one has branched from (it resumed from an older step): they are
    renamed ``abandoned-step-<N>`` (kept, but never resumed from by default).
    """
    if not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an integer >= 1 (checkpoints kept), got {keep!r}")
    root = Path(directory)
    final = root / f"step-{step:08d}"
    partial = root / f"step-{step:08d}.partial"
    rank = _rank()
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    values = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    try:
        json.dumps(values)
    except TypeError as e:
        raise CheckpointError(f"checkpoint values must be tensors or JSON values: {e}") from e
    # Every rank learns of a failure on any rank at the next collective and raises the same
    # error there, so none is left waiting in a collective its peers have abandoned.
    error = None
    if rank == 0:
        try:
            _prepare(root, partial)
        except CheckpointError as e:
            error = str(e)
    _agree(error, f"could not start checkpoint {final}")
    owners = _owners(sorted(tensors))
    mine = {k: v for k, v in tensors.items() if owners[k] == rank}
    info = error = None
    try:
        if mine:
            info = _write_shard(partial / _SHARD.format(rank), mine)
    except Exception as e:  # noqa: BLE001 - disk full, quota, I/O: safetensors' or the OS's
        error = f"{_SHARD.format(rank)}: {e}"
    gathered = _gather((info, error))
    failed = [(r, err) for r, (_, err) in enumerate(gathered) if err is not None]
    if failed:
        if rank == 0:  # every rank is done writing: nothing writes into it any more
            shutil.rmtree(partial, ignore_errors=True)
        raise CheckpointError(
            _failure(f"could not write checkpoint {partial}", failed) + "; removed it"
        )
    error = None
    if rank == 0:
        error = _finish(root, partial, final, step, keep, meta, values, gathered)
    _agree(error, f"could not complete checkpoint {final}")
    return final


def _finish(root, partial, final, step, keep, meta, values, gathered) -> str | None:
    """Rank 0: write the manifest, publish the checkpoint, rotate; the error, if any."""
    manifest = {
        **(meta or {}),
        "format": FORMAT,
        "step": step,
        "files": {},
        "tensors": {},
        "values": {**values, "step": step},
    }
    for item, _ in gathered:
        if item is None:
            continue
        name, digest, size, index = item
        manifest["files"][name] = {"sha256": digest, "bytes": size}
        for key, (shape, dtype) in index.items():
            manifest["tensors"][key] = {"file": name, "shape": shape, "dtype": dtype}
    try:
        write_manifest(partial, manifest)
        _fsync_dir(partial)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(root)
    except OSError as e:
        shutil.rmtree(partial, ignore_errors=True)
        return f"{e}; removed {partial}"
    steps = sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name))
    for later in (p for p in steps if p.name > final.name):
        _set_aside(later)
    for old in [p for p in steps if p.name <= final.name][:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return None


def _gather(obj) -> list:
    """``obj`` of every rank (a list of one without a process group)."""
    if not _dist():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _failure(what: str, failed: list[tuple[int, str]]) -> str:
    return what + ": " + "; ".join(f"rank {r}: {err}" for r, err in failed)


def _agree(error: str | None, what: str) -> None:
    """Raise the same CheckpointError on every rank when any rank passes an error."""
    failed = [(r, err) for r, err in enumerate(_gather(error)) if err is not None]
    if failed:
        raise CheckpointError(_failure(what, failed))


def _set_aside(path: Path) -> None:
    """Rename a checkpoint of an abandoned later step out of the way (``abandoned-<name>``, or
    ``abandoned-<name>.<k>`` when that exists)."""
    target, k = path.with_name(f"abandoned-{path.name}"), 1
    while target.exists():
        target, k = path.with_name(f"abandoned-{path.name}.{k}"), k + 1
    os.replace(path, target)


def _prepare(root: Path, partial: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    except OSError as e:
        raise CheckpointError(f"could not create checkpoint directory {partial}: {e}") from e


def _owners(keys: list[str]) -> dict[str, int]:
    """Which rank writes each key: the lowest rank that holds it."""
    if not _dist():
        return dict.fromkeys(keys, 0)
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, keys)
    owners: dict[str, int] = {}
    for rank, ks in enumerate(every):
        for k in ks:
            owners.setdefault(k, rank)
    return owners


def _write_shard(path: Path, tensors: dict[str, torch.Tensor]):
    from safetensors.torch import save_file

    seen: set[int] = set()
    out = {}
    for k, t in tensors.items():
        t = t.detach().contiguous()
        if t.numel() and t.data_ptr() in seen:  # safetensors refuses shared storage
            t = t.clone()
        seen.add(t.data_ptr())
        out[k] = t
    save_file(out, str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    index = {k: (list(t.shape), _dtype_name(t.dtype)) for k, t in out.items()}
    return path.name, _sha256(path), path.stat().st_size, index


def _digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_manifest(path: str | os.PathLike, manifest: dict) -> None:
    """Write ``manifest`` as ``path/plait.json``, stamped with its own SHA-256 (so a changed
    byte in the manifest is found like one in a tensor file), and fsync it."""
    data = {**manifest, "manifest_sha256": _digest(manifest)}
    with open(Path(path) / META_FILE, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_checkpoint_dir(directory: str | os.PathLike, needed_bytes: int = 0) -> None:
    """Refuse, in one line, a checkpoint directory that cannot take a checkpoint: not a
    directory, not writable, or with less free space than ``needed_bytes``. Creates it."""
    root = Path(directory)
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"--checkpoint-dir {str(directory)!r} is a file, not a directory")
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".plait-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(
            f"--checkpoint-dir {str(directory)!r} is not writable ({e.strerror})"
        ) from e
    free = shutil.disk_usage(root).free
    if needed_bytes and free < needed_bytes:
        raise CheckpointError(
            f"--checkpoint-dir {str(directory)!r} has {free / 2**20:.1f} MiB free; a checkpoint "
            f"of this model needs about {needed_bytes / 2**20:.1f} MiB"
        )


# --- reading -------------------------------------------------------------------------------


def checkpoint_meta(path: str | os.PathLike) -> dict | None:
    """The manifest of checkpoint ``path`` (its ``plait.json``), or None if it has none.

    Example::

        checkpoint_meta("ck/step-00000050")
        # {'model': 'hf:/abs/llama', 'kind': 'hf', 'n_layers': 4, 'dtype': 'fp32',
        #  'mesh': {'dp': 1, 'pp': 2, 'tp': 2}, 'step': 50, 'files': {...}, ...}
    """
    f = Path(path) / META_FILE
    if not f.is_file():
        return None
    try:
        data = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{f}: not readable JSON ({type(e).__name__})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{f}: not a JSON object")
    return data


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """The manifest of checkpoint ``path`` once every file it lists has its recorded size and
    SHA-256; :class:`CheckpointError` (one line naming the file) otherwise."""
    path = Path(path)
    meta = checkpoint_meta(path)
    if meta is None:
        if (path / ".metadata").is_file():
            raise CheckpointError(
                f"{path} is in an older plait format (torch.distributed.checkpoint, whose "
                ".metadata is a pickle plait does not load); it has no verified manifest"
            )
        raise CheckpointError(f"{path} has no {META_FILE} manifest")
    if meta.get("manifest_sha256") != _digest(meta):
        raise CheckpointError(f"{path / META_FILE}: checksum mismatch (the manifest changed)")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: manifest format {meta.get('format')!r}, not {FORMAT}")
    files = meta.get("files")
    if not isinstance(files, dict) or not isinstance(meta.get("tensors"), dict):
        raise CheckpointError(f"{path / META_FILE}: no file or tensor index")
    for name, rec in files.items():
        f = path / name
        if Path(name).name != name or not f.is_file():
            raise CheckpointError(f"{path}: file {name} is missing")
        size = f.stat().st_size
        if size != rec.get("bytes"):
            raise CheckpointError(f"{f}: {size} bytes, the manifest says {rec.get('bytes')}")
        if _sha256(f) != rec.get("sha256"):
            raise CheckpointError(f"{f}: checksum mismatch (the file changed after it was saved)")
    for key, rec in meta["tensors"].items():
        if rec.get("file") not in files:
            raise CheckpointError(f"{path}: tensor {key} points to an unlisted file")
    return meta


def _steps(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _STEP_DIR.match(p.name)), key=lambda p: p.name)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest checkpoint in ``directory`` with a manifest (not verified; ``.partial`` ones,
    saves that did not finish, are never considered)."""
    done = [p for p in _steps(Path(directory)) if (p / META_FILE).is_file()]
    return done[-1] if done else None


def newest_verified(directory: str | os.PathLike) -> tuple[Path | None, list[str]]:
    """The newest checkpoint in ``directory`` that verifies, and why each newer one did not."""
    rejected = []
    for p in reversed(_steps(Path(directory))):
        try:
            verify_checkpoint(p)
        except CheckpointError as e:
            rejected.append(str(e))
            continue
        return p, rejected
    return None, rejected


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint ``path`` names, verified: a ``step-N`` directory itself, or the newest one
    that verifies inside a ``--checkpoint-dir`` root (saying which newer ones it skipped).
    FileNotFoundError or CheckpointError (one line) otherwise."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r}: no such directory")
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint {str(path)!r} is not a directory")
    if _STEP_DIR.match(p.name) or (p / META_FILE).is_file() or (p / ".metadata").is_file():
        verify_checkpoint(p)
        return p
    found, rejected = newest_verified(p)
    if found is None:
        partial = any(q.name.endswith(".partial") for q in p.iterdir() if q.is_dir())
        why = "; ".join(rejected) or (
            "a step-NNNNNNNN/ directory with a plait.json manifest"
            + ("; .partial ones are saves that did not finish" if partial else "")
        )
        raise FileNotFoundError(f"{str(path)!r} holds no complete checkpoint that verifies ({why})")
    for r in rejected:
        print(f"plait: skipping a checkpoint that does not verify: {r}", flush=True)
    return found


def load_checkpoint(path: str | os.PathLike, state: dict, verify: bool = True) -> dict:
    """Fill ``state`` in place from checkpoint ``path``: only the keys given are read.

    Tensors must be pre-allocated in their full shape (they are copied into, cast to their
    dtype); plain values are replaced. ``verify=False`` skips the checksums (for a checkpoint
    already verified by :func:`verify_checkpoint`, e.g. by the launcher before the workers).
    """
    from safetensors import safe_open

    path = Path(path)
    meta = verify_checkpoint(path) if verify else checkpoint_meta(path)
    if meta is None or meta.get("format") != FORMAT:
        verify_checkpoint(path)  # raises the one-line reason
    index, values = meta["tensors"], meta.get("values", {})
    files: dict[str, object] = {}
    with torch.no_grad():
        for key, target in state.items():
            if not isinstance(target, torch.Tensor):
                if key not in values:
                    raise CheckpointError(f"{path}: no value {key!r} in the checkpoint")
                state[key] = values[key]
                continue
            rec = index.get(key)
            if rec is None:
                raise CheckpointError(f"{path}: no tensor {key!r} in the checkpoint")
            if list(target.shape) != rec["shape"]:
                raise CheckpointError(
                    f"{path}: tensor {key!r} is {tuple(rec['shape'])} in the checkpoint, "
                    f"{tuple(target.shape)} here"
                )
            name = rec["file"]
            try:
                if name not in files:
                    files[name] = safe_open(str(path / name), framework="pt")
                target.copy_(files[name].get_tensor(key))
            except Exception as e:  # noqa: BLE001 - safetensors' own errors, named
                raise CheckpointError(
                    f"{path / name}: tensor {key!r} not readable as safetensors ({e})"
                ) from e
    return state


def checkpoint_tensors(
    path: str | os.PathLike,
) -> dict[str, tuple[tuple[int, ...], torch.dtype] | None]:
    """Keys stored in a checkpoint and their tensors' ``(shape, dtype)`` (None for plain
    values), from its manifest."""
    meta = verify_checkpoint(path)
    out: dict = {k: (tuple(r["shape"]), _dtype(r["dtype"])) for k, r in meta["tensors"].items()}
    out.update(dict.fromkeys(meta.get("values", {})))
    return out


def checkpoint_keys(path: str | os.PathLike) -> dict[str, tuple[int, ...] | None]:
    """Keys stored in a checkpoint and their tensor shapes (None for plain values)."""
    return {k: (v[0] if v else None) for k, v in checkpoint_tensors(path).items()}
