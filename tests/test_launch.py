import os
import time

import pytest
import workers

from plait import WorkerError, launch

BOUND_S = 15.0  # launch must fail within this many seconds of a worker's failure


@pytest.mark.parametrize("world", [1, 2, 4])
def test_launch_returns_per_rank_results(world):
    assert launch(workers.rank_times, world, 10) == [(r * 10, world) for r in range(world)]


def test_collective_across_workers():
    assert launch(workers.allreduce_sum, 3) == [6.0, 6.0, 6.0]


def _assert_gone(pid_dir):
    pids = [int(p.read_text()) for p in pid_dir.iterdir()]
    assert pids, "workers did not record their pids"
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_exception_in_one_worker_fails_promptly(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(WorkerError) as info:
        launch(workers.raise_on, 4, 2, str(tmp_path))
    assert time.monotonic() - t0 < BOUND_S
    err = info.value
    assert err.rank == 2
    assert "ValueError: boom from rank 2" in str(err)
    assert "raise_on" in err.worker_traceback  # the worker's own traceback came back
    _assert_gone(tmp_path)


def test_sigkill_of_one_worker_fails_promptly(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(WorkerError) as info:
        launch(workers.sigkill_on, 4, 1, str(tmp_path), grace=2.0)
    assert time.monotonic() - t0 < BOUND_S
    assert info.value.rank == 1
    assert "SIGKILL" in str(info.value)
    _assert_gone(tmp_path)


def test_stuck_collective_times_out():
    t0 = time.monotonic()
    with pytest.raises(WorkerError) as info:
        launch(workers.stuck_collective, 2, timeout=3.0)
    assert time.monotonic() - t0 < 25
    assert info.value.rank == 0


def test_bad_arguments_are_refused_before_starting():
    with pytest.raises(ValueError, match="world_size must be a positive integer, got 0"):
        launch(workers.rank_times, 0, 1)
    with pytest.raises(ValueError, match="backend must be 'gloo', 'nccl' or None, got 'mpi'"):
        launch(workers.rank_times, 2, 1, backend="mpi")


TORCHRUN_SCRIPT = """
import os
import sys
sys.path.insert(0, {tests!r})
import workers
from plait import launch
result = launch(workers.rank_times, 2, 7)
with open(os.path.join({out!r}, "rank" + os.environ["RANK"]), "w") as f:
    f.write(repr(result))
"""


@pytest.mark.slow
def test_joins_a_torchrun_job(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "job.py"
    script.write_text(TORCHRUN_SCRIPT.format(tests=os.path.dirname(__file__), out=str(tmp_path)))
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(script),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    # Both torchrun ranks joined one job of 2 (not 2 jobs of 2 each) and got every rank's result.
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}").read_text() == "[(0, 2), (7, 2)]"


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads Linux's /proc/net/tcp")
def test_the_rendezvous_store_listens_on_loopback_only():
    for listeners in launch(workers.store_listeners, 2):
        assert listeners == ["0100007F"], listeners  # 127.0.0.1, and no other address
