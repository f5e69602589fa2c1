"""What a training step reports: the metrics file, figures gathered from every rank, timelines."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from plait.mesh import Mesh
from plait.trace import Event, Timeline

__all__ = ["open_metrics", "mean_over", "busy", "gather_record", "write_timeline"]


def open_metrics(path: str, start_step: int):
    """Open the metrics file; on resume keep the records of steps before ``start_step`` only."""
    p = Path(path)
    kept = []
    if start_step and p.exists():
        kept = [
            line
            for line in p.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] < start_step
        ]
    f = p.open("w")
    f.writelines(line + "\n" for line in kept)
    return f


def mean_over(loss: float, group) -> float:
    if group is None or dist.get_world_size(group) == 1:
        return float(loss)
    t = torch.tensor([float(loss)], dtype=torch.float64)
    dist.all_reduce(t, group=group)
    return t.item() / dist.get_world_size(group)


def busy(timeline: Timeline | None) -> tuple[float, float, float]:
    """(compute seconds, first start, last end) of this rank's step timeline."""
    if not timeline or not timeline.events:
        return (0.0, 0.0, 0.0)
    return (sum(timeline.busy(r) for r in range(timeline.num_ranks)), timeline.start, timeline.end)


def gather_record(record: dict, mesh: Mesh) -> dict:
    """Rank 0's record completed with every rank's figures.

    Communication bytes are summed over ranks (per mesh axis), memory is listed per rank, the step
    time is the slowest rank's, and the bubble fraction is the share of rank-time not spent
    computing over the span of the step on all ranks.
    """
    mine = {
        "growth": record["peak_rss_mb"] - record.pop("rss_at_start_mb"),
        "rss": record.pop("peak_rss_mb"),
        "comm": record["comm_bytes"],
        "time": record["step_time_s"],
        "busy": record.pop("busy"),
        "state": record.pop("state_bytes", 0),
    }
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list[dict] = [None] * dist.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(parts, mine)
    else:
        parts = [mine]
    record["peak_rss_mb_per_rank"] = [p["rss"] for p in parts]
    record["peak_rss_growth_mb_per_rank"] = [p["growth"] for p in parts]
    # parameters + gradients + optimizer state held after the step (local shards, bytes)
    record["state_bytes_per_rank"] = [p["state"] for p in parts]
    record["comm_bytes"] = {k: sum(p["comm"][k] for p in parts) for k in mine["comm"]}
    record["step_time_s"] = max(p["time"] for p in parts)  # the step ends when the slowest does
    busy = sum(p["busy"][0] for p in parts)
    span = max(p["busy"][2] for p in parts) - min(p["busy"][1] for p in parts)
    record["bubble_fraction"] = 1.0 - busy / (len(parts) * span) if span > 0 else 0.0
    return record


def write_timeline(cfg, timeline: Timeline | None, mesh: Mesh) -> None:
    """Gather every rank's timeline of the last step into one, tracks by global rank."""
    if not (cfg.trace_out or cfg.timeline_png):
        return
    events = [
        Event(**{**asdict(e), "rank": mesh.rank}) for e in (timeline.events if timeline else [])
    ]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, events)
        events = [e for part in parts for e in part]
    if mesh.rank != 0:
        return
    merged = Timeline(mesh.shape.world_size, events, source="measured")
    if cfg.trace_out:
        merged.write_chrome_trace(cfg.trace_out)
    if cfg.timeline_png:
        merged.draw(
            cfg.timeline_png,
            title=f"plait train {cfg.model}: {cfg.parallel_for_plan().label()} — measured bubble "
            f"{merged.bubble_fraction():.1%}",
        )
