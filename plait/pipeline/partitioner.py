"""Cut a model into consecutive pipeline stages that share the model's own parameters.

The model must have the reference layout: ``embed`` -> ``blocks`` (an ``nn.ModuleList``) ->
``head``. A :class:`Stage` holds a contiguous run of those *same* module objects under the *same*
attribute names, so ``stage.named_parameters()`` yields the original names (``embed.tok.weight``,
``blocks.3.mlp.fc_in.weight``, ``head.proj.weight``): checkpoints keyed by the model's names load
into stages, and a tensor-parallel pass that shards recognised submodules works on a stage as on
the whole model.

Balancing, by ``balance=``:

    "layers"     blocks split as evenly as possible; embed rides with the first stage, head with
                 the last; every stage needs at least one block
    "params"     units (embed, each block, head) weighted by parameter count; the largest stage
                 is made as small as possible. The embedding and head of a small model are heavy,
                 so edge stages get fewer blocks
    "time"       units weighted by measured forward + backward time on a sample batch
    [n0, n1, ...] explicit: blocks per stage (sum = number of blocks); the first stage may have 0
                 blocks (it still holds embed), as may the last (head); a middle stage may not

Example::

    stages = partition(Transformer(get_config("tiny", n_layers=4)), 2, balance="layers")
    [type(m).__name__ for m in stages[0].children()]  # ['Embedding', 'ModuleDict']
    stages[1](stages[0](idx))  # == model(idx)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn

from plait.pipeline.split import split_blocks

__all__ = ["Stage", "partition", "stage_units"]


class Stage(nn.Module):
    """Stage ``index`` of ``num_stages``: optional ``embed``, a run of ``blocks``, optional ``head``.

    ``blocks`` is an ``nn.ModuleDict`` keyed by the block's index in the original model, so
    parameter names match the model's. ``forward(x)`` applies them in order.
    """

    def __init__(
        self,
        index: int,
        num_stages: int,
        embed: nn.Module | None,
        blocks: dict[int, nn.Module],
        head: nn.Module | None,
    ):
        super().__init__()
        self.index = index
        self.num_stages = num_stages
        if embed is not None:
            self.embed = embed
        self.blocks = nn.ModuleDict({str(i): b for i, b in sorted(blocks.items())})
        if head is not None:
            self.head = head

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    @property
    def block_indices(self) -> list[int]:
        return [int(k) for k in self.blocks]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "embed"):
            x = self.embed(x)
        for block in self.blocks.values():
            x = block(x)
        if hasattr(self, "head"):
            x = self.head(x)
        return x

    def extra_repr(self) -> str:
        return f"stage {self.index} of {self.num_stages}, blocks {self.block_indices}"


def stage_units(model: nn.Module) -> tuple[nn.Module, list[nn.Module], nn.Module]:
    """``(embed, blocks, head)`` of a model with the reference layout, or a clear error."""
    missing = [name for name in ("embed", "blocks", "head") if not hasattr(model, name)]
    if missing or not isinstance(model.blocks, (nn.ModuleList, nn.Sequential)):
        raise TypeError(
            f"partition needs a model laid out as embed -> blocks (nn.ModuleList) -> head, like "
            f"plait.models.Transformer; {type(model).__name__} lacks "
            f"{missing or ['blocks as an nn.ModuleList']}"
        )
    return model.embed, list(model.blocks), model.head


def partition(
    model: nn.Module,
    num_stages: int,
    balance: str | Sequence[int] = "layers",
    sample: torch.Tensor | None = None,
) -> list[Stage]:
    """Split ``model`` into ``num_stages`` :class:`Stage` modules sharing its parameters.

    Args:
        model: ``embed -> blocks -> head`` (e.g. :class:`plait.models.Transformer`).
        num_stages: ``p`` for one chunk per rank, ``p * v`` for interleaved or V schedules.
        balance: ``"layers"``, ``"params"``, ``"time"`` or blocks per stage (see module doc).
        sample: token ids to time on for ``balance="time"``; default a random ``(4, 64)`` batch.

    Returns:
        ``num_stages`` stages; stage 0 holds ``embed``, the last holds ``head``.

    Raises:
        ValueError: a stage would be empty, or the split is impossible; names the numbers.

    Example::

        stages = partition(model, 4, balance="params")
        [s.block_indices for s in stages]
    """
    embed, blocks, head = stage_units(model)
    L = len(blocks)
    if not isinstance(num_stages, int) or isinstance(num_stages, bool) or num_stages < 1:
        raise ValueError(f"num_stages must be a positive integer, got {num_stages!r}")
    costs = None
    if balance in ("params", "time"):
        costs = (
            [_num_params(m) for m in (embed, *blocks, head)]
            if balance == "params"
            else _profile(model, embed, blocks, head, sample)
        )
    counts = split_blocks(L, num_stages, balance, costs)
    stages, start = [], 0
    for i, n in enumerate(counts):
        stages.append(
            Stage(
                i,
                num_stages,
                embed if i == 0 else None,
                {j: blocks[j] for j in range(start, start + n)},
                head if i == num_stages - 1 else None,
            )
        )
        start += n
    return stages


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _profile(model, embed, blocks, head, sample, repeats: int = 3) -> list[float]:
    """Median forward + backward seconds of each unit on ``sample``, run in sequence."""
    if sample is None:
        cfg = getattr(model, "config", None)
        vocab = getattr(cfg, "vocab_size", 256)
        seq = min(64, getattr(cfg, "max_seq_len", 64))
        sample = torch.randint(0, vocab, (4, seq), generator=torch.Generator().manual_seed(0))
    units = [embed, *blocks, head]
    times: list[list[float]] = [[] for _ in units]
    for _ in range(repeats):
        x = sample
        for u, unit in enumerate(units):
            x = x.detach().requires_grad_(x.is_floating_point())
            t0 = time.perf_counter()
            y = unit(x)
            y.float().square().mean().backward()
            times[u].append(time.perf_counter() - t0)
            x = y
    for p in model.parameters():  # profiling must not leave gradients behind
        p.grad = None
    return [statistics.median(t) for t in times]
