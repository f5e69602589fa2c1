"""One parallel configuration, validated once and used by train, infer, compare, demo and plan.

What it holds is *how* a step is split, not what is trained: the mesh ``world = dp x pp x tp``,
the pipeline schedule (with its aliases and default number of virtual chunks), the micro-batches,
what is recomputed, sequence parallelism, what data parallelism shards (ZeRO-1 or FSDP), the dtype
and the precision. Every command builds one
:class:`ParallelConfig`; the command-line flags for these fields are generated from the fields'
metadata here (:func:`add_parallel_flags`), so names, choices, help and defaults cannot drift
apart between commands. This module imports no torch.

Example::

    cfg = ParallelConfig(dp=2, pp=4, schedule="interleaved", num_microbatches=8)
    cfg.schedule, cfg.virtual, cfg.world_size   # 'interleaved-1f1b', 2, 8
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field, fields

__all__ = [
    "ParallelConfig",
    "ScheduleSpec",
    "SCHEDULES",
    "SCHEDULE_SPECS",
    "RECOMPUTE",
    "DTYPES",
    "PRECISIONS",
    "TRANSPORTS",
    "resolve_schedule",
    "resolve_dtype",
    "resolve_virtual",
    "check_schedule_costs",
    "schedule_names",
    "add_parallel_flags",
    "parallel_from_args",
]


@dataclass(frozen=True)
class ScheduleSpec:
    """What a pipeline schedule is, beyond its generator.

    Attributes:
        name: the canonical name (the one ``--help`` lists first).
        aliases: other names accepted everywhere a schedule is named.
        virtual: the fixed number of model chunks per rank, or None when any ``v >= 1`` works.
        default_virtual: chunks per rank when none is given.
        placement: ``"loop"`` (stage ``s`` on rank ``s % p``) or ``"v"`` (down and back up).
        split_backward: whether the backward is split into B (input) and W (weights).
        summary: one line for ``--help`` and the docs.
    """

    name: str
    aliases: tuple[str, ...]
    virtual: int | None
    default_virtual: int
    placement: str
    split_backward: bool
    summary: str


_SPECS = (
    ScheduleSpec("gpipe", (), 1, 1, "loop", False, "all forwards, then all backwards"),
    ScheduleSpec("1f1b", ("1F1B",), 1, 1, "loop", False, "one forward, one backward; p in flight"),
    ScheduleSpec(
        "interleaved-1f1b",
        ("interleaved",),
        None,
        2,
        "loop",
        False,
        "v chunks per rank (Megatron's interleaving)",
    ),
    ScheduleSpec("zb-h1", ("zbh1",), 1, 1, "loop", True, "zero bubble, 1F1B's memory"),
    ScheduleSpec(
        "zb-h2", ("zbh2",), 1, 1, "loop", True, "zero bubble, 2p-1 micro-batches in flight"
    ),
    ScheduleSpec("zb-v", ("zbv",), 2, 2, "v", True, "zero bubble on a V, two chunks per rank"),
    ScheduleSpec("v-half", ("vhalf",), 2, 2, "v", True, "a V at about half of 1F1B's memory"),
    ScheduleSpec("v-min", ("vmin",), 2, 2, "v", True, "a V at about a third of 1F1B's memory"),
    ScheduleSpec(
        "dualpipev",
        ("dualpipe-v",),
        2,
        2,
        "v",
        True,
        "DeepSeek's DualPipe on a V: F and B of two micro-batches paired",
    ),
)
SCHEDULE_SPECS: dict[str, ScheduleSpec] = {s.name: s for s in _SPECS}
SCHEDULES: tuple[str, ...] = tuple(SCHEDULE_SPECS)
_SCHEDULE_ALIASES = {alias: s.name for s in _SPECS for alias in s.aliases}

RECOMPUTE = ("none", "selective", "full")
BALANCES = ("layers", "params", "time")
DTYPES = ("fp32", "fp64", "bf16", "fp16")
_DTYPE_ALIASES = {"float32": "fp32", "float64": "fp64", "bfloat16": "bf16", "float16": "fp16"}
# How training computes: ``fp32`` (in ``dtype``), or mixed: the low dtype for compute (autocast),
# float32 master weights, optimizer state and gradients; fp16 with dynamic loss scaling.
PRECISIONS = ("fp32", "bf16-mixed", "fp16-mixed")
# How pipeline ranks exchange messages (PipelineRuntime(transport=...), plait train --p2p):
# shared memory where every rank is a CPU process of one host, else the process group.
TRANSPORTS = ("auto", "shm", "process-group")


def schedule_names() -> list[str]:
    """Every name a schedule may be given by: the canonical names, then the aliases."""
    return [*SCHEDULES, *_SCHEDULE_ALIASES]


def resolve_schedule(name: str) -> str:
    """The canonical schedule for ``name`` or an alias of it; ValueError listing the valid ones.

    ``"none"`` (no pipeline) resolves to itself.
    """
    if name == "none" or name in SCHEDULE_SPECS:
        return name
    if name in _SCHEDULE_ALIASES:
        return _SCHEDULE_ALIASES[name]
    aliases = ", ".join(f"{a}={c}" for a, c in _SCHEDULE_ALIASES.items())
    raise ValueError(
        f"unknown schedule {name!r}; valid schedules are {list(SCHEDULES)} (aliases: {aliases})"
    )


def resolve_virtual(schedule: str, virtual: int | None) -> int:
    """Model chunks per rank for ``schedule`` (canonical): its default for None, else checked."""
    spec = SCHEDULE_SPECS[schedule]
    if virtual is None:
        return spec.default_virtual
    if spec.virtual is not None and virtual != spec.virtual:
        raise ValueError(
            f"schedule {schedule!r} has virtual={spec.virtual} chunks per rank, got "
            f"virtual={virtual}; use 'interleaved-1f1b' for other values"
        )
    return virtual


def resolve_dtype(name: str) -> str:
    """The canonical dtype name (``fp32``, ``fp64``, ``bf16``, ``fp16``) for a name or alias."""
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ValueError(
            f"unknown dtype {name!r}; valid dtypes are {list(DTYPES)} "
            f"(or {', '.join(_DTYPE_ALIASES)})"
        )
    return name


def _flag(help: str, flag: str | None = None, **kw) -> dict:
    return {"help": help, "flag": flag, **kw}


@dataclass(frozen=True)
class ParallelConfig:
    """How one training (or scoring) step is split over ``dp x pp x tp`` workers.

    Attributes:
        dp, pp, tp: data-parallel replicas, pipeline stages (ranks) and tensor-parallel width.
        schedule: a name in :data:`SCHEDULES` or an alias, stored canonical; ``"none"`` when
            ``pp == 1`` (no pipeline: the micro-batches accumulate gradients).
        virtual: model chunks per pipeline rank; None takes the schedule's default (2 for
            interleaved-1f1b and the V schedules, else 1).
        num_microbatches: micro-batches per replica per step; None takes ``pp``.
        microbatch_size: sequences per micro-batch, as the planner searches it; training derives
            it from its global batch instead (:meth:`plait.train.TrainConfig.parallel_for_plan`).
        recompute: activations recomputed in backward: ``none``, ``selective`` (attention core;
            planner only) or ``full`` (each block).
        sequence_parallel: shard norms and dropout along the sequence inside tensor-parallel
            regions (no effect, and stored False, when ``tp == 1``).
        dtype: the dtype the whole model is cast to (weights, optimizer state and compute), one
            of :data:`DTYPES` or an alias (``float32`` ...); ``fp64`` proves exactness.
        precision: ``fp32`` (compute in ``dtype``), ``bf16-mixed`` or ``fp16-mixed``: compute in
            the low dtype (autocast) over float32 master weights, optimizer state and gradients
            (fp16 with dynamic loss scaling). Mixed precision needs ``dtype`` fp32 (its masters).
        balance: how the layers are cut into stages (:func:`plait.pipeline.split_blocks`):
            ``layers``, ``params``, ``time`` or a tuple of blocks per stage.
        schedule_costs: relative durations ``(F, B, W)`` the list-scheduling generators order by;
            None means equal.
        zero1: shard the optimizer state over the dp replicas (ZeRO stage 1).
        fsdp: shard parameters, gradients and optimizer state over the dp replicas (ZeRO-3, with
            PyTorch's FSDP2 ``fully_shard``; :mod:`plait.train.fsdp`). Needs ``dp >= 2``, excludes
            ``zero1`` and schedules that split the backward (their W step forms weight gradients
            outside autograd, where FSDP cannot reduce-scatter them).

    Raises:
        ValueError: naming the first field that is out of range, and what would be valid.
    """

    dp: int = field(default=1, metadata=_flag("data-parallel replicas"))
    pp: int = field(default=1, metadata=_flag("pipeline stages"))
    tp: int = field(default=1, metadata=_flag("tensor-parallel width"))
    schedule: str = field(
        default="1f1b",
        metadata=_flag(
            "pipeline schedule: "
            + "; ".join(f"{s.name} ({s.summary})" for s in _SPECS)
            + "; aliases "
            + ", ".join(f"{a}={c}" for a, c in _SCHEDULE_ALIASES.items()),
            choices=schedule_names(),
            metavar="NAME",
        ),
    )
    virtual: int | None = field(
        default=None,
        metadata=_flag(
            "model chunks per pipeline rank (default: "
            + ", ".join(f"{s.default_virtual} for {s.name}" for s in _SPECS if s.virtual != 1)
            + ", else 1)"
        ),
    )
    num_microbatches: int | None = field(
        default=None, metadata=_flag("micro-batches per step (default: pp)", "--microbatches")
    )
    microbatch_size: int = field(default=1, metadata=_flag("sequences per micro-batch"))
    balance: str | tuple[int, ...] = field(
        default="layers",
        metadata=_flag(
            "how the pipeline's stages are cut: layers (even), params or time (the largest "
            "stage made smallest), or blocks per stage in the library",
            choices=list(BALANCES),
        ),
    )
    recompute: str = field(
        default="none",
        metadata=_flag(
            "recompute activations in backward: none, selective (planner only) or full",
            choices=list(RECOMPUTE),
        ),
    )
    sequence_parallel: bool = field(
        default=False,
        metadata=_flag("shard norms along the sequence in tensor-parallel regions"),
    )
    dtype: str = field(
        default="fp32",
        metadata=_flag(
            "compute dtype: " + ", ".join(DTYPES) + " (or float32, float64, bfloat16, float16)",
            choices=[*DTYPES, *_DTYPE_ALIASES],
        ),
    )
    precision: str = field(
        default="fp32",
        metadata=_flag(
            "fp32 (compute in --dtype), or bf16-mixed / fp16-mixed: compute in bf16 / fp16 over "
            "float32 master weights, optimizer state and gradients (fp16 with dynamic loss "
            "scaling); needs --dtype fp32",
            choices=list(PRECISIONS),
        ),
    )
    schedule_costs: tuple[float, float, float] | None = field(
        default=None,
        metadata=_flag(
            "relative durations of forward, input-backward and weight-backward that the "
            "zero-bubble generators order by (plait plan prints the ones it assumed); "
            "default equal",
            metavar="F,B,W",
        ),
    )
    zero1: bool = field(
        default=False,
        metadata=_flag("shard optimizer state over the dp replicas (ZeRO stage 1)"),
    )
    fsdp: bool = field(
        default=False,
        metadata=_flag(
            "shard parameters, gradients and optimizer state over the dp replicas (PyTorch FSDP2 "
            "fully_shard: each block a unit); not with --zero1"
        ),
    )

    def __post_init__(self) -> None:
        def put(name: str, value) -> None:
            object.__setattr__(self, name, value)

        for name in ("dp", "pp", "tp", "microbatch_size"):
            _positive(name, getattr(self, name))
        for name in ("virtual", "num_microbatches"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        schedule = resolve_schedule(self.schedule)
        if self.pp == 1:
            if self.virtual not in (None, 1):
                raise ValueError(
                    f"virtual={self.virtual} needs a pipeline (pp > 1); with pp=1 there is one "
                    f"chunk"
                )
            schedule, virtual = "none", 1
        elif schedule == "none":
            raise ValueError(f"pp={self.pp} needs a pipeline schedule, one of {list(SCHEDULES)}")
        else:
            virtual = resolve_virtual(schedule, self.virtual)
        put("schedule", schedule)
        put("virtual", virtual)
        if self.num_microbatches is None:
            put("num_microbatches", self.pp)
        if isinstance(self.balance, str):
            if self.balance not in BALANCES:
                raise ValueError(
                    f"balance {self.balance!r} is not one of {list(BALANCES)} (or a list of "
                    f"blocks per stage)"
                )
        else:
            put("balance", tuple(self.balance))
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute {self.recompute!r} is not one of {list(RECOMPUTE)}")
        put("dtype", resolve_dtype(self.dtype))
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"precision {self.precision!r} is not one of {list(PRECISIONS)} (a whole-model "
                f"cast is set by dtype)"
            )
        if self.precision != "fp32" and self.dtype != "fp32":
            raise ValueError(
                f"precision {self.precision!r} keeps float32 master weights and computes in "
                f"{self.precision[:4]}; it needs dtype fp32, got {self.dtype!r} (a whole-model "
                f"cast: use dtype {self.dtype!r} with precision fp32)"
            )
        if self.tp == 1:
            put("sequence_parallel", False)
        put("schedule_costs", check_schedule_costs(self.schedule_costs))
        self._check_sharding()

    def _check_sharding(self) -> None:
        if self.fsdp and self.zero1:
            raise ValueError(
                "--fsdp and --zero1 are exclusive: FSDP already shards the optimizer state (with "
                "the parameters and gradients); choose one"
            )
        if self.fsdp and self.dp < 2:
            raise ValueError(
                f"--fsdp shards over the data-parallel replicas: needs --dp >= 2, got {self.dp}"
            )
        spec = SCHEDULE_SPECS.get(self.schedule)
        if self.fsdp and spec is not None and spec.split_backward:
            ok = [s.name for s in _SPECS if not s.split_backward]
            raise ValueError(
                f"--fsdp cannot run schedule {self.schedule!r}: its split backward (B, then W) "
                f"forms weight gradients outside autograd, where FSDP cannot reduce-scatter them; "
                f"use one of {ok}"
            )

    @property
    def dp_shard(self) -> str:
        """What data parallelism shards: ``none``, ``zero1`` (optimizer state) or ``fsdp``
        (parameters, gradients and optimizer state)."""
        return "fsdp" if self.fsdp else "zero1" if self.zero1 else "none"

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp

    gpus = world_size

    @property
    def compute_dtype(self) -> str:
        """The dtype the matrix multiplications run in: the low one of a mixed precision, else
        ``dtype`` (what the planner's FLOP rates and activation bytes should use)."""
        return {"bf16-mixed": "bf16", "fp16-mixed": "fp16"}.get(self.precision, self.dtype)

    @property
    def num_stages(self) -> int:
        return self.pp * self.virtual

    @property
    def global_batch(self) -> int:
        """Sequences per step over all replicas, at ``microbatch_size``."""
        return self.dp * self.microbatch_size * self.num_microbatches

    @property
    def spec(self) -> ScheduleSpec | None:
        """The schedule's :class:`ScheduleSpec`, None without a pipeline."""
        return SCHEDULE_SPECS.get(self.schedule)

    def label(self) -> str:
        sched = self.schedule + (f"/v{self.virtual}" if self.schedule == "interleaved-1f1b" else "")
        sp = "+sp" if self.sequence_parallel else ""
        shard = "" if self.dp_shard == "none" else f"+{self.dp_shard}"
        return (
            f"dp{self.dp}{shard} tp{self.tp}{sp} pp{self.pp} {sched} mb{self.microbatch_size}x"
            f"{self.num_microbatches} rc:{self.recompute}"
        )

    def to_dict(self) -> dict:
        return asdict(self)


def check_schedule_costs(costs) -> tuple[float, float, float] | None:
    """``costs`` as three floats ``(F, B, W)``, None for None; ValueError unless all positive."""
    if costs is None:
        return None
    ok = isinstance(costs, (tuple, list)) and len(costs) == 3
    if not ok or not all(
        isinstance(c, (int, float)) and not isinstance(c, bool) and 0 < c < float("inf")
        for c in costs
    ):
        raise ValueError(
            f"costs must be three positive numbers (relative durations of F, B and W), got "
            f"{costs!r}"
        )
    return tuple(float(c) for c in costs)  # type: ignore[return-value]


def _positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _costs(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or not all(0 < c < float("inf") for c in parts):
        raise argparse.ArgumentTypeError(
            f"expected three positive numbers F,B,W (e.g. 1,1.2,0.7), got {text!r}"
        )
    return parts  # type: ignore[return-value]


def add_parallel_flags(
    parser, names: list[str] | None = None, search: bool = False, **defaults
) -> None:
    """Add a ``--flag`` for each :class:`ParallelConfig` field in ``names`` (default: all).

    Flag names, choices and help come from the fields, so every command that takes a schedule
    accepts the same names. With ``search=True`` every default is None ("let the planner
    choose"); ``defaults`` overrides single defaults (for example ``recompute=None``).
    """
    by_name = {f.name: f for f in fields(ParallelConfig)}
    for name in names or list(by_name):
        f = by_name[name]
        meta = f.metadata
        flag = meta.get("flag") or "--" + name.replace("_", "-")
        default = None if search else defaults.get(name, f.default)
        kw: dict = {"dest": name, "default": default, "help": meta["help"]}
        if name in defaults:
            kw["default"] = defaults[name]
        if f.type in ("bool",):
            kw["action"] = "store_true"
            if search:
                kw["action"] = argparse.BooleanOptionalAction
        else:
            if "choices" in meta:
                kw["choices"] = meta["choices"]
            if "metavar" in meta:
                kw["metavar"] = meta["metavar"]
            if name == "schedule_costs":
                kw["type"] = _costs
            elif f.type in ("int", "int | None"):
                kw["type"] = int
        parser.add_argument(flag, **kw)


def parallel_from_args(args: argparse.Namespace, **overrides) -> ParallelConfig:
    """The :class:`ParallelConfig` of parsed flags (fields not given keep their defaults)."""
    given = {
        f.name: getattr(args, f.name)
        for f in fields(ParallelConfig)
        if getattr(args, f.name, None) is not None
    }
    return ParallelConfig(**{**given, **overrides})
