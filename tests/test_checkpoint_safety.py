"""Checkpoints that verify or are refused: flipped bytes, other models and settings, crafted
files, bad directories, a full disk, and a NaN that stops the run."""

import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from plait.cli import main
from plait.train.store import (
    META_FILE,
    CheckpointError,
    check_checkpoint_dir,
    newest_verified,
    verify_checkpoint,
    write_manifest,
)

BASE = ["train", "--model", "tiny", "--batch-size", "4", "--seq-len", "16", "--no-progress"]


def run(capsys, *args):
    code = main([*BASE, *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 4-step run saving at steps 2 and 4 (copied per test)."""
    ck = tmp_path_factory.mktemp("saved") / "ck"
    assert (
        main([*BASE, "--steps", "4", "--checkpoint-dir", str(ck), "--checkpoint-every", "2"]) == 0
    )
    return ck


@pytest.fixture
def ck(saved, tmp_path):
    dst = tmp_path / "ck"
    shutil.copytree(saved, dst)
    return dst


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_any_file_is_found_and_the_previous_checkpoint_used(saved, tmp_path):
    newest = saved / "step-00000004"
    files = sorted(p.name for p in newest.iterdir())
    assert META_FILE in files and any(f.endswith(".safetensors") for f in files)
    for name in files:
        size = (newest / name).stat().st_size
        for offset in sorted({0, 1, size // 3, size // 2, size - 2, size - 1}):
            ck = tmp_path / f"{name}-{offset}"
            shutil.copytree(saved, ck)
            flip(ck / "step-00000004" / name, offset)
            found, rejected = newest_verified(ck)
            assert found == ck / "step-00000002", (name, offset)
            assert len(rejected) == 1 and "step-00000004" in rejected[0], (name, offset)
            shutil.rmtree(ck)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_resume_skips_a_damaged_checkpoint_saying_so(ck, capsys, damage):
    shard = next((ck / "step-00000004").glob("*.safetensors"))
    if damage == "flip":
        flip(shard, shard.stat().st_size // 2)
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:100])
    else:
        shard.unlink()
    metrics = ck.parent / "m.jsonl"
    code, _, err = run(
        capsys,
        "--steps",
        "5",
        "--checkpoint-dir",
        str(ck),
        "--resume",
        "--metrics-out",
        str(metrics),
    )
    assert code == 0, err
    assert "skipping a checkpoint" in err and shard.name in err, err
    assert "resuming from" in err and "step-00000002" in err, err
    assert json.loads(metrics.read_text().splitlines()[0])["step"] == 2


def test_a_checkpoint_of_another_depth_or_model_is_refused_in_one_line(tmp_path, capsys):
    ck = str(tmp_path / "ck")
    assert run(capsys, "--steps", "2", "--layers", "2", "--checkpoint-dir", ck)[0] == 0
    for args, words in (
        (["--layers", "1"], ["holds another model", "are not in this model", "blocks.1."]),
        (["--model", "small"], ["holds another model", "(64, 64) there, (256, 256) here"]),
    ):
        code, _, err = run(capsys, "--steps", "4", "--checkpoint-dir", ck, "--resume", *args)
        assert code == 2, err
        assert len(err.strip().splitlines()) == 1, err
        assert all(w in err for w in words), err


def test_changed_settings_are_refused_unless_allowed(ck, capsys):
    args = ["--steps", "5", "--checkpoint-dir", str(ck), "--resume"]
    changed = ["--lr", "0.01", "--seed", "3", "--dtype", "fp64"]
    code, _, err = run(capsys, *args, *changed)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    for what in ("lr 0.003 -> 0.01", "seed 0 -> 3", "dtype 'fp32' -> 'fp64'"):
        assert what in err, err
    assert "--allow-change seed,lr,dtype" in err, err
    code, _, err = run(capsys, *args, *changed, "--allow-change", "lr,seed,dtype")
    assert code == 0, err
    code, _, err = run(capsys, *args, "--allow-change", "nope")
    assert code == 2 and "--allow-change nope" in err and "valid:" in err


def test_resume_with_nothing_to_resume_says_so(tmp_path, capsys):
    code, _, err = run(
        capsys, "--steps", "1", "--checkpoint-dir", str(tmp_path / "none"), "--resume"
    )
    assert code == 0
    assert "no complete checkpoint" in err and "starting from step 0" in err


class _Marker:
    """Unpickling this creates the marker file: code execution, made visible."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_crafted_files_in_a_checkpoint_never_run_code(ck, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Marker(str(marker)))
    # an old-format checkpoint whose .metadata is a crafted pickle
    old = ck / "step-00000009"
    old.mkdir()
    (old / ".metadata").write_bytes(evil)
    # a newer checkpoint whose manifest is rewritten to vouch for a pickle as its tensor file
    forged = ck / "step-00000010"
    shutil.copytree(ck / "step-00000004", forged)
    manifest = json.loads((forged / META_FILE).read_text())
    shard = next(iter(manifest["files"]))
    (forged / shard).write_bytes(evil)
    import hashlib

    manifest["files"][shard] = {"sha256": hashlib.sha256(evil).hexdigest(), "bytes": len(evil)}
    write_manifest(forged, manifest)
    verify_checkpoint(forged)  # the checksums hold: only the format can refuse it
    code, _, err = run(capsys, "--steps", "12", "--checkpoint-dir", str(ck), "--resume")
    assert code == 2 and "not readable as safetensors" in err, err
    shutil.rmtree(forged)
    code, _, err = run(capsys, "--steps", "6", "--checkpoint-dir", str(ck), "--resume")
    assert code == 0 and "older plait format" in err and "step-00000004" in err, err
    # the run branched from step 4 and saved step 6: the later step 9 is set aside, not resumed
    old = ck / "abandoned-step-00000009"
    assert old.is_dir() and not (ck / "step-00000009").exists()
    for cmd in (["export", "--out", str(tmp_path / "o")], ["infer"]):
        assert main([*cmd, "--checkpoint", str(old)]) != 0
        assert "older plait format" in capsys.readouterr().err
    assert not marker.exists()


def test_bad_checkpoint_directories_are_refused_before_training(tmp_path, capsys, monkeypatch):
    plain = tmp_path / "file"
    plain.write_text("x")
    for where, words in ((plain, "is a file"), (Path("/sys/plait-ck"), "not writable")):
        code, _, err = run(capsys, "--steps", "1", "--checkpoint-dir", str(where))
        assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, err
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(CheckpointError, match="1000 B free|0.0 MiB free"):
        check_checkpoint_dir(tmp_path / "ok", needed_bytes=10_000)
    code, _, err = run(capsys, "--steps", "1", "--checkpoint-dir", str(tmp_path / "ck"))
    assert code == 2 and "MiB free" in err and "needs about" in err, err


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past it fail (EFBIG) instead


@pytest.mark.slow
def test_a_save_that_fails_on_one_rank_fails_on_every_rank_naming_it(tmp_path):
    import workers

    from plait import launch

    t0 = time.monotonic()
    res = launch(workers.save_failing_on, 2, 1, str(tmp_path), threads_per_worker=1, timeout=30)
    assert time.monotonic() - t0 < 25  # nobody waited out the timeout in an abandoned collective
    for r in res:
        assert r["error"].startswith(f"could not write checkpoint {tmp_path}/step-00000001.partial")
        assert (
            "rank 1: rank00001.safetensors: [Errno 28] No space left on device; removed it"
            in (r["error"])
        )
    assert os.listdir(tmp_path) == []  # no .partial, no checkpoint


def test_a_save_that_cannot_finish_leaves_no_partial_and_says_why(tmp_path):
    ck = tmp_path / "ck"
    job = subprocess.run(
        [sys.executable, "-m", "plait.cli", *BASE, "--steps", "1", "--checkpoint-dir", str(ck)],
        capture_output=True,
        text=True,
        preexec_fn=_limit_file_size,
        timeout=120,
    )
    assert job.returncode == 2, job.stderr
    assert "could not write checkpoint" in job.stderr and "removed it" in job.stderr
    assert len(job.stderr.strip().splitlines()) == 1, job.stderr
    assert list(ck.iterdir()) == []


POISONED = ["train", "--model", "user_models:poisoned", "--steps", "6", "--batch-size", "4"]


def test_a_nan_stops_the_run_non_zero(tmp_path, capsys):
    ck = tmp_path / "ck"
    code = main(
        [*POISONED, "--no-progress", "--checkpoint-dir", str(ck), "--checkpoint-every", "1"]
    )
    err = capsys.readouterr().err
    assert code == 1, err
    assert "step 3: loss nan" in err and "not finite" in err, err
    saved = sorted(p.name for p in ck.iterdir())
    assert saved == ["step-00000001", "step-00000002", "step-00000003"]  # nothing after the NaN


@pytest.mark.slow
def test_a_nan_stops_a_multi_process_run_non_zero(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    job = subprocess.run(
        [sys.executable, "-m", "plait.cli", *POISONED, "--dp", "2", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert job.returncode == 1, job.stderr
    assert "NonFiniteError: step 3: loss nan" in job.stderr, job.stderr


def test_a_run_branched_from_an_older_step_sets_the_later_checkpoints_aside(tmp_path):
    import torch

    from plait.train.store import save_checkpoint

    def save(step, keep=3):
        return save_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step))}, keep=keep)

    for step in (2, 4, 6):
        save(step)
    save(3)  # resumed from step 2: steps 4 and 6 are another run's future
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["abandoned-step-00000004", "abandoned-step-00000006", *step_names(2, 3)]
    assert newest_verified(tmp_path)[0].name == "step-00000003"  # never the abandoned 6
    save(4)  # and again: the earlier abandoned copy is kept too
    assert (tmp_path / "abandoned-step-00000004").is_dir()
    assert sorted(p.name for p in tmp_path.glob("step-*")) == step_names(2, 3, 4)
    with pytest.raises(ValueError, match="keep must be an integer >= 1 .*got 0"):
        save(5, keep=0)


def step_names(*steps):
    return [f"step-{s:08d}" for s in steps]
