"""One parallel configuration: how a training step is split over devices.

Example::

    cfg = ParallelConfig(dp=8, tp=8, pp=4, microbatch_size=1, num_microbatches=32,
                         schedule="interleaved-1f1b", virtual=2, recompute="selective", sp=True)
    cfg.gpus, cfg.global_batch  # 256, 256
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from plait.plan.model_spec import RECOMPUTE

__all__ = ["ParallelConfig", "SCHEDULES", "normalise_schedule"]

# Schedules the planner knows how to cost; "none" is no pipeline (pp=1, gradient accumulation).
SCHEDULES = ("none", "gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-v")
_ALIASES = {"interleaved": "interleaved-1f1b", "zbh1": "zb-h1", "zbv": "zb-v", "1F1B": "1f1b"}


def normalise_schedule(name: str) -> str:
    name = _ALIASES.get(name, name)
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid: {list(SCHEDULES)}")
    return name


@dataclass(frozen=True)
class ParallelConfig:
    """``world = dp x pp x tp`` plus how the pipeline runs and what is recomputed.

    Attributes:
        dp, tp, pp: data-, tensor- and pipeline-parallel sizes.
        microbatch_size: sequences per micro-batch.
        num_microbatches: micro-batches per replica per step.
        schedule: one of :data:`SCHEDULES` (``none`` when ``pp == 1``).
        virtual: model chunks per pipeline rank (interleaved 1F1B; 2 for ZB-V).
        recompute: ``none``, ``selective`` or ``full``.
        sp: sequence parallelism (shards norms and dropout along the sequence; needs ``tp > 1``).
        dtype: compute dtype (``bf16``, ``fp16``, ``fp32``).
    """

    dp: int = 1
    tp: int = 1
    pp: int = 1
    microbatch_size: int = 1
    num_microbatches: int = 1
    schedule: str = "none"
    virtual: int = 1
    recompute: str = "none"
    sp: bool = False
    dtype: str = "bf16"

    def __post_init__(self) -> None:
        for f in ("dp", "tp", "pp", "microbatch_size", "num_microbatches", "virtual"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{f} must be a positive integer, got {v!r}")
        object.__setattr__(self, "schedule", normalise_schedule(self.schedule))
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute {self.recompute!r} is not one of {list(RECOMPUTE)}")
        if self.pp == 1 and self.schedule != "none":
            object.__setattr__(self, "schedule", "none")
        if self.pp > 1 and self.schedule == "none":
            raise ValueError(
                f"pp={self.pp} needs a pipeline schedule, one of {list(SCHEDULES[1:])}"
            )
        if self.schedule == "zb-v" and self.virtual != 2:
            object.__setattr__(self, "virtual", 2)
        if self.schedule not in ("interleaved-1f1b", "zb-v") and self.virtual != 1:
            raise ValueError(
                f"virtual={self.virtual} only applies to interleaved-1f1b (or zb-v, which uses 2); "
                f"schedule is {self.schedule!r}"
            )
        if self.sp and self.tp == 1:
            object.__setattr__(self, "sp", False)

    @property
    def gpus(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def global_batch(self) -> int:
        return self.dp * self.microbatch_size * self.num_microbatches

    @property
    def num_stages(self) -> int:
        return self.pp * self.virtual

    def label(self) -> str:
        sched = self.schedule + (f"/v{self.virtual}" if self.schedule == "interleaved-1f1b" else "")
        sp = "+sp" if self.sp else ""
        return (
            f"dp{self.dp} tp{self.tp}{sp} pp{self.pp} {sched} mb{self.microbatch_size}x"
            f"{self.num_microbatches} rc:{self.recompute}"
        )

    def to_dict(self) -> dict:
        return asdict(self)
