"""What every inference strategy shares: the config, the requests, scoring, and the report.

The work is fixed by the input, not by the strategy: the consecutive ``seq_len + 1``-token windows
of ``data`` under the model's tokenizer (:func:`plait.data.dataset_for`, then ``.sequences``),
grouped into requests of ``batch_size`` sequences. Each sequence's score is its mean next-token
loss (the model's own, :meth:`plait.models.ModelSource.loss`) under the model named by ``model``
-- a preset, ``hf:DIR`` or ``PACKAGE.MODULE:FUNCTION`` -- built from ``seed``, or with its
parameters loaded from a training ``checkpoint``; so every strategy must produce the same numbers.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from plait.alloc import peak_rss_mb
from plait.data import dataset_for
from plait.mesh_shape import MeshShape
from plait.models.source import next_token_loss, resolve_model

__all__ = [
    "InferConfig",
    "InferReport",
    "STRATEGIES",
    "parse_strategy",
    "load_requests",
    "build_model",
    "probe_model",
    "loss_for",
    "score_batch",
    "score_batch_rss",
    "peak_rss_mb",
    "percentile",
    "logits_of",
]

STRATEGIES = ("single", "task", "pipeline", "tensor")


@dataclass
class InferConfig:
    """One inference run.

    ``model`` is any name :func:`plait.models.resolve_model` takes; ``checkpoint`` a training
    checkpoint (``step-N/`` or a ``--checkpoint-dir`` root: its newest complete one) whose full
    tensors replace the model's parameters before any strategy shards it. With a checkpoint,
    ``model=None`` means the model the checkpoint records; without one, ``tiny``.

    Example::

        report = infer(InferConfig(model="tiny", data="notes.txt", strategy="task", workers=2))
        report.losses[0], report.throughput
        infer(InferConfig(model="hf:./llama", checkpoint="ck", strategy="pipeline", workers=2))
    """

    model: str | None = "tiny"
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
    checkpoint: str | None = None

    def source(self):
        """The model (:class:`plait.models.ModelSource`): ``model``, or the one the checkpoint
        records when ``model`` is None."""
        if self.model is None:
            if self.checkpoint is None:
                return resolve_model("tiny")
            from plait.train.export import checkpoint_source

            return checkpoint_source(self.checkpoint)[1]
        return resolve_model(self.model)

    def n_layers(self) -> int | None:
        """The layer count to build: the checkpoint's, else the model's own (None)."""
        if self.checkpoint is None:
            return None
        from plait.train.export import checkpoint_source

        return checkpoint_source(self.checkpoint, self.model)[2]

    def validate(self) -> MeshShape:
        """Check every field before any process starts; return the (dp, pp, tp) shape."""
        source = self.source()  # raises naming the kinds of model names
        for name in ("workers", "seq_len", "batch_size", "threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(
                f"--limit must be >= 1 (or omitted for every sequence), got {self.limit}"
            )
        if not source.is_language_model:
            raise ValueError(
                f"--model {source.name!r} is not a language model: plait infer scores token "
                "sequences (its mean next-token loss)"
            )
        limit = source.max_seq_len
        if limit is not None and self.seq_len > limit:
            raise ValueError(
                f"--seq-len {self.seq_len} exceeds model {source.name!r}'s max_seq_len={limit}"
            )
        shape = parse_strategy(self.strategy, self.workers, self.stages, self.tp)
        if self.checkpoint is not None or shape.pp > 1 or shape.tp > 1:
            self._check_model(source, shape)
        return shape

    def _check_model(self, source, shape: MeshShape) -> None:
        """The checkpoint's tensors against the model, and the split, on a probe of the model
        (the meta device for Hugging Face models: shapes only)."""
        probe = probe_model(self, source)
        if self.checkpoint is not None:
            from plait.train.checkpoint import find_checkpoint
            from plait.train.export import check_params

            check_params(probe, find_checkpoint(self.checkpoint), f"model {source.name!r}")
        try:
            if shape.pp > 1:
                from plait.pipeline import partition

                partition(probe, shape.pp)  # too many stages for the layers fails here
            if shape.tp > 1:
                from plait.tensor.parallelize import validate

                validate(probe, shape.tp)  # bad sizes fail here
        except TypeError as e:  # a model the partitioner or the tensor plans do not know
            raise ValueError(str(e).splitlines()[0]) from None


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
    """The input's sequences, ``(n, seq_len + 1)`` ids under the model's tokenizer, split into
    requests of ``batch_size``."""
    data = dataset_for(cfg.source(), cfg.data, seed=cfg.seed, seq_len=cfg.seq_len)
    sequences = data.sequences(cfg.seq_len, cfg.limit)
    if len(sequences) == 0:
        raise ValueError(
            f"--data {cfg.data!r} is shorter than one sequence of {cfg.seq_len + 1} {data.unit}"
        )
    return list(torch.split(sequences, cfg.batch_size))


def _serving(model: nn.Module) -> nn.Module:
    """Eval mode; a Hugging Face model keeps no key/value cache (each request is scored once)."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "use_cache"):
        cfg.use_cache = False
    return model.eval()


