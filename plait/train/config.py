"""What a training run depends on: :class:`TrainConfig`, checked before any process starts.

Example::

    cfg = TrainConfig(model="tiny", steps=50, pp=2, tp=2, schedule="1f1b")
    cfg.validate()      # ValueError naming the first bad setting
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from plait.models import get_config

__all__ = ["TrainConfig", "lr_at"]

DTYPE_NAMES = ("float32", "float64", "bfloat16")


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
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"--dtype {self.dtype!r} is not one of {list(DTYPE_NAMES)}")
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
        from plait.train.parts import validate_parallel

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

