"""Schedule generators against the simple schedules, PyTorch's and the papers' formulas.

Unit costs: a rank's whole stage costs F = B = W = 1 (a chunk of a v-chunk schedule 1/v), messages
free; makespans come from plait's simulator. PyTorch's schedule classes compute their
``pipeline_order`` in ``__init__`` from stage objects, so stand-ins with the fields they read are
enough (no processes); their orders run in plait's simulator as compute-only schedules.
"""

import functools
import math
import subprocess
import sys
import warnings

import pp_workers as W
import pytest
from test_pipeline import _check_cases

from plait import launch
from plait.config import SCHEDULE_SPECS
from plait.pipeline import Action, Kind, Schedule, ScheduleError, build_schedule, validate
from plait.pipeline.timing import best_order, order_time, peak_in_flight
from plait.pipeline.zero_bubble import dualpipe_v
from plait.plan.cost import UniformCosts
from plait.plan.simulator import simulate

NEW = ["zb-h2", "v-half", "v-min", "dualpipev"]
PS = range(1, 9)
MS = range(1, 33)
FAST_PS = [2, 3, 4]  # the full product of p <= 8 is marked slow
EQUAL = {Kind.F: 1.0, Kind.B: 1.0, Kind.W: 1.0, Kind.BW: 2.0}
_TORCH_KIND = {"F": Kind.F, "I": Kind.B, "W": Kind.W, "B": Kind.BW}


def _ps(fast, first=1):
    """p = first..8, those not in ``fast`` marked slow."""
    return [pytest.param(p, marks=() if p in fast else pytest.mark.slow) for p in PS if p >= first]


@functools.cache
def built(name: str, p: int, m: int, v: int | None = None, costs=None) -> Schedule:
    return build_schedule(name, p, m, v, costs)


def makespan(s: Schedule, costs=(1.0, 1.0, 1.0)) -> float:
    """The simulator's step time for the compute order (messages free, so the same as with them:
    ``test_fast_timing_agrees_with_the_simulator``), a whole stage costing ``costs``."""
    v = s.virtual
    order = Schedule(
        s.name, s.num_ranks, s.num_stages, s.num_microbatches, s.stage_to_rank, s.compute_only()
    )
    return simulate(order, UniformCosts(*(c / v for c in costs))).pipeline_time


class _Stage:
    """What torch's schedule constructors read from a stage (no module, no process group)."""

    def __init__(self, stage_index: int, num_stages: int, group_size: int):
        self.stage_index, self.num_stages = stage_index, num_stages
        self.group_size, self.group_rank = group_size, 0
        self.is_first, self.is_last = stage_index == 0, stage_index == num_stages - 1
        self.submod = None


@functools.cache
def torch_order(cls_name: str, p: int, m: int, v: int = 2) -> Schedule | None:
    """PyTorch's compute order for ``cls_name`` as a plait Schedule (None where PyTorch refuses
    the configuration); OVERLAP_F_B runs its sub-actions in order, as PyTorch's runtime does."""
    S = pytest.importorskip("torch.distributed.pipelining.schedules")
    n = p * v
    v_shape = cls_name != "ScheduleInterleaved1F1B"
    local = [0, n - 1] if v_shape else list(range(0, n, p))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sched = getattr(S, cls_name)([_Stage(i, n, p) for i in local], m)
    except ValueError:
        return None
    rows = []
    for r in range(p):
        row = []
        for a in sched.pipeline_order[r]:
            for x in (a.sub_actions or (a,)) if a is not None else ():
                row.append(
                    Action(_TORCH_KIND[x.computation_type.value], x.stage_index, x.microbatch_index)
                )
        rows.append(row)
    s2r = [sched.stage_index_to_group_rank[i] for i in range(n)]
    return Schedule(cls_name, p, n, m, s2r, rows)


