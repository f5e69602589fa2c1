"""The training loop over a dp x pp x tp mesh: AdamW, clipping, checkpoints, metrics, timelines.

``train(TrainConfig(...))`` runs on one process when ``dp * pp * tp == 1`` and otherwise launches
that many local workers (or joins a torchrun job). Every rank runs :func:`run_rank`: it builds the
full reference model from the seed (or loads it from a checkpoint), keeps and shards its own part
(:mod:`plait.train_parts`), and then for each step

1. takes its data-parallel slice of the global batch (batches depend only on seed and step),
2. runs forward and backward over the micro-batches (a pipeline schedule when ``pp > 1``),
3. averages gradients over the dp group (bucketed, overlapped with backward),
4. clips by the global norm over all shards, and steps AdamW with a warmup + cosine schedule.

Rank 0 writes the metrics (one JSON line per step), checkpoints are saved collectively, and the
measured timeline of the last step can be written as a Chrome trace and a Gantt PNG.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from plait import comm
from plait.alloc import peak_rss_mb, rss_mb
from plait.checkpoint import (
    checkpoint_keys,
    gather_full,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    take_shard,
)
from plait.data import ByteDataset
from plait.grads import GradSync, clip_grad_norm
from plait.launch import launch
from plait.mesh import Mesh
from plait.models import Transformer, get_config
from plait.progress import progress_bar
from plait.trace import Event, Timeline
from plait.zero import ZeroAdamW

__all__ = ["TrainConfig", "train", "run_rank"]

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


@dataclass
class TrainConfig:
    """Everything a training run depends on.

    Example::

        metrics = train(TrainConfig(model="tiny", steps=50, pp=2, tp=2, schedule="1f1b"))
        metrics[-1]["loss"] < metrics[0]["loss"]
    """

    model: str = "tiny"
    n_layers: int | None = None
    steps: int = 50
    batch_size: int = 8
    seq_len: int = 64
    seed: int = 0
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    data: str | None = None
    dtype: str = "float32"
    # the mesh
    dp: int = 1
    pp: int = 1
    tp: int = 1
    schedule: str = "1f1b"
    microbatches: int | None = None
    virtual: int | None = None
    schedule_costs: tuple[float, float, float] | None = None
    balance: str = "layers"
    activation_checkpointing: bool = False
    sequence_parallel: bool = False
    zero1: bool = False
    # outputs and fault tolerance
    metrics_out: str | None = None
    trace_out: str | None = None
    timeline_png: str | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    timeout: float = 60.0
    progress: bool = True

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp

    @property
    def num_microbatches(self) -> int:
        return self.microbatches or max(1, self.pp)

    @property
    def num_virtual(self) -> int:
        """Model chunks per pipeline rank: as given, else 2 for V-shaped and interleaved."""
        if self.virtual is not None:
            return self.virtual
        return 2 if self.schedule in ("zb-v", "interleaved-1f1b") and self.pp > 1 else 1

    def model_config(self):
        """The model preset, with ``n_layers`` replaced when given."""
        return get_config(self.model, **({"n_layers": self.n_layers} if self.n_layers else {}))

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting (before any process starts)."""
        mcfg = self.model_config()
        for name in ("steps", "batch_size", "seq_len", "dp", "pp", "tp", "num_virtual"):
            value = getattr(self, name)
            name = "virtual" if name == "num_virtual" else name
            if not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}"
                )
        if self.microbatches is not None and self.microbatches < 1:
            raise ValueError(f"--microbatches must be >= 1, got {self.microbatches}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"--lr-schedule {self.lr_schedule!r} is not 'constant' or 'cosine'")
        if self.seq_len > mcfg.max_seq_len:
            raise ValueError(
                f"--seq-len {self.seq_len} exceeds model {self.model!r}'s "
                f"max_seq_len={mcfg.max_seq_len}"
            )
        if self.batch_size % self.dp:
            raise ValueError(
                f"--batch-size {self.batch_size} must divide evenly over --dp "
                f"{self.dp} replicas (try {self.dp * max(1, self.batch_size // self.dp)})"
            )
        local = self.batch_size // self.dp
        if self.num_microbatches > local:
            raise ValueError(
                f"--microbatches {self.num_microbatches} exceeds the "
                f"{local} sequences each replica gets per step"
            )
        if self.resume and not self.checkpoint_dir:
            raise ValueError("--resume needs --checkpoint-dir")
        from plait.train_parts import validate_parallel

        validate_parallel(self, mcfg)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of ``step``: linear warmup, then constant or cosine down to min_lr_ratio."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (
        cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    )


