"""plait schedules <-> torch.distributed.pipelining's action format (plait/pipeline/torch_format.py).

Checked against the installed torch (2.13): its action strings, ``_validate_schedule``,
``_add_send_recv``, ``_add_reduce_grad``, the schedule classes' ``pipeline_order`` and
``_PipelineScheduleRuntime._load_csv`` / ``_dump_csv``. Nothing here needs a process group: the
schedule classes read only a few attributes of their stages, so small fake stages stand in.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

from plait.pipeline import (
    SCHEDULES,
    ScheduleError,
    build_schedule,
    from_torch_actions,
    from_torch_csv,
    to_torch_actions,
    to_torch_csv,
    to_torch_pipeline_order,
    validate,
)
from plait.pipeline.schedule import Schedule

S = pytest.importorskip("torch.distributed.pipelining.schedules")


def _cases(ps, ms):
    for name in SCHEDULES:
        for v in (1, 2, 3, 4) if name == "interleaved-1f1b" else (None,):
            for p in ps:
                for m in ms:
                    yield name, p, m, v


def _same(a: Schedule, b: Schedule) -> bool:
    return (a.actions, a.stage_to_rank, a.num_microbatches, a.num_ranks, a.num_stages) == (
        b.actions,
        b.stage_to_rank,
        b.num_microbatches,
        b.num_ranks,
        b.num_stages,
    )


def _round_trip(cases) -> int:
    n = 0
    for name, p, m, v in cases:
        s = build_schedule(name, p, m, v)
        back = from_torch_actions(to_torch_actions(s))
        assert _same(back, s), (name, p, m, v)
        # compute-only: plait's add_communication puts the messages back where the generators did
        bare = from_torch_actions(to_torch_actions(s, compute_only=True))
        assert _same(bare, s), (name, p, m, v, "compute_only")
        n += 1
    return n


# ---------------------------------------------------------------------------------------------
# names, stage conventions, round trips


def test_names_and_stage_convention_match_torch():
    s = build_schedule("gpipe", 2, 1)
    assert to_torch_actions(s) == {
        0: ["0F0", "0SEND_F0", "0RECV_B0", "0B0"],
        1: ["1RECV_F0", "1F0", "1B0", "1SEND_B0"],
    }
    assert to_torch_actions(build_schedule("zb-h1", 1, 1)) == {0: ["0F0", "0I0", "0W0"]}
    # torch's own lowering names the messages the same way (SEND_F on s, RECV_F on s + 1, SEND_B
    # on s, RECV_B on s - 1): on these small schedules it even puts them in the same places.
    for name, p in (("gpipe", 2), ("gpipe", 3), ("zb-h1", 3), ("zb-v", 2)):
        s = build_schedule(name, p, 1)
        torch_comms = S._add_send_recv(
            to_torch_pipeline_order(s), s.stage_to_rank.__getitem__, s.num_stages
        )
        assert {r: [str(a) for a in acts] for r, acts in torch_comms.items()} == to_torch_actions(
            s
        ), name
    # torch _Action objects and their parsed strings agree with ours, field by field
    a = to_torch_pipeline_order(build_schedule("zb-h1", 2, 1), compute_only=False)[1][2]
    assert (a.stage_index, a.computation_type, a.microbatch_index) == (1, S.BACKWARD_INPUT, 0)


# schedules times the v each is tried at (interleaved-1f1b at four)
VARIANTS = len(SCHEDULES) + 3


def test_round_trip_sampled():
    assert _round_trip(_cases((1, 2, 3, 4, 8), (1, 2, 3, 7, 16))) == 5 * 5 * VARIANTS


@pytest.mark.slow
def test_round_trip_every_generated_schedule():
    assert _round_trip(_cases(range(1, 9), range(1, 17))) == 8 * 16 * VARIANTS


def test_round_trip_through_torch_action_objects():
    for name in SCHEDULES:
        s = build_schedule(name, 3, 5)
        for compute_only in (True, False):
            order = to_torch_pipeline_order(s, compute_only=compute_only)
            assert all(isinstance(a, S._Action) for acts in order.values() for a in acts)
            assert _same(from_torch_actions(order), s), (name, compute_only)


def test_stage_to_rank_and_microbatches_given_or_inferred():
    s = build_schedule("zb-v", 2, 3)
    rows = to_torch_actions(s)
    assert from_torch_actions(rows).stage_to_rank == [0, 1, 1, 0]
    # torch's {stage: rank} dict works too, and m can be larger than the indices used
    t = from_torch_actions(rows, num_microbatches=4, stage_to_rank={0: 0, 1: 1, 2: 1, 3: 0})
    assert t.stage_to_rank == [0, 1, 1, 0] and t.num_microbatches == 4
    # idle steps (None / '') are dropped; a row may be one string
    u = from_torch_actions({0: [None, "0F0", "", None, "0B0"], 1: "1F0, 1B0"})
    assert str(u).splitlines()[1:] == [
        "rank 0: F0.0 SEND_ACT0.0 RECV_GRAD0.0 BW0.0",
        "rank 1: RECV_ACT1.0 F1.0 BW1.0 SEND_GRAD1.0",
    ]
    validate(u)


def test_reduce_grad_matches_torch():
    for name in ("gpipe", "zb-h1", "zb-v", "interleaved-1f1b"):
        s = build_schedule(name, 3, 4)
        ours = to_torch_actions(s, compute_only=True, reduce_grad=True)
        order = to_torch_pipeline_order(s)
        theirs = {r: [str(a) for a in S._add_reduce_grad(acts, 4)] for r, acts in order.items()}
        assert ours == theirs, name
        # with comms, after the last backward's send (where torch's lowering puts it), and dropped
        # again on import
        full = to_torch_actions(s, reduce_grad=True)
        assert sum(t.endswith("REDUCE_GRAD") for row in full.values() for t in row) == s.num_stages
        assert _same(from_torch_actions(full), s)
    row0 = to_torch_actions(build_schedule("gpipe", 2, 1), reduce_grad=True)[1]
    assert row0 == ["1RECV_F0", "1F0", "1B0", "1SEND_B0", "1REDUCE_GRAD"]


# ---------------------------------------------------------------------------------------------
# torch's validator and lowering on plait's exports


REPRESENTATIVE = [
    (name, p, m, v)
    for name, v in (
        ("gpipe", None),
        ("1f1b", None),
        ("interleaved-1f1b", 2),
        ("interleaved-1f1b", 3),
        ("zb-h1", None),
        ("zb-v", None),
    )
    for p, m in ((2, 4), (4, 8), (3, 5), (4, 3))
]


@pytest.mark.parametrize("name,p,m,v", REPRESENTATIVE)
def test_torch_validator_accepts_plait_exports(name, p, m, v):
    s = build_schedule(name, p, m, v)
    for compute_only in (True, False):
        mapping = S._validate_schedule(
            to_torch_pipeline_order(s, compute_only=compute_only), p, s.num_stages, m
        )
        assert mapping == dict(enumerate(s.stage_to_rank))
    # torch's own send/recv insertion on the compute-only export gives a schedule plait proves
    comms = S._add_send_recv(to_torch_pipeline_order(s), s.stage_to_rank.__getitem__, s.num_stages)
    t = from_torch_actions(comms, num_microbatches=m, stage_to_rank=s.stage_to_rank)
    assert any(a.kind.name.startswith("SEND") for acts in t.actions for a in acts) == (p > 1)
    assert validate(t).num_messages == validate(s).num_messages
    assert t.compute_only() == s.compute_only()


# ---------------------------------------------------------------------------------------------
# torch's own schedules, validated by plait


class _FakeStage:
    """What torch's schedule constructors read from a stage (no module, no process group)."""

    def __init__(self, stage_index: int, num_stages: int, group_size: int, group_rank: int):
        self.stage_index, self.num_stages = stage_index, num_stages
        self.group_size, self.group_rank = group_size, group_rank
        self.is_first, self.is_last = stage_index == 0, stage_index == num_stages - 1
        self.submod = None


