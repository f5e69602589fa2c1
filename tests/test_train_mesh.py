"""Training on a mesh reproduces single-process training; checkpoints reshard and resume exactly."""

import shutil

import pytest

from plait.checkpoint import latest_checkpoint
from plait.train import TrainConfig, train

RTOL = 1e-4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from plait.data import stdlib_corpus

    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_bytes(stdlib_corpus(max_bytes=300_000))
    return str(path)


def losses(hist):
    return [r["loss"] for r in hist]


def assert_close(a, b, rtol=RTOL):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) <= rtol * abs(y), f"step {i}: {x} vs {y}"


def cfg(corpus, **kw):
    base = dict(model="tiny", steps=20, batch_size=8, seq_len=32, data=corpus, progress=False)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def single(corpus):
    return losses(train(cfg(corpus)))


@pytest.mark.slow
def test_data_parallel_matches_single_process(corpus, single):
    hist = train(cfg(corpus, dp=2))
    assert_close(losses(hist), single)
    assert hist[0]["comm_bytes"]["dp"] > 0
    assert len(hist[0]["peak_rss_mb_per_rank"]) == 2


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
    assert_close(losses(train(cfg(corpus, microbatches=3))), single)


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


def test_bad_mesh_settings_are_named(corpus):
    with pytest.raises(ValueError, match="--batch-size 7 must divide evenly over --dp 2"):
        train(cfg(corpus, batch_size=7, dp=2))
    with pytest.raises(ValueError, match="--microbatches 9 exceeds the 8 sequences"):
        train(cfg(corpus, microbatches=9))
    with pytest.raises(ValueError, match="--resume needs --checkpoint-dir"):
        train(cfg(corpus, resume=True))
