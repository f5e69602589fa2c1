import json
import subprocess
import sys

import pytest
import torch

from plait.data import ByteDataset
from plait.train import TrainConfig, train


def test_tiny_loss_falls_clearly_over_50_steps():
    hist = train(TrainConfig(model="tiny", steps=50, progress=False))
    first = sum(r["loss"] for r in hist[:5]) / 5
    last = sum(r["loss"] for r in hist[-5:]) / 5
    assert first > 5.0  # about ln(256) at the start
    assert last < first - 2.0, (first, last)


def test_equal_seeds_give_bit_identical_losses():
    a = train(TrainConfig(steps=8, seed=3, progress=False))
    b = train(TrainConfig(steps=8, seed=3, progress=False))
    c = train(TrainConfig(steps=8, seed=4, progress=False))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["loss"] for r in a] != [r["loss"] for r in c]


def test_batches_are_a_function_of_seed_and_step():
    text = bytes(
        torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(0)).tolist()
    )
    ds, same, other = (ByteDataset(text, seed=s) for s in (1, 1, 2))
    x, y = ds.batch(5, 4, 16)
    assert (x[:, 1:] == y[:, :-1]).all()
    assert x.equal(same.batch(5, 4, 16)[0])
    assert not x.equal(ds.batch(6, 4, 16)[0])
    assert not x.equal(other.batch(5, 4, 16)[0])


def test_default_corpus_is_the_standard_library():
    ds = ByteDataset.from_path(None)
    assert len(ds) > 1_000_000
    assert b"import " in bytes(ds.tokens[:200_000].to(torch.uint8).tolist())


def test_cli_train_writes_metrics(tmp_path):
    data = tmp_path / "text.txt"
    data.write_text("hello plait " * 500)
    out = tmp_path / "m.jsonl"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "plait.cli",
            "train",
            "--steps",
            "3",
            "--seq-len",
            "32",
            "--batch-size",
            "4",
            "--data",
            str(data),
            "--metrics-out",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all({"loss", "step_time_s", "tokens_per_s"} <= r.keys() for r in rows)


def test_cli_help_lists_commands():
    out = subprocess.run(
        [sys.executable, "-m", "plait.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "train" in out and "demo" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "0"], "--steps must be an integer >= 1, got 0"),
        (["--model", "huge"], "unknown model 'huge'"),
        (["--seq-len", "999"], "--seq-len 999 exceeds model 'tiny'"),
        (["--data", "/nonexistent.txt"], "--data '/nonexistent.txt' is not a readable file"),
        (
            ["--schedule-costs", "1,x,2"],
            "expected three positive numbers F,B,W (e.g. 1,1.2,0.7), got '1,x,2'",
        ),
        (["--grad-clip", "-1"], "--grad-clip -1.0 is not valid: it must be a norm >= 0"),
        (["--warmup-steps", "-3"], "--warmup-steps -3 is not valid"),
        (["--checkpoint-every", "-1"], "--checkpoint-every -1 is not valid"),
        (["--timeout", "0"], "--timeout must be a positive number of seconds"),
        (["--virtual", "3"], "virtual=3 needs a pipeline (pp > 1)"),
        (["--p2p", "tcp"], "argument --p2p: invalid choice: 'tcp'"),
    ],
)
def test_cli_bad_input_is_named(args, message):
    res = subprocess.run(
        [sys.executable, "-m", "plait.cli", "train", *args], capture_output=True, text=True
    )
    assert res.returncode == 2
    assert message in res.stderr


def test_a_checkpoint_dir_alone_saves_at_the_end_and_an_empty_resume_says_so(tmp_path, capsys):
    from plait.train.checkpoint import latest_checkpoint

    ck = tmp_path / "ck"
    train(TrainConfig(steps=2, checkpoint_dir=str(ck), resume=True, progress=False))
    assert "--resume: no complete checkpoint in" in capsys.readouterr().err
    assert latest_checkpoint(ck).name == "step-00000002"  # no --checkpoint-every: at the end


@pytest.mark.slow
def test_the_pipeline_transport_changes_no_bit_of_training():
    from plait import ParallelConfig

    def losses(p2p: str) -> list[float]:
        cfg = TrainConfig(steps=4, parallel=ParallelConfig(pp=2), p2p=p2p, progress=False)
        return [r["loss"] for r in train(cfg)]

    assert losses("shm") == losses("process-group")
    with pytest.raises(
        ValueError, match=r"p2p 'tcp' is not one of \['auto', 'shm', 'process-group'\]"
    ):
        TrainConfig(p2p="tcp").validate()