def _torch_schedule(cls, p: int, m: int, v: int = 2, v_shape: bool = False):
    n = p * v
    local = [0, n - 1] if v_shape else list(range(0, n, p))  # rank 0's stages
    return cls([_FakeStage(i, n, p, 0) for i in local], m)


TORCH_MULTI = [
    ("ScheduleInterleaved1F1B", 2, False),
    ("ScheduleInterleaved1F1B", 3, False),
    ("ScheduleLoopedBFS", 2, False),
    ("ScheduleInterleavedZeroBubble", 2, False),
    ("ScheduleZBVZeroBubble", 2, True),
]


@pytest.mark.parametrize("cls_name,v,v_shape", TORCH_MULTI)
@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (4, 6), (3, 5)])
def test_plait_validates_torch_schedule_classes(cls_name, v, v_shape, p, m):
    sched = _torch_schedule(getattr(S, cls_name), p, m, v, v_shape)
    # pipeline_order: compute only, with idle steps (None); plait inserts the messages
    s = from_torch_actions(sched.pipeline_order, num_microbatches=m, name=cls_name)
    assert s.stage_to_rank == [sched.stage_index_to_group_rank[i] for i in range(p * v)]
    validate(s)
    # pipeline_order_with_comms: torch's own sends/receives (and UNSHARD/RESHARD/REDUCE_GRAD,
    # which are dropped), validated as torch will run them
    t = from_torch_actions(sched.pipeline_order_with_comms, num_microbatches=m, name=cls_name)
    validate(t)
    assert t.compute_only() == s.compute_only()