def train(cfg: TrainConfig) -> list[dict]:
    """Run training; returns the per-step metrics (as rank 0 recorded them)."""
    cfg.validate()
    if cfg.world_size == 1 and not (dist.is_available() and dist.is_initialized()):
        return run_rank(cfg)
    results = launch(run_rank, cfg.world_size, cfg, timeout=cfg.timeout)
    return results[0]


def run_rank(cfg: TrainConfig) -> list[dict] | None:
    """The whole run on this rank (inside a launched worker, or the only process)."""
    from plait.train_parts import build_local

    torch.manual_seed(cfg.seed)
    rss_at_start = rss_mb()  # PyTorch's own footprint, so growth is what training holds
    mesh = Mesh(cfg.dp, cfg.pp, cfg.tp)
    rank0 = mesh.rank == 0
    dtype = DTYPES[cfg.dtype]
    data = ByteDataset.from_path(cfg.data, seed=cfg.seed)
    full = Transformer(cfg.model_config(), seed=cfg.seed).to(dtype)
    start_step, resume_from = 0, None
    if cfg.resume:
        resume_from = latest_checkpoint(cfg.checkpoint_dir)
    full_shapes = {n: tuple(p.shape) for n, p in full.named_parameters()}
    local = build_local(full, mesh, cfg)  # shards `full` in place
    params = local.params  # original full-model name -> this rank's (possibly sharded) parameter
    del full
    if cfg.zero1:
        opt = ZeroAdamW(params, mesh.group("dp"), lr=cfg.lr, weight_decay=cfg.weight_decay)
        owns = opt.owns
    else:
        opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)

        def owns(name: str) -> bool:
            return True

    if resume_from is not None:
        start_step = _load(resume_from, params, full_shapes, opt, mesh, owns)
    sync = GradSync(params.values(), mesh.group("dp"))
    out = _open_metrics(cfg.metrics_out, start_step) if rank0 and cfg.metrics_out else None
    history: list[dict] = []
    local_batch = cfg.batch_size // cfg.dp
    tokens = cfg.batch_size * cfg.seq_len
    timeline = None
    try:
        with progress_bar(
            cfg.steps - start_step, f"train {cfg.model}", rank0 and cfg.progress
        ) as update:
            for step in range(start_step, cfg.steps):
                x, y = data.batch(step, cfg.batch_size, cfg.seq_len)
                rows = slice(mesh.dp_rank * local_batch, (mesh.dp_rank + 1) * local_batch)
                for g in opt.param_groups:
                    g["lr"] = lr_at(cfg, step)
                comm.stats.reset()
                t0 = time.perf_counter()
                sync.prepare(accumulations=cfg.num_microbatches)
                loss = local.step(x[rows], y[rows])
                t1 = time.perf_counter()
                sync.finish()
                t2 = time.perf_counter()
                norm = clip_grad_norm(
                    params.values(), cfg.grad_clip, mesh.group("tp"), mesh.tp_rank, mesh.group("pp")
                )
                opt.step()
                opt.zero_grad(set_to_none=True)
                t3 = time.perf_counter()
                loss = _mean_over(loss, mesh.group("dp"))
                dt = time.perf_counter() - t0
                # Where rank 0's step went: forward and backward of every micro-batch (pipeline
                # and tensor communication included), waiting for the last gradient all-reduce,
                # clipping plus the optimizer.
                phases = {"forward_backward": t1 - t0, "dp_sync_wait": t2 - t1, "update": t3 - t2}
                timeline = local.timeline
                record = {
                    "step": step,
                    "loss": loss,
                    "step_time_s": dt,
                    "phase_s": phases,
                    "lr": lr_at(cfg, step),
                    "grad_norm": norm,
                    "comm_bytes": {a: comm.stats.bytes(axis=a) for a in ("dp", "pp", "tp")},
                    "busy": _busy(timeline),
                    "peak_rss_mb": peak_rss_mb(),
                    "rss_at_start_mb": rss_at_start,
                }
                record = _gather_record(record, mesh)
                record["tokens_per_s"] = tokens / record["step_time_s"]
                if rank0:
                    history.append(record)
                    if out:
                        out.write(json.dumps(record) + "\n")
                        out.flush()
                    update(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}")
                done = step + 1
                if (
                    cfg.checkpoint_dir
                    and cfg.checkpoint_every
                    and (done % cfg.checkpoint_every == 0 or done == cfg.steps)
                ):
                    _save(cfg.checkpoint_dir, done, params, full_shapes, opt, mesh, owns)
    finally:
        if out:
            out.close()
        sync.remove()
    _write_timeline(cfg, timeline, mesh)
    return history if rank0 else None


