"""A tasks job killed from outside leaves nothing behind: no worker process, no semaphore.

Real processes: the job runs in a subprocess in its own session (process group), the test waits
until both workers are inside an item (each writes a file), then kills the job's parent (SIGKILL
or SIGTERM, as ``timeout``, Slurm or docker do) or its whole group.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import task_workers as tw

JOB = """
import sys
from functools import partial
sys.path.insert(0, {tests!r})
import task_workers as tw
from plait import tasks

if __name__ == "__main__":  # the workers import this file as their main module
    tasks.map(partial(tw.announce_and_block, {execs!r}, {fifo!r}), range(4), workers=2,
              progress=False)
"""

_DEADLINE = 5.0  # seconds the workers may outlive their parent


def _state(pid: int) -> str | None:
    """The process's state letter, or None if it is gone (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    state = stat.rsplit(")", 1)[1].split()[0]
    return None if state in ("Z", "X") else state


def _group(pgid: int) -> set[int]:
    """Live processes of process group ``pgid``."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            pids.add(int(entry.name))
    return pids


def _semaphores() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("sem.mp-*")}


def _mapped_semaphores(pids) -> set[str]:
    """Names of /dev/shm semaphores the processes ``pids`` have mapped (i.e. are using)."""
    names = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        names |= {line.rsplit("/", 1)[1] for line in maps.splitlines() if "/dev/shm/sem." in line}
    return names


def _start_job(tmp_path):
    execs, fifo = tmp_path / "exec", tmp_path / "never"
    execs.mkdir()
    os.mkfifo(fifo)
    script = tmp_path / "job.py"
    script.write_text(JOB.format(tests=os.path.dirname(__file__), execs=str(execs), fifo=str(fifo)))
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    # Synchronise on the files the items write: both workers are inside an item.
    deadline = time.monotonic() + 120
    while len(tw.executed_pids(execs)) < 2:
        if proc.poll() is not None:
            pytest.fail(f"the job ended early: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the job's workers never started an item")
        time.sleep(0.02)
    return proc, tw.executed_pids(execs)


def _wait_gone(pids, seconds: float) -> set[int]:
    """Poll until every pid is gone or the deadline passes; return the pids still alive."""
    deadline = time.monotonic() + seconds
    while True:
        alive = {pid for pid in pids if _state(pid) is not None}
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.02)


def _cleanup(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_no_task_worker_outlives_its_killed_parent(tmp_path, sig):
    proc, workers = _start_job(tmp_path)
    try:
        assert proc.pid not in workers and len(workers) == 2
        os.kill(proc.pid, sig)
        assert proc.wait(timeout=30) == -sig
        assert _wait_gone(workers, _DEADLINE) == set(), "task workers outlived their parent"
        # And nothing else of the job (the forkserver, the resource tracker) lingers either.
        assert _wait_gone(_group(proc.pid), _DEADLINE) == set()
    finally:
        _cleanup(proc.pid)


@pytest.mark.slow
def test_whole_group_sigkill_leaves_no_semaphores(tmp_path):
    before = _semaphores()
    proc, workers = _start_job(tmp_path)
    try:
        members = _group(proc.pid)
        assert workers <= members
        # The pool talks over pipes only: no process of the job holds a named semaphore...
        assert _mapped_semaphores(members) == set()
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        assert _wait_gone(members, _DEADLINE) == set()
    finally:
        _cleanup(proc.pid)
    # ...so none is left in /dev/shm. (New files still mapped by a live process belong to some
    # other job running on this machine meanwhile; a leaked one is mapped by nobody.)
    new = _semaphores() - before
    live = _mapped_semaphores(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
    assert new - live == set()
