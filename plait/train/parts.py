"""What one rank trains: its part of the model on the mesh, and how it runs a step.

:func:`build_local` takes the full model (built from its source, identical on every rank)
and returns a :class:`LocalModel`: the parameters this rank owns, keyed by their names in the full
model (checkpoints and clipping use these), and ``step(x, y)``, which runs forward and backward
over the micro-batches of this replica's batch and returns its mean loss.

- ``pp == 1``: the whole model, with gradient accumulation over the micro-batches.
- ``pp > 1``: the model cut into ``pp * virtual`` stages by its layout
  (:func:`plait.pipeline.partition`: the reference model, a Hugging Face decoder or an
  ``nn.Sequential``); this
  rank keeps the stages the schedule places on it and runs them with
  :class:`plait.pipeline.PipelineRuntime`.
- ``tp > 1``: whatever this rank keeps is sharded over its tensor group
  (:func:`plait.tensor.parallelize`), and the loss is the vocabulary-parallel cross-entropy.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from plait.mesh import Mesh
from plait.models.layout import find_layout
from plait.trace import Event, Timeline

__all__ = ["LocalModel", "build_local", "validate_parallel"]


def validate_parallel(cfg, source) -> None:
    """Check the tensor and pipeline settings against the model before any process starts.

    A Hugging Face model is built on the meta device for this (shapes only, no memory)."""
    seq_len, pc = cfg.seq_len, cfg.parallel
    if pc.pp == 1 and pc.tp == 1:
        return
    if source.kind == "hf":
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(source.hf_config(cfg.n_layers))
    else:
        model = source.build(0, cfg.n_layers)
    if pc.tp > 1:
        from plait.tensor import validate

        validate(model, pc.tp, sequence_parallel=pc.sequence_parallel, seq_len=seq_len)
    if pc.pp > 1:
        from plait.pipeline import build_schedule, partition
        from plait.pipeline import validate as validate_schedule

        schedule = build_schedule(
            pc.schedule, pc.pp, pc.num_microbatches, pc.virtual, pc.schedule_costs
        )
        validate_schedule(schedule)
        # "time" is measured in the workers; here the split only has to exist
        partition(model, schedule.num_stages, "params" if pc.balance == "time" else pc.balance)


class LocalModel:
    """This rank's share of the model and how it runs a step (see :func:`build_local`)."""

    params: dict[str, nn.Parameter]
    timeline: Timeline | None = None
    schedule = None  # the pipeline schedule, when there is one

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Forward and backward over this replica's batch; returns its mean loss."""
        raise NotImplementedError


class WholeModel(LocalModel):
    """No pipeline: the whole model (tensor-sharded when tp > 1), accumulating over micro-batches."""

    def __init__(self, model: nn.Module, num_microbatches: int, loss_fn):
        from plait.pipeline import split_batch

        self.model = model
        self.m = num_microbatches
        self.loss_fn = loss_fn
        self.split = split_batch
        self.params = dict(model.named_parameters(remove_duplicate=False))

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        tl = Timeline(1)
        total, start = 0.0, 0
        for i, n in enumerate(self.split(x.shape[0], self.m)):
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


class PipelinePart(LocalModel):
    """This rank's pipeline stages, run by the schedule."""

    def __init__(self, runtime, stages: dict[int, nn.Module]):
        self.runtime = runtime
        self.schedule = runtime.schedule
        self.params = {}
        for stage in stages.values():
            self.params.update(dict(stage.named_parameters(remove_duplicate=False)))

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        loss = self.runtime.train_step(x, y)
        self.timeline = self.runtime.timeline
        return loss


def _loss_for(module: nn.Module, tp: int, source):
    """The loss on this rank: the model's own, or the vocabulary-parallel cross-entropy when the
    output head is sharded over the tensor group."""
    if tp == 1:
        return source.loss
    from plait.tensor import loss_fn

    sharded = loss_fn(module)
    return lambda out, y: sharded(getattr(out, "logits", out), y)


def _checkpoint_blocks(model: nn.Module) -> None:
    """Recompute each block's activations in backward instead of keeping them (the pipeline
    runtime does the same per stage). The block's own forward is wrapped, so parameter names
    stay those of the model."""
    from torch.utils.checkpoint import checkpoint

    for _, block in find_layout(model).blocks:
        inner = block.forward
        block.forward = lambda *a, inner=inner, **k: checkpoint(inner, *a, use_reentrant=False, **k)


def _check_unshared(stages: dict[int, nn.Module]) -> None:
    """FSDP manages each parameter in one unit: two of this rank's stages sharing one (a tied
    embedding on the first and last stage of a V-shaped schedule) cannot both be sharded."""
    seen: dict[int, int] = {}
    for s, stage in stages.items():
        for name, p in stage.named_parameters():
            if seen.setdefault(id(p), s) != s:
                raise ValueError(
                    f"--fsdp: stages {seen[id(p)]} and {s} on this rank share parameter {name!r}; "
                    f"FSDP shards each parameter in one unit: choose a schedule that places them "
                    f"on different ranks"
                )


def build_local(full: nn.Module, mesh: Mesh, cfg, source) -> LocalModel:
    """This rank's :class:`LocalModel` for the mesh and config (shards ``full`` in place)."""
    transport = cfg.p2p
    cfg = cfg.parallel
    fsdp = cfg.fsdp  # each block, and each stage's rest, fully sharded over dp (train.fsdp)
    if fsdp:

        def shard(unit: nn.Module) -> None:
            from plait.train.fsdp import shard_over_dp
            from plait.train.precision import LOW_DTYPES

            ids = {id(b) for _, b in find_layout(full).blocks}  # after tp: the modules run
            blocks = [m for m in unit.modules() if id(m) in ids]
            shard_over_dp(unit, mesh, blocks, LOW_DTYPES.get(cfg.precision))

    recompute = cfg.recompute == "full"
    tp = mesh.size("tp")
    if tp > 1:
        from plait.tensor import parallelize
    if mesh.size("pp") == 1:
        if tp > 1:
            parallelize(full, mesh, sequence_parallel=cfg.sequence_parallel)
        if recompute:
            _checkpoint_blocks(full)
        loss_fn = _loss_for(full, tp, source)
        if fsdp:
            shard(full)
        return WholeModel(full, cfg.num_microbatches, loss_fn)

    from plait.pipeline import PipelineRuntime, build_schedule, partition

    schedule = build_schedule(
        cfg.schedule, mesh.size("pp"), cfg.num_microbatches, cfg.virtual, cfg.schedule_costs
    )
    all_stages = partition(full, schedule.num_stages, cfg.balance)
    stages = {s: all_stages[s] for s in schedule.stages_of(mesh.pp_rank)}
    if tp > 1:
        for stage in stages.values():
            parallelize(stage, mesh, sequence_parallel=cfg.sequence_parallel)
    last = schedule.num_stages - 1
    # Only the last stage's rank computes the loss; the others are given the plain one.
    loss_fn = _loss_for(stages.get(last, full), tp if last in stages else 1, source)
    if fsdp:
        _check_unshared(stages)
        for stage in stages.values():
            shard(stage)
    runtime = PipelineRuntime(
        stages, schedule, mesh, loss_fn, checkpoint=recompute, transport=transport
    )
    if fsdp and any(runtime._deferred.values()):
        raise RuntimeError(
            "--fsdp: the pipeline runtime defers weight gradients of some stages to a W step "
            "outside autograd, which FSDP cannot reduce-scatter; run a schedule without W"
        )
    return PipelinePart(runtime, stages)
