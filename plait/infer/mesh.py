"""The ``pipeline`` and ``tensor`` strategies, alone or mixed with ``task``, on a plait.Mesh.

One :func:`plait.launch` job of ``dp * pp * tp`` workers. Every worker builds the same whole
model from the seed (or fills it from the checkpoint), then keeps its part: :func:`plait.tensor.parallelize` shards it over the
``tp`` group, and a forward-only pipeline keeps this rank's stage. The ``dp`` replicas (each a
pipeline and/or tensor group) take requests ``dp_rank, dp_rank + dp, ...``: a static split, since
a group of processes cannot take work from a pool one request at a time the way a single
``task`` worker does (pure ``task`` runs on :func:`plait.tasks.map` with dynamic dispatch).

Only one rank per replica reports (the last stage's ``tp`` rank 0), so the parent merges the
per-rank lists into input order.
"""

from __future__ import annotations

import time

import torch

from plait.infer.core import InferConfig, InferReport, build_model, logits_of, loss_for, peak_rss_mb
from plait.launch import launch
from plait.mesh import Mesh, MeshShape

__all__ = ["run_mesh"]


def run_mesh(cfg: InferConfig, shape: MeshShape, requests: list[torch.Tensor]) -> InferReport:
    _check_available(shape)
    # The split (stages, tensor sizes) and the checkpoint were checked by cfg.validate(), on a
    # probe of the model, before any process starts.
    t0 = time.perf_counter()
    per_rank = launch(
        _worker, shape.world_size, cfg, shape, requests, threads_per_worker=cfg.threads
    )
    seconds = time.perf_counter() - t0
    done = sorted(r for rank, _ in per_rank for r in rank)  # (request, losses, seconds)
    if [r for r, _, _ in done] != list(range(len(requests))):
        raise RuntimeError(f"requests came back incomplete: {[r for r, _, _ in done]}")
    losses = [loss for _, batch_losses, _ in done for loss in batch_losses]
    extra = {"peak_rss_mb_per_worker": [rss for _, rss in per_rank]}
    return InferReport(cfg.strategy, shape, losses, [s for _, _, s in done], seconds, extra)


def _check_available(shape: MeshShape) -> None:
    if shape.pp > 1:
        try:
            from plait.pipeline import PipelineRuntime, partition  # noqa: F401
        except ImportError:
            raise ValueError(
                "--strategy pipeline needs plait.pipeline's partition and PipelineRuntime, which "
                "this version of plait does not have yet"
            ) from None


def _worker(cfg: InferConfig, shape: MeshShape, requests: list[torch.Tensor]):
    mesh = Mesh(shape.dp, shape.pp, shape.tp)
    mine = list(range(mesh.dp_rank, len(requests), shape.dp))
    model = build_model(cfg)
    source = cfg.source()
    if shape.pp > 1:
        done = _pipeline_replica(cfg, mesh, model, requests, mine, source)
    else:
        done = _tensor_replica(mesh, model, requests, mine, source)
    return done, peak_rss_mb()


@torch.no_grad()
def _tensor_replica(mesh: Mesh, model, requests, mine, source=None):
    from plait.tensor import parallelize

    model = parallelize(model, mesh)  # a tp group of one leaves the model whole
    loss = loss_for(model, source)  # vocabulary-parallel cross-entropy on sharded logits
    out = []
    for r in mine:
        batch = requests[r]
        t0 = time.perf_counter()
        logits = logits_of(model(batch[:, :-1]))
        y = batch[:, 1:]
        # Each row's loss is a collective over the tp group: every rank computes it.
        losses = [loss(logits[i : i + 1], y[i : i + 1]).item() for i in range(len(batch))]
        out.append((r, losses, time.perf_counter() - t0))
    return out if mesh.tp_rank == 0 else []


WAVE = 32  # requests per pipeline run: enough micro-batches to fill the pipe, bounded memory


def _waves(mine: list[int], requests: list[torch.Tensor]) -> list[list[int]]:
    """Runs of equal-sized requests, at most WAVE long: each request is then one micro-batch."""
    waves: list[list[int]] = []
    for r in mine:
        w = waves[-1] if waves else None
        if w and len(w) < WAVE and len(requests[w[0]]) == len(requests[r]):
            w.append(r)
        else:
            waves.append([r])
    return waves


@torch.no_grad()
def _pipeline_replica(cfg: InferConfig, mesh: Mesh, model, requests, mine, source=None):
    from plait.pipeline import PipelineRuntime, build_schedule, partition
    from plait.tensor import parallelize

    pp = mesh.size("pp")
    stage = parallelize(partition(model, pp)[mesh.pp_rank], mesh)  # this rank's stage, tp-sharded
    loss = loss_for(stage, source)
    out = []
    for wave in _waves(mine, requests):
        batch = torch.cat([requests[r] for r in wave])
        runtime = PipelineRuntime(
            {mesh.pp_rank: stage}, build_schedule("gpipe", pp, len(wave)).forward_only(), mesh
        )
        try:
            logits = runtime.forward(batch[:, :-1])  # forward-only; None except on the last stage
            timeline = runtime.gather_timeline()
        finally:
            runtime.close()
        if not mesh.is_last_stage:
            continue
        y = batch[:, 1:]
        logits = logits_of(logits)
        losses = [loss(logits[i : i + 1], y[i : i + 1]).item() for i in range(len(batch))]
        # A request's latency: its first stage's forward start to its last stage's forward end.
        starts = {e.microbatch: e.start for e in timeline.events if e.kind == "F" and e.stage == 0}
        ends = {e.microbatch: e.end for e in timeline.events if e.kind == "F" and e.stage == pp - 1}
        row = 0
        for i, r in enumerate(wave):
            n = len(requests[r])
            out.append((r, losses[row : row + n], ends[i] - starts[i]))
            row += n
    return out if mesh.is_last_stage and mesh.tp_rank == 0 else []
