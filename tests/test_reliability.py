"""Faults around the launcher and stalled workers: no orphans, no hangs, nothing left behind."""

import multiprocessing as mp
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from procs import children, descendants, running, steps_done, train_cmd, wait_for

from plait import heartbeat

ORPHAN_BOUND_S = 5.0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from plait.data import stdlib_corpus

    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_bytes(stdlib_corpus(max_bytes=200_000))
    return str(path)


def long_run(corpus, metrics, ck, *mesh, timeout=120):
    """A run that goes on until it is stopped, checkpointing every 2 steps."""
    return train_cmd(
        corpus, metrics, ck, *mesh, steps=100_000, batch=4, seq=16, every=2, timeout=timeout
    )


def start(cmd, **kw):
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def workers_of(job) -> list[int]:
    """The workers: grandchildren of the launcher (forked by its forkserver), in rank order."""
    return sorted(w for c in children(job.pid) for w in children(c))


def checkpoints(ck: Path) -> set[str]:
    return {p.name for p in ck.iterdir()} if ck.is_dir() else set()


def sems() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("sem.mp-*")}


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killing_the_launcher_leaves_no_worker_alive(sig, corpus, tmp_path):
    metrics, ck = tmp_path / "m.jsonl", tmp_path / "ck"
    job = start(long_run(corpus, metrics, ck, "--dp", "2"))
    try:
        wait_for(lambda: steps_done(metrics) >= 3, 120, "three steps")
        below = descendants(job.pid)
        assert len(workers_of(job)) == 2
        os.kill(job.pid, sig)
        job.wait(timeout=30)
        seen = checkpoints(ck)
        wait_for(lambda: not any(running(p) for p in below), ORPHAN_BOUND_S, "every worker to end")
        time.sleep(0.5)  # a grace period in which an orphan would write; none is alive
        assert checkpoints(ck) == seen
    finally:
        if job.poll() is None:
            job.kill()
        for p in descendants(job.pid):
            os.kill(p, signal.SIGKILL)
    if sig == signal.SIGTERM:
        assert job.returncode == 143, job.returncode
        assert "SIGTERM" in job.stderr.read()


@pytest.mark.slow
def test_killing_the_whole_group_leaves_no_semaphore(corpus, tmp_path):
    metrics, ck = tmp_path / "m.jsonl", tmp_path / "ck"
    before = sems()
    job = start(long_run(corpus, metrics, ck, "--dp", "2"), start_new_session=True)
    try:
        wait_for(lambda: steps_done(metrics) >= 2, 120, "two steps")
        below = descendants(job.pid)
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=30)
        wait_for(lambda: not any(running(p) for p in below), ORPHAN_BOUND_S, "every process")
    finally:
        if job.poll() is None:
            job.kill()
    assert sems() - before == set()


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [("--dp", "2"), ("--pp", "2")], ids=["dp2", "pp2"])
def test_a_stopped_worker_is_named_and_the_job_exits(mesh, corpus, tmp_path):
    metrics, ck = tmp_path / "m.jsonl", tmp_path / "ck"
    job = start(long_run(corpus, metrics, ck, *mesh, timeout=10))
    try:
        wait_for(lambda: steps_done(metrics) >= 3, 120, "three steps")
        workers = workers_of(job)
        victim = 1
        os.kill(workers[victim], signal.SIGSTOP)
        t0 = time.monotonic()
        _, err = job.communicate(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 1
    assert elapsed < 30, elapsed
    assert f"worker rank {victim} is stopped" in err, err
    assert "at step" in err and "timeout of 10 s" in err, err
    assert not any(running(p) for p in workers)


def test_watchdog_blames_the_silent_worker_not_the_one_waiting_on_it():
    slots = heartbeat.Slots(mp.get_context("spawn"), 3)
    dog = heartbeat.Watchdog(slots, [None, None, None], limit=10.0)

    def put(rank, t, label, step=4):
        slots.times[rank] = t
        slots.steps[rank] = step
        data = label.encode()
        slots.labels[rank * heartbeat.LABEL_BYTES : (rank + 1) * heartbeat.LABEL_BYTES] = (
            data.ljust(heartbeat.LABEL_BYTES, b"\0")
        )

    put(0, 100.0, "F0.3")  # computing since t=100, nobody waits on it: no stall
    put(1, 101.0, "F1.3")
    put(2, 0.0, "")
    assert dog.stalled(set(), now=500.0) is None
    put(0, 100.0, "RECV_GRAD0.3")  # waiting on rank 1 since t=100
    put(1, 101.0, "F1.3")  # computing since t=101, then silent
    put(2, 0.0, "")  # never beat: still starting, not watched
    assert dog.stalled(set(), now=105.0) is None  # within the limit
    stall = dog.stalled(set(), now=112.0)
    assert (stall.rank, stall.label, stall.step) == (1, "F1.3", 4)  # not rank 0, silent longer
    assert "stalled 11.0 s at step 4 in F1.3" in stall.message(10.0)
    assert dog.stalled({1}, now=112.0).rank == 0  # rank 1 finished: rank 0's wait is the stall
    put(1, -101.0, "save checkpoint")  # unwatched phase
    assert dog.stalled({0}, now=500.0) is None


def test_a_torchrun_world_the_mesh_does_not_fill_is_refused(monkeypatch, capsys):
    from plait.cli import main

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    code = main(["train", "--model", "tiny", "--steps", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "torchrun started 2 processes" in err and "--dp 2" in err, err


def test_a_corpus_too_short_for_one_window_is_refused_before_the_workers(tmp_path, capsys):
    from plait.cli import main

    short = tmp_path / "short.txt"
    short.write_text("too short")
    code = main(
        [
            "train",
            "--model",
            "tiny",
            "--pp",
            "2",
            "--seq-len",
            "32",
            "--batch-size",
            "4",
            "--data",
            str(short),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "has 9 bytes" in err and "needs at least 33" in err, err


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--f", "-1", "--f -1.0 is not a time: it must be finite and > 0"),
        ("--b", "nan", "--b nan is not a time"),
        ("--comm", "-0.5", "--comm -0.5 is not a time: it must be finite and >= 0"),
    ],
)
def test_simulate_refuses_negative_or_non_finite_times(flag, value, message, capsys):
    from plait.cli import main

    assert main(["simulate", "--stages", "2", flag, value]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
