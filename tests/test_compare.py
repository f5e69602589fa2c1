"""plait compare measures every strategy beside the planner's prediction; plait demo runs."""

import json
import subprocess
import sys

import pytest

from plait.compare import CompareConfig, infer_candidates, train_candidates


def test_candidates_are_every_valid_split():
    names = {(s.dp, s.pp, s.tp) for _, s in train_candidates("tiny", 4)}
    # tiny has 2 layers (pp <= 2) and 4 heads (tp in 1, 2, 4)
    assert names == {(4, 1, 1), (2, 2, 1), (2, 1, 2), (1, 2, 2), (1, 1, 4)}
    assert [n for n, _ in infer_candidates("tiny", 2)] == ["single", "task", "pipeline", "tensor"]


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="--mode must be 'train' or 'infer', got 'serve'"):
        CompareConfig(mode="serve").validate()
    with pytest.raises(ValueError, match="--warmup must be in 0..steps-1"):
        CompareConfig(steps=2, warmup=2).validate()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["train", "infer"])
def test_compare_runs_end_to_end(tmp_path, mode):
    out = tmp_path / "out"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "plait.cli",
            "compare",
            "--model",
            "tiny",
            "--workers",
            "2",
            "--mode",
            mode,
            "--steps",
            "3",
            "--sequences",
            "16",
            "--seq-len",
            "64",
            "--out-dir",
            str(out),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    rows = {r["strategy"]: r for r in report["rows"]}
    expected = (
        ["data×2", "tensor×2", "pipeline×2"]
        if mode == "train"
        else ["single", "task", "pipeline", "tensor"]
    )
    assert sorted(rows) == sorted(expected)
    key = "tokens_per_s" if mode == "train" else "sequences_per_s"
    for r in rows.values():
        assert r["error"] is None
        assert r["measured"][key] > 0 and r["predicted"][key] > 0
        assert r["measured"]["memory_mb"] > 0
    if mode == "train":
        assert rows["pipeline×2"]["measured"]["bubble_fraction"] > 0
        assert rows["tensor×2"]["measured"]["comm_mb_by_axis"]["tp"] > 0
        assert rows["data×2"]["measured"]["comm_mb_by_axis"]["dp"] > 0
        for path in report["timelines"].values():
            assert open(path, "rb").read(4) == b"\x89PNG"
    assert open(report["chart"], "rb").read(4) == b"\x89PNG"


@pytest.mark.slow
def test_demo_runs_every_part_and_draws_its_pictures(tmp_path, capsys):
    from plait.demo import run_demo

    assert run_demo(out_dir=str(tmp_path), steps=4) == 0
    out = capsys.readouterr().out
    for part in ("1. Calibrating", "2. The verdict", "3. Training the chosen", "4. Measuring"):
        assert part in out
    assert "median step" in out and "against the predicted" in out
    assert (tmp_path / "timeline-chosen.png").stat().st_size > 0
    assert (tmp_path / "compare" / "compare-train.png").stat().st_size > 0
