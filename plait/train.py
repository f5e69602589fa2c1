"""The training loop: a model, its data, AdamW, per-step metrics.

``train(TrainConfig(...))`` runs the reference transformer on byte-level data and returns one
metrics dict per step (also appended to ``metrics_out`` as JSON lines as they happen).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from plait.data import ByteDataset
from plait.models import Transformer, get_config
from plait.progress import progress_bar

__all__ = ["TrainConfig", "train"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


@dataclass
class TrainConfig:
    """Everything a training run depends on.

    Example::

        metrics = train(TrainConfig(model="tiny", steps=50))
        metrics[-1]["loss"] < metrics[0]["loss"]
    """

    model: str = "tiny"
    steps: int = 50
    batch_size: int = 8
    seq_len: int = 64
    seed: int = 0
    lr: float = 3e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    data: str | None = None
    dtype: str = "float32"
    metrics_out: str | None = None
    progress: bool = True

    def validate(self) -> None:
        get_config(self.model)  # raises on an unknown name
        for name in ("steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"--dtype {self.dtype!r} is not one of {sorted(_DTYPES)}")
        max_len = get_config(self.model).max_seq_len
        if self.seq_len > max_len:
            raise ValueError(
                f"--seq-len {self.seq_len} exceeds model {self.model!r}'s max_seq_len={max_len}"
            )


def train(cfg: TrainConfig) -> list[dict]:
    """Train on one process; returns the per-step metrics."""
    cfg.validate()
    torch.manual_seed(cfg.seed)
    data = ByteDataset.from_path(cfg.data, seed=cfg.seed)
    model = Transformer(get_config(cfg.model), seed=cfg.seed).to(_DTYPES[cfg.dtype])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    out = Path(cfg.metrics_out).open("w") if cfg.metrics_out else None
    history: list[dict] = []
    tokens = cfg.batch_size * cfg.seq_len
    try:
        with progress_bar(cfg.steps, f"train {cfg.model}", cfg.progress) as update:
            for step in range(cfg.steps):
                x, y = data.batch(step, cfg.batch_size, cfg.seq_len)
                t0 = time.perf_counter()
                loss = model.loss(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                dt = time.perf_counter() - t0
                record = {
                    "step": step,
                    "loss": loss.item(),
                    "step_time_s": dt,
                    "tokens_per_s": tokens / dt,
                }
                history.append(record)
                if out:
                    out.write(json.dumps(record) + "\n")
                    out.flush()
                update(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}")
    finally:
        if out:
            out.close()
    return history
