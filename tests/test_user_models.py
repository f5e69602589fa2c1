"""Any nn.Module through `--model package.module:function`: an nn.Sequential MLP and a small CNN
(tests/user_models.py) train at pp=2, from the library and the command line, exactly as in one
process."""

import subprocess
import sys

import pytest

from plait.config import ParallelConfig
from plait.train import TrainConfig, train


def _losses(model, **kw):
    cfg = TrainConfig(model=model, steps=10, parallel=ParallelConfig(**kw), progress=False)
    return [r["loss"] for r in train(cfg)]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["user_models:mlp", "user_models:cnn"])
@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_a_user_model_trains_at_pp2_exactly_as_one_process(model, schedule):
    one = _losses(model, dtype="fp64")
    two = _losses(model, dtype="fp64", pp=2, schedule=schedule)
    assert two == pytest.approx(one, rel=1e-9)
    assert one[-1] < one[0]  # and it learns


@pytest.mark.slow
def test_the_command_line_trains_a_user_model_at_pp2():
    def run(*flags):
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "plait.cli",
                "train",
                "--model",
                "user_models:cnn",
                "--steps",
                "10",
                "--no-progress",
                *flags,
            ],
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, res.stderr[-2000:]
        return res.stdout.strip().splitlines()[-1]

    assert run("--pp", "2") == run()


def test_a_user_model_takes_no_text_data():
    cfg = TrainConfig(model="user_models:mlp", data="notes.txt", progress=False)
    with pytest.raises(ValueError, match="is not a language model"):
        cfg.validate()
