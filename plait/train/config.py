"""What a training run depends on: :class:`TrainConfig`, checked before any process starts.

How the step is split (mesh, schedule, micro-batches, recomputation, dtype, precision) is the one
:class:`plait.config.ParallelConfig` that every command shares; the rest is the run's own.

Example::

    cfg = TrainConfig(model="tiny", steps=50, parallel=ParallelConfig(pp=2, tp=2))
    cfg.validate()      # ValueError naming the first bad setting
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from plait.config import TRANSPORTS, ParallelConfig
from plait.models.source import resolve_model

__all__ = ["TrainConfig", "lr_at", "TRAIN_DTYPES"]

# Dtypes training casts the whole model to; fp16 needs loss scaling: --precision fp16-mixed.
TRAIN_DTYPES = ("fp32", "fp64", "bf16")


@dataclass
class TrainConfig:
    """Everything a training run depends on.

    Example::

        metrics = train(TrainConfig(model="tiny", steps=50, parallel=ParallelConfig(pp=2, tp=2)))
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
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    p2p: str = "auto"  # pipeline messages: plait.config.TRANSPORTS (PipelineRuntime transport)
    # fp16-mixed's dynamic loss scaling (plait.train.precision.LossScaler)
    loss_scale: float = 2.0**16  # the initial scale
    loss_scale_window: int = 1000  # finite steps in a row before the scale doubles
    # outputs and fault tolerance
    metrics_out: str | None = None
    trace_out: str | None = None
    timeline_png: str | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    resume_from: str | None = None  # a checkpoint; default: the newest that verifies
    allow_change: tuple[str, ...] = ()  # settings a resume may change (plait.train.resume)
    timeout: float = 60.0
    progress: bool = True

    @property
    def world_size(self) -> int:
        return self.parallel.world_size

    def parallel_for_plan(self) -> ParallelConfig:
        """The parallel configuration with the micro-batch size this run's batch gives (what the
        planner costs for it)."""
        pc = self.parallel
        return replace(pc, microbatch_size=max(1, self.batch_size // pc.dp // pc.num_microbatches))

    def source(self):
        """The model as named by ``model`` (:func:`plait.models.resolve_model`): a preset,
        ``hf:PATH`` or ``package.module:function``."""
        return resolve_model(self.model)

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting (before any process starts)."""
        source = self.source()
        pc = self.parallel
        if not isinstance(pc, ParallelConfig):
            raise ValueError(f"parallel must be a plait.ParallelConfig, got {type(pc).__name__}")
        if self.p2p not in TRANSPORTS:
            raise ValueError(f"p2p {self.p2p!r} is not one of {list(TRANSPORTS)}")
        for name in ("steps", "batch_size", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}"
                )
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        for name, value, valid in (
            ("grad-clip", self.grad_clip, "a norm >= 0 (0 disables clipping)"),
            ("weight-decay", self.weight_decay, "a number >= 0"),
            ("warmup-steps", self.warmup_steps, "a number of steps >= 0"),
            ("checkpoint-every", self.checkpoint_every, "a number of steps >= 0 (0: at the end)"),
        ):
            if not value >= 0:
                raise ValueError(f"--{name} {value} is not valid: it must be {valid}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not self.timeout > 0:
            raise ValueError(f"--timeout must be a positive number of seconds, got {self.timeout}")
        if pc.dtype not in TRAIN_DTYPES:
            raise ValueError(
                f"--dtype {pc.dtype!r} cannot train as a whole-model cast (no loss scaling); use "
                f"one of {list(TRAIN_DTYPES)}, or --precision fp16-mixed (fp16 compute, float32 "
                f"master weights, dynamic loss scaling)"
            )
        if not (1 <= self.loss_scale < math.inf):
            raise ValueError(
                f"--loss-scale must be a finite number >= 1 (the smallest scale an overflow "
                f"halves to), got {self.loss_scale!r}"
            )
        if not isinstance(self.loss_scale_window, int) or self.loss_scale_window < 1:
            raise ValueError(
                f"--loss-scale-window must be an integer >= 1, got {self.loss_scale_window!r}"
            )
        if pc.recompute == "selective":
            raise ValueError(
                "--recompute selective is modelled by the planner only; plait train recomputes "
                "'none' or 'full' (each block)"
            )
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"--lr-schedule {self.lr_schedule!r} is not 'constant' or 'cosine'")
        if self.n_layers is not None and (not isinstance(self.n_layers, int) or self.n_layers < 1):
            raise ValueError(f"--layers must be an integer >= 1, got {self.n_layers!r}")
        limit = source.max_seq_len
        if source.is_language_model and limit is not None and self.seq_len > limit:
            raise ValueError(
                f"--seq-len {self.seq_len} exceeds model {self.model!r}'s max_seq_len={limit}"
            )
        if not source.is_language_model and self.data is not None:
            raise ValueError(
                f"--data: {self.model!r} is not a language model; it makes its own batches"
            )
        if self.batch_size % pc.dp:
            raise ValueError(
                f"--batch-size {self.batch_size} must divide evenly over --dp "
                f"{pc.dp} replicas (try {pc.dp * max(1, self.batch_size // pc.dp)})"
            )
        local = self.batch_size // pc.dp
        if pc.num_microbatches > local:
            raise ValueError(
                f"--microbatches {pc.num_microbatches} exceeds the "
                f"{local} sequences each replica gets per step"
            )
        if self.resume and not self.checkpoint_dir:
            raise ValueError("--resume needs --checkpoint-dir")
        from plait.train.resume import SETTINGS

        bad = [c for c in self.allow_change if c not in SETTINGS]
        if bad:
            raise ValueError(
                f"--allow-change {','.join(bad)}: not a setting a resume checks; valid: "
                f"{','.join(SETTINGS)}"
            )
        if self.n_layers is not None and source.kind == "function":
            raise ValueError(
                f"--layers applies to presets and hf: models, not to {self.model!r} (a function "
                f"builds the depth it wants)"
            )
        if pc.pp > 1 or pc.tp > 1:  # the split is checked on the model itself (loads torch)
            from plait.train.parts import validate_parallel

            validate_parallel(self, source)


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
