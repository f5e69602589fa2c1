"""Checkpoints that load into any mesh shape, written atomically with torch.distributed.checkpoint.

What is saved is mesh-independent: every parameter and optimizer-state tensor in its *full,
unsharded* shape under the reference model's parameter name (``blocks.3.mlp.fc_in.weight``),
plus the step (the data position: batches are a function of seed and step) and RNG state. Each
rank contributes the tensors of its own pipeline stage, gathered over its tensor group;
torch.distributed.checkpoint de-duplicates the copies held by several ranks and writes in
parallel. Loading reads, on each rank, only the tensors its stage needs and slices its own shard,
so a run saved at (dp, pp, tp) = (1, 2, 2) resumes at (2, 1, 1), in one process, or any other
shape.

Atomicity: a checkpoint is written into ``step-NNNNNNNN.partial/`` and renamed to
``step-NNNNNNNN/`` only after every rank has finished and the metadata is on disk. Directories
that are still ``.partial`` (a crash mid-save) are never loaded.

Which model a checkpoint holds is recorded beside its tensors in ``plait.json`` (the model's
name as given, with ``hf:`` paths made absolute, its layer count, dtype and the mesh it was saved
at), written by rank 0 before the rename, so a complete checkpoint always has it
(:func:`checkpoint_meta`; checkpoints of older versions have none).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "find_checkpoint",
    "checkpoint_meta",
    "checkpoint_keys",
    "checkpoint_tensors",
    "META_FILE",
    "shard_dim",
    "gather_full",
    "take_shard",
    "save_state",
    "load_state",
]

_STEP_DIR = re.compile(r"^step-(\d{8})$")
META_FILE = "plait.json"


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def shard_dim(local: tuple[int, ...], full: tuple[int, ...]) -> int | None:
    """The dimension along which ``local`` is a slice of ``full``, or None when not sharded."""
    if tuple(local) == tuple(full):
        return None
    diff = [d for d, (a, b) in enumerate(zip(local, full)) if a != b]
    if len(local) != len(full) or len(diff) != 1:
        raise ValueError(
            f"a local shard of shape {tuple(local)} is not a one-dimension slice of "
            f"the full shape {tuple(full)}"
        )
    return diff[0]


def gather_full(
    local: torch.Tensor, full_shape: tuple[int, ...], group: dist.ProcessGroup | None
) -> torch.Tensor:
    """All-gather a tensor-parallel shard into the full tensor (dropping any end padding)."""
    dim = shard_dim(tuple(local.shape), full_shape)
    if dim is None:
        return local.detach().clone()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.detach().contiguous(), group=group)
    return torch.cat(parts, dim=dim).narrow(dim, 0, full_shape[dim]).clone()


def take_shard(full: torch.Tensor, local_shape: tuple[int, ...], rank: int) -> torch.Tensor:
    """This tensor rank's slice of ``full`` shaped ``local_shape`` (zero padding at the end)."""
    dim = shard_dim(tuple(local_shape), tuple(full.shape))
    if dim is None:
        return full
    size = local_shape[dim]
    start = rank * size
    out = torch.zeros(local_shape, dtype=full.dtype)
    avail = max(0, min(size, full.shape[dim] - start))
    if avail:
        out.narrow(dim, 0, avail).copy_(full.narrow(dim, start, avail))
    return out


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in ``directory`` (``.partial`` ones are ignored)."""
    root = Path(directory)
    if not root.is_dir():
        return None
    done = sorted(
        (p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / ".metadata").is_file()),
        key=lambda p: p.name,
    )
    return done[-1] if done else None


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The complete checkpoint ``path`` names: a ``step-N`` directory itself, or the newest
    complete one inside a ``--checkpoint-dir`` root. FileNotFoundError (one line) otherwise."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r}: no such directory")
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint {str(path)!r} is not a directory")
    if (p / ".metadata").is_file() and not p.name.endswith(".partial"):
        return p
    found = latest_checkpoint(p)
    if found is None:
        partial = p.name.endswith(".partial") or any(
            q.name.endswith(".partial") for q in p.iterdir() if q.is_dir()
        )
        raise FileNotFoundError(
            f"{str(path)!r} holds no complete checkpoint (a step-NNNNNNNN/ directory with "
            "torch.distributed.checkpoint's .metadata"
            + ("; .partial ones are saves that did not finish" if partial else "")
            + ")"
        )
    return found


def checkpoint_meta(path: str | os.PathLike) -> dict | None:
    """What a checkpoint records about its model (``plait.json``), or None for checkpoints
    written before plait recorded it.

    Example::

        checkpoint_meta("ck/step-00000050")
        # {'model': 'hf:/abs/llama', 'kind': 'hf', 'n_layers': 4, 'dtype': 'fp32',
        #  'mesh': {'dp': 1, 'pp': 2, 'tp': 2}, 'step': 50, ...}
    """
    f = Path(path) / META_FILE
    if not f.is_file():
        return None
    try:
        data = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{f}: not readable JSON ({type(e).__name__})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{f}: not a JSON object")
    return data


def save_checkpoint(
    directory: str | os.PathLike, step: int, state: dict, keep: int = 3, meta: dict | None = None
) -> Path:
    """Save ``state`` (full tensors, plain values) as ``directory/step-<step>`` on every rank.

    Collective: every rank calls it with its own part of the state; keys held by several ranks
    must hold identical values (they are written once). ``meta`` (rank 0's) is written as
    ``plait.json`` inside the checkpoint before the rename that completes it.
    """
    root = Path(directory)
    final = root / f"step-{step:08d}"
    partial = root / f"step-{step:08d}.partial"
    rank0 = not _dist() or dist.get_rank() == 0
    if rank0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    if _dist():
        dist.barrier()
    with _quiet():
        dcp.save(state, checkpoint_id=partial, no_dist=not _dist())
    if _dist():
        dist.barrier()  # every rank's files are on disk before the rename makes them visible
    if rank0:
        if meta is not None:
            with open(partial / META_FILE, "w") as f:
                json.dump({**meta, "step": step}, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
        _fsync_dir(partial)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(root)
        for old in sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if _dist():
        dist.barrier()
    return final


def load_checkpoint(path: str | os.PathLike, state: dict) -> dict:
    """Fill ``state`` in place from checkpoint ``path``: only the keys given are read.

    Tensors must be pre-allocated in their full shape; plain values are replaced.
    """
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no .metadata)")
    with _quiet():
        dcp.load(state, checkpoint_id=path, no_dist=not _dist())
    return state


def checkpoint_keys(path: str | os.PathLike) -> dict[str, tuple[int, ...] | None]:
    """Keys stored in a checkpoint and their tensor shapes (None for plain values)."""
    return {k: (v[0] if v else None) for k, v in checkpoint_tensors(path).items()}


def checkpoint_tensors(
    path: str | os.PathLike,
) -> dict[str, tuple[tuple[int, ...], torch.dtype] | None]:
    """Keys stored in a checkpoint and their tensors' ``(shape, dtype)`` (None for plain
    values)."""
    reader = dcp.FileSystemReader(str(path))
    meta = reader.read_metadata()
    out = {}
    for key, md in meta.state_dict_metadata.items():
        if hasattr(md, "size"):
            out[key] = (tuple(md.size), md.properties.dtype)
        else:
            out[key] = None
    return out


@contextmanager
def _quiet():
    """Silence DCP's notice that a one-process save or load is not distributed: we meant it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- the training state's layout -----------------------------------------------------------

