"""The training state's checkpoint layout: loads into any mesh shape.

What is saved is mesh-independent: every parameter and optimizer-state tensor in its *full,
unsharded* shape under the reference model's parameter name (``blocks.3.mlp.fc_in.weight``),
plus the step (the data position: batches are a function of seed and step) and RNG state. Each
rank contributes the tensors of its own pipeline stage, gathered over its tensor group; a tensor
held by several ranks is written once. Loading reads, on each rank, only the tensors its stage
needs and slices its own shard, so a run saved at (dp, pp, tp) = (1, 2, 2) resumes at (2, 1, 1),
in one process, or any other shape.

The files themselves -- safetensors shards and a verified JSON manifest, written atomically --
are :mod:`plait.train.store`; its functions are re-exported here.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from plait.train import fsdp
from plait.train.store import (
    META_FILE,
    CheckpointError,
    check_checkpoint_dir,
    checkpoint_keys,
    checkpoint_meta,
    checkpoint_tensors,
    find_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    newest_verified,
    save_checkpoint,
    verify_checkpoint,
)

__all__ = [  # the files' functions, re-exported, then the layout's
    "CheckpointError",
    "META_FILE",
    "check_checkpoint_dir",
    "checkpoint_keys",
    "checkpoint_meta",
    "checkpoint_tensors",
    "find_checkpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "newest_verified",
    "save_checkpoint",
    "verify_checkpoint",
    "shard_dim",
    "gather_full",
    "take_shard",
    "save_state",
    "load_state",
]


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


# --- the training state's layout -----------------------------------------------------------

_OPT_KEYS = ("exp_avg", "exp_avg_sq")


def save_state(
    directory, step, params, full_shapes, opt, mesh, owns, meta=None, extra=None
) -> None:
    """Every rank adds its stage's tensors, gathered over tp; optimizer state from its owner.

    The step is the data position (batches are a function of seed and step); each rank's RNG
    state is kept under its rank, for a resume on the same world size. ``meta`` is what the
    checkpoint records about its model (``plait.json``, see :func:`save_checkpoint`); ``extra``:
    JSON values saved beside the step (fp16's loss scale), read back from the manifest's values.
    """
    group = mesh.group("tp")
    state: dict = {**(extra or {}), "step": step, f"rng.rank{mesh.rank}": torch.get_rng_state()}
    for name, p in params.items():
        # an FSDP parameter (and its state) is first gathered over dp: full() is collective
        state[f"model.{name}"] = gather_full(fsdp.full(p.data), full_shapes[name], group)
        st = opt.state.get(p, {}) if owns(name) else {}
        for key in _OPT_KEYS:
            if key in st:
                whole = fsdp.full(st[key])
                state[f"optim.{name}.{key}"] = gather_full(whole, full_shapes[name], group)
        if "step" in st:
            state[f"optim.{name}.step"] = fsdp.full(st["step"]).detach().clone()
    save_checkpoint(directory, step, state, meta=meta)


def load_state(path, params, full_shapes, opt, mesh, owns, verify: bool = True) -> int:
    """Read this rank's tensors (in full) and keep its shard of each; any mesh shape works.

    ``verify=False``: the checkpoint was verified already (by the launcher, before the workers).
    """
    state: dict = {"step": 0}
    for name, p in params.items():
        state[f"model.{name}"] = torch.empty(full_shapes[name], dtype=p.dtype)
        if not owns(name):
            continue
        for key in _OPT_KEYS:
            state[f"optim.{name}.{key}"] = torch.empty(full_shapes[name], dtype=p.dtype)
        state[f"optim.{name}.step"] = torch.zeros((), dtype=torch.float32)
    rng_key = f"rng.rank{mesh.rank}"
    saved_world = sum(k.startswith("rng.rank") for k in checkpoint_meta(path)["tensors"])
    same_world = saved_world == mesh.shape.world_size
    if same_world:  # RNG streams belong to ranks: restored only on the same world size
        state[rng_key] = torch.get_rng_state()
    load_checkpoint(path, state, verify=verify)
    if same_world:
        torch.set_rng_state(state[rng_key])
    tp_rank = mesh.tp_rank
    with torch.no_grad():
        for name, p in params.items():
            # an FSDP parameter is a DTensor: its dp shard of the tp shard, cut where it is
            mine = take_shard(state[f"model.{name}"], tuple(p.shape), tp_rank)
            fsdp.local(p).copy_(fsdp.local(fsdp.shard_like(mine, p)))
            if not owns(name):
                continue
            opt.state[p] = {
                "step": state[f"optim.{name}.step"],
                **{
                    k: fsdp.shard_like(
                        take_shard(state[f"optim.{name}.{k}"], tuple(p.shape), tp_rank).to(p.dtype),
                        p,
                    )
                    for k in _OPT_KEYS
                },
            }
    return int(state["step"])
