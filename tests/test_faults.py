"""A worker SIGKILLed mid-run takes the job down promptly; --resume finishes the run exactly."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from procs import children, steps_done, train_cmd, wait_for

MESH = ("--dp", "2", "--pp", "2")

BOUND_S = 60.0


@pytest.mark.slow
def test_sigkill_one_of_four_workers_then_resume(tmp_path):
    from plait.data import stdlib_corpus

    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(stdlib_corpus(max_bytes=300_000))
    corpus = str(corpus)

    ref_metrics = tmp_path / "ref.jsonl"
    subprocess.run(
        train_cmd(corpus, ref_metrics, tmp_path / "ref-ck", *MESH),
        check=True,
        capture_output=True,
        timeout=300,
    )
    reference = [json.loads(line)["loss"] for line in ref_metrics.read_text().splitlines()]

    metrics, ck = tmp_path / "m.jsonl", tmp_path / "ck"
    job = subprocess.Popen(
        train_cmd(corpus, metrics, ck, *MESH),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: steps_done(metrics) >= 6, 120, "six steps")
        # The workers are the launcher's grandchildren (forked by its forkserver).
        workers = wait_for(
            lambda: [w for c in children(job.pid) for w in children(c)], 10, "the workers"
        )
        victim = workers[-1]
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        _, err = job.communicate(timeout=BOUND_S + 30)
        elapsed = time.monotonic() - t0
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    assert elapsed < BOUND_S, elapsed
    assert "worker rank" in err and "SIGKILL" in err, err
    assert all(not Path(f"/proc/{p}").exists() for p in workers)
    killed_at = steps_done(metrics)
    assert killed_at < 16

    subprocess.run(
        train_cmd(corpus, metrics, ck, *MESH, "--resume"),
        check=True,
        capture_output=True,
        timeout=300,
    )
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    resumed = {r["step"]: r["loss"] for r in rows}
    assert resumed[15] == reference[15]  # the final loss equals the uninterrupted run's
    assert [resumed[s] for s in range(16)] == reference
