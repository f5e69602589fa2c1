"""Gradients on a mesh: data-parallel averaging overlapped with backward, and global-norm clipping.

:class:`GradSync` averages gradients over the data-parallel group. Parameters are packed into
buckets (in reverse registration order, which is roughly the order backward finishes them); a
post-accumulate hook counts each parameter's accumulations, and the moment every parameter of a
bucket has received its last one for the step (one per micro-batch), that bucket's all-reduce is
started asynchronously while backward continues. ``finish()`` starts whatever is left (parameters
whose gradients arrived outside autograd's hooks) and waits.

Each bucket owns one flat buffer for the whole run (as DDP's gradient-as-bucket-view does): the
gradients are copied into it once, reduced and averaged in place, and each parameter's ``.grad``
then *is* its slice of the buffer. Nothing is allocated per step and nothing is copied back, so a
step costs one pass over the gradients plus the division, not a fresh buffer's page faults and two
more copies.

:func:`clip_grad_norm` clips by the norm of the *whole* model's gradient: squares are summed over
the tensor group only for sharded parameters (replicated ones are counted once), then over the
pipeline group; the data-parallel replicas already hold identical averaged gradients.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from plait import comm
from plait.mesh import new_group
from plait.tensor.state import is_tp_sharded
from plait.train.fsdp import local

__all__ = ["GradSync", "clip_grad_norm"]


class GradSync:
    """Average gradients over ``group``, bucket by bucket, as soon as each bucket is final.

    Example::

        sync = GradSync(model.parameters(), mesh.group("dp"))
        sync.prepare(accumulations=num_microbatches)
        ...backward for every micro-batch...
        sync.finish()   # grads are now averaged over the dp group
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        group: dist.ProcessGroup | None,
        bucket_bytes: int = 25 * 1024 * 1024,
        uses: dict[int, int] | None = None,
    ):
        # uses: id(param) -> how many of this rank's stages use it (a tied embedding on the
        # first and last stage of one rank takes two gradient accumulations per micro-batch)
        self.uses = uses or {}
        self.group = group
        self.size = dist.get_world_size(group) if group is not None else 1
        self.params = [p for p in params if p.requires_grad]
        self.buckets: list[list[nn.Parameter]] = []
        current, size = [], 0
        for p in reversed(self.params):
            if current and (p.dtype, p.device) != (current[0].dtype, current[0].device):
                self.buckets.append(current)  # one buffer holds one dtype on one device
                current, size = [], 0
            current.append(p)
            size += p.numel() * p.element_size()
            if size >= bucket_bytes:
                self.buckets.append(current)
                current, size = [], 0
        if current:
            self.buckets.append(current)
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self._expected = 1
        self._count: dict[int, int] = {}
        self._pending: list[int] = []
        self._works: dict[int, tuple[dist.Work, torch.Tensor]] = {}
        self._flat: dict[int, torch.Tensor] = {}  # bucket -> its buffer, made on first use
        self._hooks = []
        if self.size > 1:
            self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    def prepare(self, accumulations: int) -> None:
        """Start a step in which each parameter's gradient is accumulated ``accumulations`` times."""
        self._expected = accumulations
        self._count = {}
        self._pending = [len(b) for b in self.buckets]
        self._works = {}

    def _on_grad(self, p: nn.Parameter) -> None:
        n = self._count.get(id(p), 0) + 1
        self._count[id(p)] = n
        b = self._bucket_of[id(p)]
        expected = self._expected * self.uses.get(id(p), 1)
        if n > expected:
            raise RuntimeError(
                f"a parameter's gradient was accumulated {n} times in one step but "
                f"GradSync.prepare(accumulations={self._expected}) was told to expect "
                f"{expected}; its bucket was already reduced"
            )
        if n == expected:
            self._pending[b] -= 1
            if self._pending[b] == 0:
                self._launch(b)

    def _buffer(self, b: int) -> torch.Tensor:
        buf = self._flat.get(b)
        if buf is None:
            ref = self.buckets[b][0]
            n = sum(p.numel() for p in self.buckets[b])
            buf = self._flat[b] = torch.zeros(n, dtype=ref.dtype, device=ref.device)
        return buf

    def _launch(self, b: int) -> None:
        flat = self._buffer(b)
        offset = 0
        for p in self.buckets[b]:
            n = p.numel()
            view = flat[offset : offset + n]
            if p.grad is None:
                view.zero_()
            elif p.grad.data_ptr() != view.data_ptr():  # not already our slice (zero_grad
                view.copy_(p.grad.reshape(-1))  # without set_to_none keeps the slice)
            offset += n
        work = comm.all_reduce_async(flat, self.group, axis="dp", phase="backward")
        self._works[b] = (work, flat)

    def finish(self) -> None:
        """Reduce any bucket not yet started, wait for all, and make each ``.grad`` the averaged
        slice of its bucket's buffer."""
        if self.size == 1:
            return
        for b in range(len(self.buckets)):
            if b not in self._works:
                self._launch(b)
        for b, (work, flat) in sorted(self._works.items()):
            work.wait()
            flat.div_(self.size)
            offset = 0
            for p in self.buckets[b]:
                n = p.numel()
                p.grad = flat[offset : offset + n].view_as(p)
                offset += n
        self._works = {}

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def clip_grad_norm(
    params: Iterable[nn.Parameter],
    max_norm: float,
    tp_group: dist.ProcessGroup | None = None,
    tp_rank: int = 0,
    pp_group: dist.ProcessGroup | None = None,
    not_here: Iterable[nn.Parameter] = (),
    dp_group: dist.ProcessGroup | None = None,
) -> float:
    """Clip gradients in place by the global norm over all shards and stages; returns the norm.

    Sharded parameters (:func:`is_tp_sharded`) contribute their squares on every tensor rank;
    replicated ones only on tensor rank 0, so nothing is counted twice. ``not_here``: parameters
    another pipeline rank counts (the copy of a tied embedding on the last stage); they are
    clipped but not counted here. A parameter given twice is counted once. ``dp_group``: the
    group the gradients are sharded over (FSDP's DTensor gradients): each rank counts its own
    shard, and the squares are summed over it too.
    """
    skip = {id(p) for p in not_here}
    params = list({id(p): p for p in params if p.grad is not None}.values())
    dtype = params[0].grad.dtype if params else torch.float32
    sharded = torch.zeros((), dtype=torch.float64)
    replicated = torch.zeros((), dtype=torch.float64)
    for p in params:
        if id(p) in skip:
            continue
        sq = local(p.grad.detach()).double().pow(2).sum()
        if is_tp_sharded(p):
            sharded += sq
        else:
            replicated += sq
    total = sharded + (replicated if tp_rank == 0 else 0.0)
    for group in (tp_group, pp_group, dp_group):
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(total, group=group)
    norm = total.sqrt().item()
    if max_norm and norm > max_norm:
        scale = torch.tensor(max_norm / (norm + 1e-6), dtype=dtype)
        for p in params:
            local(p.grad).mul_(scale)
    return norm


