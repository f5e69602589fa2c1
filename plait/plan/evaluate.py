"""Predict one configuration: step time, throughput, bubble, memory.

:func:`evaluate` costs a :class:`ParallelConfig` for a model on some hardware. With
``simulate=True`` it builds the schedule with :func:`plait.pipeline.build_schedule` and runs it
through the discrete-event simulator (the same action lists the runtime executes); a schedule too
big to simulate whole is simulated at shorter lengths and extended (:func:`extrapolate`). With
``simulate=False`` it uses closed-form pipeline formulas, fast enough to rank thousands of
candidates, which the search then re-checks by simulation.

Example::

    est = evaluate(get_model("gpt3-175b"), get_hardware("a100-80gb"),
                   ParallelConfig(dp=8, tp=8, pp=8, microbatch_size=1, num_microbatches=64,
                                  schedule="1f1b", recompute="selective", sequence_parallel=True))
    est.step_time_s, est.tflops_per_gpu, est.memory_gb_per_gpu
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from plait.config import SCHEDULE_SPECS, ParallelConfig
from plait.pipeline.schedule import Action, Kind, Schedule
from plait.plan.cost import CostModel, UniformCosts
from plait.plan.hardware import HardwareSpec
from plait.plan.memory import MemoryBreakdown, analytic_in_flight, memory_per_device
from plait.plan.model_spec import ModelSpec
from plait.plan.simulator import SimResult, StageCosts, simulate
from plait.trace import Event

__all__ = [
    "Estimate",
    "evaluate",
    "get_schedule",
    "simulate_config",
    "can_simulate",
    "can_extrapolate",
    "extrapolate",
    "short_counts",
    "schedule_costs",
    "schedule_in_flight",
    "list_scheduled",
]

# Above this many compute actions a schedule is not simulated whole (it would take seconds).
SIMULATE_MAX_ACTIONS = 40_000
# The list-scheduling generators (zero-bubble, and interleaved when m is not a multiple of p) take
# time growing faster than p * m * v (about 0.5 s at 512 on the 2-core machine); above this size
# the schedule is simulated at fewer micro-batches and extended (:func:`extrapolate`), or, where
# even that is too big, costed by formula.
GREEDY_MAX_SIZE = 512
# The longest run an extrapolation may simulate (p * m * v). Its runs are cached and shared by
# every configuration with the same stage count, residue of m and costs.
EXTRAPOLATE_MAX_SIZE = 8192


def list_scheduled(name: str, p: int, m: int) -> bool:
    """Whether schedule ``name`` at ``p`` ranks and ``m`` micro-batches comes from the list
    scheduler (built for costs, slower to generate): every schedule with a split backward
    (the zero-bubble family), and the any-``v`` interleaving when ``m`` is not a multiple of
    ``p``."""
    spec = SCHEDULE_SPECS.get(name)
    if spec is None:
        return False
    return spec.split_backward or (spec.virtual is None and m % p != 0)


def _greedy(cfg: ParallelConfig) -> bool:
    return list_scheduled(cfg.schedule, cfg.pp, cfg.num_microbatches)


def _size_ok(name: str, p: int, m: int, v: int, greedy_max: int) -> bool:
    if p * v * m * 3 > SIMULATE_MAX_ACTIONS:
        return False
    return not list_scheduled(name, p, m) or p * m * v <= greedy_max


def can_simulate(cfg: ParallelConfig, greedy_max: int | None = None) -> bool:
    """Whether :func:`evaluate` simulates ``cfg`` whole (else it extrapolates shorter
    simulations, or uses the closed forms)."""
    g = GREEDY_MAX_SIZE if greedy_max is None else greedy_max
    return _size_ok(cfg.schedule, cfg.pp, cfg.num_microbatches, cfg.virtual, g)


def _candidates(
    name: str, p: int, m: int, v: int, target: int, limit: int
) -> list[tuple[int, ...]]:
    def fits(k: int) -> bool:
        return k < m and _size_ok(name, p, k, v, limit)

    out: list[tuple[int, ...]] = []
    for d in (2 * p, p):  # runs about as long as one simulated whole: the longest span
        top = min(m - 1, target // (p * v))
        hi = top - (top - m % d) % d
        span = 2 * d * max(1, hi // (4 * d))
        if hi - span >= 2 * p and fits(hi):
            out.append((hi - span, hi - span // 2, hi))
    for d in (p, 2 * p):  # the shortest runs past the warm-up: longer than the target
        lo = 2 * p + m % d
        if fits(lo + 2 * d) and (lo, lo + d, lo + 2 * d) not in out:
            out.append((lo, lo + d, lo + 2 * d))
    r = m % p
    if not out and fits(3 * p + r):
        out.append((2 * p + r, 3 * p + r))
    return out


def short_counts(
    name: str, p: int, m: int, v: int = 1, target: int | None = None, limit: int | None = None
) -> tuple[int, ...] | None:
    """The shorter micro-batch counts :func:`extrapolate` simulates first for ``m``, or None if
    even the shortest are too big (all the candidates: :func:`_candidates`).

    A schedule repeats a pattern in its steady state, of a length that depends on ``m`` modulo
    ``p`` (1F1B, Megatron's interleaving) or ``2p`` (the list-scheduled interleaving alternates
    two patterns of ``p`` micro-batches). So the runs share ``m``'s residue modulo ``d = 2p``
    (or ``p`` where that does not fit) and lie ``d`` apart or a multiple of it: three counts
    ``lo < mid < hi``, ``lo >= 2p`` past the warm-up, ``hi`` about as long as a run simulated
    whole (``target``, in p * m * v) and the span about half of ``hi`` so that irregular
    patterns average out; failing that the shortest such runs within ``limit``; failing that
    two counts ``2p + m mod p`` and ``3p + m mod p``.
    """
    target = GREEDY_MAX_SIZE if target is None else target
    limit = EXTRAPOLATE_MAX_SIZE if limit is None else limit
    cands = _candidates(name, p, m, v, target, limit)
    return cands[0] if cands else None


def _short(cfg: ParallelConfig) -> tuple[int, ...] | None:
    return short_counts(cfg.schedule, cfg.pp, cfg.num_microbatches, cfg.virtual)


def can_extrapolate(cfg: ParallelConfig) -> bool:
    """Whether ``cfg`` is too big to simulate whole but shorter runs of its schedule are not
    (see :func:`extrapolate`)."""
    return cfg.pp > 1 and not can_simulate(cfg) and _short(cfg) is not None


# The midpoint of three runs may miss the line through the outer two by this share of the
# longest run's time before the next candidate counts are tried (a pattern longer than the
# spacing shows up as a bend).
LINEAR_TOLERANCE = 0.002


def extrapolate(
    name: str,
    p: int,
    m: int,
    v: int,
    costs: StageCosts,
    build_costs: tuple[float, float, float] | None = None,
    counts: tuple[int, ...] | None = None,
) -> SimResult:
    """Simulate schedule ``name`` at the shorter micro-batch ``counts`` (default: the candidates
    of :func:`short_counts` in turn, until three runs lie on a line, else the last) and extend
    the result to ``m`` micro-batches.

    Past the warm-up a schedule repeats a pattern, so over counts that share ``m``'s place in it
    the step time, and each rank's end, grow linearly in the number of micro-batches: the line
    through the shortest and longest run gives them at ``m``. Compute time grows exactly with
    ``m`` (the bubble follows from it); activations held stop growing once the pipeline is full,
    or grow by the same step as between the two longest runs (GPipe holds all ``m``). The
    timeline is the longest run's.

    Raises:
        ValueError: no shorter counts fit (:func:`short_counts` gave None).
    """
    return _extend(name, p, m, v, costs, build_costs, counts)[0]


def _extend(
    name: str,
    p: int,
    m: int,
    v: int,
    costs: StageCosts,
    build_costs: tuple[float, float, float] | None,
    counts: tuple[int, ...] | None,
) -> tuple[SimResult, tuple[int, ...]]:
    cands = (
        [counts] if counts else _candidates(name, p, m, v, GREEDY_MAX_SIZE, EXTRAPOLATE_MAX_SIZE)
    )
    if not cands:
        raise ValueError(f"{name} p={p} m={m} v={v} is too big to simulate even in part")
    for counts in cands:
        runs = [simulate(get_schedule(name, p, k, v, build_costs), costs) for k in counts]
        if len(runs) < 3:
            break
        t = [r.pipeline_time for r in runs]
        line = t[0] + (t[2] - t[0]) * (counts[1] - counts[0]) / (counts[2] - counts[0])
        if abs(t[1] - line) <= LINEAR_TOLERANCE * t[2]:
            break
    lo, hi = counts[0], counts[-1]
    first, last = runs[0], runs[-1]
    k = (m - hi) / (hi - lo)

    def extend(a: float, b: float) -> float:
        return b + k * (b - a)

    pipe = extend(first.pipeline_time, last.pipeline_time)
    ends = [extend(a, b) for a, b in zip(first.rank_end, last.rank_end)]
    busy = (1.0 - last.bubble_fraction) * p * last.pipeline_time * m / hi  # rank-seconds
    prev, mid = runs[-2], counts[-2]
    g = (m - hi) / (hi - mid)

    def held(a: list[float], b: list[float]) -> list[float]:
        return [y + g * (y - x) if y > x + 1e-9 else y for x, y in zip(a, b)]

    res = SimResult(
        last.timeline,
        pipe,
        1.0 - busy / (p * pipe) if pipe > 0 else 0.0,
        held(prev.peak_in_flight, last.peak_in_flight),
        held(prev.peak_activation_bytes, last.peak_activation_bytes),
        ends,
    )
    return res, counts


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
    fsdp_comm_s: float = 0.0  # FSDP's all-gathers and reduce-scatters left exposed, per step
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
            "precision": c.precision,
            "dp_shard": c.dp_shard,
            "step_time_s": self.step_time_s,
            "tflops_per_gpu": self.tflops_per_gpu,
            "mfu": self.mfu,
            "bubble_fraction": self.bubble_fraction,
            "memory_gb_per_gpu": self.memory_gb_per_gpu,
            "fits_memory": self.fits,
            "tokens_per_s": self.tokens_per_s,
            "pipeline_time_s": self.pipeline_time_s,
            "dp_allreduce_s": self.dp_comm_s,
            "fsdp_comm_s": self.fsdp_comm_s,
            "optimizer_s": self.optimizer_s,
            "tp_comm_share": self.tp_comm_share,
            "memory": self.memory.to_dict(),
            "method": self.method,
            "schedule_costs": list(self.schedule_costs) if self.schedule_costs else None,
        }


@lru_cache(maxsize=128)
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

    return build_schedule(name, p, m, v if SCHEDULE_SPECS[name].virtual is None else None, costs)


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


# Above this size (p * m * v) the in-flight counts of a schedule the closed forms know are taken
# from them (:func:`plait.plan.memory.analytic_in_flight`, tested equal to the simulator's)
# rather than simulated: the search asks for thousands of shapes.
IN_FLIGHT_MAX_SIZE = 512


@lru_cache(maxsize=4096)
def _peak(name: str, p: int, m: int, v: int) -> tuple[float, ...]:
    unit = UniformCosts(1 / v, 1 / v, 1 / v)
    return tuple(simulate(get_schedule(name, p, m, v), unit).peak_in_flight)


def schedule_in_flight(name: str, p: int, m: int, v: int = 1) -> tuple[float, ...]:
    """Peak micro-batches in flight per rank (whole-stage units, as the validator counts them)
    of schedule ``name`` as the generator builds it for equal costs: simulated at ``m`` itself
    when small, else at ``2p`` and ``3p`` plus ``m mod p`` and extended (what a pipeline holds
    stops growing once it is full, or grows by the same step: GPipe). Works for every schedule
    in :data:`plait.config.SCHEDULE_SPECS`; past ``IN_FLIGHT_MAX_SIZE`` the closed forms stand
    in for the schedules they know.

    Example::

        schedule_in_flight("1f1b", 4, 8)  # (4.0, 3.0, 2.0, 1.0)
    """
    if name == "none":
        return (1.0,)
    r = m % p
    a, b = 2 * p + r, 3 * p + r
    if p * v * min(m, b) > IN_FLIGHT_MAX_SIZE:
        try:
            return tuple(analytic_in_flight(name, p, m, v))
        except ValueError:
            pass  # a schedule the formulas do not know: simulate it, however long it takes
    if m <= b:
        return _peak(name, p, m, v)
    x, y = _peak(name, p, a, v), _peak(name, p, b, v)
    g = (m - b) / (b - a)
    return tuple(yy + g * (yy - xx) if yy > xx + 1e-9 else yy for xx, yy in zip(x, y))


# Closed forms for the bubble, in units of the bottleneck rank's F + B + W per micro-batch (and
# F, B, W separately for the split-backward schedules). GPipe and 1F1B: (p - 1), exact for even
# stages. The others are the schedules' ideals -- Megatron's (p - 1) / v for interleaving with m a
# multiple of p, the Zero Bubble paper's for ZB-H1 and ZB-V -- which the list-scheduled
# generators need not reach with uneven costs and communication: for them this is optimistic, and
# it only ranks candidates; what the search ranks is simulated (or extended, within 3%). Cases
# without a closed form (interleaving with m not a multiple of p, schedules added later) are costed
# as 1F1B, the generators' contract being never to be slower than it at the same (p, m).
def _bubble_units(name: str, p: int, m: int, v: int, f: float, b: float, w: float) -> float:
    if name in ("gpipe", "1f1b") or (name == "interleaved-1f1b" and v == 1):
        return (p - 1) * (f + b + w)
    if name == "interleaved-1f1b" and m % p == 0:
        return (p - 1) * (f + b + w) / v
    if name == "zb-h1":
        return (p - 1) * max(f + b - w, (f + b + w) / 3)
    if name == "zb-v":
        return (p - 1) * max(f + b - 2 * w, (f + b + w) / 6) / 2
    return (p - 1) * (f + b + w)


def _analytic_pipeline(cm: CostModel) -> tuple[float, float]:
    """Closed-form pipeline time and bubble fraction (bottleneck rank, uniform in time); see
    :func:`_bubble_units` for which schedules have an exact form and which are bounded."""
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
    else:
        bubble_t = _bubble_units(name, p, m, v, f, b, w)
        # fill and drain cross p - 1 links each way; chunks of an interleaving cross more
        comm = 2 * (p - 1) * tc * (1 + (1 / v if v > 1 and name == "interleaved-1f1b" else 0))
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
    whole = can_simulate(cfg)
    counts = None if whole or cfg.pp == 1 else _short(cfg)
    if not whole and counts is None:
        # Too short to extend, too long for the usual limit: the extension's own limit applies.
        whole = can_simulate(cfg, EXTRAPOLATE_MAX_SIZE)
    if simulate and (whole or counts):
        if whole:
            sim = simulate_config(cm)
            method = "simulated"
        else:
            sim, counts = _extend(
                cfg.schedule,
                cfg.pp,
                cfg.num_microbatches,
                cfg.virtual,
                cm,
                schedule_costs(cm),
                None,
            )
            method = f"simulated at {', '.join(map(str, counts))} micro-batches, extended"
        pipe, bubble = sim.pipeline_time, sim.bubble_fraction
        in_flight = sim.peak_in_flight
    else:
        pipe, bubble = _analytic_pipeline(cm)
        in_flight = list(
            schedule_in_flight(cfg.schedule, cfg.pp, cfg.num_microbatches, cfg.virtual)
        )
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
        mfu=cm.model_flops_per_gpu() / step / hw.flops(cfg.compute_dtype),
        memory=mem,
        memory_limit=hw.usable_memory,
        tp_comm_share=tp_share,
        p2p_time_s=p2p,
        tokens_per_s=cfg.global_batch * cm.seq / step,
        method=method,
        schedule_costs=schedule_costs(cm),
        sim=sim,
        fsdp_comm_s=max(cm.fsdp_time(r) for r in range(cfg.pp)) * cfg.num_microbatches,
    )