_OPT_KEYS = ("exp_avg", "exp_avg_sq")


def save_state(directory, step, params, full_shapes, opt, mesh, owns, meta=None) -> None:
    """Every rank adds its stage's tensors, gathered over tp; optimizer state from its owner.

    The step is the data position (batches are a function of seed and step); each rank's RNG
    state is kept under its rank, for a resume on the same world size. ``meta`` is what the
    checkpoint records about its model (``plait.json``, see :func:`save_checkpoint`).
    """
    group = mesh.group("tp")
    state: dict = {"step": step, f"rng.rank{mesh.rank}": torch.get_rng_state()}
    for name, p in params.items():
        state[f"model.{name}"] = gather_full(p.data, full_shapes[name], group)
        st = opt.state.get(p, {}) if owns(name) else {}
        for key in _OPT_KEYS:
            if key in st:
                state[f"optim.{name}.{key}"] = gather_full(st[key], full_shapes[name], group)
        if "step" in st:
            state[f"optim.{name}.step"] = st["step"].detach().clone()
    save_checkpoint(directory, step, state, meta=meta)


def load_state(path, params, full_shapes, opt, mesh, owns) -> int:
    """Read this rank's tensors (in full) and keep its shard of each; any mesh shape works."""
    state: dict = {"step": 0}
    for name, p in params.items():
        state[f"model.{name}"] = torch.empty(full_shapes[name], dtype=p.dtype)
        if not owns(name):
            continue
        for key in _OPT_KEYS:
            state[f"optim.{name}.{key}"] = torch.empty(full_shapes[name], dtype=p.dtype)
        state[f"optim.{name}.step"] = torch.zeros((), dtype=torch.float32)
    rng_key = f"rng.rank{mesh.rank}"
    saved_world = sum(k.startswith("rng.rank") for k in checkpoint_keys(path))
    same_world = saved_world == mesh.shape.world_size
    if same_world:  # RNG streams belong to ranks: restored only on the same world size
        state[rng_key] = torch.get_rng_state()
    load_checkpoint(path, state)
    if same_world:
        torch.set_rng_state(state[rng_key])
    tp_rank = mesh.tp_rank
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(take_shard(state[f"model.{name}"], tuple(p.shape), tp_rank))
            if not owns(name):
                continue
            opt.state[p] = {
                "step": state[f"optim.{name}.step"],
                **{
                    k: take_shard(state[f"optim.{name}.{k}"], tuple(p.shape), tp_rank).to(p.dtype)
                    for k in _OPT_KEYS
                },
            }
    return int(state["step"])
