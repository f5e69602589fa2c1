"""What one rank trains: its part of the model on the mesh, and how it runs a step.

:func:`build_local` takes the full reference model (built from the seed, identical on every rank)
and returns a :class:`LocalModel`: the parameters this rank owns, keyed by their names in the full
model (checkpoints and clipping use these), and ``step(x, y)``, which runs forward and backward
over the micro-batches of this replica's batch and returns its mean loss. With ``pp > 1`` the step
is a pipeline schedule; with ``tp > 1`` the layers are sharded over the tensor group.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from plait.mesh import Mesh
from plait.models import ModelConfig, Transformer
from plait.trace import Event, Timeline

__all__ = ["LocalModel", "build_local", "validate_parallel", "split_microbatches"]


def split_microbatches(n: int, m: int) -> list[int]:
    """Sizes of ``m`` micro-batches of ``n`` rows: as even as possible, larger ones first."""
    if not 1 <= m <= n:
        raise ValueError(f"cannot split {n} rows into {m} micro-batches (need 1 <= m <= {n})")
    return [n // m + (1 if i < n % m else 0) for i in range(m)]


def validate_parallel(cfg, mcfg: ModelConfig) -> None:
    """Check the tensor and pipeline settings against the model before any process starts."""
    if cfg.tp > 1:
        from plait.tensor import check_divisible

        check_divisible(mcfg, cfg.tp, sequence_parallel=cfg.sequence_parallel, seq_len=cfg.seq_len)
    if cfg.pp > 1 or cfg.virtual > 1:
        from plait.pipeline import check_config

        check_config(mcfg, cfg.pp, cfg.schedule, cfg.num_microbatches, cfg.virtual)


class LocalModel:
    """This rank's share of the model and its step; see :func:`build_local`."""

    params: dict[str, nn.Parameter]
    timeline: Timeline | None

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        raise NotImplementedError

    def reset_comm(self) -> None:
        pass

    def comm_bytes(self) -> dict[str, int]:
        return {}


class WholeModel(LocalModel):
    """No pipeline: the whole model (tensor-sharded when tp > 1), gradient accumulation over m."""

    def __init__(self, model: nn.Module, num_microbatches: int, loss_fn, comm=None):
        self.model = model
        self.m = num_microbatches
        self.loss_fn = loss_fn
        self.params = dict(model.named_parameters())
        self.timeline = None
        self.comm = comm

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        tl = Timeline(1)
        total = 0.0
        start = 0
        for i, n in enumerate(split_microbatches(x.shape[0], self.m)):
            xs, ys = x[start : start + n], y[start : start + n]
            start += n
            t0 = time.perf_counter()
            loss = self.loss_fn(self.model(xs), ys) * (n / x.shape[0])
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            tl.add(Event(0, f"F0.{i}", "F", t0, t1, 0, i))
            tl.add(Event(0, f"BW0.{i}", "BW", t1, t2, 0, i))
            total += loss.item()
        self.timeline = tl
        return total

    def reset_comm(self) -> None:
        if self.comm is not None:
            self.comm.reset()

    def comm_bytes(self) -> dict[str, int]:
        return {"tp": self.comm.total_bytes()} if self.comm is not None else {}


def build_local(full: Transformer, mesh: Mesh, cfg) -> LocalModel:
    """This rank's :class:`LocalModel` for the mesh and config."""
    if mesh.size("pp") == 1:
        loss_fn = Transformer.loss
        comm = None
        if mesh.size("tp") > 1:
            from plait.tensor import parallelize

            parallelize(full, mesh, sequence_parallel=cfg.sequence_parallel)
            raise NotImplementedError("tensor parallel loss wiring")
        return WholeModel(full, cfg.num_microbatches, loss_fn, comm)
    raise NotImplementedError("pipeline wiring")