def rank_idle(s: Schedule, costs=(1.0, 1.0, 1.0)) -> list[float]:
    """Per rank, idle time within its own busy span (first action's start to last one's end)."""
    v = s.virtual
    ev = simulate(s, UniformCosts(*(c / v for c in costs))).timeline.events
    out = []
    for r in range(s.num_ranks):
        mine = [e for e in ev if e.rank == r and e.kind in ("F", "B", "W", "BW")]
        busy = sum(e.end - e.start for e in mine)
        out.append(max(e.end for e in mine) - min(e.start for e in mine) - busy)
    return out


# -- interleaved-1f1b: never slower than 1f1b or PyTorch's interleaving ---------------------------


@pytest.mark.parametrize("v", [2, 4])
@pytest.mark.parametrize("p", _ps(FAST_PS))
def test_interleaved_never_slower_than_1f1b_nor_torch(p, v):
    for m in MS:
        s = build_schedule("interleaved-1f1b", p, m, v)
        peak = validate(s).peak_in_flight
        t = makespan(s)
        assert t <= makespan(built("1f1b", p, m)) + 1e-9, (p, v, m)
        theirs = torch_order("ScheduleInterleaved1F1B", p, m, v)
        if theirs is not None:
            assert t <= makespan(theirs) + 1e-9, (p, v, m, t, makespan(theirs))
            assert max(peak) <= max(peak_in_flight(theirs.actions)), (p, v, m)
        if m % p == 0 and m >= p:  # Megatron's bubble: (p - 1)(F + B) / v
            assert t == pytest.approx(3 * m + 3 * (p - 1) / v), (p, v, m)


# -- zb-v: never slower than PyTorch's ZBV ---------------------------------------------------------


@pytest.mark.parametrize("p", _ps([2, 5]))
def test_zb_v_never_slower_than_torch(p):
    compared = 0
    for m in MS:
        s = build_schedule("zb-v", p, m)
        assert max(validate(s).peak_in_flight) <= 2 * min(p, m)
        theirs = torch_order("ScheduleZBVZeroBubble", p, m)
        if theirs is None:
            continue
        compared += 1
        assert makespan(s) <= makespan(theirs) + 1e-9, (p, m, makespan(s), makespan(theirs))
        if m >= 2 * p:  # the lower bound: rank p - 1 starts at (p - 1) / 2 and works 3m
            assert makespan(s) == pytest.approx(3 * m + (p - 1) / 2)
    assert compared


# -- built for costs: never slower at those costs than the equal-cost build ------------------------

COSTS = [(1.0, 1.18, 0.7), (1.0, 1.5, 0.5), (1.0, 0.5, 2.0)]


@pytest.mark.parametrize("costs", COSTS)
@pytest.mark.parametrize("name", ["zb-h1", "zb-v", "zb-h2"])
@pytest.mark.parametrize(
    "p,ms",
    [(2, range(1, 33, 3)), (4, range(1, 33, 3))]
    + [pytest.param(p, MS, marks=pytest.mark.slow) for p in PS],
)
def test_built_for_costs_never_slower_than_equal_build(name, p, ms, costs):
    for m in ms:
        fitted = build_schedule(name, p, m, costs=costs)
        validate(fitted)
        equal = built(name, p, m)
        assert makespan(fitted, costs) <= makespan(equal, costs) + 1e-9, (name, p, m)


def test_the_issue_cases():
    # the configurations issue 14 named
    assert makespan(build_schedule("interleaved-1f1b", 8, 25, 4)) <= 96.0
    assert makespan(build_schedule("interleaved-1f1b", 3, 4, 4)) <= 13.5
    assert makespan(build_schedule("zb-v", 6, 9)) <= 29.5
    c = (1.0, 1.18, 0.7)
    assert makespan(build_schedule("zb-h1", 8, 32, costs=c), c) <= makespan(
        build_schedule("zb-h1", 8, 32), c
    )


# -- ZB-H2 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", _ps([1, 2, 3, 4]))
def test_zb_h2_is_a_parallelogram_at_2p_minus_1_in_flight(p):
    for m in range(1, 33):
        s = build_schedule("zb-h2", p, m)
        peak = validate(s).peak_in_flight
        assert max(peak) <= min(2 * p - 1, m)
        if m >= 2 * p - 1:
            assert peak[0] == 2 * p - 1
            # the Zero Bubble paper's bubble (p - 1)(T_F + T_B - 2 T_W), 0 at equal costs: no rank
            # idles inside its own span; the step is the lower bound 3m + (p - 1)
            assert max(rank_idle(s)) == pytest.approx((p - 1) * (1 + 1 - 2 * 1))
            assert makespan(s) == pytest.approx(3 * m + p - 1)
    assert makespan(build_schedule("zb-h2", p, 32)) <= makespan(build_schedule("zb-h1", p, 32))


