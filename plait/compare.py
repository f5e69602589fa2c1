"""``plait compare``: measure every strategy the worker count allows, beside the planner's prediction.

The planner predicts (:mod:`plait.plan`); ``compare`` runs the same model with each mix of
pipeline, tensor and data/task parallelism that ``workers`` allows, on this machine, and prints
one table with the measured figures and, beside each, what the planner predicted for it with the
calibrated ``local`` hardware spec. It writes a PNG chart, each run's measured timeline (Chrome
trace and Gantt PNG) and, with ``--json``, everything as one object.

The model is any name :func:`plait.models.resolve_model` takes: a preset, ``hf:DIR`` or
``PACKAGE.MODULE:FUNCTION`` (the planner's side needs a transformer's shape: a function's model
without a Hugging Face or plait config is measured but not predicted).

Example::

    report = compare(CompareConfig(model="small", workers=2, mode="train"))
    Console().print(report.rich_table())   # rich.console.Console
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from plait.config import ParallelConfig, resolve_schedule
from plait.mesh_shape import MeshShape
from plait.models import resolve_model

__all__ = ["CompareConfig", "CompareReport", "compare", "train_candidates", "infer_candidates"]


@dataclass
class CompareConfig:
    """What to compare, and how long to measure each strategy."""

    model: str = "small"
    workers: int = 2
    mode: str = "train"
    steps: int = 8
    warmup: int = 2
    batch_size: int = 8
    seq_len: int = 128
    num_microbatches: int = 4
    schedule: str = "1f1b"
    sequences: int = 64
    out_dir: str = "plait-out/compare"

    def parallel(self, shape: MeshShape) -> ParallelConfig:
        """The one parallel configuration a candidate mesh is both measured and predicted at."""
        m = min(self.num_microbatches, self.batch_size // shape.dp)
        return ParallelConfig(
            dp=shape.dp,
            pp=shape.pp,
            tp=shape.tp,
            schedule=self.schedule,
            num_microbatches=m,
            microbatch_size=max(1, self.batch_size // shape.dp // m),
        )

    def validate(self) -> None:
        source = resolve_model(self.model)  # raises naming the kinds of model names
        self.schedule = resolve_schedule(self.schedule)
        if self.mode not in ("train", "infer"):
            raise ValueError(f"--mode must be 'train' or 'infer', got {self.mode!r}")
        for name in ("workers", "steps", "batch_size", "seq_len", "num_microbatches", "sequences"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                flag = "microbatches" if name == "num_microbatches" else name.replace("_", "-")
                raise ValueError(f"--{flag} must be >= 1, got {value!r}")
        if self.warmup < 0 or self.warmup >= self.steps:
            raise ValueError(
                f"--warmup must be in 0..steps-1 ({self.steps - 1}), got {self.warmup}"
            )
        if self.mode == "infer" and not source.is_language_model:
            raise ValueError(
                f"--mode infer: {self.model!r} is not a language model (plait infer scores token "
                "sequences)"
            )
        limit = source.max_seq_len if source.is_language_model else None
        if limit is not None and self.seq_len > limit:
            raise ValueError(
                f"--seq-len {self.seq_len} exceeds model {self.model!r}'s max_seq_len={limit}"
            )


@dataclass
class Row:
    """One strategy: its mesh, measured figures and the planner's prediction."""

    strategy: str
    dp: int
    pp: int
    tp: int
    measured: dict = field(default_factory=dict)
    predicted: dict = field(default_factory=dict)
    error: str | None = None


@dataclass
class CompareReport:
    config: CompareConfig
    rows: list[Row]
    chart: str | None = None
    timelines: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "config": asdict(self.config),
            "rows": [asdict(r) for r in self.rows],
            "chart": self.chart,
            "timelines": self.timelines,
        }

    def rich_table(self):
        from rich.table import Table

        train = self.config.mode == "train"
        t = Table(
            title=f"plait compare — {self.config.model}, {self.config.workers} workers, "
            f"{self.config.mode} (measured | predicted)"
        )
        t.add_column("strategy")
        t.add_column("dp×pp×tp", justify="center")
        if train:
            cols = [
                ("step time s", "step_time_s", "{:.3f}"),
                ("tokens/s", "tokens_per_s", "{:,.0f}"),
                ("bubble", "bubble_fraction", "{:.0%}"),
                ("peak MB/worker", "memory_mb", "{:,.0f}"),
                ("comm MB/step", "comm_mb", "{:,.1f}"),
            ]
        else:
            cols = [
                ("sequences/s", "sequences_per_s", "{:,.1f}"),
                ("p50 latency ms", "latency_p50_ms", "{:,.1f}"),
                ("p99 latency ms", "latency_p99_ms", "{:,.1f}"),
                ("peak MB/worker", "memory_mb", "{:,.0f}"),
            ]
        for title, _, _ in cols:
            t.add_column(title, justify="right")
        for r in self.rows:
            cells = [r.strategy, f"{r.dp}×{r.pp}×{r.tp}"]
            if r.error:
                t.add_row(*cells, f"[red]failed: {r.error}[/red]", *[""] * (len(cols) - 1))
                continue
            for _, key, fmt in cols:
                m, p = r.measured.get(key), r.predicted.get(key)
                text = fmt.format(m) if m is not None else "–"
                if p is not None:
                    text += f" | {fmt.format(p)}"
                cells.append(text)
            t.add_row(*cells)
        return t

    def best(self) -> Row | None:
        ok = [r for r in self.rows if not r.error]
        key = "tokens_per_s" if self.config.mode == "train" else "sequences_per_s"
        return max(ok, key=lambda r: r.measured.get(key, 0.0), default=None)


