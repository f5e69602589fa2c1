"""The schedule IR, its generators and the validator: pure Python, no processes."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plait.pipeline import (
    SCHEDULES,
    Action,
    Kind,
    Schedule,
    ScheduleError,
    build_schedule,
    validate,
)
from plait.plan.simulator import simulate

ONE_F_ONE_B_P2_M3 = [
    "F0.0 SEND_ACT0.0 F0.1 SEND_ACT0.1 RECV_GRAD0.0 BW0.0 F0.2 SEND_ACT0.2 "
    "RECV_GRAD0.1 BW0.1 RECV_GRAD0.2 BW0.2",
    "RECV_ACT1.0 F1.0 BW1.0 SEND_GRAD1.0 RECV_ACT1.1 F1.1 BW1.1 SEND_GRAD1.1 "
    "RECV_ACT1.2 F1.2 BW1.2 SEND_GRAD1.2",
]


def test_text_form_round_trips():
    a = Action.parse("SEND_GRAD3.12")
    assert (a.kind, a.stage, a.microbatch) == (Kind.SEND_GRAD, 3, 12) and str(a) == "SEND_GRAD3.12"
    s = Schedule.from_text(ONE_F_ONE_B_P2_M3)
    assert (s.num_ranks, s.num_stages, s.num_microbatches) == (2, 2, 3)
    assert str(s).splitlines()[1:] == [
        f"rank {r}: {row}" for r, row in enumerate(ONE_F_ONE_B_P2_M3)
    ]
    with pytest.raises(ValueError, match="cannot parse action 'X0.1'"):
        Action.parse("X0.1")


def test_1f1b_is_the_textbook_order():
    s = build_schedule("1f1b", 2, 3)
    assert [" ".join(map(str, acts)) for acts in s.actions] == ONE_F_ONE_B_P2_M3
    assert validate(s).peak_in_flight == [2, 1]


def test_placements():
    assert build_schedule("interleaved-1f1b", 2, 4, virtual=3).stage_to_rank == [0, 1, 0, 1, 0, 1]
    assert build_schedule("zb-v", 3, 4).stage_to_rank == [0, 1, 2, 2, 1, 0]
    # zb-v hands the turn of the V over on rank p-1 without a message
    s = build_schedule("zb-v", 2, 2)
    assert Action(Kind.SEND_ACT, 1, 0) not in s.actions[1]
    assert Action(Kind.RECV_ACT, 3, 0) in s.actions[0]


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match=r"unknown schedule 'pipedream'; valid schedules are"):
        build_schedule("pipedream", 2, 4)
    with pytest.raises(ValueError, match="num_microbatches must be a positive integer, got 0"):
        build_schedule("1f1b", 2, 0)
    with pytest.raises(ValueError, match="'zb-v' has virtual=2 chunks per rank, got virtual=3"):
        build_schedule("zb-v", 2, 4, virtual=3)
    with pytest.raises(
        ValueError, match=r"costs must be three positive numbers .* got \(1, 0, 1\)"
    ):
        build_schedule("zb-v", 2, 4, costs=(1, 0, 1))


def test_zero_bubble_built_for_the_real_costs_runs_faster_on_them():
    # Weight gradients cheaper than forwards (as measured on CPU: W about 0.7 F) leave holes in a
    # schedule built for equal times; built for the real ones, ZB-V fills them.
    real = {Kind.F: 1.0, Kind.B: 1.18, Kind.W: 0.7}
    real[Kind.BW] = real[Kind.B] + real[Kind.W]
    for p, m in [(2, 8), (4, 16), (8, 32)]:
        equal = _unit_makespan(build_schedule("zb-v", p, m), real)
        fitted = _unit_makespan(build_schedule("zb-v", p, m, costs=(1.0, 1.18, 0.7)), real)
        assert fitted < 0.95 * equal, (p, m, fitted, equal)
    # equal costs given explicitly build the default schedule
    assert build_schedule("zb-h1", 4, 8, costs=(1, 1, 1)) == build_schedule("zb-h1", 4, 8)


schedules = st.one_of(
    st.tuples(
        st.sampled_from(
            ["gpipe", "1f1b", "zb-h1", "zb-h2", "zb-v", "v-half", "v-min", "dualpipev"]
        ),
        st.just(None),
    ),
    st.tuples(st.just("interleaved-1f1b"), st.integers(1, 4)),
)


costs = st.one_of(st.none(), st.tuples(*[st.floats(0.2, 5.0)] * 3))


@settings(max_examples=200, deadline=None)
@given(schedules, st.integers(1, 8), st.integers(1, 32), costs)
def test_every_generated_schedule_is_valid(name_v, p, m, costs):
    name, v = name_v
    s = build_schedule(name, p, m, virtual=v, costs=costs)
    report = validate(s)
    # every (stage, micro-batch) has its forward and its backward exactly once
    compute = [a for acts in s.compute_only() for a in acts]
    # (a split backward is two actions; DualPipeV splits only some)
    per_mb = {(a.stage, a.microbatch): 3 if a.kind in (Kind.B, Kind.W) else 2 for a in compute}
    assert len(compute) == len(set(compute)) == sum(per_mb.values())
    assert len(per_mb) == s.num_stages * m
    if name.startswith("zb") or name.startswith("v-"):
        assert set(per_mb.values()) == {3}
    peak = report.peak_in_flight
    if name == "gpipe":
        assert peak == [m] * p
    elif name == "1f1b" or (name == "interleaved-1f1b" and v == 1):
        assert peak == [min(p - r, m) for r in range(p)]
    elif name == "zb-h1":
        assert max(peak) <= min(p, m)  # 1F1B's peak, though W is deferred
    elif name == "zb-v":
        assert max(peak) <= 2 * min(p, m)  # in half-size chunks: p micro-batches' worth
    elif name == "zb-h2":
        assert max(peak) <= min(2 * p - 1, m)
    elif name == "dualpipev":
        assert max(peak) <= 2 * p + 1  # in chunks: p + 1/2 micro-batches
    # the inference schedule derived from it is valid too, with nothing but forwards
    fwd = validate(s.forward_only())
    assert fwd.forward_only and fwd.num_messages == report.num_messages // 2


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(SCHEDULES), st.integers(2, 4), st.integers(1, 6), st.data())
def test_dropping_any_action_is_caught(name, p, m, data):
    s = build_schedule(name, p, m)
    r = data.draw(st.integers(0, p - 1))
    i = data.draw(st.integers(0, len(s.actions[r]) - 1))
    dropped = s.actions[r][i]
    s.actions[r] = s.actions[r][:i] + s.actions[r][i + 1 :]
    with pytest.raises(ScheduleError) as info:
        validate(s)
    assert str(dropped.stage) in str(info.value)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(SCHEDULES), st.integers(2, 4), st.integers(2, 6), st.data())
def test_swapping_two_receives_from_one_sender_is_caught(name, p, m, data):
    s = build_schedule(name, p, m)
    r = data.draw(st.integers(0, p - 1))
    recvs = [i for i, a in enumerate(s.actions[r]) if a.kind in (Kind.RECV_ACT, Kind.RECV_GRAD)]
    by_src: dict[int, list[int]] = {}
    for i in recvs:
        a = s.actions[r][i]
        src_stage = a.stage - 1 if a.kind is Kind.RECV_ACT else a.stage + 1
        by_src.setdefault(s.stage_to_rank[src_stage], []).append(i)
    pairs = [idx for idx in by_src.values() if len(idx) >= 2]
    if not pairs:
        return
    idx = data.draw(st.sampled_from(pairs))
    i, j = sorted(data.draw(st.lists(st.sampled_from(idx), min_size=2, max_size=2, unique=True)))
    acts = s.actions[r]
    acts[i], acts[j] = acts[j], acts[i]
    with pytest.raises(ScheduleError):
        validate(s)


def test_errors_name_the_failing_action():
    # rank 0 waits for a gradient before sending the activation that would produce it
    dead = Schedule.from_text(
        ["RECV_GRAD0.0 F0.0 SEND_ACT0.0 BW0.0", "RECV_ACT1.0 F1.0 BW1.0 SEND_GRAD1.0"]
    )
    with pytest.raises(ScheduleError, match=r"rank 0, action #0 RECV_GRAD0.0: .*deadlock") as info:
        validate(dead)
    assert info.value.rank == 0 and info.value.action == Action.parse("RECV_GRAD0.0")
    early = Schedule.from_text(
        ["F0.0 SEND_ACT0.0 BW0.0 RECV_GRAD0.0", "RECV_ACT1.0 F1.0 BW1.0 SEND_GRAD1.0"]
    )
    with pytest.raises(ScheduleError, match=r"BW0.0: runs before its output gradient arrives"):
        validate(early)
    wrong_rank = Schedule.from_text(["F1.0", "F0.0"], num_microbatches=1)
    with pytest.raises(ScheduleError, match="stage 1 lives on rank 1"):
        validate(wrong_rank)
    no_w = Schedule.from_text(["F0.0 B0.0"], stage_to_rank=[0])
    with pytest.raises(ScheduleError, match=r"W0.0 is missing"):
        validate(no_w)


def test_user_written_schedule_is_validated_and_counted():
    # GPipe by hand, p = 2, m = 2: both activations in flight on both ranks
    s = Schedule.from_text(
        [
            "F0.0 SEND_ACT0.0 F0.1 SEND_ACT0.1 RECV_GRAD0.0 BW0.0 RECV_GRAD0.1 BW0.1",
            "RECV_ACT1.0 F1.0 RECV_ACT1.1 F1.1 BW1.0 SEND_GRAD1.0 BW1.1 SEND_GRAD1.1",
        ]
    )
    report = validate(s)
    assert report.peak_in_flight == [2, 2] and report.num_messages == 4
    assert "peak micro-batches in flight per rank [2, 2]" in str(report)


def test_ir_generators_and_validator_stay_free_of_torch():
    import pathlib
    import re

    import plait.pipeline as pp

    root = pathlib.Path(pp.__file__).parent
    for name in (
        "schedule.py",
        "walk.py",
        "generators.py",
        "listsched.py",
        "timing.py",
        "zero_bubble.py",
        "validate.py",
        "__init__.py",
    ):
        text = (root / name).read_text()
        assert not re.search(r"^\s*(import|from)\s+torch", text, re.M), name


def _unit_makespan(s: Schedule, cost: dict) -> float:
    """Finish time when each rank runs its compute order with these costs, messages free: the
    simulator on the compute-only order (each chunk's action costs ``cost / v``)."""

    class Costs:
        p2p_blocks_compute = False

        def compute(self, kind: str, stage: int, microbatch: int = 0) -> float:
            return cost[Kind(kind)] / s.virtual

        def transfer(self, src_stage: int, dst_stage: int) -> float:
            return 0.0

    order = Schedule(
        s.name, s.num_ranks, s.num_stages, s.num_microbatches, s.stage_to_rank, s.compute_only()
    )
    return simulate(order, Costs()).pipeline_time


@pytest.mark.parametrize("p,m", [(2, 8), (4, 8), (4, 16), (8, 32)])
def test_bubbles_in_unit_time(p, m):
    cost = {Kind.F: 1, Kind.B: 1, Kind.W: 1, Kind.BW: 2}
    one_f = _unit_makespan(build_schedule("1f1b", p, m), cost)
    assert one_f == 3 * m + 3 * (p - 1)  # the textbook 1F1B bubble
    assert _unit_makespan(build_schedule("zb-h1", p, m), cost) == 3 * m + (p - 1)  # ZB-H1's
    assert _unit_makespan(build_schedule("interleaved-1f1b", p, m, 2), cost) < one_f
    assert _unit_makespan(build_schedule("zb-v", p, m), cost) < one_f


@pytest.mark.slow
def test_every_schedule_up_to_p8_m32_v4_is_valid():
    # exhaustive, not sampled: 3072 schedules, about 40 s
    for name in SCHEDULES:
        for v in [1, 2, 3, 4] if name == "interleaved-1f1b" else [None]:
            for p in range(1, 9):
                for m in range(1, 33):
                    s = build_schedule(name, p, m, virtual=v)
                    peak = validate(s).peak_in_flight
                    if name == "1f1b":
                        assert peak == [min(p - r, m) for r in range(p)]
                    elif name == "zb-h1":
                        assert max(peak) <= min(p, m)
                    elif name == "zb-v":
                        assert max(peak) <= 2 * min(p, m)
                    elif name == "zb-h2":
                        assert max(peak) <= min(2 * p - 1, m)
                    elif name == "dualpipev":
                        assert max(peak) <= 2 * p + 1
