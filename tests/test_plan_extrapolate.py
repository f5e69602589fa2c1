"""The planner's extension of long schedules, its in-flight counts, its schedule choice and the
refusals of `plait plan`: checked against whatever the generators build today, for every schedule
in SCHEDULE_SPECS."""

import subprocess
import sys

import pytest

from plait.cli import main
from plait.config import SCHEDULE_SPECS, ParallelConfig
from plait.plan.calibrate import get_hardware
from plait.plan.cost import CostModel, UniformCosts
from plait.plan.evaluate import (
    GREEDY_MAX_SIZE,
    evaluate,
    extrapolate,
    get_schedule,
    schedule_in_flight,
    short_counts,
    simulate_config,
)
from plait.plan.model_spec import get_model
from plait.plan.search import NOT_SEARCHED, _schedule_options, search
from plait.plan.simulator import simulate
from plait.plan.verdict import explain, schedule_reason


class _Uneven(UniformCosts):
    """Measured-like costs: F : B : W = 1 : 1.18 : 0.7, heavier first and last stages, transfers."""

    def __init__(self, v: int, stages: int):
        super().__init__(1 / v, 1.18 / v, 0.7 / v, comm=0.1)
        self.stages = stages

    def compute(self, kind, stage, microbatch=0):
        scale = 1.3 if stage == self.stages - 1 else 1.1 if stage == 0 else 1.0
        return self.times[str(kind)] * scale


def _cases():
    for name, spec in SCHEDULE_SPECS.items():
        for v in [spec.virtual] if spec.virtual is not None else [2, 4]:
            for p in (2, 4, 8):
                yield name, p, v


def _costs(kind: str, p: int, v: int):
    if kind == "unit":
        return UniformCosts(1 / v, 1 / v, 1 / v), None
    return _Uneven(v, p * v), (1.0, 1.18, 0.7)


def _check(name, p, v, m, kind, counts, peak=True):
    costs, build = _costs(kind, p, v)
    ext = extrapolate(name, p, m, v, costs, build, counts)
    whole = simulate(get_schedule(name, p, m, v, build), costs)
    err = ext.pipeline_time / whole.pipeline_time - 1
    assert abs(err) <= 0.03, (name, p, v, m, kind, counts, err)
    assert ext.bubble_fraction == pytest.approx(whole.bubble_fraction, abs=0.02)
    if peak:
        assert ext.peak_in_flight == pytest.approx(whole.peak_in_flight, abs=1e-6)
    return err


@pytest.mark.parametrize("kind", ["unit", "uneven"])
@pytest.mark.parametrize("name,p,v", list(_cases()))
def test_extended_step_time_within_3pct_of_whole_simulation(name, p, v, kind):
    # Runs about half as long as m (so that the whole one stays quick to simulate), at two
    # residues of m modulo 2p; the default candidates, line check included.
    for m in (12 * p + 3, 13 * p + 1):
        _check(name, p, v, m, kind, None)
        counts = short_counts(name, p, m, v, target=p * v * (m - 1))
        assert counts is not None and max(counts) < m
        _check(name, p, v, m, kind, counts)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["unit", "uneven"])
@pytest.mark.parametrize("name,p,v", list(_cases()))
def test_extended_within_3pct_above_the_planners_threshold(name, p, v, kind):
    # m from just above the size the planner simulates whole to a few hundred micro-batches.
    th = GREEDY_MAX_SIZE // (p * v)
    # Step time only: above the threshold interleaved-1f1b at p >= 4 holds up to half a
    # micro-batch more at its peak than the extension says (12.5 vs 12.0 at p=8, v=2), a known
    # gap of the planner's memory extension, left open.
    for m in sorted({min(th + 1, 301), min(th + p + 3, 333), 97, 203, 301}):
        if short_counts(name, p, m, v) is None:
            continue  # no shorter run shares m's pattern: the planner costs it by formula
        _check(name, p, v, m, kind, None, peak=False)


def test_planner_extends_interleaved_p8_v4_m65_as_simulated_whole():
    # issue 14: the old two-run extension gave 369.5 against 306.5 (unit costs) here
    model, hw = get_model("gpt3-175b"), get_hardware("a100-80gb")
    cfg = ParallelConfig(
        dp=1, tp=8, pp=8, num_microbatches=65, schedule="interleaved-1f1b", virtual=4,
        recompute="selective", sequence_parallel=True, dtype="bf16",
    )  # fmt: skip
    est = evaluate(model, hw, cfg, 2048)
    assert est.method.startswith("simulated at")
    whole = simulate_config(CostModel(model, hw, cfg, 2048))
    assert est.pipeline_time_s == pytest.approx(whole.pipeline_time, rel=0.03)
    assert est.memory.activations > 0


@pytest.mark.parametrize("name,p,v", [c for c in _cases() if c[1] <= 4])
def test_in_flight_counts_are_the_simulated_peaks(name, p, v):
    for m in (1, p, 3 * p + 1, 5 * p + 2):
        whole = simulate(get_schedule(name, p, m, v), UniformCosts(1 / v, 1 / v, 1 / v))
        assert schedule_in_flight(name, p, m, v) == pytest.approx(whole.peak_in_flight), m