def test_dual_pipe_v_overlap_needs_expand_overlap():
    sched = _torch_schedule(S.ScheduleDualPipeV, 2, 4, 2, v_shape=True)
    tokens = [str(a) for acts in sched.pipeline_order.values() for a in acts if a is not None]
    assert any(t.endswith(")OVERLAP_F_B") for t in tokens)
    with pytest.raises(ValueError, match=r"OVERLAP_F_B.*expand_overlap=True") as err:
        from_torch_actions(sched.pipeline_order)
    assert "\n" not in str(err.value)
    for rows in (sched.pipeline_order, sched.pipeline_order_with_comms):
        validate(from_torch_actions(rows, num_microbatches=4, expand_overlap=True))


def test_torch_single_stage_pipeline_orders():
    # ScheduleGPipe's reported order is valid. Schedule1F1B's reported order (what it returns
    # from _get_pipeline_order for visualization; its _step_microbatches runs its own loop) has,
    # in torch 2.13, the last rank start its steady state at micro-batch 1: it never runs F of
    # micro-batch 0 and runs one of micro-batch m. Both validators reject it.
    p, m = 4, 8
    gpipe = S.ScheduleGPipe(_FakeStage(0, p, p, 0), m)
    assert validate(from_torch_actions(gpipe.pipeline_order, num_microbatches=m))
    assert S._validate_schedule(gpipe.pipeline_order, p, p, m) == {s: s for s in range(p)}
    one_f_one_b = S.Schedule1F1B(_FakeStage(0, p, p, 0), m)
    order = one_f_one_b.pipeline_order
    last = [str(a) for a in order[p - 1] if a is not None]
    if "3F0" in last:  # fixed in a later torch
        validate(from_torch_actions(order, num_microbatches=m))
        return
    assert last[:2] == ["3F1", "3B0"] and "3F8" in last
    with pytest.raises(AssertionError, match="without first running Forward"):
        S._validate_schedule(order, p, p, m)
    with pytest.raises(ValueError, match="never sends"):
        validate(from_torch_actions(order, num_microbatches=m))


# ---------------------------------------------------------------------------------------------
# what torch's validator lets through and plait's does not


def _torch_accepts(rows: dict[int, list[str]], p: int, num_stages: int, m: int) -> bool:
    order = {r: [S._Action.from_str(t) for t in row] for r, row in rows.items()}
    S._validate_schedule(order, p, num_stages, m)  # raises AssertionError if not
    return True


