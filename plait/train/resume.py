"""Whether a checkpoint fits the run that resumes from it, decided before any worker starts.

A checkpoint's manifest records the run's settings (:func:`run_settings`) and the model's
parameter names and full shapes. ``--resume`` picks the newest checkpoint that verifies (saying
which newer ones it skipped and why), then refuses, in one line naming what differs, a
checkpoint of another model (missing, extra or reshaped parameters: ``--layers 1`` on a 2-layer
checkpoint) or of a run with other settings (seed, learning rate, dtype, batch...). A change made
on purpose is allowed by name: ``--allow-change lr,steps``. The mesh, the schedule and the
micro-batching may always change: checkpoints are mesh-independent.

Torch-free at import (:data:`SETTINGS` is read when a config is validated).
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["SETTINGS", "run_settings", "model_shapes", "choose_checkpoint", "check_compatible"]

# What a resumed run must share with the run that saved (unless allowed by name): everything
# that changes which numbers training produces, apart from how the work is split.
SETTINGS = (
    "model",
    "seed",
    "lr",
    "lr_schedule",
    "min_lr_ratio",
    "warmup_steps",
    "steps",
    "weight_decay",
    "grad_clip",
    "batch_size",
    "seq_len",
    "data",
    "dtype",
    "precision",
)


def run_settings(cfg, source) -> dict:
    """The settings of :data:`SETTINGS` for this run, as recorded in its checkpoints."""
    name = f"hf:{source.path}" if source.kind == "hf" else source.name
    data = cfg.data
    if data is not None and Path(data).exists():
        data = str(Path(data).resolve())
    parallel = ("dtype", "precision")  # ParallelConfig's
    out = {k: getattr(cfg, k) for k in SETTINGS if k not in ("model", "data", *parallel)}
    out.update({k: getattr(cfg.parallel, k) for k in parallel})
    return {**out, "model": name, "data": data}


def model_shapes(cfg, source) -> dict[str, tuple[int, ...]] | None:
    """Every parameter's name and full shape, from a build on the meta device (no memory);
    None when the model cannot be built there (then the workers check)."""
    import torch

    try:
        with torch.device("meta"):
            if source.kind == "hf":
                from transformers import AutoModelForCausalLM

                model = AutoModelForCausalLM.from_config(source.hf_config(cfg.n_layers))
            else:
                model = source.build(cfg.seed, cfg.n_layers)
    except Exception:  # noqa: BLE001 - a user's builder may need real tensors; workers check
        return None
    return {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}


def choose_checkpoint(cfg, source, shapes) -> Path | None:
    """The checkpoint ``--resume`` continues from (None: nothing to resume, said so)."""
    from plait.train.store import CheckpointError, newest_verified

    directory = cfg.checkpoint_dir
    path, rejected = newest_verified(directory)
    for why in rejected:
        print(f"plait train: --resume: skipping a checkpoint: {why}", file=sys.stderr)
    if path is None:
        if rejected:
            raise CheckpointError(
                f"--resume: no checkpoint in {directory} verifies (see above); move them away "
                "to start from step 0"
            )
        print(
            f"plait train: --resume: no complete checkpoint in {directory}; starting from step 0",
            file=sys.stderr,
        )
        return None
    if rejected:
        print(f"plait train: --resume: resuming from {path} instead", file=sys.stderr)
    check_compatible(path, cfg, source, shapes)
    return path


def check_compatible(path, cfg, source, shapes) -> None:
    """CheckpointError (one line) unless checkpoint ``path`` fits this run (see module doc)."""
    from plait.train.store import checkpoint_meta

    meta = checkpoint_meta(path) or {}
    saved = meta.get("params")
    if shapes is not None and saved is not None:
        _check_params(path, {k: tuple(v) for k, v in saved.items()}, shapes)
    now = run_settings(cfg, source)
    before = meta.get("run", {})
    allowed = set(cfg.allow_change)
    differ = [
        k
        for k in SETTINGS
        if k in before and k not in allowed and before[k] != now[k] and _matters(k, cfg)
    ]
    if differ:
        from plait.train.store import CheckpointError

        what = ", ".join(f"{k} {before[k]!r} -> {now[k]!r}" for k in differ)
        raise CheckpointError(
            f"--resume: this run differs from checkpoint {path}: {what}; pass --allow-change "
            f"{','.join(differ)} to resume anyway"
        )


def _matters(key: str, cfg) -> bool:
    # The step count shapes the learning rate only under the cosine schedule.
    return key != "steps" or cfg.lr_schedule == "cosine"


def _check_params(path, saved: dict, shapes: dict) -> None:
    from plait.train.store import CheckpointError

    missing = [n for n in saved if n not in shapes]
    extra = [n for n in shapes if n not in saved]
    reshaped = [n for n in saved if n in shapes and saved[n] != shapes[n]]
    if not (missing or extra or reshaped):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} of its parameters are not in this model ({_few(missing)})")
    if extra:
        parts.append(f"this model has {len(extra)} it lacks ({_few(extra)})")
    for n in reshaped[:2]:
        parts.append(f"{n} is {saved[n]} there, {shapes[n]} here")
    raise CheckpointError(
        f"--resume: checkpoint {path} holds another model: {'; '.join(parts)} (check --model "
        "and --layers)"
    )


def _few(names: list[str]) -> str:
    return ", ".join(names[:2]) + (f", +{len(names) - 2} more" if len(names) > 2 else "")
