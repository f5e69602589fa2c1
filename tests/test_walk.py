"""One dependency rule, in plait.pipeline.walk: the validator and the simulator walk by it alike."""

import pytest

import plait.plan.simulator
from plait.pipeline import SCHEDULES, Action, Schedule, ScheduleError, build_schedule, validate
from plait.pipeline.walk import (
    Walk,
    matching_recv,
    matching_send,
    message_in,
    message_out,
    peer_stage,
)
from plait.plan.cost import UniformCosts
from plait.plan.simulator import simulate

GOOD_1F1B = ["F0.0 SEND_ACT0.0 RECV_GRAD0.0 BW0.0", "RECV_ACT1.0 F1.0 BW1.0 SEND_GRAD1.0"]

# (rows, stage_to_rank, expected error or None): each is run by validate and by simulate
CASES = [
    (GOOD_1F1B, None, None),
    (["F0.0 F1.0 BW1.0 BW0.0"], [0, 0], None),  # two stages on one rank hand over locally
    (["F0.0 B0.0 W0.0"], [0], None),
    (
        ["RECV_GRAD0.0 F0.0 SEND_ACT0.0 BW0.0", GOOD_1F1B[1]],
        None,
        r"^rank 0, action #0 RECV_GRAD0.0: deadlock: rank 0 at RECV_GRAD0.0 \(#0\) waits for "
        r"SEND_GRAD1.0 from rank 1; rank 1 at RECV_ACT1.0 \(#0\) waits for SEND_ACT0.0 from rank 0$",
    ),
    (
        ["F0.0 SEND_ACT0.0 BW0.0 RECV_GRAD0.0", GOOD_1F1B[1]],
        None,
        r"^rank 0, action #2 BW0.0: runs before its output gradient arrives \(RECV_GRAD0.0\)$",
    ),
    (
        [GOOD_1F1B[0], "F1.0 RECV_ACT1.0 BW1.0 SEND_GRAD1.0"],
        None,
        r"^rank 1, action #0 F1.0: runs before its input arrives \(RECV_ACT1.0\)$",
    ),
    (
        ["SEND_ACT0.0 F0.0 RECV_GRAD0.0 BW0.0", GOOD_1F1B[1]],
        None,
        r"SEND_ACT0.0: sends before F0.0 produced the activation$",
    ),
    (
        [GOOD_1F1B[0], "RECV_ACT1.0 F1.0 SEND_GRAD1.0 BW1.0"],
        None,
        r"SEND_GRAD1.0: sends before B1.0 or BW1.0 produced the gradient$",
    ),
    (["F0.0 W0.0 B0.0"], [0], r"^rank 0, action #1 W0.0: runs before B0.0$"),
    (["BW0.0 F0.0"], [0], r"^rank 0, action #0 BW0.0: runs before F0.0$"),
    (["F1.0 F0.0 BW1.0 BW0.0"], [0, 0], r"F1.0: runs before F0.0 on this rank$"),
    (
        ["F0.0 F1.0 BW0.0 BW1.0"],
        [0, 0],
        r"BW0.0: runs before the backward of stage 1 on this rank \(B1.0 or BW1.0\)$",
    ),
    (
        [
            "F0.0 SEND_ACT0.0 F0.1 SEND_ACT0.1 RECV_GRAD0.0 BW0.0 RECV_GRAD0.1 BW0.1",
            "RECV_ACT1.1 F1.1 RECV_ACT1.0 F1.0 BW1.0 SEND_GRAD1.0 BW1.1 SEND_GRAD1.1",
        ],
        None,
        r"^rank 1, action #0 RECV_ACT1.1: expects SEND_ACT0.1 from rank 0, but the next message "
        r"from rank 0 to rank 1 is SEND_ACT0.0 \(messages between two ranks are matched in order\)",
    ),
    (["F1.0", "F0.0"], None, r"^rank 0, action #0 F1.0: stage 1 lives on rank 1$"),
    (["F0.0 F2.0", ""], [0, 1], r"F2.0: stage 2 outside 0..1$"),
    (["F0.0 F0.0"], [0], r"F0.0: appears twice \(also on rank 0\)$"),
    (
        ["F0.0 SEND_ACT0.0 F1.0 BW1.0 BW0.0"],
        [0, 0],
        r"SEND_ACT0.0: stage 1 is on the same rank: hand over locally, no message$",
    ),
    (["RECV_ACT0.0 F0.0"], [0], r"RECV_ACT0.0: there is no stage -1 to exchange with$"),
]


