"""Training on a mesh reproduces single-process training; checkpoints reshard and resume exactly.

Float32 runs use the CLI's defaults (built-in data, batch 8, sequence 64, lr 3e-3) and match to
1e-4 relative over 20 steps. Float64 runs show the arithmetic itself is the same to ~1e-12: in
float32 an ill-conditioned step can differ by 1e-3 between *any* two summation orders, even
between single-process float32 and float64, so float64 is where exactness is proven.
"""

import math
import shutil
from dataclasses import fields

import pytest

from plait.config import ParallelConfig
from plait.train import TrainConfig, train
from plait.train.checkpoint import latest_checkpoint

RTOL = 1e-4


@pytest.fixture(scope="module")
def corpus():
    return None  # the built-in default data, as `plait train` uses


def losses(hist):
    return [r["loss"] for r in hist]


def assert_close(a, b, rtol=RTOL):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) <= rtol * abs(y), f"step {i}: {x} vs {y}"


def cfg(corpus, **kw):
    """A TrainConfig at the CLI's defaults; ParallelConfig fields go to its ``parallel``."""
    split = {f.name for f in fields(ParallelConfig)}
    parallel = ParallelConfig(**{k: v for k, v in kw.items() if k in split})
    base = dict(model="tiny", steps=20, batch_size=8, seq_len=64, data=corpus, progress=False)
    rest = {k: v for k, v in kw.items() if k not in split}
    return TrainConfig(**{**base, **rest}, parallel=parallel)


@pytest.fixture(scope="module")
def single(corpus):
    return losses(train(cfg(corpus)))


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [(1, 1, 2), (2, 2, 1), (1, 2, 2), (2, 1, 2)], ids=str)
def test_mesh_matches_single_process_for_20_steps(corpus, single, mesh):
    dp, pp, tp = mesh
    hist = train(cfg(corpus, dp=dp, pp=pp, tp=tp, num_microbatches=2))
    assert_close(losses(hist), single)
    first = hist[0]
    for axis, size in zip(("dp", "pp", "tp"), mesh):  # each axis that is split talks, only those
        assert (first["comm_bytes"][axis] > 0) == (size > 1), (axis, first["comm_bytes"])
    assert len(first["peak_rss_mb_per_rank"]) == dp * pp * tp
    if pp > 1:
        assert 0.0 < first["bubble_fraction"] < 1.0


@pytest.mark.slow
def test_full_mesh_on_8_processes(corpus, single):
    hist = train(cfg(corpus, steps=3, dp=2, pp=2, tp=2, num_microbatches=2))
    assert_close(losses(hist), single[:3])


@pytest.fixture(scope="module")
def single_4_layers_f64(corpus):
    return losses(train(cfg(corpus, n_layers=4, steps=6, dtype="fp64")))


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-v"])
def test_every_schedule_at_pp2_matches_single_process_f64(corpus, schedule, single_4_layers_f64):
    # 4 layers so that V-shaped and interleaved schedules have a block per chunk
    kw = dict(n_layers=4, steps=6, dtype="fp64", pp=2, schedule=schedule, num_microbatches=4)
    assert_close(losses(train(cfg(corpus, **kw))), single_4_layers_f64, rtol=1e-9)


@pytest.mark.slow
def test_zero_bubble_built_for_measured_costs_matches_single_process_f64(
    corpus, single_4_layers_f64
):
    kw = dict(n_layers=4, steps=6, dtype="fp64", pp=2, schedule="zb-v", num_microbatches=4)
    hist = train(cfg(corpus, schedule_costs=(1.0, 1.18, 0.7), **kw))
    assert_close(losses(hist), single_4_layers_f64, rtol=1e-9)


@pytest.fixture(scope="module")
def single_4_layers(corpus):
    return losses(train(cfg(corpus, n_layers=4)))


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-v"])
def test_every_schedule_at_pp2_matches_single_process_f32(corpus, schedule, single_4_layers):
    hist = train(cfg(corpus, n_layers=4, pp=2, schedule=schedule, num_microbatches=4))
    assert_close(losses(hist), single_4_layers)


