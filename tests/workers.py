"""Module-level worker functions for multi-process tests (launch pickles them by reference)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist

from plait.mesh import Mesh


def rank_times(x):
    return dist.get_rank() * x, dist.get_world_size()


def allreduce_sum():
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return t.item()


def _record_pid(pid_dir: str) -> None:
    Path(pid_dir, f"{dist.get_rank()}.pid").write_text(str(os.getpid()))


def raise_on(bad_rank: int, pid_dir: str):
    _record_pid(pid_dir)
    if dist.get_rank() == bad_rank:
        raise ValueError(f"boom from rank {bad_rank}")
    dist.barrier()  # the others block here until launch tears them down
    return "unreachable"


def sigkill_on(bad_rank: int, pid_dir: str):
    _record_pid(pid_dir)
    if dist.get_rank() == bad_rank:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()
    return "unreachable"


def stuck_collective():
    if dist.get_rank() == 0:
        dist.barrier()  # rank 1 never joins: gloo's timeout must fire
    else:
        import threading

        threading.Event().wait(30)
    return "unreachable"


def mesh_groups(dp: int, pp: int, tp: int):
    """Each rank reports its coordinates and, per axis, the ranks found by all-gather in its group."""
    mesh = Mesh(dp, pp, tp)
    found = {}
    for axis in ("dp", "pp", "tp"):
        group = mesh.group(axis)
        size = mesh.size(axis)
        out = [torch.zeros(1) for _ in range(size)]
        dist.all_gather(out, torch.tensor([float(mesh.rank)]), group=group)
        found[axis] = [int(t.item()) for t in out]
    return {
        "rank": mesh.rank,
        "coords": mesh.coords,
        "groups": found,
        "prev": mesh.pp_prev,
        "next": mesh.pp_next,
    }
