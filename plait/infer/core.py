"""What every inference strategy shares: the config, the requests, scoring, and the report.

The work is fixed by the input, not by the strategy: the consecutive ``seq_len + 1``-byte windows
of ``data`` (:meth:`plait.ByteDataset.sequences`), grouped into requests of ``batch_size``
sequences. Each sequence's score is its mean next-token cross-entropy under the reference
transformer built from ``seed``, so every strategy must produce the same numbers.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from plait.alloc import peak_rss_mb
from plait.data import ByteDataset
from plait.mesh_shape import MeshShape
from plait.models import Transformer, get_config

__all__ = [
    "InferConfig",
    "InferReport",
    "STRATEGIES",
    "parse_strategy",
    "load_requests",
    "build_model",
    "score_batch",
    "score_batch_rss",
    "peak_rss_mb",
    "percentile",
]

STRATEGIES = ("single", "task", "pipeline", "tensor")


@dataclass
class InferConfig:
    """One inference run.

    Example::

        report = infer(InferConfig(model="tiny", data="notes.txt", strategy="task", workers=2))
        report.losses[0], report.throughput
    """

    model: str = "tiny"
    data: str | None = None
    strategy: str = "single"
    workers: int = 1
    seq_len: int = 64
    batch_size: int = 4
    limit: int | None = 256
    seed: int = 0
    threads: int = 1  # torch threads per process: pinned, so strategies compare fairly
    stages: int | None = None  # pipeline stages when composed; default from workers
    tp: int | None = None  # tensor group size when composed; default from workers
    out: str | None = None
    progress: bool = True

    def validate(self) -> MeshShape:
        """Check every field before any process starts; return the (dp, pp, tp) shape."""
        cfg = get_config(self.model)  # raises naming the presets
        for name in ("workers", "seq_len", "batch_size", "threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(
                f"--limit must be >= 1 (or omitted for every sequence), got {self.limit}"
            )
        if self.seq_len > cfg.max_seq_len:
            raise ValueError(
                f"--seq-len {self.seq_len} exceeds model {self.model!r}'s "
                f"max_seq_len={cfg.max_seq_len}"
            )
        return parse_strategy(self.strategy, self.workers, self.stages, self.tp)


def parse_strategy(
    strategy: str, workers: int, stages: int | None = None, tp: int | None = None
) -> MeshShape:
    """``"task,pipeline"`` and 4 workers -> ``MeshShape(dp=2, pp=2, tp=1)``.

    ``task`` is the dp axis (whole replicas), ``pipeline`` the pp axis, ``tensor`` the tp axis.
    Axes named but not sized split the workers evenly (``stages``/``tp`` size them explicitly);
    ``single`` is one process.
    """
    names = [s.strip() for s in strategy.split(",") if s.strip()]
    bad = [s for s in names if s not in STRATEGIES]
    if not names or bad or len(set(names)) != len(names):
        raise ValueError(
            f"--strategy {strategy!r} is not valid; use one of {list(STRATEGIES)} or a "
            "comma-separated mix of task, pipeline and tensor (e.g. 'task,pipeline')"
        )
    if names == ["single"]:
        if workers != 1:
            raise ValueError(f"--strategy single runs one process; got --workers {workers}")
        return MeshShape()
    if "single" in names:
        raise ValueError("--strategy single cannot be combined with other strategies")
    sizes = {"task": None, "pipeline": stages, "tensor": tp}
    for axis, size in (("pipeline", stages), ("tensor", tp)):
        if size is not None and axis not in names:
            raise ValueError(
                f"--{'stages' if axis == 'pipeline' else 'tp'} needs {axis!r} in --strategy"
            )
    unsized = [n for n in names if sizes[n] is None]
    fixed = math.prod(sizes[n] for n in names if sizes[n] is not None)
    if fixed < 1 or workers % fixed:
        raise ValueError(f"--workers {workers} is not divisible by the sizes given ({fixed})")
    rest = workers // fixed
    if unsized:
        even = round(rest ** (1 / len(unsized)))
        if even ** len(unsized) != rest:
            raise ValueError(
                f"--workers {workers} does not split evenly over {unsized}; give the sizes with "
                "--stages and/or --tp"
            )
        for n in unsized:
            sizes[n] = even
    elif rest != 1:
        raise ValueError(f"--workers {workers} must equal the product of the sizes given ({fixed})")
    return MeshShape(dp=sizes["task"] or 1, pp=sizes["pipeline"] or 1, tp=sizes["tensor"] or 1)


def load_requests(cfg: InferConfig) -> list[torch.Tensor]:
    """The input's sequences, ``(n, seq_len + 1)``, split into requests of ``batch_size``."""
    sequences = ByteDataset.from_path(cfg.data).sequences(cfg.seq_len, cfg.limit)
    if len(sequences) == 0:
        raise ValueError(
            f"--data {cfg.data!r} is shorter than one sequence of {cfg.seq_len + 1} bytes"
        )
    return list(torch.split(sequences, cfg.batch_size))


def build_model(cfg: InferConfig) -> Transformer:
    """The whole model, identical on every worker (same seed), in eval mode."""
    return Transformer(get_config(cfg.model), seed=cfg.seed).eval()


def per_sequence_losses(logits: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Mean next-token loss of each row, by the model's own loss function."""
    return [
        Transformer.loss(logits[i : i + 1], targets[i : i + 1]).item() for i in range(len(targets))
    ]


@torch.no_grad()
def score_batch(model: Transformer, batch: torch.Tensor) -> tuple[list[float], float]:
    """``(per-sequence losses, seconds)`` for one request of shape ``(B, seq_len + 1)``."""
    t0 = time.perf_counter()
    logits = model(batch[:, :-1])
    losses = per_sequence_losses(logits, batch[:, 1:])
    return losses, time.perf_counter() - t0


def score_batch_rss(model: Transformer, batch: torch.Tensor) -> tuple[list[float], float, float]:
    """:func:`score_batch` plus the worker's peak memory after it (for per-worker reports)."""
    losses, seconds = score_batch(model, batch)
    return losses, seconds, peak_rss_mb()


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class InferReport:
    """Per-sequence losses (input order) and how fast they came.

    ``latencies`` holds one figure per request: seconds from the start of its computation to its
    losses (on a pipeline, from its first stage's forward to its last stage's loss).
    """

    strategy: str
    shape: MeshShape
    losses: list[float]
    latencies: list[float]
    seconds: float
    extra: dict = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return len(self.losses) / self.seconds if self.seconds > 0 else float("inf")

    def summary(self) -> dict:
        s = self.shape
        return {
            "strategy": self.strategy,
            "mesh": {"dp": s.dp, "pp": s.pp, "tp": s.tp},
            "sequences": len(self.losses),
            "requests": len(self.latencies),
            "seconds": round(self.seconds, 4),
            "sequences_per_s": round(self.throughput, 2),
            **{
                f"latency_p{q}_ms": round(1000 * percentile(self.latencies, q), 3)
                for q in (50, 90, 99)
            },
            **self.extra,
        }

    def write_jsonl(self, path: str) -> None:
        """One line per sequence, ``{"index": i, "loss": x}``, in input order."""
        p = Path(path)
        tmp = p.with_name(f".{p.name}.tmp")
        with open(tmp, "w") as f:
            for i, loss in enumerate(self.losses):
                f.write(json.dumps({"index": i, "loss": loss}) + "\n")
        tmp.replace(p)