@pytest.mark.slow
def test_mesh_matches_single_process_f64(corpus):
    reference = losses(train(cfg(corpus, steps=4, dtype="fp64")))
    hist = train(cfg(corpus, steps=4, dtype="fp64", dp=2, pp=1, tp=2, sequence_parallel=True))
    assert_close(losses(hist), reference, rtol=1e-9)


@pytest.mark.slow
def test_data_parallel_matches_single_process(corpus, single):
    hist = train(cfg(corpus, dp=2))
    assert_close(losses(hist), single)
    assert hist[0]["comm_bytes"]["dp"] > 0
    assert len(hist[0]["peak_rss_mb_per_rank"]) == 2
    for r in hist:  # the phases are disjoint parts of rank 0's step
        phases = r["phase_s"]
        assert set(phases) == {"forward_backward", "dp_sync_wait", "update"}
        assert all(v >= 0 for v in phases.values())
        assert sum(phases.values()) <= r["step_time_s"]


@pytest.mark.slow
def test_zero1_matches_and_its_checkpoint_resumes_anywhere(corpus, tmp_path, single):
    ck = tmp_path / "ck"
    hist = train(cfg(corpus, dp=2, zero1=True, checkpoint_dir=str(ck), checkpoint_every=10))
    assert_close(losses(hist), single)
    # Each replica saved only the optimizer state it owns; one process resumes with all of it.
    shutil.rmtree(ck / "step-00000020")
    resumed = losses(train(cfg(corpus, checkpoint_dir=str(ck), resume=True)))
    assert_close(resumed, single[10:])


def test_microbatch_accumulation_matches_whole_batch(corpus, single):
    # 3 uneven micro-batches of 8 rows (3, 3, 2): the mean loss and gradients are the same.
    assert_close(losses(train(cfg(corpus, num_microbatches=3))), single)


def test_resume_is_bit_identical(corpus, tmp_path):
    full = losses(train(cfg(corpus, steps=10)))
    ck = tmp_path / "ck"
    train(cfg(corpus, steps=10, checkpoint_dir=str(ck), checkpoint_every=5))
    shutil.rmtree(ck / "step-00000010")  # as if the run died after step 5's checkpoint
    assert latest_checkpoint(ck).name == "step-00000005"
    resumed = losses(train(cfg(corpus, steps=10, checkpoint_dir=str(ck), resume=True)))
    assert resumed == full[5:]


def test_partial_checkpoint_is_never_loaded(corpus, tmp_path):
    ck = tmp_path / "ck"
    train(cfg(corpus, steps=4, checkpoint_dir=str(ck), checkpoint_every=2))
    (ck / "step-00000006.partial").mkdir()  # a save that crashed midway
    (ck / "step-00000008").mkdir()  # no metadata: incomplete
    assert latest_checkpoint(ck).name == "step-00000004"


@pytest.mark.slow
def test_checkpoint_from_dp2_resumes_in_one_process(corpus, tmp_path, single):
    ck = tmp_path / "ck"
    train(cfg(corpus, steps=10, dp=2, checkpoint_dir=str(ck), checkpoint_every=10))
    resumed = losses(train(cfg(corpus, checkpoint_dir=str(ck), resume=True)))
    assert_close(resumed, single[10:])


@pytest.mark.slow
def test_pipeline_and_tensor_checkpoint_resumes_in_data_parallel_and_one_process(
    corpus, tmp_path, single
):
    ck = tmp_path / "ck"
    train(cfg(corpus, steps=10, pp=2, tp=2, checkpoint_dir=str(ck), checkpoint_every=10))
    (tmp_path / "again").mkdir()
    shutil.copytree(ck, tmp_path / "again" / "ck")
    assert_close(losses(train(cfg(corpus, dp=2, checkpoint_dir=str(ck), resume=True))), single[10:])
    again = str(tmp_path / "again" / "ck")
    assert_close(losses(train(cfg(corpus, checkpoint_dir=again, resume=True))), single[10:])