class TiedGrads:
    """Sums the gradients of tied parameters held by two pipeline ranks (an input embedding on the
    first stage, the same matrix as the output head on the last), as one process would.

    ``tied``: groups of names that are one tensor in the full model. Every rank must construct
    it (it creates process groups). After :meth:`reduce`, both copies hold the summed gradient,
    so identical optimizer steps keep them identical.
    """

    def __init__(self, params: dict[str, nn.Parameter], tied: list[list[str]], mesh, schedule):
        self.pairs: list[nn.Parameter] = []  # local params to all-reduce over self.group
        self.not_here: list[nn.Parameter] = []  # counted by the first stage's rank in clipping
        self.group = None
        if schedule is None or not tied:
            return
        first, last = schedule.stage_to_rank[0], schedule.stage_to_rank[-1]
        if first == last:
            return  # one rank holds both: one Parameter, autograd sums it
        shape = mesh.shape
        for d in range(shape.dp):  # collective: every rank creates every pair's group
            for t in range(shape.tp):
                ranks = [shape.rank(d, first, t), shape.rank(d, last, t)]
                g = new_group(ranks)
                if mesh.rank in ranks:
                    self.group = g
        for names in tied:
            here = [params[n] for n in names if n in params]
            if here:
                self.pairs.append(here[0])
                if mesh.pp_rank == last:
                    self.not_here.append(here[0])

    def reduce(self) -> None:
        for p in self.pairs:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            # an FSDP gradient: both ranks hold the same dp shard of it
            comm.all_reduce(local(p.grad), self.group, axis="pp", phase="backward")