def test_zb_h2_idles_less_than_zb_h1_inside_each_rank():
    s1, s2 = build_schedule("zb-h1", 4, 16), build_schedule("zb-h2", 4, 16)
    assert sum(rank_idle(s2)) < sum(rank_idle(s1))


# -- V-Half and V-Min ------------------------------------------------------------------------------


@pytest.mark.parametrize("p", _ps([2, 3, 4], first=2))
def test_v_half_and_v_min_memory_and_bubble(p):
    # peaks in chunks (half a stage each); 1F1B holds p micro-batches, 2p chunks, with a bubble
    # of 3(p - 1)
    for m in range(1, 33):
        half, vmin = build_schedule("v-half", p, m), build_schedule("v-min", p, m)
        ph, pm = max(validate(half).peak_in_flight), max(validate(vmin).peak_in_flight)
        if m >= p:
            assert ph <= p + 2  # half of 1F1B's 2p, plus the W's wait
            assert pm <= math.ceil((2 * p + 1) / 3) + 2  # a third of 2p, plus the W's wait
        for s in (half, vmin):  # a bubble below 1F1B's
            assert makespan(s) - 3 * m < 3 * (p - 1), (s.name, p, m)


@pytest.mark.slow
def test_v_min_holds_a_third_as_p_grows():
    for p in (16, 24):
        m = 2 * p
        one_f = 2 * max(validate(build_schedule("1f1b", p, m)).peak_in_flight)  # in chunks
        assert max(validate(build_schedule("v-min", p, m)).peak_in_flight) <= 0.4 * one_f
        assert max(validate(build_schedule("v-half", p, m)).peak_in_flight) <= 0.57 * one_f


# -- DualPipeV -------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", _ps([1, 2, 3, 4]))
def test_dualpipev_bubble_formula_and_torch(p):
    F = Bi = Wt = 1.0
    B = Bi + Wt  # DeepSeek's B is the full backward
    for m in (2 * p, 2 * p + 1, 3 * p + 2, 32):
        s = build_schedule("dualpipev", p, m)
        assert max(validate(s).peak_in_flight) == 2 * p + 1  # DeepSeek's PP + 1, PP = 2p stages
        orders, pairs = dualpipe_v(p, m)
        assert orders == s.compute_only()
        s2r = s.stage_to_rank
        for fb in (F + B, 0.8 * (F + B), max(F, B)):  # F&B: no, some, full overlap
            t = order_time(orders, s2r, EQUAL, pairs, fb)
            busy = [
                sum(EQUAL[a.kind] for i, a in enumerate(row))
                - sum(F + EQUAL[row[i + 1].kind] - fb for (q, i) in pairs if q == r)
                for r, row in enumerate(orders)
            ]
            idle = max(t - b for b in busy)
            assert idle == pytest.approx((p - 1) * (fb + B - 3 * Wt)), (p, m, fb)
        theirs = torch_order("ScheduleDualPipeV", p, m)
        if theirs is not None:
            assert makespan(s) <= makespan(theirs) + 1e-9, (p, m)


def test_dualpipev_with_few_micro_batches_still_runs():
    for p in (2, 4):
        for m in range(1, 2 * p):
            s = build_schedule("dualpipev", p, m)
            validate(s)
            assert makespan(s) <= makespan(build_schedule("1f1b", p, m)) + 1e-9


# -- the validator, the fast timing and the choice rule --------------------------------------------