def test_bad_mesh_settings_are_named(corpus):
    with pytest.raises(ValueError, match="--batch-size 7 must divide evenly over --dp 2"):
        train(cfg(corpus, batch_size=7, dp=2))
    with pytest.raises(ValueError, match="--microbatches 9 exceeds the 8 sequences"):
        train(cfg(corpus, num_microbatches=9))
    with pytest.raises(ValueError, match="--resume needs --checkpoint-dir"):
        train(cfg(corpus, resume=True))
    with pytest.raises(ValueError, match="tp=3 does not divide n_heads=4"):
        train(cfg(corpus, tp=3))
    with pytest.raises(ValueError, match="cannot split 2 blocks into 4 stages"):
        train(cfg(corpus, pp=4))
    with pytest.raises(ValueError, match="unknown schedule 'fast'"):
        train(cfg(corpus, pp=2, schedule="fast"))


@pytest.mark.slow
def test_trace_and_timeline_png_have_one_track_per_rank(corpus, tmp_path):
    import json

    trace, png = tmp_path / "t.json", tmp_path / "t.png"
    train(
        cfg(
            corpus,
            steps=2,
            pp=2,
            tp=2,
            num_microbatches=4,
            trace_out=str(trace),
            timeline_png=str(png),
        )
    )
    data = json.loads(trace.read_text())
    spans = [e for e in data["traceEvents"] if e["ph"] == "X"]
    names = {e["pid"]: e["args"]["name"] for e in data["traceEvents"] if e["ph"] == "M"}
    assert names == {r: f"rank {r}" for r in range(4)}
    assert {e["pid"] for e in spans} == {0, 1, 2, 3}
    for e in spans:
        assert (
            e["dur"] >= 0
            and e["ts"] >= 0
            and e["cat"] in {"F", "B", "W", "BW", "SEND_ACT", "RECV_ACT", "SEND_GRAD", "RECV_GRAD"}
        )
    # every rank ran a forward and a backward of each of the 4 micro-batches
    for r in range(4):
        fwd = sorted(e["args"]["microbatch"] for e in spans if e["pid"] == r and e["cat"] == "F")
        assert fwd == [0, 1, 2, 3]
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_resume_restores_the_rng_state(corpus, tmp_path):
    import torch

    from plait.train.checkpoint import checkpoint_keys, load_checkpoint

    ck = tmp_path / "ck"
    train(cfg(corpus, steps=2, checkpoint_dir=str(ck), checkpoint_every=2))
    keys = checkpoint_keys(ck / "step-00000002")
    assert "rng.rank0" in keys and keys["model.head.proj.weight"] == (256, 64)
    state = {"rng.rank0": torch.get_rng_state()}
    load_checkpoint(ck / "step-00000002", state)
    torch.manual_seed(12345)  # anything else
    train(cfg(corpus, steps=2, checkpoint_dir=str(ck), resume=True))  # nothing left to run
    assert torch.equal(torch.get_rng_state(), state["rng.rank0"])


def test_activation_checkpointing_without_a_pipeline_changes_nothing_but_memory(corpus):
    plain = losses(train(cfg(corpus, steps=3, dtype="fp64")))
    recomputed = losses(train(cfg(corpus, steps=3, dtype="fp64", recompute="full")))
    assert_close(recomputed, plain, rtol=1e-12)


