"""Predict one configuration: step time, throughput, bubble, memory.

:func:`evaluate` costs a :class:`ParallelConfig` for a model on some hardware. With
``simulate=True`` it builds the schedule with :func:`plait.pipeline.build_schedule` and runs it
through the discrete-event simulator (the same action lists the runtime executes); with
``simulate=False`` it uses closed-form pipeline formulas, fast enough to rank thousands of
candidates, which the search then re-checks by simulation.

Example::

    est = evaluate(get_model("gpt3-175b"), get_hardware("a100-80gb"),
                   ParallelConfig(dp=8, tp=8, pp=8, microbatch_size=1, num_microbatches=64,
                                  schedule="1f1b", recompute="selective", sequence_parallel=True))
    est.step_time_s, est.tflops_per_gpu, est.memory_gb_per_gpu
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache

from plait.config import ParallelConfig
from plait.pipeline.schedule import Action, Kind, Schedule
from plait.plan.cost import CostModel
from plait.plan.hardware import HardwareSpec
from plait.plan.memory import MemoryBreakdown, analytic_in_flight, memory_per_device
from plait.plan.model_spec import ModelSpec
from plait.plan.simulator import SimResult, simulate
from plait.trace import Event

__all__ = [
    "Estimate",
    "evaluate",
    "get_schedule",
    "simulate_config",
    "can_simulate",
    "can_extrapolate",
    "schedule_costs",
]

# Above this many compute actions a schedule is costed by formula (simulating it would take
# seconds; the formulas match the simulator closely for uniform stages).
SIMULATE_MAX_ACTIONS = 40_000
# The list-scheduling generators (zero-bubble, and interleaved when m is not a multiple of p) take
# time growing faster than p * m * v (0.2 s at 2048 on the development machine); above this size
# the schedule is simulated with fewer micro-batches and its steady state extended (see
# :func:`_extrapolated`), or, where even that is too big, costed by formula.
GREEDY_MAX_SIZE = 2048
# Extrapolation simulates two short runs, whose schedules are cached and shared by every
# configuration with the same stage count, remainder and costs, so it may go further.
EXTRAPOLATE_MAX_SIZE = 8192


def _greedy(cfg: ParallelConfig) -> bool:
    return cfg.schedule in ("zb-h1", "zb-v") or (
        cfg.schedule == "interleaved-1f1b" and cfg.num_microbatches % cfg.pp != 0
    )


def can_simulate(cfg: ParallelConfig, greedy_max: int | None = None) -> bool:
    """Whether :func:`evaluate` simulates ``cfg`` whole (else it extrapolates a shorter
    simulation, or uses the closed forms)."""
    p, m, v = cfg.pp, cfg.num_microbatches, cfg.virtual
    if cfg.num_stages * m * 3 > SIMULATE_MAX_ACTIONS:
        return False
    return not _greedy(cfg) or p * m * v <= (GREEDY_MAX_SIZE if greedy_max is None else greedy_max)


def _short_counts(cfg: ParallelConfig) -> tuple[int, int]:
    """The two shorter micro-batch counts :func:`_extrapolated` simulates: ``2p`` and ``3p`` plus
    ``m mod p``, so that a generator that treats counts not a multiple of ``p`` differently builds
    the same kind of schedule as for ``m``."""
    p, r = cfg.pp, cfg.num_microbatches % cfg.pp
    return 2 * p + r, 3 * p + r


def can_extrapolate(cfg: ParallelConfig) -> bool:
    """Whether ``cfg`` is too big to simulate whole but shorter runs of its schedule are not
    (see :func:`_extrapolated`)."""
    m2 = _short_counts(cfg)[1]
    short = replace(cfg, num_microbatches=m2)
    return (
        cfg.pp > 1
        and cfg.num_microbatches > m2
        and not can_simulate(cfg)
        and can_simulate(short, EXTRAPOLATE_MAX_SIZE)
    )


def _extrapolated(cm: CostModel) -> SimResult:
    """Simulate the schedule with about ``2p`` and ``3p`` micro-batches (:func:`_short_counts`)
    and extend to ``m``: past the warm-up every further micro-batch adds the same time to each
    rank (the steady state), so the difference of the two runs gives it. The timeline and the
    activations held are the longer run's (in-flight counts stop growing once the pipeline is
    full)."""
    cfg = cm.cfg
    p, m, v = cfg.pp, cfg.num_microbatches, cfg.virtual
    m1, m2 = _short_counts(cfg)
    costs = schedule_costs(cm)
    s1 = simulate(get_schedule(cfg.schedule, p, m1, v, costs), cm)
    s2 = simulate(get_schedule(cfg.schedule, p, m2, v, costs), cm)
    k = (m - m2) / (m2 - m1)
    pipe = s2.pipeline_time + k * (s2.pipeline_time - s1.pipeline_time)
    ends = [e2 + k * (e2 - e1) for e1, e2 in zip(s1.rank_end, s2.rank_end)]
    busy = (1.0 - s2.bubble_fraction) * p * s2.pipeline_time * m / m2  # rank-seconds computing
    return SimResult(
        s2.timeline,
        pipe,
        1.0 - busy / (p * pipe),
        s2.peak_in_flight,
        s2.peak_activation_bytes,
        ends,
    )


@dataclass
class Estimate:
    """A predicted training step. Times in seconds, memory in bytes unless named ``_gb``."""

    config: ParallelConfig
    step_time_s: float
    pipeline_time_s: float
    dp_comm_s: float
    optimizer_s: float
    bubble_fraction: float
    tflops_per_gpu: float
    mfu: float
    memory: MemoryBreakdown
    memory_limit: float
    tp_comm_share: float
    p2p_time_s: float
    tokens_per_s: float
    method: str
    sim: SimResult | None = field(default=None, repr=False)
    schedule_costs: tuple[float, float, float] | None = None

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.memory_limit

    @property
    def memory_gb_per_gpu(self) -> float:
        return self.memory.total / 1e9

    def to_dict(self) -> dict:
        c = self.config
        return {
            "dp": c.dp,
            "tp": c.tp,
            "pp": c.pp,
            "virtual": c.virtual,
            "schedule": c.schedule,
            "microbatch_size": c.microbatch_size,
            "num_microbatches": c.num_microbatches,
            "recompute": c.recompute,
            "sequence_parallel": c.sequence_parallel,
            "dtype": c.dtype,
            "step_time_s": self.step_time_s,
            "tflops_per_gpu": self.tflops_per_gpu,
            "mfu": self.mfu,
            "bubble_fraction": self.bubble_fraction,
            "memory_gb_per_gpu": self.memory_gb_per_gpu,
            "fits_memory": self.fits,
            "tokens_per_s": self.tokens_per_s,
            "pipeline_time_s": self.pipeline_time_s,
            "dp_allreduce_s": self.dp_comm_s,
            "optimizer_s": self.optimizer_s,
            "tp_comm_share": self.tp_comm_share,
            "memory": self.memory.to_dict(),
            "method": self.method,
            "schedule_costs": list(self.schedule_costs) if self.schedule_costs else None,
        }


@lru_cache(maxsize=64)
def get_schedule(
    name: str, p: int, m: int, v: int = 1, costs: tuple[float, float, float] | None = None
) -> Schedule:
    """The schedule the runtime would run (``none``: one rank, forward then backward per
    micro-batch, i.e. gradient accumulation), built for ``costs`` (see :func:`schedule_costs`)."""
    if name == "none":
        acts = []
        for i in range(m):
            acts += [Action(Kind.F, 0, i), Action(Kind.BW, 0, i)]
        return Schedule("none", 1, 1, m, [0], [acts])
    from plait.pipeline.generators import build_schedule

    return build_schedule(name, p, m, v if name == "interleaved-1f1b" else None, costs)


def schedule_costs(cm: CostModel) -> tuple[float, float, float] | None:
    """The relative ``(F, B, W)`` durations a list-scheduled configuration's schedule is built
    for (``plait train --schedule-costs``): the cost model's mean over stages, F = 1, rounded to
    hundredths so that near-equal models share one schedule. None for fixed-pattern schedules."""
    if not _greedy(cm.cfg):
        return None
    n = cm.cfg.num_stages
    f, b, w = (sum(cm.compute(k, s) for s in range(n)) / n for k in ("F", "B", "W"))
    if f <= 0:
        return None
    return (1.0, round(b / f, 2) or 0.01, round(w / f, 2) or 0.01)


def _analytic_pipeline(cm: CostModel) -> tuple[float, float]:
    """Closed-form pipeline time and bubble fraction (bottleneck rank, uniform in time)."""
    cfg = cm.cfg
    p, m, v = cfg.pp, cfg.num_microbatches, cfg.virtual
    per_rank = []
    for r in range(p):
        stages = [s for s, rr in enumerate(cm.stage_rank) if rr == r]
        per_rank.append({k: sum(cm.compute(k, s) for s in stages) for k in ("F", "B", "W")})
    f = max(x["F"] for x in per_rank)
    b = max(x["B"] for x in per_rank)
    w = max(x["W"] for x in per_rank)
    mean = sum(x["F"] + x["B"] + x["W"] for x in per_rank) / p
    work = m * (f + b + w)
    tc = max((cm.transfer(s, s + 1) for s in range(cfg.num_stages - 1)), default=0.0)
    name = cfg.schedule
    if name == "none":
        bubble_t, comm = 0.0, 0.0
    elif name in ("gpipe", "1f1b"):
        bubble_t, comm = (p - 1) * (f + b + w), 2 * (p - 1) * tc
    elif name == "interleaved-1f1b":
        bubble_t, comm = (p - 1) * (f + b + w) / v, 2 * (p - 1) * tc * (1 + 1 / v)
    elif name == "zb-h1":
        bubble_t, comm = (p - 1) * max(f + b - w, (f + b + w) / 3), 2 * (p - 1) * tc
    else:  # zb-v
        bubble_t, comm = (p - 1) * max(f + b - 2 * w, (f + b + w) / 6) / 2, 2 * (p - 1) * tc
    if cm.p2p_blocks_compute and p > 1:
        comm += m * v * 2 * tc  # every send occupies its sender
    total = work + bubble_t + comm
    busy = m * mean
    return total, 1.0 - busy / total


def simulate_config(cm: CostModel) -> SimResult:
    """Simulate one pipeline replica of ``cm.cfg`` with its costs."""
    cfg = cm.cfg
    sched = get_schedule(
        cfg.schedule, cfg.pp, cfg.num_microbatches, cfg.virtual, schedule_costs(cm)
    )
    return simulate(sched, cm)


def evaluate(
    model: ModelSpec,
    hw: HardwareSpec,
    cfg: ParallelConfig,
    seq: int | None = None,
    simulate: bool = True,
    flash_attention: bool = True,
) -> Estimate:
    """Predict one training step of ``cfg``; see the module docstring."""
    cm = CostModel(model, hw, cfg, seq, flash_attention=flash_attention)
    sim = None
    if simulate and (can_simulate(cfg) or can_extrapolate(cfg)):
        whole = can_simulate(cfg)
        sim = simulate_config(cm) if whole else _extrapolated(cm)
        pipe, bubble = sim.pipeline_time, sim.bubble_fraction
        in_flight = sim.peak_in_flight
        m1, m2 = _short_counts(cfg)
        method = "simulated" if whole else f"simulated at {m1} and {m2} micro-batches, extended"
    else:
        pipe, bubble = _analytic_pipeline(cm)
        in_flight = analytic_in_flight(cfg.schedule, cfg.pp, cfg.num_microbatches, cfg.virtual)
        method = "analytic"
    # Gradient all-reduce and optimizer after the pipeline drains, on the slowest rank.
    tails = [cm.dp_allreduce_time(r) + cm.optimizer_time(r) for r in range(cfg.pp)]
    rank_end = sim.rank_end if sim else [pipe] * cfg.pp
    ends = [rank_end[r] + tails[r] for r in range(cfg.pp)]
    step = max(ends)
    if sim is not None:
        for r in range(cfg.pp):
            t0 = rank_end[r]
            ar = cm.dp_allreduce_time(r)
            if ar > 0:
                sim.timeline.add(Event(r, "dp all-reduce", "comm", t0, t0 + ar))
            sim.timeline.add(Event(r, "optimizer", "optimizer", t0 + ar, ends[r]))
    mem = memory_per_device(cm, in_flight)
    flops = cm.step_flops_per_gpu()
    lt = cm.layer_times
    tp_share = (lt["comm_F"] + lt["comm_B"]) / max(lt["F"] + lt["B"] + lt["W"], 1e-30)
    p2p = max((cm.transfer(s, s + 1) for s in range(cfg.num_stages - 1)), default=0.0)
    return Estimate(
        config=cfg,
        step_time_s=step,
        pipeline_time_s=pipe,
        dp_comm_s=max(cm.dp_allreduce_time(r) for r in range(cfg.pp)),
        optimizer_s=max(cm.optimizer_time(r) for r in range(cfg.pp)),
        bubble_fraction=bubble,
        tflops_per_gpu=flops / step / 1e12,
        mfu=cm.model_flops_per_gpu() / step / hw.flops(cfg.dtype),
        memory=mem,
        memory_limit=hw.usable_memory,
        tp_comm_share=tp_share,
        p2p_time_s=p2p,
        tokens_per_s=cfg.global_batch * cm.seq / step,
        method=method,
        schedule_costs=schedule_costs(cm),
        sim=sim,
    )