def _probe(model: str):
    """``(the built model, its layer count)`` for deciding which splits exist: the layers from
    the planner's spec, else from the pipeline layout, else 1 (no pipeline split)."""
    source = resolve_model(model)
    probe = source.build()
    try:
        layers = source.spec().layers
    except ValueError:
        from plait.models.layout import find_layout

        try:
            layers = len(find_layout(probe).blocks)
        except (TypeError, ValueError):
            layers = 1
    return probe, layers


def _tp_ok(probe, tp: int, seq_len: int | None = None) -> bool:
    from plait.tensor import validate as validate_tp

    try:
        validate_tp(probe, tp, seq_len=seq_len)
    except (TypeError, ValueError):
        return False
    return True


def train_candidates(model: str, workers: int, seq_len: int = 128) -> list[tuple[str, MeshShape]]:
    """Every (dp, pp, tp) with ``dp * pp * tp == workers`` that the model can be split into."""
    probe, layers = _probe(model)
    out = []
    for shape in MeshShape.factorisations(workers):
        if shape.pp > layers:
            continue
        if not _tp_ok(probe, shape.tp, seq_len):
            continue
        out.append((_name(shape), shape))
    return sorted(out, key=lambda c: (-c[1].dp, -c[1].tp, c[1].pp))


def infer_candidates(model: str, workers: int) -> list[tuple[str, MeshShape]]:
    """Scoring strategies: single process, and task / pipeline / tensor and their mixes."""
    from plait.infer import parse_strategy

    probe, layers = _probe(model)
    names = ["single", "task", "pipeline", "tensor"]
    if workers >= 4:
        names += ["task,pipeline", "task,tensor", "pipeline,tensor"]
    out = []
    for name in names:
        try:
            shape = parse_strategy(name, 1 if name == "single" else workers)
        except ValueError:
            continue
        if shape.pp > layers or not _tp_ok(probe, shape.tp):
            continue
        out.append((name, shape))
    return out


def _name(shape: MeshShape) -> str:
    parts = [
        f"{label}×{size}"
        for label, size in (("data", shape.dp), ("pipeline", shape.pp), ("tensor", shape.tp))
        if size > 1
    ]
    return " × ".join(parts) or "single"


def compare(cfg: CompareConfig, hardware=None) -> CompareReport:
    """Run every candidate strategy and predict each with the planner; see the module docstring."""
    cfg.validate()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if hardware is None:
        from plait.plan import get_hardware

        hardware = get_hardware("local")
    run = _measure_train if cfg.mode == "train" else _measure_infer
    predict = _predict_train if cfg.mode == "train" else _predict_infer
    candidates = (
        train_candidates(cfg.model, cfg.workers, cfg.seq_len)
        if cfg.mode == "train"
        else infer_candidates(cfg.model, cfg.workers)
    )
    report = CompareReport(cfg, [])
    for name, shape in candidates:
        row = Row(name, shape.dp, shape.pp, shape.tp)
        try:
            row.predicted = predict(cfg, shape, hardware)
        except ValueError as exc:  # the planner cannot cost it: show the measurement anyway
            row.predicted = {"note": str(exc)}
        try:
            row.measured, timeline = run(cfg, shape, name, out)
            if timeline:
                report.timelines[name] = timeline
        except Exception as exc:  # noqa: BLE001 - one strategy failing must not hide the rest
            row.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:120]
        report.rows.append(row)
    report.chart = str(_chart(report, out / f"compare-{cfg.mode}.png"))
    (out / f"compare-{cfg.mode}.json").write_text(json.dumps(report.to_dict(), indent=1))
    return report


# --- measuring ----------------------------------------------------------------------------------


def _slug(name: str) -> str:
    return name.replace(" × ", "-").replace("×", "x").replace(",", "-").replace(" ", "")


