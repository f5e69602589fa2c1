"""ZeRO stage 1: AdamW whose state is sharded over the data-parallel group.

Each data-parallel rank owns a share of the parameters (whole tensors, balanced by size) and keeps
AdamW's moments only for those, so optimizer memory falls by the dp size. Gradients are still
averaged on every rank (that is stage 1); after the step each owner broadcasts its updated
parameters, packed into one buffer per owner, to the rest of the group.

Example::

    opt = ZeroAdamW(dict(model.named_parameters()), mesh.group("dp"), lr=1e-3)
    ...backward, average grads...
    opt.step(); opt.zero_grad()
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["ZeroAdamW"]


class ZeroAdamW:
    """AdamW over ``params`` with state held only by each parameter's owning dp rank."""

    def __init__(
        self, params: dict[str, nn.Parameter], group: dist.ProcessGroup | None, **adamw_kwargs
    ):
        self.params = params
        self.group = group
        self.size = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        load = [0] * self.size
        self.owner: dict[str, int] = {}
        # Largest first onto the least-loaded rank: deterministic and well balanced.
        for name in sorted(params, key=lambda n: (-params[n].numel(), n)):
            r = min(range(self.size), key=lambda i: (load[i], i))
            self.owner[name] = r
            load[r] += params[name].numel()
        mine = [p for n, p in params.items() if self.owner[n] == self.rank]
        # An optimizer always exists so lr schedules and state access look the same on all ranks.
        self.opt = torch.optim.AdamW(mine or [nn.Parameter(torch.zeros(1))], **adamw_kwargs)

    @property
    def param_groups(self):
        return self.opt.param_groups

    @property
    def state(self):
        return self.opt.state

    def owns(self, name: str) -> bool:
        return self.owner[name] == self.rank

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params.values():
            p.grad = None if set_to_none else (p.grad.zero_() if p.grad is not None else None)

    @torch.no_grad()
    def step(self) -> None:
        self.opt.step()
        if self.size == 1:
            return
        works = []
        for owner in range(self.size):
            names = [n for n in self.params if self.owner[n] == owner]
            if not names:
                continue
            flat = torch.cat([self.params[n].detach().reshape(-1) for n in names])
            src = dist.get_global_rank(self.group, owner)
            works.append(
                (dist.broadcast(flat, src=src, group=self.group, async_op=True), flat, names)
            )
        for work, flat, names in works:
            work.wait()
            offset = 0
            for n in names:
                p = self.params[n]
                p.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