def test_checkpointed_blocks_keep_fewer_tensors_for_backward():
    import torch
    from torch.autograd.graph import saved_tensors_hooks

    from plait.models import Transformer, get_config
    from plait.train.parts import _checkpoint_blocks

    def saved(model):
        count = [0]

        def pack(t):
            count[0] += 1
            return t

        x = torch.randint(0, 256, (2, 16))
        with saved_tensors_hooks(pack, lambda t: t):
            model.loss(model(x), x).backward()
        return count[0]

    plain = Transformer(get_config("tiny"))
    wrapped = Transformer(get_config("tiny"))
    _checkpoint_blocks(wrapped)
    assert [n for n, _ in wrapped.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert saved(wrapped) < saved(plain) / 2


# Mixed precision: each mesh computes in bf16 (or fp16) with its own summation orders and
# collectives, so it tracks the single-process mixed run to the low dtype's precision, not 1e-4.
MIXED_RTOL = 1e-2


@pytest.fixture(scope="module")
def single_bf16(corpus):
    return losses(train(cfg(corpus, steps=6, precision="bf16-mixed")))


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [(1, 2, 2), (2, 2, 1), (2, 1, 2)], ids=str)
def test_bf16_mixed_mesh_tracks_single_process(corpus, single_bf16, mesh):
    dp, pp, tp = mesh
    kw = dict(steps=6, precision="bf16-mixed", dp=dp, pp=pp, tp=tp, num_microbatches=2)
    assert_close(losses(train(cfg(corpus, **kw))), single_bf16, rtol=MIXED_RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [(2, 1, 1), (2, 2, 1)], ids=str)
def test_bf16_mixed_fsdp_tracks_single_process(corpus, single_bf16, mesh):
    # FSDP2's MixedPrecisionPolicy: bf16 gathers over float32 shards, float32 reduce-scatters
    dp, pp, _ = mesh
    kw = dict(steps=6, precision="bf16-mixed", dp=dp, pp=pp, num_microbatches=2, fsdp=True)
    hist = train(cfg(corpus, **kw))
    assert_close(losses(hist), single_bf16, rtol=MIXED_RTOL)
    assert hist[0]["comm_bytes"]["dp"] > 0


@pytest.mark.slow
def test_bf16_mixed_split_backward_schedule_tracks_single_process(corpus, single_bf16):
    # zero bubble: the deferred weight gradients (W) are formed in bf16 into float32 masters
    kw = dict(steps=6, precision="bf16-mixed", pp=2, schedule="zb-h1", num_microbatches=4)
    assert_close(losses(train(cfg(corpus, **kw))), single_bf16, rtol=MIXED_RTOL)


@pytest.mark.slow
def test_fp16_mixed_mesh_skips_overflowing_steps_and_recovers(corpus):
    # Which steps overflow is not the same as in one process: a replica's loss is the mean over
    # its own rows (its fp16 gradients are dp times larger until averaged in float32), and
    # tensor-parallel partial sums differ, so thresholds move by powers of two. What must hold
    # is that the mesh decides as one (skip, halve) and keeps training.
    kw = dict(steps=10, precision="fp16-mixed", loss_scale=2.0**20, loss_scale_window=2)
    hist = train(cfg(corpus, dp=2, pp=2, num_microbatches=2, **kw))
    assert hist[0]["skipped"] and hist[0]["loss_scale"] == 2.0**20
    for r, nxt in zip(hist, hist[1:]):
        if r["skipped"]:
            assert nxt["loss_scale"] == r["loss_scale"] / 2
        else:
            assert nxt["loss_scale"] in (r["loss_scale"], 2 * r["loss_scale"])
    assert sum(not r["skipped"] for r in hist) >= 3
    assert all(math.isfinite(r["loss"]) for r in hist)
    assert hist[-1]["loss"] < hist[0]["loss"] - 0.3, losses(hist)


@pytest.mark.slow
def test_fp16_mixed_fsdp_skips_overflowing_steps_and_recovers(corpus):
    kw = dict(steps=8, precision="fp16-mixed", loss_scale=2.0**20, loss_scale_window=2)
    hist = train(cfg(corpus, dp=2, fsdp=True, num_microbatches=2, **kw))
    assert hist[0]["skipped"] and hist[0]["loss_scale"] == 2.0**20
    assert sum(not r["skipped"] for r in hist) >= 3
    assert all(math.isfinite(r["loss"]) for r in hist)
    assert hist[-1]["loss"] < hist[0]["loss"] - 0.3, losses(hist)
