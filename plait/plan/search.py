"""Search the configurations of a training job and rank them by time per step.

The space: every ``dp x tp x pp`` that multiplies to the GPU count (tensor ranks dividing the
attention heads, pipeline stages no more than layers), micro-batch sizes that divide each
replica's share of the global batch, every schedule of :data:`plait.config.SCHEDULE_SPECS` (those
with any number of chunks at 2, 4 and 8; GPipe only when asked, since it has 1F1B's bubble with
more memory), what data parallelism shards (nothing, the optimizer state with ZeRO-1, or
everything with FSDP: :data:`DP_SHARDS`), recomputation and sequence parallelism. For each shape
and sharding the cheapest recomputation
that fits memory is kept (none is fastest, then selective, then full), with the activations each
schedule holds as its generator builds it (:func:`plait.plan.evaluate.schedule_in_flight`). Every
candidate is costed by formula; the best few are then simulated on the real schedule (or
simulated shorter and extended, within 3%) and re-ranked: what is ranked was simulated. For the
winner's shape every schedule is simulated too, so the verdict can say why this one.

Example::

    res = search(get_model("llama3-70b"), get_hardware("h100-sxm"), gpus=64, global_batch=512)
    res.best.config.label(), res.best.step_time_s
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from plait.config import SCHEDULE_SPECS, ParallelConfig, resolve_schedule
from plait.plan.evaluate import Estimate, evaluate
from plait.plan.hardware import HardwareSpec
from plait.plan.memory import state_bytes_per_param
from plait.plan.model_spec import RECOMPUTE, ModelSpec

__all__ = [
    "SearchResult",
    "search",
    "strategy_of",
    "STRATEGIES",
    "DP_SHARDS",
    "tp_problem",
    "valid_tp",
    "resolve_precision",
]

STRATEGIES = ("data", "fsdp", "tensor", "pipeline", "tensor+pipeline")
# What data parallelism may shard (ParallelConfig.dp_shard): nothing, ZeRO-1, FSDP (ZeRO-3).
DP_SHARDS = ("none", "zero1", "fsdp")


def strategy_of(cfg: ParallelConfig) -> str:
    """Which family a configuration belongs to (data parallel is always combined; fully sharded
    data parallel alone is its own family)."""
    if cfg.tp == 1 and cfg.pp == 1 and cfg.fsdp:
        return "fsdp"
    if cfg.tp > 1 and cfg.pp > 1:
        return "tensor+pipeline"
    if cfg.tp > 1:
        return "tensor"
    if cfg.pp > 1:
        return "pipeline"
    return "data"


@dataclass
class SearchResult:
    """Ranked estimates, best first, plus the best of each strategy family (even if it does not
    fit, so the verdict can say why not), and ``schedules``: the best shape under every schedule
    that search considered (simulated; empty without a pipeline)."""

    ranked: list[Estimate]
    by_strategy: dict[str, Estimate]
    considered: int
    rejected_memory: int
    model: ModelSpec
    hw: HardwareSpec
    gpus: int
    global_batch: int
    seq: int
    extra: dict = field(default_factory=dict)
    _schedules: list[Estimate] | None = field(default=None, repr=False)

    @property
    def schedules(self) -> list[Estimate]:
        """The best shape under every schedule the search considered, simulated, 1F1B first
        (computed when first asked for; empty without a pipeline)."""
        if self._schedules is None:
            best = self.ranked[0] if self.ranked else None
            if best is None or best.config.pp == 1:
                self._schedules = []
            else:
                self._schedules = _every_schedule(
                    self.model,
                    self.hw,
                    best,
                    self.seq,
                    self.extra.get("schedules", _default_schedules()),
                    self.model.layers,
                    self.extra.get("flash_attention", True),
                )
        return self._schedules

    @property
    def best(self) -> Estimate:
        if not self.ranked:
            params = self.model.num_parameters()
            per_param = state_bytes_per_param(self.extra["precision_config"])
            state = params * per_param
            usable = self.hw.usable_memory
            if state > self.gpus * usable:
                # Weights, gradients and optimizer states alone exceed every GPU's memory put
                # together: no split of the work helps, and a smaller batch does not either.
                need = math.ceil(state / usable)
                hint = (
                    f"its weights, gradients and Adam states alone take {state / 1e9:,.0f} GB "
                    f"({per_param:g} bytes x {params / 1e9:.1f}B parameters) "
                    f"against {self.gpus * usable / 1e9:,.0f} GB on all {self.gpus} GPUs; "
                    f"training needs at least {need} GPUs (more for activations), or serve it "
                    f"with --inference"
                )
            else:
                hint = "try more GPUs or a smaller global batch"
            raise ValueError(
                f"no configuration of {self.model.name} fits {self.gpus} x {self.hw.name} "
                f"({usable / 1e9:.0f} GB usable each) with global batch {self.global_batch}; "
                + hint
            )
        return self.ranked[0]


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def search(
    model: ModelSpec,
    hw: HardwareSpec,
    gpus: int,
    global_batch: int,
    seq: int | None = None,
    schedules: list[str] | None = None,
    recompute: list[str] | None = None,
    sequence_parallel: bool | None = None,
    dtype: str | None = None,
    flash_attention: bool = True,
    simulate_top: int = 6,
    keep: int = 10,
    max_microbatch: int = 16,
    precision: str | None = None,
    dp_shards: list[str] | None = None,
) -> SearchResult:
    """Rank configurations of ``gpus`` devices for a step of ``global_batch`` sequences.

    Args:
        schedules: restrict the pipeline schedules (default every one in
            :data:`plait.config.SCHEDULE_SPECS` but GPipe).
        recompute: restrict recomputation choices (default all three).
        sequence_parallel: force it on or off (default on whenever ``tp > 1``: it moves the same
            bytes and shards more activations).
        dtype, precision: as :class:`ParallelConfig`'s (see :func:`resolve_precision`; default
            bf16 mixed precision over float32 masters).
        dp_shards: restrict what data parallelism shards (default all of :data:`DP_SHARDS`;
            FSDP only with ``dp > 1`` and a schedule that does not split the backward).
        simulate_top: how many of the best by formula are simulated on the real schedule (the
            ranking holds only these, and each family's best).
        keep: how many ranked alternatives to return (at most ``simulate_top``).
    """
    if not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"--gpus must be a positive integer, got {gpus!r}")
    if not isinstance(global_batch, int) or global_batch < 1:
        raise ValueError(f"--global-batch must be a positive integer, got {global_batch!r}")
    if seq is not None and (not isinstance(seq, int) or seq < 1):
        raise ValueError(f"--seq-len must be a positive integer, got {seq!r}")
    seq = seq or model.seq_len
    scheds = list(dict.fromkeys(resolve_schedule(s) for s in (schedules or _default_schedules())))
    rcs = recompute or list(RECOMPUTE)
    for r in rcs:
        if r not in RECOMPUTE:
            raise ValueError(f"recompute {r!r} is not one of {list(RECOMPUTE)}")
    rcs = [r for r in RECOMPUTE if r in rcs]  # fastest first
    dtype, precision = resolve_precision(dtype, precision)
    shards = list(DP_SHARDS) if dp_shards is None else list(dp_shards)
    for sh in shards:
        if sh not in DP_SHARDS:
            raise ValueError(f"dp shard {sh!r} is not one of {list(DP_SHARDS)}")
    max_tp = min(model.heads, 2 * hw.devices_per_node)

    fitting: list[Estimate] = []
    by_strategy: dict[str, Estimate] = {}
    considered = rejected = 0

    def consider(est: Estimate) -> None:
        fam = strategy_of(est.config)
        cur = by_strategy.get(fam)
        # Per family keep the fastest that fits, else the one that comes closest to fitting.
        if cur is None or (est.fits, -est.step_time_s if est.fits else -est.memory.total) > (
            cur.fits,
            -cur.step_time_s if cur.fits else -cur.memory.total,
        ):
            by_strategy[fam] = est

    for tp in _divisors(gpus):
        if tp > max_tp or tp_problem(model, tp):
            continue
        for pp in _divisors(gpus // tp):
            if pp > model.layers:
                continue
            dp = gpus // (tp * pp)
            if global_batch % dp:
                continue
            per_replica = global_batch // dp
            sps = (
                [sequence_parallel if sequence_parallel is not None else True]
                if tp > 1
                else [False]
            )
            for mbs in (1, 2, 4, 8, 16, 32, 64):
                if mbs > max_microbatch or per_replica % mbs:
                    continue
                m = per_replica // mbs
                for sched, v in _schedule_options(scheds, pp, m, model.layers):
                    split = sched != "none" and SCHEDULE_SPECS[sched].split_backward
                    opts = [
                        sh
                        for sh in shards
                        if (dp > 1 or sh == "none") and not (sh == "fsdp" and split)
                    ]
                    # ZeRO-1 moves the gradient all-reduce's bytes (a reduce-scatter and an
                    # all-gather), steps 1/dp of the optimizer and holds less: plain data
                    # parallel never beats it, so it is costed only where ZeRO-1 is not
                    opts = [sh for sh in opts if sh != "none" or "zero1" not in opts]
                    for sp in sps:
                        for sh in opts:
                            last = None
                            for rc in rcs:
                                cfg = ParallelConfig(
                                    dp=dp,
                                    tp=tp,
                                    pp=pp,
                                    microbatch_size=mbs,
                                    num_microbatches=m,
                                    schedule=sched,
                                    virtual=v,
                                    recompute=rc,
                                    sequence_parallel=sp,
                                    dtype=dtype,
                                    precision=precision,
                                    zero1=sh == "zero1",
                                    fsdp=sh == "fsdp",
                                )
                                est = evaluate(
                                    model,
                                    hw,
                                    cfg,
                                    seq,
                                    simulate=False,
                                    flash_attention=flash_attention,
                                )
                                considered += 1
                                last = est
                                if est.fits:
                                    fitting.append(est)
                                    break
                            if last is not None:
                                if not last.fits:
                                    rejected += 1
                                consider(last)
    fitting.sort(key=lambda e: e.step_time_s)
    # Re-cost the leaders (and each family's best) on the real schedules; rank only those.
    leaders = fitting[:simulate_top]
    for est in list(by_strategy.values()):
        if est.fits and est not in leaders:
            leaders.append(est)
    resim = {
        id(e): evaluate(model, hw, e.config, seq, simulate=True, flash_attention=flash_attention)
        for e in leaders
    }
    by_strategy = {k: resim.get(id(e), e) for k, e in by_strategy.items()}
    simulated = [resim[id(e)] for e in leaders]
    rejected += sum(1 for e in simulated if not e.fits)
    ranked = sorted((e for e in simulated if e.fits), key=lambda e: e.step_time_s)[:keep]
    extra = {
        "schedules": scheds,
        "flash_attention": flash_attention,
        "precision_config": ParallelConfig(dtype=dtype, precision=precision),
    }
    return SearchResult(
        ranked, by_strategy, considered, rejected, model, hw, gpus, global_batch, seq, extra
    )


# Never the better choice in a search by step time, so not searched unless asked for: GPipe has
# 1F1B's bubble and holds every micro-batch; ZB-H2 has ZB-H1's step time (3m + p - 1 at equal
# costs: its gain is a gap-free span) at up to twice its activation memory, and its list-scheduled
# build is the slowest of all.
NOT_SEARCHED = ("gpipe", "zb-h2")


def _default_schedules() -> list[str]:
    return [s for s in SCHEDULE_SPECS if s not in NOT_SEARCHED]


def resolve_precision(dtype: str | None, precision: str | None) -> tuple[str, str]:
    """``(dtype, precision)`` for the planner: bf16 mixed precision over float32 masters when
    neither is given (what large runs use); a ``dtype`` alone is a whole-model cast (precision
    fp32), a ``precision`` alone keeps float32 masters."""
    if dtype is None and precision is None:
        return "fp32", "bf16-mixed"
    return dtype or "fp32", precision or "fp32"


def tp_problem(model: ModelSpec, tp: int) -> str | None:
    """Why ``tp`` tensor ranks cannot split ``model``'s attention, or None if they can: ``tp``
    must divide the heads, and divide the key/value heads or be a multiple of them (each rank
    then keeps a copy of one, as Megatron does)."""
    kv = model.kv_heads or model.heads
    if model.heads % tp:
        return f"does not divide the {model.heads} attention heads"
    if kv % tp and tp % kv:
        return f"neither divides the {kv} key/value heads nor is a multiple of them"
    return None


def valid_tp(model: ModelSpec, limit: int | None = None) -> list[int]:
    """Tensor-parallel widths that split ``model``'s attention (up to ``limit``)."""
    top = model.heads if limit is None else min(limit, model.heads)
    return [t for t in range(1, top + 1) if tp_problem(model, t) is None]


def _every_schedule(
    model: ModelSpec,
    hw: HardwareSpec,
    best: Estimate,
    seq: int,
    scheds: list[str],
    layers: int,
    flash_attention: bool,
) -> list[Estimate]:
    """``best``'s shape under every schedule option, simulated, 1F1B first: what the verdict
    compares the chosen schedule with."""
    c = best.config
    opts = list(_schedule_options(scheds, c.pp, c.num_microbatches, layers))
    if ("1f1b", 1) not in opts:
        opts.insert(0, ("1f1b", 1))
    if c.fsdp:  # FSDP runs no schedule that splits the backward (ParallelConfig refuses them)
        opts = [(s, v) for s, v in opts if not SCHEDULE_SPECS[s].split_backward]
    out = []
    for sched, v in opts:
        if (sched, v) == (c.schedule, c.virtual):
            out.append(best)
            continue
        cfg = replace(c, schedule=sched, virtual=v)
        out.append(evaluate(model, hw, cfg, seq, simulate=True, flash_attention=flash_attention))
    out.sort(key=lambda e: e.config.schedule != "1f1b")
    return out


def _schedule_options(scheds: list[str], pp: int, m: int, layers: int):
    """``(schedule, chunks per rank)`` for each schedule of ``scheds`` at ``pp`` stages: its fixed
    chunk count, or 2, 4 and 8 for those that take any; each chunk needs at least one layer."""
    if pp == 1:
        yield "none", 1
        return
    for s in scheds:
        spec = SCHEDULE_SPECS[s]
        for v in (spec.virtual,) if spec.virtual is not None else (2, 4, 8):
            if pp * v <= layers:
                yield s, v
