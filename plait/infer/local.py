"""The ``single`` and ``task`` strategies: one process, or whole replicas via plait.tasks."""

from __future__ import annotations

import time
from functools import partial

import torch

from plait import tasks
from plait.infer.core import (
    InferConfig,
    InferReport,
    build_model,
    loss_for,
    peak_rss_mb,
    score_batch,
    score_batch_rss,
)
from plait.mesh_shape import MeshShape
from plait.progress import progress_bar

__all__ = ["run_single", "run_task"]


def run_single(cfg: InferConfig, requests: list[torch.Tensor]) -> InferReport:
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)  # pinned like every worker of the other strategies
    try:
        t0 = time.perf_counter()
        model = build_model(cfg)
        loss = loss_for(model, cfg.source())
        losses, latencies = [], []
        with progress_bar(len(requests), "infer single", cfg.progress) as update:
            for batch in requests:
                batch_losses, seconds = score_batch(model, batch, loss)
                losses += batch_losses
                latencies.append(seconds)
                update()
        seconds = time.perf_counter() - t0
        return InferReport(
            "single",
            MeshShape(),
            losses,
            latencies,
            seconds,
            {"peak_rss_mb_per_worker": [peak_rss_mb()]},
        )
    finally:
        torch.set_num_threads(threads)


def _replica(cfg: InferConfig):  # setup: one whole model (and its loss) per worker, built once
    model = build_model(cfg)
    return model, loss_for(model, cfg.source())


def _score(replica, batch: torch.Tensor):
    model, loss = replica
    return score_batch_rss(model, batch, loss)


def run_task(cfg: InferConfig, requests: list[torch.Tensor]) -> InferReport:
    """N whole replicas; a free replica takes the next request (plait.tasks.map)."""
    t0 = time.perf_counter()
    results = tasks.map(
        _score,
        requests,
        workers=cfg.workers,
        setup=partial(_replica, cfg),
        threads_per_worker=cfg.threads,
        progress=cfg.progress,
        description=f"infer task x{cfg.workers}",
    )
    seconds = time.perf_counter() - t0
    losses = [loss for batch_losses, _, _ in results for loss in batch_losses]
    # Workers are not named in results; the largest peaks stand for the busiest workers.
    peaks = sorted((rss for _, _, rss in results), reverse=True)[: cfg.workers]
    return InferReport(
        "task",
        MeshShape(dp=cfg.workers),
        losses,
        [s for _, s, _ in results],
        seconds,
        {"peak_rss_mb_per_worker": peaks},
    )
