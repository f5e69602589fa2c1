"""The measured parts of the local hardware spec: all-reduce curve and per-size compute scale."""

import pytest

from plait.plan import get_hardware
from plait.plan.hardware import HardwareSpec, Link


def test_all_reduce_curve_interpolates_and_extrapolates():
    link = Link("x", 1e9, 1e-4, ((4.0, 1e-4), (1e6, 1e-3), (4e6, 4e-3)))
    assert link.all_reduce_time(4.0, 2) == pytest.approx(1e-4)
    assert link.all_reduce_time(2.5e6, 2) == pytest.approx(2.5e-3)
    assert link.all_reduce_time(8e6, 2) == pytest.approx(8e-3)  # the last segment's slope
    assert link.all_reduce_time(1e6, 1) == 0.0
    assert link.all_gather_time(1e6, 2) == pytest.approx(0.5e-3)
    # without a curve, the latency-bandwidth formula
    plain = Link("y", 1e9, 1e-5)
    assert plain.all_reduce_time(1e6, 2) == pytest.approx(2e-5 + 1e-3)


def test_compute_scale_by_tokens_and_round_trip():
    base = get_hardware("a100-80gb")
    assert base.compute_scale_at(123) == 1.0
    d = base.to_dict()
    d.update(
        compute_scale=1.3,
        compute_scale_by_tokens=[[128, 1.5], [512, 1.1]],
        elementwise_scale_by_tokens=[[128, 3.0]],
    )
    d["intra"]["all_reduce_curve"] = [[4, 1e-4], [1e6, 1e-3]]
    spec = HardwareSpec.from_dict(d)
    assert spec.compute_scale_at(64) == 1.5 and spec.compute_scale_at(1024) == 1.1
    assert spec.compute_scale_at(256) == pytest.approx(1.3)  # halfway in log tokens
    assert spec.elementwise_scale_at(1024) == 3.0
    assert spec.intra.all_reduce_time(1e6, 2) == pytest.approx(1e-3)
    assert HardwareSpec.from_dict(spec.to_dict()) == spec


def test_packaged_calibration_table_matches_the_shared_one():
    from pathlib import Path

    from plait.plan.published import calibration_dir, load_rows

    packaged = Path(__import__("plait.plan", fromlist=["x"]).__file__).parent / "data"
    assert len(load_rows(packaged)) == 10  # the Megatron-LM 2021 table ships with plait
    if calibration_dir() != packaged:  # the workspace's copy is next to the repository
        shared = {
            r["params_b"]: r
            for r in load_rows(calibration_dir())
            if r["file"] == "megatron2021_table1.csv"
        }
        for row in load_rows(packaged):
            assert shared[row["params_b"]] == row


def test_monotone_pools_a_dip_by_sample_weight():
    from plait.plan.calibrate import _monotone

    # 2 KiB measured cheaper than 1 KiB: noise, pooled with its neighbour by sample counts.
    got = _monotone([(1e3, 3e-3, 10), (2e3, 1e-3, 30), (4e3, 5e-3, 10)])
    assert got == [(1e3, pytest.approx(1.5e-3)), (2e3, pytest.approx(1.5e-3)), (4e3, 5e-3)]
    rising = [(1.0, 1e-4, 5), (2.0, 2e-4, 5)]
    assert _monotone(rising) == [(1.0, 1e-4), (2.0, 2e-4)]


def test_narrow_model_is_one_tensor_rank_of_the_layer():
    import torch

    from plait.models import Transformer, get_config
    from plait.plan.calibrate import _narrow

    cfg = get_config("tiny")
    full, cut = Transformer(cfg), Transformer(cfg)
    _narrow(cut, 2)
    for a, b in zip(full.blocks, cut.blocks):
        assert b.attn.q_proj.weight.shape == (cfg.hidden // 2, cfg.hidden)
        assert b.attn.o_proj.weight.shape == (cfg.hidden, cfg.hidden // 2)
        assert b.mlp.fc_in.weight.shape == (cfg.ffn // 2, cfg.hidden)
        assert b.norm1.weight.shape == a.norm1.weight.shape  # norms stay whole
    x = torch.randint(0, cfg.vocab_size // 2, (2, 9))
    logits = cut(x)
    assert logits.shape == (2, 9, cfg.vocab_size // 2)
    cut.loss(logits, x).backward()  # forward and backward run at half width


def _parts(spec, b, t):
    from plait.plan import ParallelConfig, get_model
    from plait.plan.cost import CostModel

    cm = CostModel(
        get_model("small", seq_len=128),
        spec,
        ParallelConfig(tp=t, microbatch_size=b, dtype="fp32"),
        seq=128,
    )
    parts = [cm.layer_parts()] * cm.model.layers + [cm.head_parts(), cm.embed_parts()]
    return (sum(p[k][0] for p in parts for k in "FBW"), sum(p[k][1] for p in parts for k in "FBW"))


def test_fit_scales_recovers_the_two_factors_and_falls_back_on_noise():
    from plait.plan.calibrate import _SIZES, _fit_scales

    spec = get_hardware("a100-80gb")
    timings = {}
    for b in _SIZES:
        for t in (1, 2):
            s, o = _parts(spec, b, t)
            timings[f"b{b}t{t}"] = 1.5 * s + 4.0 * o  # what a machine with these factors takes
    split, other = _fit_scales(spec, timings)
    assert [f for _, f in split] == pytest.approx([1.5] * 3)
    assert [f for _, f in other] == pytest.approx([4.0] * 3)
    assert [t for t, _ in split] == [128.0 * b for b in _SIZES]
    # Half width taking as long as full width cannot be split into positive factors: one factor.
    flat = {k: timings[f"b{k[1]}t1"] for k in timings}
    split, other = _fit_scales(spec, flat)
    assert split == other


def test_elementwise_scale_keeps_the_unsplit_work_of_a_tensor_parallel_layer():
    from dataclasses import replace

    from plait.plan import ParallelConfig, get_model
    from plait.plan.cost import CostModel

    base = get_hardware("a100-80gb")
    heavy = replace(base, elementwise_scale_by_tokens=((1.0, 50.0),))
    assert heavy.elementwise_scale_at(4096) == 50.0 and base.elementwise_scale_at(4096) == 1.0

    def layer(spec, t):
        cm = CostModel(get_model("llama3-8b"), spec, ParallelConfig(tp=t, dtype="bf16"))
        return cm.layer_times["F"] - cm.layer_times["comm_F"]

    # With element-wise work weighing more, splitting the layer in two saves a smaller share.
    assert layer(heavy, 2) / layer(heavy, 1) > layer(base, 2) / layer(base, 1) > 0.5


def test_straggler_factor_paces_jobs_of_more_than_one_worker():
    from dataclasses import replace

    from plait.plan import ParallelConfig, get_model
    from plait.plan.cost import CostModel

    local = replace(get_hardware("a100-80gb"), shared_cores=4, straggler_factor=1.1)

    def fwd(dp):
        cfg = ParallelConfig(dp=dp, dtype="bf16")
        return CostModel(get_model("llama3-8b"), local, cfg).compute("F", 0)

    assert fwd(2) == pytest.approx(1.1 * fwd(1))
    assert fwd(8) == pytest.approx(1.1 * 2 * fwd(1))  # and 8 workers take turns on 4 cores