def test_plait_rejects_schedules_torch_validator_accepts():
    s = build_schedule("1f1b", 2, 2)
    rows = to_torch_actions(s)
    assert rows[1][:5] == ["1RECV_F0", "1F0", "1B0", "1SEND_B0", "1RECV_F1"]

    # a missing receive: rank 1 runs F1.1 with no input
    missing = {0: rows[0], 1: [t for t in rows[1] if t != "1RECV_F1"]}
    assert _torch_accepts(missing, 2, 2, 2)
    with pytest.raises(ScheduleError, match=r"F1\.1: runs before its input arrives"):
        validate(from_torch_actions(missing))

    # receives out of send order: rank 0 sends micro-batch 0 first, rank 1 receives 1 first
    swapped = {0: rows[0], 1: ["1RECV_F1", "1RECV_F0", "1F0", "1B0", "1SEND_B0", "1F1"]}
    swapped[1] += ["1B1", "1SEND_B1"]
    assert _torch_accepts(swapped, 2, 2, 2)
    with pytest.raises(ScheduleError, match="matched in order"):
        validate(from_torch_actions(swapped))

    # a duplicated forward (torch counts distinct micro-batches per stage)
    dup = to_torch_actions(s, compute_only=True)
    dup[0] = ["0F0", *dup[0]]
    assert _torch_accepts(dup, 2, 2, 2)
    with pytest.raises(ScheduleError, match="appears twice"):
        validate(from_torch_actions(dup))

    # a compute order that deadlocks: rank 1's F1.1 needs F0.1, which rank 0 runs after B0.0,
    # which needs B1.0, which rank 1 runs after F1.1. torch's validator checks each stage's
    # F < I/B < W only; its _add_send_recv then fails; plait names the cycle.
    cycle = {0: ["0F0", "0B0", "0F1", "0B1"], 1: ["1F0", "1F1", "1B0", "1B1"]}
    assert _torch_accepts(cycle, 2, 2, 2)
    order = {r: [S._Action.from_str(t) for t in row] for r, row in cycle.items()}
    with pytest.raises(AssertionError, match="Malformed compute schedule"):
        S._add_send_recv(order, lambda st: st, 2)
    with pytest.raises(ScheduleError, match="deadlock"):
        validate(from_torch_actions(cycle))


# ---------------------------------------------------------------------------------------------
# CSV


def test_csv_round_trip_through_a_file(tmp_path):
    for name, p, m, v in [
        ("zb-v", 3, 5, None),
        ("interleaved-1f1b", 2, 3, 3),
        ("gpipe", 1, 2, None),
    ]:
        s = build_schedule(name, p, m, v)
        for compute_only in (False, True):
            path = tmp_path / f"{name}-{compute_only}.csv"
            text = to_torch_csv(s, path, compute_only=compute_only)
            assert path.read_bytes() == text.encode()
            assert text.count("\r\n") == p  # one row per rank, csv's default line end
            assert _same(from_torch_csv(path), s)  # a PathLike
            assert _same(from_torch_csv(str(path)), s)  # a file name
            assert _same(from_torch_csv(text), s)  # the text itself
    assert (
        to_torch_csv(build_schedule("gpipe", 2, 1), compute_only=True) == "0F0,0B0\r\n1F0,1B0\r\n"
    )
    with pytest.raises(FileNotFoundError):
        from_torch_csv(tmp_path / "missing.csv")


