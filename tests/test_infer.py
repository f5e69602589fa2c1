"""plait infer: every strategy scores the same sequences with the same losses."""

import json
from pathlib import Path

import pytest

from plait.cli import main
from plait.infer import InferConfig, infer, parse_strategy
from plait.mesh import MeshShape


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "input.txt"
    path.write_bytes(Path(__file__).read_bytes() * 2)  # some real text, enough for 24 sequences
    return path


def _run_cli(capsys, text_file, out, *argv):
    code = main(
        ["infer", "--data", str(text_file), "--limit", "24", "--seq-len", "32",
         "--batch-size", "3", "--no-progress", "--out", str(out), *argv]
    )  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [rec["index"] for rec in lines] == list(range(24))
    return [rec["loss"] for rec in lines], summary


def _close(a, b):
    assert len(a) == len(b)
    assert max(abs(x - y) / max(1.0, abs(x)) for x, y in zip(a, b)) < 1e-5


@pytest.mark.slow
def test_task_and_tensor_match_single_process(capsys, text_file, tmp_path):
    single, s = _run_cli(capsys, text_file, tmp_path / "single.jsonl")
    assert s["strategy"] == "single" and s["sequences"] == 24 and s["requests"] == 8
    assert s["sequences_per_s"] > 0 and s["latency_p50_ms"] <= s["latency_p99_ms"]
    for strategy, workers in [("task", 2), ("tensor", 2), ("task,tensor", 4)]:
        out = tmp_path / f"{strategy}.jsonl"
        losses, summary = _run_cli(
            capsys, text_file, out, "--strategy", strategy, "--workers", str(workers)
        )
        _close(losses, single)
        assert summary["sequences"] == 24


def test_losses_are_the_models_own_mean_next_token_loss(text_file):
    import torch

    from plait.data import ByteDataset
    from plait.models import Transformer, get_config

    report = infer(InferConfig(data=str(text_file), limit=5, seq_len=32, progress=False))
    model = Transformer(get_config("tiny"), seed=0).eval()
    seqs = ByteDataset.from_path(text_file).sequences(32, 5)
    with torch.no_grad():
        expected = [model.loss(model(s[None, :-1]), s[None, 1:]).item() for s in seqs]
    _close(report.losses, expected)


@pytest.mark.parametrize(
    "strategy, workers, shape",
    [
        ("single", 1, MeshShape()),
        ("task", 3, MeshShape(dp=3)),
        ("pipeline", 2, MeshShape(pp=2)),
        ("tensor", 4, MeshShape(tp=4)),
        ("task,pipeline", 4, MeshShape(dp=2, pp=2)),
        ("task,pipeline,tensor", 8, MeshShape(dp=2, pp=2, tp=2)),
    ],
)
def test_strategy_to_mesh(strategy, workers, shape):
    assert parse_strategy(strategy, workers) == shape


def test_strategy_sizes_can_be_given():
    assert parse_strategy("task,pipeline", 6, stages=3) == MeshShape(dp=2, pp=3)
    assert parse_strategy("pipeline,tensor", 4, stages=4, tp=1) == MeshShape(pp=4)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--strategy", "data"], "--strategy 'data' is not valid"),
        (["--strategy", "single", "--workers", "2"], "single runs one process"),
        (["--strategy", "task,pipeline", "--workers", "6"], "does not split evenly"),
        (["--strategy", "task", "--workers", "2", "--tp", "2"], "--tp needs 'tensor'"),
        (["--strategy", "tensor", "--workers", "3"], "tp=3"),
        (["--seq-len", "999"], "exceeds model 'tiny'"),
        (["--workers", "0", "--strategy", "task"], "--workers must be >= 1, got 0"),
    ],
)
def test_bad_input_is_refused_before_starting(capsys, text_file, argv, message):
    assert main(["infer", "--data", str(text_file), "--no-progress", *argv]) == 2
    assert message in capsys.readouterr().err