def _open_metrics(path: str, start_step: int):
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


def _mean_over(loss: float, group) -> float:
    if group is None or dist.get_world_size(group) == 1:
        return float(loss)
    t = torch.tensor([float(loss)], dtype=torch.float64)
    dist.all_reduce(t, group=group)
    return t.item() / dist.get_world_size(group)


def _busy(timeline: Timeline | None) -> tuple[float, float, float]:
    """(compute seconds, first start, last end) of this rank's step timeline."""
    if not timeline or not timeline.events:
        return (0.0, 0.0, 0.0)
    return (sum(timeline.busy(r) for r in range(timeline.num_ranks)), timeline.start, timeline.end)


def _gather_record(record: dict, mesh: Mesh) -> dict:
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
    }
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list[dict] = [None] * dist.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(parts, mine)
    else:
        parts = [mine]
    record["peak_rss_mb_per_rank"] = [p["rss"] for p in parts]
    record["peak_rss_growth_mb_per_rank"] = [p["growth"] for p in parts]
    record["comm_bytes"] = {k: sum(p["comm"][k] for p in parts) for k in mine["comm"]}
    record["step_time_s"] = max(p["time"] for p in parts)  # the step ends when the slowest does
    busy = sum(p["busy"][0] for p in parts)
    span = max(p["busy"][2] for p in parts) - min(p["busy"][1] for p in parts)
    record["bubble_fraction"] = 1.0 - busy / (len(parts) * span) if span > 0 else 0.0
    return record


# --- checkpoints --------------------------------------------------------------------------------

_OPT_KEYS = ("exp_avg", "exp_avg_sq")


def _save(directory, step, params, full_shapes, opt, mesh: Mesh, owns) -> None:
    """Every rank adds its stage's tensors, gathered over tp; optimizer state from its owner.

    The step is the data position (batches are a function of seed and step); each rank's RNG
    state is kept under its rank, for a resume on the same world size.
    """
    group = mesh.group("tp")
    state: dict = {"step": step, f"rng.rank{mesh.rank}": torch.get_rng_state()}
    for name, p in params.items():
        state[f"model.{name}"] = gather_full(p.data, full_shapes[name], group)
        st = opt.state.get(p, {}) if owns(name) else {}
        for key in _OPT_KEYS:
            if key in st:
                state[f"optim.{name}.{key}"] = gather_full(st[key], full_shapes[name], group)
        if "step" in st:
            state[f"optim.{name}.step"] = st["step"].detach().clone()
    save_checkpoint(directory, step, state)


def _load(path, params, full_shapes, opt, mesh: Mesh, owns) -> int:
    """Read this rank's tensors (in full) and keep its shard of each; any mesh shape works."""
    state: dict = {"step": 0}
    for name, p in params.items():
        state[f"model.{name}"] = torch.empty(full_shapes[name], dtype=p.dtype)
        if not owns(name):
            continue
        for key in _OPT_KEYS:
            state[f"optim.{name}.{key}"] = torch.empty(full_shapes[name], dtype=p.dtype)
        state[f"optim.{name}.step"] = torch.zeros((), dtype=torch.float32)
    rng_key = f"rng.rank{mesh.rank}"
    saved_world = sum(k.startswith("rng.rank") for k in checkpoint_keys(path))
    same_world = saved_world == mesh.shape.world_size
    if same_world:  # RNG streams belong to ranks: restored only on the same world size
        state[rng_key] = torch.get_rng_state()
    load_checkpoint(path, state)
    if same_world:
        torch.set_rng_state(state[rng_key])
    tp_rank = mesh.tp_rank
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(take_shard(state[f"model.{name}"], tuple(p.shape), tp_rank))
            if not owns(name):
                continue
            opt.state[p] = {
                "step": state[f"optim.{name}.step"],
                **{
                    k: take_shard(state[f"optim.{name}.{k}"], tuple(p.shape), tp_rank).to(p.dtype)
                    for k in _OPT_KEYS
                },
            }
    return int(state["step"])


# --- timelines ------------------------------------------------------------------------------------


def _write_timeline(cfg: TrainConfig, timeline: Timeline | None, mesh: Mesh) -> None:
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
            title=f"plait train {cfg.model}: dp={cfg.dp} pp={cfg.pp} "
            f"tp={cfg.tp} {cfg.schedule} m={cfg.num_microbatches} — measured bubble "
            f"{merged.bubble_fraction():.1%}",
        )
