"""The training loop over a dp x pp x tp mesh: AdamW, clipping, checkpoints, metrics, timelines.

``train(TrainConfig(...))`` runs on one process when ``dp * pp * tp == 1`` and otherwise launches
that many local workers (or joins a torchrun job). Every rank runs :func:`run_rank`: it builds the
full model from its source (:func:`plait.models.resolve_model`: a preset from the seed, a Hugging
Face directory's weights, a user's function), loads a checkpoint when resuming, keeps and shards
its own part (:mod:`plait.train.parts`), and then for each step

1. takes its data-parallel slice of the global batch (batches depend only on seed and step),
2. runs forward and backward over the micro-batches (a pipeline schedule when ``pp > 1``), under
   autocast for a mixed ``--precision`` (:mod:`plait.train.precision`; fp16 scales the loss),
3. averages gradients over the dp group (bucketed, overlapped with backward), and sums a tied
   embedding's gradients over the two pipeline ranks that hold it,
4. clips by the global norm over all shards, and steps AdamW with a warmup + cosine schedule.

Rank 0 writes the metrics (one JSON line per step), checkpoints are saved collectively, and the
measured timeline of the last step can be written as a Chrome trace and a Gantt PNG.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace

import torch
import torch.distributed as dist

from plait import comm, heartbeat
from plait.alloc import peak_rss_mb, rss_mb
from plait.data import dataset_for
from plait.launch import launch
from plait.mesh import Mesh
from plait.models.layout import tied_parameter_names
from plait.progress import progress_bar
from plait.train.checkpoint import check_checkpoint_dir, load_state, save_state
from plait.train.config import TrainConfig, lr_at
from plait.train.fsdp import state_bytes
from plait.train.grads import GradSync, TiedGrads, clip_grad_norm
from plait.train.metrics import busy, gather_record, mean_over, open_metrics, write_timeline
from plait.train.parts import build_local
from plait.train.precision import Precision, scale_loss
from plait.train.resume import check_compatible, choose_checkpoint, model_shapes, run_settings
from plait.train.zero import ZeroAdamW

__all__ = ["train", "run_rank", "checkpoint_record", "NonFiniteError"]

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}


class NonFiniteError(ArithmeticError):
    """The loss or the gradient norm of a step is NaN or infinite: training stopped before the
    optimizer step (so neither the parameters nor any checkpoint hold the bad values)."""


def train(cfg: TrainConfig) -> list[dict]:
    """Run training; returns the per-step metrics (as rank 0 recorded them).

    Before any worker starts: the settings are validated, the checkpoint directory must be
    writable with room for a checkpoint of this model, and ``--resume`` picks the newest
    checkpoint that verifies and fits this run (:mod:`plait.train.resume`).
    """
    cfg.validate()
    _check_world(cfg)
    source = cfg.source()
    if cfg.world_size > 1:
        _check_corpus(cfg, source)
    shapes = model_shapes(cfg, source) if cfg.checkpoint_dir else None
    if cfg.checkpoint_dir:
        check_checkpoint_dir(cfg.checkpoint_dir, _checkpoint_bytes(shapes, cfg))
    if cfg.resume and cfg.resume_from is None:
        found = choose_checkpoint(cfg, source, shapes)
        cfg = replace(cfg, resume_from=str(found) if found else None, resume=found is not None)
    elif cfg.resume_from is not None:
        from plait.train.store import verify_checkpoint

        verify_checkpoint(cfg.resume_from)
        check_compatible(cfg.resume_from, cfg, source, shapes)
    if cfg.world_size == 1 and not (dist.is_available() and dist.is_initialized()):
        return run_rank(cfg)
    results = launch(run_rank, cfg.world_size, cfg, timeout=cfg.timeout)
    return results[0]


def _check_world(cfg: TrainConfig) -> None:
    """Under torchrun the world is torchrun's: refuse a mesh that does not fill it (each
    process would otherwise train its own full copy)."""
    from plait.launch import torchrun_world_size

    world = torchrun_world_size()
    if world is not None and world != cfg.world_size:
        pc = cfg.parallel
        raise ValueError(
            f"torchrun started {world} processes but the mesh --dp {pc.dp} x --pp {pc.pp} x "
            f"--tp {pc.tp} has {cfg.world_size} ranks; choose sizes whose product is {world} "
            f"(e.g. --dp {world})"
        )


def _check_corpus(cfg: TrainConfig, source) -> None:
    """A corpus too short for one window is refused here, not inside every worker. Corpora over
    8 MiB hold more tokens than any window needs, and are not read twice."""
    from pathlib import Path

    if cfg.data is None or not Path(cfg.data).is_file() or Path(cfg.data).stat().st_size > 2**23:
        return
    dataset_for(source, cfg.data, seed=cfg.seed, seq_len=cfg.seq_len)


def _checkpoint_bytes(shapes: dict | None, cfg: TrainConfig) -> int:
    """About what one checkpoint of this model takes: weights and two AdamW moments."""
    if not shapes:
        return 0
    numel = sum(math.prod(shape) for shape in shapes.values())  # a tied matrix counts twice
    per = {"fp64": 8, "fp32": 4, "bf16": 2, "fp16": 2}[cfg.parallel.dtype]
    return 3 * numel * per


def checkpoint_record(cfg: TrainConfig, source) -> dict:
    """What a checkpoint of this run records about its model (``plait.json``): the name as given
    (an ``hf:`` path made absolute), the layer count it was built with, dtype, mesh and seed --
    enough for ``plait export`` and ``plait infer --checkpoint`` to rebuild it."""
    pc = cfg.parallel
    name = f"hf:{source.path}" if source.kind == "hf" else source.name
    n_layers = cfg.n_layers if cfg.n_layers is not None else source.n_layers
    return {
        "format": 1,
        "model": name,
        "kind": source.kind,
        "n_layers": n_layers,
        "dtype": pc.dtype,
        "precision": pc.precision,
        "mesh": {"dp": pc.dp, "pp": pc.pp, "tp": pc.tp},
        "seed": cfg.seed,
        "run": run_settings(cfg, source),
    }


def run_rank(cfg: TrainConfig) -> list[dict] | None:
    """The whole run on this rank (inside a launched worker, or the only process)."""
    torch.manual_seed(cfg.seed)
    rss_at_start = rss_mb()  # PyTorch's own footprint, so growth is what training holds
    pc = cfg.parallel
    mesh = Mesh(pc.dp, pc.pp, pc.tp)
    rank0 = mesh.rank == 0
    dtype = DTYPES[pc.dtype]
    source = cfg.source()
    data = dataset_for(source, cfg.data, seed=cfg.seed, seq_len=cfg.seq_len)
    full = source.build(cfg.seed, cfg.n_layers).to(dtype)
    start_step, resume_from = 0, cfg.resume_from
    full_shapes = {n: tuple(p.shape) for n, p in full.named_parameters(remove_duplicate=False)}
    if resume_from is not None:  # verified by train(); the model itself checked here too
        check_compatible(resume_from, cfg, source, full_shapes)
    tied = tied_parameter_names(full)
    precision = Precision(pc.precision, cfg.loss_scale, cfg.loss_scale_window)
    precision.check_masters(full.parameters())
    local = build_local(full, mesh, cfg, source)  # shards `full` in place
    scaler = precision.scaler  # fp16-mixed: dynamic loss scaling
    if scaler is not None:
        scale_loss(local, lambda: scaler.scale)
    params = local.params  # original full-model name -> this rank's (possibly sharded) parameter
    del full
    # A tied matrix may be here under two names (first and last stage on one rank): one tensor
    # for the optimizer, the gradient sync and clipping; both names in checkpoints.
    unique: dict[str, torch.nn.Parameter] = {}
    primary: dict[int, str] = {}
    for name, p in params.items():
        primary.setdefault(id(p), name)
        unique.setdefault(primary[id(p)], p)
    uses = {i: sum(1 for p in params.values() if id(p) == i) for i in primary}
    meta = {**checkpoint_record(cfg, source), "params": full_shapes}
    if pc.zero1:
        opt = ZeroAdamW(unique, mesh.group("dp"), lr=cfg.lr, weight_decay=cfg.weight_decay)

        def owns(name: str) -> bool:
            return opt.owns(primary[id(params[name])])
    else:
        opt = torch.optim.AdamW(list(unique.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)

        def owns(name: str) -> bool:
            return True

    tied_grads = TiedGrads(params, tied, mesh, local.schedule)

    if resume_from is not None:
        start_step = load_state(resume_from, params, full_shapes, opt, mesh, owns, verify=False)
        from plait.train.store import checkpoint_meta

        saved = checkpoint_meta(resume_from).get("values", {})
        if scaler is not None and "loss_scale" in saved:
            scaler.load_state_dict(saved)
    # FSDP reduce-scatters gradients itself, in each backward: no all-reduce of them here.
    sync = GradSync(unique.values(), None if pc.fsdp else mesh.group("dp"), uses=uses)
    out = open_metrics(cfg.metrics_out, start_step) if rank0 and cfg.metrics_out else None
    history: list[dict] = []
    local_batch = cfg.batch_size // pc.dp
    tokens = cfg.batch_size * cfg.seq_len
    timeline = None
    device = next(iter(unique.values())).device.type if unique else "cpu"
    try:
        with progress_bar(
            cfg.steps - start_step, f"train {cfg.model}", rank0 and cfg.progress
        ) as update:
            for step in range(start_step, cfg.steps):
                x, y = data.batch(step, cfg.batch_size, cfg.seq_len)
                if x.is_floating_point():  # a user model's own inputs, in the training dtype
                    x = x.to(dtype)
                rows = slice(mesh.dp_rank * local_batch, (mesh.dp_rank + 1) * local_batch)
                for g in opt.param_groups:
                    g["lr"] = lr_at(cfg, step)
                comm.stats.reset()
                heartbeat.set_step(step)
                heartbeat.beat("forward/backward")
                t0 = time.perf_counter()
                sync.prepare(accumulations=pc.num_microbatches)
                scale = scaler.scale if scaler is not None else None
                with precision.autocast(device):  # forward and backward (precision.py)
                    loss = local.step(x[rows], y[rows])
                if scale is not None:
                    loss /= scale  # a power of two: the loss as an unscaled run reports it
                t1 = time.perf_counter()
                heartbeat.beat("wait all-reduce gradients")
                sync.finish()
                tied_grads.reduce()
                if scaler is not None:
                    scaler.unscale_(unique.values())  # after the fp32 sums, before clipping
                t2 = time.perf_counter()
                heartbeat.beat("clip gradients (norm all-reduce)")
                norm = clip_grad_norm(
                    unique.values(),
                    cfg.grad_clip,
                    mesh.group("tp"),
                    mesh.tp_rank,
                    mesh.group("pp"),
                    not_here=tied_grads.not_here,
                    dp_group=mesh.group("dp") if pc.fsdp else None,
                )
                heartbeat.beat("mean loss over dp (all-reduce)")
                loss = mean_over(loss, mesh.group("dp"))
                finite = math.isfinite(loss) and math.isfinite(norm)  # the same on every rank
                if not finite and (scaler is None or scaler.at_floor):
                    floor = f" at the smallest loss scale {scale}" if scaler is not None else ""
                    raise NonFiniteError(
                        f"step {step}: loss {loss}, gradient norm {norm}: not finite{floor}; "
                        "stopped before the optimizer step (lower --lr, or --grad-clip; --resume "
                        "restarts from the last checkpoint)"
                    )
                # fp16: an overflow skips the step and halves the scale
                skipped = scaler.update(finite) if scaler is not None else False
                if not skipped:
                    heartbeat.beat("optimizer step")  # with --zero1: each shard broadcast
                    opt.step()
                t3 = time.perf_counter()
                dt = t3 - t0
                # a metric, outside the timed step (a pass over every tensor: ms under FSDP)
                held = state_bytes(unique.values(), opt, sync._flat.values())
                opt.zero_grad(set_to_none=True)
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
                    **({"loss_scale": scale, "skipped": skipped} if scaler is not None else {}),
                    "comm_bytes": {a: comm.stats.bytes(axis=a) for a in ("dp", "pp", "tp")},
                    "busy": busy(timeline),
                    "peak_rss_mb": peak_rss_mb(),
                    "state_bytes": held,
                    "rss_at_start_mb": rss_at_start,
                }
                record = gather_record(record, mesh)
                record["tokens_per_s"] = tokens / record["step_time_s"]
                if rank0:
                    history.append(record)
                    if out:
                        out.write(json.dumps(record) + "\n")
                        out.flush()
                    update(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}")
                done = step + 1
                every = cfg.checkpoint_every
                if cfg.checkpoint_dir and (done == cfg.steps or (every and done % every == 0)):
                    heartbeat.beat("save checkpoint", watched=False)
                    extra = scaler.state_dict() if scaler is not None else None
                    save_state(
                        cfg.checkpoint_dir, done, params, full_shapes, opt, mesh, owns, meta, extra
                    )
    finally:
        if out:
            out.close()
        sync.remove()
    write_timeline(cfg, timeline, mesh)
    return history if rank0 else None