def _measure_train(cfg: CompareConfig, shape: MeshShape, name: str, out: Path):
    from plait.train import TrainConfig, train

    png = out / f"timeline-train-{_slug(name)}.png"
    hist = train(
        TrainConfig(
            model=cfg.model,
            steps=cfg.steps,
            batch_size=cfg.batch_size,
            seq_len=cfg.seq_len,
            parallel=cfg.parallel(shape),
            trace_out=str(png.with_suffix(".json")),
            timeline_png=str(png),
            progress=False,
        )
    )
    steady = hist[cfg.warmup :]
    step = statistics.median(r["step_time_s"] for r in steady)
    return {
        "step_time_s": step,
        "tokens_per_s": cfg.batch_size * cfg.seq_len / step,
        "bubble_fraction": statistics.median(r["bubble_fraction"] for r in steady),
        "memory_mb": max(hist[-1]["peak_rss_growth_mb_per_rank"]),
        "rss_mb": max(hist[-1]["peak_rss_mb_per_rank"]),
        "comm_mb": sum(hist[-1]["comm_bytes"].values()) / 1e6,
        "comm_mb_by_axis": {k: v / 1e6 for k, v in hist[-1]["comm_bytes"].items()},
        "final_loss": hist[-1]["loss"],
    }, str(png)


def _measure_infer(cfg: CompareConfig, shape: MeshShape, name: str, out: Path):
    from plait.infer import InferConfig, infer

    rep = infer(
        InferConfig(
            model=cfg.model,
            strategy=name,
            workers=1 if name == "single" else cfg.workers,
            seq_len=cfg.seq_len,
            batch_size=cfg.batch_size,
            limit=cfg.sequences,
            progress=False,
        )
    )
    s = rep.summary()
    return {
        "sequences_per_s": s["sequences_per_s"],
        "latency_p50_ms": s["latency_p50_ms"],
        "latency_p99_ms": s["latency_p99_ms"],
        "memory_mb": max(rep.extra["peak_rss_mb_per_worker"]),
    }, None


# --- predicting ---------------------------------------------------------------------------------


def _spec(cfg: CompareConfig):
    """The planner's :class:`plait.plan.ModelSpec` of the model, at the measured sequence length
    (ValueError for a model without a transformer's shape: then it is measured, not predicted)."""
    return replace(resolve_model(cfg.model).spec(), seq_len=cfg.seq_len)


def _predict_train(cfg: CompareConfig, shape: MeshShape, hw) -> dict:
    from plait.plan import evaluate

    pc = cfg.parallel(shape)
    est = evaluate(_spec(cfg), hw, pc, seq=cfg.seq_len)
    return {
        "step_time_s": est.step_time_s,
        "tokens_per_s": cfg.batch_size * cfg.seq_len / est.step_time_s,
        "bubble_fraction": est.bubble_fraction,
        "memory_mb": est.memory_gb_per_gpu * 1e3,
    }


def _predict_infer(cfg: CompareConfig, shape: MeshShape, hw) -> dict:
    """Forward-only: each replica streams batches through its pipeline of stages."""
    from plait.plan import CostModel

    replicas = shape.dp
    per_replica = -(-cfg.sequences // replicas)
    batches = -(-per_replica // cfg.batch_size)
    pc = ParallelConfig(
        tp=shape.tp,
        pp=shape.pp,
        microbatch_size=cfg.batch_size,
        num_microbatches=batches,
        schedule="gpipe",
    )
    cm = CostModel(_spec(cfg), hw, pc, cfg.seq_len)
    stage_f = [cm.compute("F", s) for s in range(shape.pp)]
    hop = cm.transfer(0, 1) if shape.pp > 1 else 0.0
    latency = sum(stage_f) + hop * (shape.pp - 1)
    total = latency + (batches - 1) * (max(stage_f) + (hop if shape.pp > 1 else 0.0))
    return {"sequences_per_s": per_replica * replicas / total, "latency_p50_ms": latency * 1e3}


# --- the chart ----------------------------------------------------------------------------------


def _chart(report: CompareReport, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = report.config.mode == "train"
    key, label = ("tokens_per_s", "tokens / s") if train else ("sequences_per_s", "sequences / s")
    rows = [r for r in report.rows if not r.error]
    names = [f"{r.strategy}\n{r.dp}×{r.pp}×{r.tp}" for r in rows]
    measured = [r.measured.get(key, 0.0) for r in rows]
    predicted = [r.predicted.get(key, 0.0) for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows) + 2), 4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], measured, 0.4, label="measured", color="#4C72B0")
    ax.bar(
        [x + 0.2 for x in xs], predicted, 0.4, label="predicted (plan, local spec)", color="#DD8452"
    )
    ax.set_xticks(list(xs), names, fontsize=8)
    ax.set_ylabel(label)
    ax.set_title(
        f"plait compare: {report.config.model} on {report.config.workers} workers "
        f"({report.config.mode})"
    )
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