@pytest.mark.parametrize("name", NEW)
def test_validator_accepts_new_schedules_and_rejects_their_mutations(name):
    judged = rejected = 0
    for p, m in [(2, 3), (3, 2), (3, 5)]:
        base = build_schedule(name, p, m)
        validate(base)
        for r, acts in enumerate(base.actions):
            for i in range(len(acts)):
                dropped = [list(a) for a in base.actions]
                del dropped[r][i]
                with pytest.raises(ScheduleError):
                    validate(Schedule(name, p, base.num_stages, m, base.stage_to_rank, dropped))
                if i + 1 == len(acts):
                    continue
                rows = [list(a) for a in base.actions]
                rows[r][i], rows[r][i + 1] = rows[r][i + 1], rows[r][i]
                s = Schedule(name, p, base.num_stages, m, base.stage_to_rank, rows)
                verdicts = []
                for run in (validate, lambda s: simulate(s, UniformCosts())):
                    try:
                        run(s)
                        verdicts.append("valid")
                    except ScheduleError as e:
                        verdicts.append(str(e))
                assert verdicts[0] == verdicts[1], (name, p, m, r, i)
                judged += 1
                rejected += verdicts[0] != "valid"
    assert 0 < rejected < judged


@pytest.mark.parametrize("name", [*SCHEDULE_SPECS])
def test_fast_timing_agrees_with_the_simulator(name):
    for p, m in [(2, 5), (4, 7), (3, 9)]:
        s = build_schedule(name, p, m)
        t = order_time(s.compute_only(), s.stage_to_rank, EQUAL)
        assert t == pytest.approx(simulate(s, UniformCosts()).pipeline_time)
        assert peak_in_flight(s.compute_only()) == validate(s).peak_in_flight
        assert build_schedule(name, p, m) == s  # deterministic


def test_best_order_ranks_by_time_then_memory_and_skips_what_cannot_run():
    gpipe = [
        [Action(Kind.F, 0, 0), Action(Kind.F, 0, 1), Action(Kind.BW, 0, 0), Action(Kind.BW, 0, 1)]
    ]
    serial = [
        [Action(Kind.F, 0, 0), Action(Kind.BW, 0, 0), Action(Kind.F, 0, 1), Action(Kind.BW, 0, 1)]
    ]
    broken = [[Action(Kind.BW, 0, 0), Action(Kind.F, 0, 0)]]
    assert order_time(broken, [0], EQUAL) is None
    assert best_order([broken, gpipe, serial], [0], EQUAL) is serial  # same time, less memory
    with pytest.raises(ValueError, match="no candidate"):
        best_order([broken], [0], EQUAL)


# -- runs: exact to single process, and from the command line --------------------------------------


@pytest.mark.slow
def test_p2_new_schedules_match_single_process():
    steps = [(8, 16, 1), (6, 8, 2)]  # 6 splits unevenly into 4
    cases = [dict(name=n, m=4, steps=steps) for n in NEW]
    cases += [dict(name=n, m=3, steps=steps[:1]) for n in ("dualpipev", "v-half")]  # m < 2p
    results = launch(W.run_cases, 2, (1, 2, 1), cases, threads_per_worker=1, timeout=120)
    _check_cases(results)


@pytest.mark.slow
def test_p4_new_schedules_match_single_process():
    steps = [(8, 8, 1), (10, 12, 2)]
    cases = [dict(name=n, m=8, steps=steps) for n in NEW]
    cases += [dict(name="zb-h2", m=8, steps=steps[:1], costs=(1.0, 1.18, 0.7))]
    cases += [dict(name="interleaved-1f1b", v=2, m=6, steps=steps[:1])]  # m % p != 0
    results = launch(W.run_cases, 4, (1, 4, 1), cases, threads_per_worker=1, timeout=180)
    _check_cases(results)


@pytest.mark.slow
@pytest.mark.parametrize("name", NEW)
def test_cli_trains_with_new_schedule(name, tmp_path):
    data = tmp_path / "text.txt"
    data.write_text("hello plait " * 500)
    argv = [sys.executable, "-m", "plait.cli", "train", "--pp", "2", "--schedule", name]
    argv += ["--steps", "2", "--seq-len", "16", "--batch-size", "4", "--layers", "4"]
    argv += ["--data", str(data), "--no-progress"]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
