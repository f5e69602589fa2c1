"""``--fsdp``: PyTorch FSDP2 over the dp axis reproduces single-process training, composes with
pipeline and tensor parallelism, halves the per-rank training state at dp=2, and its checkpoints
resume at any mesh (and checkpoints saved without it resume with it).

Float64, so exactness is to summation order (~1e-12), as in tests/test_train_mesh.py.
"""

import shutil
from dataclasses import fields

import pytest

from plait.config import ParallelConfig
from plait.train import TrainConfig, train

RTOL = 1e-9


def cfg(**kw):
    """tiny with 4 layers (so every schedule has a block per chunk), float64, 4 steps."""
    split = {f.name for f in fields(ParallelConfig)}
    parallel = ParallelConfig(**{"dtype": "fp64", **{k: v for k, v in kw.items() if k in split}})
    base = dict(model="tiny", n_layers=4, steps=4, batch_size=8, seq_len=64, progress=False)
    rest = {k: v for k, v in kw.items() if k not in split}
    return TrainConfig(**{**base, **rest}, parallel=parallel)


def assert_close(a, b, rtol=RTOL):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) <= rtol * abs(y), f"step {i}: {x} vs {y}"


def losses(hist):
    return [r["loss"] for r in hist]


def norms(hist):
    return [r["grad_norm"] for r in hist]


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(dp=2, zero1=True), "--fsdp and --zero1 are exclusive"),
        (dict(dp=1), "needs --dp >= 2, got 1"),
        (dict(dp=2, pp=2, schedule="zb-h1", num_microbatches=4), "cannot run schedule 'zb-h1'"),
        (dict(dp=2, pp=2, schedule="zb-v", num_microbatches=4), "cannot run schedule 'zb-v'"),
    ],
    ids=["zero1", "dp1", "zb-h1", "zb-v"],
)
def test_what_fsdp_cannot_run_is_refused_in_one_line(kw, message):
    with pytest.raises(ValueError, match=message) as err:
        cfg(fsdp=True, **kw).validate()
    assert "\n" not in str(err.value)


def test_fsdp_flag_reaches_the_config():
    from plait.cli import build_parser

    args = build_parser().parse_args(["train", "--dp", "2", "--fsdp"])
    assert args.fsdp is True


@pytest.fixture(scope="module")
def single():
    return train(cfg())


@pytest.fixture(scope="module")
def fsdp_dp2():
    return train(cfg(dp=2, fsdp=True, num_microbatches=2))


@pytest.mark.slow
def test_fsdp_at_dp2_matches_single_process_f64(single, fsdp_dp2):
    assert_close(losses(fsdp_dp2), losses(single))
    assert_close(norms(fsdp_dp2), norms(single))  # clipping counts each shard once
    assert single[0]["grad_norm"] > 1.0  # ... and clipping was active
    # FSDP's all-gathers and reduce-scatters are counted on the dp axis
    assert fsdp_dp2[0]["comm_bytes"]["dp"] > 0 and single[0]["comm_bytes"]["dp"] == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "mesh, schedule",
    [((2, 2, 1), "1f1b"), ((2, 2, 1), "interleaved-1f1b"), ((2, 1, 2), None)],
    ids=["pp2-1f1b", "pp2-interleaved", "tp2"],
)
def test_fsdp_with_pipeline_or_tensor_parallel_matches_single_process_f64(single, mesh, schedule):
    dp, pp, tp = mesh
    kw = dict(dp=dp, pp=pp, tp=tp, num_microbatches=4 if pp > 1 else 2)
    if schedule:
        kw["schedule"] = schedule
    hist = train(cfg(fsdp=True, **kw))
    assert_close(losses(hist), losses(single))
    assert_close(norms(hist), norms(single))


@pytest.mark.slow
def test_fsdp_with_a_tied_embedding_across_pipeline_ranks_matches_f64(tmp_path):
    # GPT-2 ties its input and output embeddings: on pp=2 the first and last stage's ranks each
    # hold the matrix, FSDP-sharded alike, and sum its gradients shard by shard
    import hf_models

    model = "hf:" + hf_models.save("gpt2", tmp_path / "gpt2", layers=2)
    kw = dict(model=model, n_layers=None, steps=3, seq_len=32)
    reference = train(cfg(**kw))
    hist = train(cfg(**kw, dp=2, pp=2, fsdp=True, num_microbatches=2, schedule="1f1b"))
    assert_close(losses(hist), losses(reference))
    assert_close(norms(hist), norms(reference))


@pytest.mark.slow
def test_fsdp_holds_at_most_055_of_plain_data_parallel_state_per_rank(fsdp_dp2):
    # parameters + gradients + AdamW moments after the step, local shards, each storage once
    plain = train(cfg(dp=2, num_microbatches=2, steps=1))
    plain_bytes = plain[0]["state_bytes_per_rank"]
    sharded = fsdp_dp2[0]["state_bytes_per_rank"]
    assert len(sharded) == len(plain_bytes) == 2
    assert min(plain_bytes) > 0
    assert max(sharded) <= 0.55 * min(plain_bytes), (sharded, plain_bytes)


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_at_another_mesh_and_in_one_process_and_back(tmp_path, single):
    ref = losses(single)
    ck = tmp_path / "ck"
    mesh = dict(dp=2, pp=2, fsdp=True, num_microbatches=4, schedule="1f1b")
    train(cfg(**mesh, checkpoint_dir=str(ck), checkpoint_every=2))
    shutil.rmtree(ck / "step-00000004")  # resume from step 2's
    again = tmp_path / "again"
    shutil.copytree(ck, again)
    # in one process
    assert_close(losses(train(cfg(checkpoint_dir=str(ck), resume=True))), ref[2:])
    # at another mesh, tensor-parallel without FSDP
    hist = train(cfg(tp=2, checkpoint_dir=str(again), resume=True))
    assert_close(losses(hist), ref[2:])
    # and back: a one-process checkpoint resumes under FSDP with tensor parallelism
    back = tmp_path / "back"
    train(cfg(steps=4, checkpoint_dir=str(back), checkpoint_every=2))
    shutil.rmtree(back / "step-00000004")
    hist = train(cfg(dp=2, tp=2, fsdp=True, checkpoint_dir=str(back), resume=True))
    assert_close(losses(hist), ref[2:])


def test_each_block_is_its_own_fsdp_unit_and_the_root_holds_the_rest():
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from plait.models.layout import find_layout
    from plait.models.source import resolve_model
    from plait.train.fsdp import shard_over_dp

    class OneRank:  # the dp group of a one-process world
        def group(self, axis):
            return dist.group.WORLD

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = resolve_model("tiny").build(0, 4)
        blocks = [b for _, b in find_layout(model).blocks]
        shard_over_dp(model, OneRank(), blocks, torch.bfloat16)
        assert all(isinstance(b, FSDPModule) for b in blocks) and isinstance(model, FSDPModule)
        x = torch.randint(0, 256, (2, 16))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x).float().square().mean().backward()
        # bf16 gathers over float32 shards: the gradients are reduced and kept in float32
        assert all(p.dtype == p.grad.dtype == torch.float32 for p in model.parameters())
    finally:
        dist.destroy_process_group()