def build_model(cfg: InferConfig) -> nn.Module:
    """The whole model, identical on every worker (same seed, or the checkpoint's parameters),
    in eval mode."""
    if cfg.checkpoint is not None:
        from plait.train.export import model_from_checkpoint

        model, _, _ = model_from_checkpoint(cfg.checkpoint, cfg.model, seed=cfg.seed)
        return _serving(model)
    return _serving(cfg.source().build(cfg.seed))


def probe_model(cfg: InferConfig, source=None) -> nn.Module:
    """The model's structure for checks before any process starts: a Hugging Face model on the
    meta device (no memory, no weights read), anything else built as usual."""
    source = source if source is not None else cfg.source()
    n_layers = cfg.n_layers()
    if source.kind == "hf":
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(source.hf_config(n_layers))
    return source.build(cfg.seed, n_layers)


def loss_for(module: nn.Module, source):
    """The loss for ``module``'s output: the vocabulary-parallel cross-entropy when its output
    layer is sharded over a tensor group, else the model's own (:meth:`ModelSource.loss`)."""
    from plait.tensor import loss_fn, vocab_head

    if vocab_head(module) is not None:
        return loss_fn(module)
    return source.loss if source is not None else next_token_loss


def logits_of(out):
    """The logits of a model's output: a tensor, a Hugging Face output's ``.logits``, or a
    tuple's first item."""
    out = getattr(out, "logits", out)
    return out[0] if isinstance(out, (tuple, list)) else out


def per_sequence_losses(logits, targets: torch.Tensor, loss=None) -> list[float]:
    """Mean next-token loss of each row, by the model's own loss function (``loss``; default
    mean next-token cross-entropy)."""
    loss = loss if loss is not None else next_token_loss
    logits = logits_of(logits)
    return [loss(logits[i : i + 1], targets[i : i + 1]).item() for i in range(len(targets))]


@torch.no_grad()
def score_batch(model: nn.Module, batch: torch.Tensor, loss=None) -> tuple[list[float], float]:
    """``(per-sequence losses, seconds)`` for one request of shape ``(B, seq_len + 1)``."""
    t0 = time.perf_counter()
    logits = model(batch[:, :-1])
    losses = per_sequence_losses(logits, batch[:, 1:], loss)
    return losses, time.perf_counter() - t0


def score_batch_rss(model: nn.Module, batch: torch.Tensor, loss=None):
    """:func:`score_batch` plus the worker's peak memory after it (for per-worker reports)."""
    losses, seconds = score_batch(model, batch, loss)
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
            "mean_loss": round(sum(self.losses) / len(self.losses), 6) if self.losses else None,
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
