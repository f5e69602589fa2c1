"""The planner weighs what data parallelism shards (nothing, ZeRO-1, FSDP) and the precision:
FSDP wins where the model fits only sharded and the interconnect hides its gathers, loses to
pipeline and tensor parallelism over a slow inter-node link, and its memory formula is what
``plait train`` measures per rank."""

from dataclasses import replace

import pytest

from plait.cli import main
from plait.config import ParallelConfig
from plait.mesh_shape import MeshShape
from plait.models import resolve_model
from plait.plan.calibrate import get_hardware
from plait.plan.cost import CostModel
from plait.plan.evaluate import evaluate
from plait.plan.hardware import Link
from plait.plan.memory import state_bytes_per_param, training_state_bytes
from plait.plan.model_spec import get_model
from plait.plan.search import search, strategy_of
from plait.plan.verdict import explain
from plait.train import TrainConfig, train


def test_state_bytes_follow_dtype_precision_and_sharding():
    mixed = ParallelConfig(dp=4, precision="bf16-mixed")  # float32 masters
    assert state_bytes_per_param(mixed) == 16
    assert state_bytes_per_param(ParallelConfig(dtype="bf16")) == 8  # a whole-model cast
    assert training_state_bytes(1000, mixed) == 16000
    assert training_state_bytes(1000, replace(mixed, zero1=True)) == 8000 + 8000 / 4
    assert training_state_bytes(1000, replace(mixed, fsdp=True)) == 16000 / 4


def test_mixed_precision_computes_in_bf16_and_keeps_fp32_state():
    model, hw = get_model("llama3-8b"), get_hardware("h100-sxm")
    kw = dict(dp=8, num_microbatches=8, recompute="full")
    mixed = evaluate(model, hw, ParallelConfig(precision="bf16-mixed", fsdp=True, **kw))
    fp32 = evaluate(model, hw, ParallelConfig(fsdp=True, **kw))
    cast = evaluate(model, hw, ParallelConfig(dtype="bf16", fsdp=True, **kw))
    # the same state, half the activations, and bf16's matmul rate
    assert mixed.memory.weights_grads_optimizer == fp32.memory.weights_grads_optimizer
    assert mixed.memory.activations == pytest.approx(fp32.memory.activations / 2)
    assert fp32.step_time_s > 5 * mixed.step_time_s  # h100: 989 vs 67 TFLOP/s dense
    assert cast.memory.weights_grads_optimizer == pytest.approx(
        mixed.memory.weights_grads_optimizer / 2
    )


def test_fsdp_only_wins_an_8b_model_on_8_h100s():
    # 8B x 16 bytes = 128 GB of training state: plain data parallel does not fit, ZeRO-1 only
    # with full recomputation; FSDP keeps 16 GB per GPU and hides its gathers behind compute.
    res = search(get_model("llama3-8b"), get_hardware("h100-sxm"), 8, 256)
    best = res.best
    assert strategy_of(best.config) == "fsdp" and best.config.dp == 8
    assert best.config.recompute == "none"
    assert not res.by_strategy["data"].fits
    for fam in ("tensor", "pipeline", "tensor+pipeline"):
        assert res.by_strategy[fam].step_time_s > best.step_time_s
    text = explain(res)
    assert text.startswith("Verdict: fully sharded data parallel only — dp8+fsdp")
    assert "FSDP shards the 128 GB of weights, gradients and Adam states over 8 replicas" in text
    assert "Not pipeline parallel (with data parallel): " in text
    assert "Not data parallel only: does not fit" in text


def test_pipeline_and_tensor_win_over_a_slow_inter_node_link():
    model, h100 = get_model("llama2-70b"), get_hardware("h100-sxm")
    slow = replace(h100, name="h100-25gbe", inter=Link("25GbE", 3.1e9, 2e-5))
    fast_res, slow_res = search(model, h100, 64, 512), search(model, slow, 64, 512)
    # on InfiniBand FSDP's gathers hide behind compute: it is in the winner (with tp) ...
    assert any(e.config.fsdp for e in fast_res.ranked[:3])
    # ... over 25 GbE they cannot: pipeline stages with tensor parallelism inside the node win
    best = slow_res.best.config
    assert not best.fsdp and best.pp > 1 and 1 < best.tp <= 8
    fsdp = slow_res.by_strategy["fsdp"]
    assert fsdp.fits and fsdp.step_time_s > 1.3 * slow_res.best.step_time_s
    assert fsdp.fsdp_comm_s > 0.2 * fsdp.step_time_s
    assert "its main cost is FSDP all-gathers and reduce-scatters" in explain(slow_res)


def test_plan_cli_forces_or_leaves_out_fsdp(capsys):
    base = "plan --model llama3-8b --hardware h100-sxm --gpus 8 --global-batch 64 --top 3"
    assert main((base + " --no-fsdp").split()) == 0
    assert "+fsdp" not in capsys.readouterr().out
    assert main((base + " --zero1").split()) == 0
    out = capsys.readouterr().out
    assert "+zero1" in out and "+fsdp" not in out.split("Verdict")[0]
    assert main((base + " --fsdp --zero1").split()) == 2
    assert "--fsdp and --zero1 are exclusive" in capsys.readouterr().err
    given = base + " --dp 8 --tp 1 --pp 1 --microbatch-size 1 --fsdp --json"
    assert main(given.split()) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert out["dp_shard"] == "fsdp" and out["precision"] == "bf16-mixed"


# The planner's per-rank training state against the bytes `plait train` holds after a step
# (parameters, gradients and AdamW moments, local shards, each storage once).
MESHES = [
    dict(dp=2),
    dict(dp=2, zero1=True),
    dict(dp=2, fsdp=True),
    dict(dp=2, pp=2, zero1=True),
    dict(dp=2, pp=2, fsdp=True),
    dict(dp=2, tp=2, fsdp=True),
    dict(dp=2, fsdp=True, precision="bf16-mixed"),
]


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
def test_memory_formula_within_5pct_of_measured_state_per_rank(mesh):
    pc = ParallelConfig(num_microbatches=2, **mesh)
    hist = train(
        TrainConfig(
            model="tiny", n_layers=4, steps=1, batch_size=8, seq_len=64, progress=False, parallel=pc
        )
    )
    measured = hist[0]["state_bytes_per_rank"]
    spec = replace(resolve_model("tiny").spec(), layers=4)
    cm = CostModel(spec, get_hardware("h100-sxm"), pc, seq=64)
    shape = MeshShape(dp=pc.dp, pp=pc.pp, tp=pc.tp)
    assert len(measured) == pc.world_size
    for rank, got in enumerate(measured):
        want = training_state_bytes(cm.rank_params(shape.coords(rank)["pp"]), pc)
        assert want == pytest.approx(got, rel=0.05), (rank, want, got)


def test_an_fsdp_pipeline_winner_is_compared_only_with_schedules_fsdp_runs():
    from plait.plan.search import _default_schedules, _every_schedule

    model, hw = get_model("llama3-8b"), get_hardware("h100-sxm")
    cfg = ParallelConfig(dp=4, pp=2, num_microbatches=8, fsdp=True, precision="bf16-mixed")
    best = evaluate(model, hw, cfg, 4096)
    others = _every_schedule(model, hw, best, 4096, _default_schedules(), model.layers, True)
    names = {e.config.schedule for e in others}
    assert names == {"1f1b", "interleaved-1f1b"}  # no zero-bubble or V schedule (split backward)
    assert all(e.config.fsdp and e.config.pp == 2 for e in others)
