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


@pytest.fixture(scope="module")
def single(tmp_path_factory, text_file):
    out = tmp_path_factory.mktemp("single") / "single.jsonl"
    report = infer(
        InferConfig(data=str(text_file), limit=24, seq_len=32, batch_size=3, progress=False)
    )
    report.write_jsonl(str(out))
    return [json.loads(line)["loss"] for line in out.read_text().splitlines()]


def _pipeline_available() -> bool:
    try:
        from plait.pipeline import PipelineRuntime, partition  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy, workers",
    [
        ("single", 1),
        ("task", 2),
        ("tensor", 2),
        ("pipeline", 2),
        ("task,pipeline", 4),
        ("task,tensor", 4),
        ("pipeline,tensor", 4),
    ],
)
def test_every_strategy_matches_single_process(
    capsys, text_file, tmp_path, single, strategy, workers
):
    if "pipeline" in strategy and not _pipeline_available():
        pytest.skip("plait.pipeline has no PipelineRuntime/partition in this checkout")
    out = tmp_path / "losses.jsonl"
    losses, summary = _run_cli(
        capsys, text_file, out, "--strategy", strategy, "--workers", str(workers)
    )
    _close(losses, single)
    assert summary["strategy"] == strategy
    assert summary["sequences"] == 24 and summary["requests"] == 8
    assert summary["sequences_per_s"] > 0
    assert 0 < summary["latency_p50_ms"] <= summary["latency_p90_ms"] <= summary["latency_p99_ms"]


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


def test_too_many_stages_is_refused_before_starting(capsys, text_file):
    if not _pipeline_available():
        pytest.skip("plait.pipeline has no PipelineRuntime/partition in this checkout")
    argv = ["infer", "--data", str(text_file), "--strategy", "pipeline", "--workers", "3"]
    assert main([*argv, "--no-progress"]) == 2
    assert "cannot split 2 blocks into 3 stages" in capsys.readouterr().err