def test_search_options_cover_every_schedule_spec():
    opts = list(_schedule_options(list(SCHEDULE_SPECS), 4, 13, 64))
    for name, spec in SCHEDULE_SPECS.items():
        vs = {v for s, v in opts if s == name}
        assert vs == ({spec.virtual} if spec.virtual is not None else {2, 4, 8}), name
    # each chunk needs a layer: 4 stages x 8 chunks do not fit 16 layers
    assert ("interleaved-1f1b", 8) not in _schedule_options(["interleaved-1f1b"], 4, 16, 16)


@pytest.fixture(scope="module")
def res70b():
    # a pipeline's schedules to compare: FSDP (within a few % of the best here, with pp=1) is
    # left out
    model, hw = get_model("llama2-70b"), get_hardware("h100-sxm")
    return search(model, hw, 64, 512, simulate_top=3, dp_shards=["none", "zero1"])


def test_search_ranks_only_simulated_and_compares_every_schedule(res70b):
    res = res70b
    assert res.ranked and all(e.method != "analytic" and e.fits for e in res.ranked)
    assert res.best.config.pp > 1
    seen = {e.config.schedule for e in res.schedules}
    assert seen == {s for s in SCHEDULE_SPECS if s not in NOT_SEARCHED}
    c = res.best.config
    for e in res.schedules:  # the same shape, another schedule, simulated
        assert (e.config.dp, e.config.tp, e.config.pp) == (c.dp, c.tp, c.pp)
        assert e.method != "analytic"


def test_verdict_says_why_this_schedule_with_numbers(res70b):
    res = res70b
    line = schedule_reason(res)
    assert line and "\n" not in line
    b = res.best
    ref = next(e for e in res.schedules if e.config.schedule == "1f1b")
    assert line.startswith(b.config.schedule)
    if b.config.schedule != "1f1b":
        pts = (ref.bubble_fraction - b.bubble_fraction) * 100
        assert f"{abs(pts):.1f} points" in line and "than 1f1b" in line
        assert f"{b.bubble_fraction:.1%} vs {ref.bubble_fraction:.1%}" in line
        act = b.memory.activations / ref.memory.activations
        assert ("same activation memory" in line) == (abs(act - 1) < 0.005)
    over = [e for e in res.schedules if not e.fits and e.step_time_s < b.step_time_s]
    assert ("over the" in line) == bool(over)
    assert "  Schedule " + line + "." in explain(res)


def test_verdict_names_a_faster_schedule_over_the_memory_limit(res70b):
    from dataclasses import replace

    res = res70b
    ref = next(e for e in res.schedules if e.config.schedule == "1f1b")
    big = max(res.schedules, key=lambda e: e.memory.total)
    assert big is not ref and big.memory.total > ref.memory.total
    # A limit between the two, and the bigger one made faster: it must be named as over it.
    limit = (ref.memory.total + big.memory.total) / 2
    best = replace(ref, memory_limit=limit)
    over = replace(big, memory_limit=limit, step_time_s=ref.step_time_s * 0.9)
    line = schedule_reason(replace(res, ranked=[best], _schedules=[best, over]))
    act = big.memory.activations / ref.memory.activations
    assert line.startswith("1f1b: ") and "\n" not in line
    assert f"would be {1 / 0.9 - 1:.0%} faster but needs {act:.2f}x 1f1b's activation" in line
    assert f"over the {limit / 1e9:.0f} GB limit" in line


PLAN = ["plan", "--model", "llama3-70b", "--gpus", "64", "--global-batch", "512"]


@pytest.mark.parametrize(
    "extra,expect",
    [
        (["--seq-len", "0"], "--seq-len must be a positive integer, got 0"),
        (["--seq-len", "-5"], "--seq-len must be a positive integer, got -5"),
        (["--global-batch", "0"], "--global-batch must be a positive integer, got 0"),
        (["--gpus", "-8"], "--gpus must be a positive integer, got -8"),
        (["--tp", "7"], "--tp 7 does not divide the 64 attention heads"),
        (["--tp", "3"], "--tp 3 does not divide the 64 attention heads"),
        (["--pp", "128"], "--pp 128 is more pipeline stages than the 80 layers"),
        (
            ["--pp", "32", "--schedule", "interleaved-1f1b", "--virtual", "4"],
            "--pp 32 x 4 chunks per rank (interleaved-1f1b) = 128 stages for the 80 layers",
        ),
    ],
)
def test_plan_refuses_splits_the_model_cannot_take(capsys, extra, expect):
    assert main(PLAN + extra) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and expect in err
    if "--tp" in extra and "16" not in extra:
        assert "valid tensor widths: 1, 2, 4, 8" in err


def test_plan_refuses_tp_that_splits_key_value_heads(capsys):
    shape = "--layers 4 --hidden 768 --heads 12 --kv-heads 4 --vocab 100 --gpus 12 --tp 6"
    assert main(["plan", *shape.split()]) == 2
    err = capsys.readouterr().err.strip()
    assert "--tp 6 neither divides the 4 key/value heads nor is a multiple of them" in err
    assert "valid tensor widths: 1, 2, 4, 12" in err and "\n" not in err


def test_plan_refusal_is_one_line_without_traceback():
    out = subprocess.run(
        [sys.executable, "-m", "plait.cli", *PLAN, "--seq-len", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip() == "plait plan: error: --seq-len must be a positive integer, got 0"
    assert "Traceback" not in out.stderr + out.stdout