@pytest.mark.parametrize("rows,stage_to_rank,error", CASES)
def test_validate_and_simulate_apply_one_rule(rows, stage_to_rank, error):
    s = Schedule.from_text(rows, stage_to_rank)
    for run in (validate, lambda s: simulate(s, UniformCosts())):
        if error is None:
            run(s)
        else:
            with pytest.raises(ScheduleError, match=error):
                run(s)


def test_mutated_generated_schedules_are_judged_alike():
    # every swap of two neighbouring actions of one rank, on small schedules of every generator
    judged = accepted = 0
    for name in SCHEDULES:
        for p, m in [(2, 3), (3, 2), (4, 4)]:
            base = build_schedule(name, p, m)
            for r, acts in enumerate(base.actions):
                for i in range(len(acts) - 1):
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
                    accepted += verdicts[0] == "valid"
    assert 0 < accepted < judged  # both kinds of verdict were tested


def test_compute_only_orders_send_implicitly_in_the_simulator_only():
    order = Schedule.from_text(["F0.0 BW0.0", "F1.0 BW1.0"])
    with pytest.raises(ScheduleError, match=r"F1.0: runs before its input arrives \(RECV_ACT1.0\)"):
        validate(order)
    # F0.0 0-1, activation lands 1.5, F1.0 to 2.5, BW1.0 to 4.5, gradient lands 5, BW0.0 to 7
    assert simulate(order, UniformCosts(1, 1, 1, comm=0.5)).pipeline_time == pytest.approx(7.0)
    # waiting for a remote compute action is a deadlock when it never comes
    dead = Schedule.from_text(["F0.0 BW0.0 F0.1 BW0.1", "F1.1 BW1.1 F1.0 BW1.0"])
    with pytest.raises(
        ScheduleError,
        match=r"deadlock: rank 0 at BW0.0 \(#1\) waits for BW1.0 on rank 1; "
        r"rank 1 at F1.1 \(#0\) waits for F0.1 on rank 0",
    ):
        simulate(dead, UniformCosts())


def test_a_send_never_received_is_an_error():
    # (validate names the missing forward first; a walk of the lists sees the lost message)
    s = Schedule.from_text(["F0.0 SEND_ACT0.0 F0.1 SEND_ACT0.1", ""], [0, 1])
    with pytest.raises(
        ScheduleError, match=r"^rank 0 sends SEND_ACT0.0 to rank 1, which never receives it \(and 1"
    ):
        simulate(s, UniformCosts())
    with pytest.raises(ScheduleError, match="rank 1 never runs F1.0"):
        validate(s)


def test_walk_visits_each_action_once_after_what_it_needs():
    for name in SCHEDULES:
        s = build_schedule(name, 4, 6)
        seen = set()
        for r, i, a, needs in Walk(s):
            assert s.actions[r][i] == a and (r, i) not in seen
            assert all(n in seen for n in needs), (a, needs)
            seen.add((r, i))
        assert len(seen) == sum(map(len, s.actions))


def test_one_schedule_error_and_one_message_rule():
    assert plait.plan.simulator.ScheduleError is ScheduleError
    send = Action.parse("SEND_GRAD2.1")
    assert matching_recv(send) == Action.parse("RECV_GRAD1.1") and peer_stage(send) == 1
    assert matching_send(matching_recv(send)) == send
    assert peer_stage(Action.parse("F0.0")) is None
    rank_of = [0, 1, 1, 0]  # a V: stages 1 and 2 share rank 1
    assert message_out(Action.parse("F0.3"), rank_of) == (1, Action.parse("SEND_ACT0.3"))
    assert message_out(Action.parse("F1.3"), rank_of) is None
    assert message_out(Action.parse("F3.3"), rank_of) is None  # the last stage's output stays
    assert message_out(Action.parse("B2.3"), rank_of) is None
    assert message_out(Action.parse("BW3.3"), rank_of) == (1, Action.parse("SEND_GRAD3.3"))
    assert message_out(Action.parse("W3.3"), rank_of) is None
    assert message_in(Action.parse("F3.0"), rank_of) == (1, Action.parse("RECV_ACT3.0"))
    assert message_in(Action.parse("F2.0"), rank_of) is None
    assert message_in(Action.parse("B0.0"), rank_of) == (1, Action.parse("RECV_GRAD0.0"))
    assert message_in(Action.parse("W0.0"), rank_of) is None
