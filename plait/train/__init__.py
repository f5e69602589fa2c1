"""Training over a dp x pp x tp mesh, one file per part::

config.py      TrainConfig: what a run depends on, checked before any process starts
loop.py        train() and run_rank(): the step loop on every rank
parts.py       what one rank trains: its stages, shards and how a step runs
grads.py       data-parallel gradient averaging (bucketed, overlapped) and global-norm clipping
zero.py        ZeRO stage 1: AdamW state sharded over the data-parallel replicas
precision.py   mixed precision: autocast over float32 masters, fp16's dynamic loss scaling
checkpoint.py  the mesh-independent checkpoint layout and its atomic I/O
metrics.py     per-step records gathered from every rank, metrics file, timelines
"""

from __future__ import annotations

from plait.train.config import TrainConfig, lr_at

__all__ = ["TrainConfig", "lr_at", "run_rank", "train"]


def __getattr__(name: str):
    # The loop (and torch) load on first use: a config can be built and checked without them.
    if name in ("train", "run_rank"):
        from plait.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'plait.train' has no attribute {name!r}")
