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


def grad_sync_mixed_dtypes():
    """GradSync over parameters of two dtypes: each gradient comes back averaged, in its own
    dtype."""
    from plait.train.grads import GradSync

    a = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    b = torch.nn.Parameter(torch.ones(2, dtype=torch.float32))
    sync = GradSync([a, b], dist.group.WORLD)
    sync.prepare(accumulations=1)
    r = float(dist.get_rank())
    ((a * (r + 1)).sum() + (b * (r + 2)).sum()).backward()
    sync.finish()
    return len(sync.buckets), a.grad.dtype, a.grad.tolist(), b.grad.dtype, b.grad.tolist()


def grad_sync_steps(set_to_none: bool):
    """Two steps of a tiny model under GradSync (buckets small enough to make several), two
    micro-batches each; returns, per step, each parameter's synced gradient, this rank's own
    gradient, and whether every ``.grad`` is a slice of a bucket buffer."""
    from plait.train.grads import GradSync

    torch.manual_seed(0)  # same weights on every rank
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    sync = GradSync(model.parameters(), dist.group.WORLD, bucket_bytes=64)
    gen = torch.Generator().manual_seed(100 + dist.get_rank())  # different data per rank
    out = []
    for _ in range(2):
        xs = [torch.randn(4, 6, generator=gen) for _ in range(2)]
        sync.prepare(accumulations=2)
        for x in xs:
            model(x).square().mean().backward()
        sync.finish()
        synced = [p.grad.clone() for p in model.parameters()]
        views = all(
            p.grad.untyped_storage().data_ptr() in sync_ptrs(sync) for p in model.parameters()
        )
        # This rank's own gradient, without GradSync's hooks, for the expected average.
        own = torch.autograd.grad(
            sum(model(x).square().mean() for x in xs), list(model.parameters())
        )
        out.append({"synced": synced, "own": [g.clone() for g in own], "views": views})
        for p in model.parameters():
            if set_to_none:
                p.grad = None
            else:
                p.grad.zero_()
    sync.remove()
    return out, len(sync.buckets)


def sync_ptrs(sync) -> set[int]:
    return {buf.untyped_storage().data_ptr() for buf in sync._flat.values()}


def store_listeners(_=None) -> list[str]:
    """The local addresses listening on this job's rendezvous port, from /proc/net/tcp*."""
    import os

    port = f"{int(os.environ['MASTER_PORT']):04X}"
    out = []
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path) as f:
            for line in f.read().splitlines()[1:]:
                fields = line.split()
                if fields[1].endswith(":" + port) and fields[3] == "0A":  # 0A: LISTEN
                    out.append(fields[1].rsplit(":", 1)[0])
    return out


def save_failing_on(bad_rank: int, directory: str) -> dict:
    """Every rank saves its own tensor; ``bad_rank``'s write fails (a full disk, say)."""
    from plait.train import store

    rank = dist.get_rank()
    if rank == bad_rank:

        def full(path, tensors):
            raise OSError(28, "No space left on device")

        store._write_shard = full
    try:
        store.save_checkpoint(directory, 1, {f"t{rank}": torch.ones(3) * rank})
        return {"error": None}
    except store.CheckpointError as e:
        return {"error": str(e)}
