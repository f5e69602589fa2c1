"""The ``single`` and ``task`` strategies: one process, or whole replicas via plait.tasks."""

from __future__ import annotations

import time
from functools import partial

import torch

from plait import tasks
from plait.infer.core import InferConfig, InferReport, build_model, score_batch
from plait.mesh import MeshShape
from plait.progress import progress_bar

__all__ = ["run_single", "run_task"]


def run_single(cfg: InferConfig, requests: list[torch.Tensor]) -> InferReport:
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)  # pinned like every worker of the other strategies
    try:
        t0 = time.perf_counter()
        model = build_model(cfg)
        losses, latencies = [], []
        with progress_bar(len(requests), "infer single", cfg.progress) as update:
            for batch in requests:
                batch_losses, seconds = score_batch(model, batch)
                losses += batch_losses
                latencies.append(seconds)
                update()
        return InferReport("single", MeshShape(), losses, latencies, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)


def _replica(cfg: InferConfig):  # setup: one whole model per worker, built once
    return build_model(cfg)


def run_task(cfg: InferConfig, requests: list[torch.Tensor]) -> InferReport:
    """N whole replicas; a free replica takes the next request (plait.tasks.map)."""
    t0 = time.perf_counter()
    results = tasks.map(
        score_batch,
        requests,
        workers=cfg.workers,
        setup=partial(_replica, cfg),
        threads_per_worker=cfg.threads,
        progress=cfg.progress,
        description=f"infer task x{cfg.workers}",
    )
    seconds = time.perf_counter() - t0
    losses = [loss for batch_losses, _ in results for loss in batch_losses]
    return InferReport("task", MeshShape(dp=cfg.workers), losses, [s for _, s in results], seconds)