@pytest.mark.parametrize("name,p,m,v", [("zb-v", 2, 4, None), ("interleaved-1f1b", 3, 6, 2)])
def test_torch_runtime_loads_plait_csv(tmp_path, name, p, m, v):
    s = build_schedule(name, p, m, v)
    local = s.stages_of(0)
    stages = [_FakeStage(i, s.num_stages, p, 0) for i in local]

    # compute_only, torch's default (what torchtitan's pipeline_parallel_schedule_csv does)
    path = tmp_path / "compute.csv"
    to_torch_csv(s, path, compute_only=True)
    rt = S._PipelineScheduleRuntime(stages, m)
    rt._load_csv(str(path))
    assert rt.stage_index_to_group_rank == dict(enumerate(s.stage_to_rank))
    assert {r: [str(a) for a in acts] for r, acts in rt.pipeline_order.items()} == (
        to_torch_actions(s, compute_only=True)
    )
    # torch lowers it (UNSHARD/RESHARD, REDUCE_GRAD, its own sends/receives); plait proves that
    validate(from_torch_actions(rt.pipeline_order_with_comms, stage_to_rank=s.stage_to_rank))
    # torch writes the same bytes back, and its lowered schedule reads back through plait's CSV
    dumped = tmp_path / "dumped.csv"
    rt._dump_csv(str(dumped), format="compute_only")
    assert dumped.read_bytes() == path.read_bytes()
    rt._dump_csv(str(dumped), format="compute_comms")
    validate(from_torch_csv(dumped, stage_to_rank=s.stage_to_rank))

    # compute_comms: torch runs plait's sends and receives exactly as written
    path = tmp_path / "comms.csv"
    to_torch_csv(s, path, reduce_grad=True)
    rt = S._PipelineScheduleRuntime(stages, m)
    rt._load_csv(str(path), format="compute_comms")
    got = {r: [str(a) for a in acts] for r, acts in rt.pipeline_order_with_comms.items()}
    assert got == to_torch_actions(s, reduce_grad=True)


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "token,match",
    [
        ("0X1", r"unknown torch action '0X1' at rank 1, step 1"),
        ("F0.1", r"unknown torch action 'F0\.1'"),  # plait's own text form is not torch's
        ("0F1x", r"unknown torch action '0F1x'"),  # torch's regex would read this as 0F1
        ("0F", r"'0F' at rank 1, step 1 needs a micro-batch index"),
        ("0BATCHED_SEND_RECV1", r"batched communication '0BATCHED_SEND_RECV1'"),
        ("(0F1;1B0)SOMETHING", r"unknown torch action"),
    ],
)
def test_unknown_token_is_a_one_line_error(token, match):
    with pytest.raises(ValueError, match=match) as err:
        from_torch_actions({0: ["0F0"], 1: ["1F0", token]})
    msg = str(err.value)
    assert "\n" not in msg and "SEND_F" in msg  # names what is supported
    with pytest.raises(ValueError, match=match):
        from_torch_csv(f"0F0\r\n1F0,{token}\r\n")


def test_fsdp_actions_dropped_unless_strict():
    rows = {0: ["0UNSHARD", "0F0", "0B0", "0REDUCE_GRAD", "0RESHARD"]}
    s = from_torch_actions(rows)
    assert str(s).splitlines()[1] == "rank 0: F0.0 BW0.0"
    with pytest.raises(ValueError, match=r"'0UNSHARD' at rank 0, step 0 \(UNSHARD\)") as err:
        from_torch_actions(rows, strict=True)
    assert "\n" not in str(err.value)


def test_other_bad_input():
    with pytest.raises(ValueError, match="stage 0 is run by rank 0 and by rank 1"):
        from_torch_actions({0: ["0F0"], 1: ["0B0"]})
    with pytest.raises(ValueError, match=r"stages \[1\] never appear; pass stage_to_rank"):
        from_torch_actions({0: ["0F0", "2F0"], 1: []})
    with pytest.raises(ValueError, match=r"ranks must be 0\.\.1, got \[0, 2\]"):
        from_torch_actions({0: ["0F0"], 2: ["1F0"]})
    with pytest.raises(ValueError, match="expected a torch action string"):
        from_torch_actions({0: [("0", "F", 0)]})


def test_module_imports_torch_only_inside_functions():
    import plait.pipeline.torch_format as tf

    tree = ast.parse(pathlib.Path(tf.__file__).read_text())
    for node in tree.body:  # module level only
        if isinstance(node, ast.Import):
            assert not any(a.name.split(".")[0] == "torch" for a in node.names)
        if isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] != "torch"
