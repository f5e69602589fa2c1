"""plait.tasks on the local process pool: order, balance, deaths and retries, resumable results."""

import collections
import concurrent.futures as cf
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import task_workers as tw

from plait import tasks
from plait.tasks import SetupError, TaskError, WorkerLostError


@pytest.fixture(autouse=True)
def _private_state_dir(tmp_path_factory, monkeypatch):
    # The key that signs stored results lives in a state dir of this test, not in ~/.local.
    monkeypatch.setenv("PLAIT_STATE_DIR", str(tmp_path_factory.mktemp("state")))


def _stored(out, fn, items):
    """The items whose result is stored in ``out`` (files are named by fingerprint)."""
    return {x for x in items if (Path(out) / f"{tasks.fingerprint(fn, x)}.result").exists()}


def _assert_gone(pids):
    assert pids, "no worker pids were recorded"
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_results_keep_input_order_and_skew_is_balanced_by_dynamic_dispatch(tmp_path):
    # Item 0 holds one worker until item n-1 has started: with dynamic dispatch the other worker
    # takes every other item meanwhile (counts 1 and n-1); any static split of the items
    # between the two workers would give each about half.
    n = 12
    fifo = tmp_path / "gate"
    os.mkfifo(fifo)
    results = tasks.map(partial(tw.gated, str(fifo), n), range(n), workers=2, progress=False)
    assert [x for x, _ in results] == list(range(n))  # input order, though item 0 finished last
    per_worker = collections.Counter(pid for _, pid in results)
    assert sorted(per_worker.values()) == [1, n - 1]


def test_stream_yields_as_items_finish(tmp_path):
    n = 6
    fifo = tmp_path / "gate"
    os.mkfifo(fifo)
    order = [i for i, _ in tasks.stream(partial(tw.gated, str(fifo), n), range(n), workers=2)]
    assert sorted(order) == list(range(n))
    # Item 1 finished (and was yielded) before item n-1 was even dispatched; item 0 after it.
    assert order.index(1) < order.index(0)


def test_setup_runs_once_per_worker_and_is_reused(tmp_path):
    results = tasks.map(
        tw.use_state,
        range(10),
        workers=2,
        setup=partial(tw.setup_counter, str(tmp_path)),
        progress=False,
    )
    assert [r for r, _ in results] == [x + 100 for x in range(10)]
    setups = collections.Counter(int(f.name.split("-")[0]) for f in tmp_path.iterdir())
    assert set(setups.values()) == {1}  # each process ran setup exactly once...
    assert set(setups) == {pid for _, pid in results}  # ...and only processes that did work


def test_worker_killed_mid_run_loses_nothing_and_repeats_only_its_item(tmp_path):
    marker, execs = tmp_path / "killed", tmp_path / "exec"
    execs.mkdir()
    fn = partial(tw.kill_once, str(marker), str(execs), 5)
    results = tasks.map(fn, range(12), workers=2, retries=2, progress=False)
    assert marker.exists()  # the kill really happened
    assert [r for r, _ in results] == [x * x for x in range(12)]
    counts = tw.executions(execs)
    assert counts == {x: (2 if x == 5 else 1) for x in range(12)}
    # Item 5's retry ran in another process than the killed one, and no worker is left running.
    tries = {int(f.name.split("-")[1]) for f in execs.iterdir() if f.name.startswith("5-")}
    assert len(tries) == 2 and results[5][1] in tries
    _assert_gone(tw.executed_pids(execs))


def test_exhausted_retries_name_the_item_and_leave_no_orphans(tmp_path):
    fn = partial(tw.kill_always, str(tmp_path), 3)
    with pytest.raises(WorkerLostError) as info:
        tasks.map(fn, range(8), workers=2, retries=1, progress=False)
    err = info.value
    assert err.index == 3 and err.item == 3 and err.attempts == 2
    assert "item 3 (3) lost its worker on all 2 attempts" in str(err)
    assert "SIGKILL" in str(err)
    assert tw.executions(tmp_path)[3] == 2
    _assert_gone(tw.executed_pids(tmp_path))


def test_task_that_raises_is_reported_with_item_and_traceback():
    with pytest.raises(TaskError) as info:
        tasks.map(partial(tw.raise_on, 4), range(8), workers=2, progress=False)
    err = info.value
    assert not isinstance(err, WorkerLostError)
    assert err.index == 4 and err.item == 4
    assert "item 4 (4) raised ValueError: bad item 4" in str(err)
    assert "raise_on" in err.worker_traceback


def test_failing_setup_is_reported():
    with pytest.raises(SetupError, match="RuntimeError: cannot load the model"):
        tasks.map(tw.use_state, range(4), workers=2, setup=tw.failing_setup, progress=False)


def test_timeout_kills_a_stuck_item(tmp_path):
    fifo = tmp_path / "never"
    os.mkfifo(fifo)
    with pytest.raises(WorkerLostError, match=r"timed out after 1.0s"):
        tasks.map(
            partial(tw.block_forever, str(fifo)),
            [7],
            workers=1,
            timeout=1.0,
            retries=0,
            progress=False,
        )


def test_rerun_after_interruption_computes_only_missing_items(tmp_path):
    out, first, second = tmp_path / "out", tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    # Interrupt: stop consuming the stream after 5 results (as Ctrl-C would stop the job).
    stream = tasks.stream(
        partial(tw.recorded_square, str(first)), range(20), workers=2, results_dir=out
    )
    for _ in range(5):
        next(stream)
    stream.close()
    saved = _stored(out, tw.recorded_square, range(20))
    assert len(saved) >= 5 and len(saved) < 20
    results = tasks.map(
        partial(tw.recorded_square, str(second)),
        range(20),
        workers=2,
        results_dir=out,
        progress=False,
    )
    assert results == [x * x for x in range(20)]
    assert set(tw.executions(second)) == set(range(20)) - saved
    assert set(tw.executions(second).values()) == {1}


KILLED_PARENT = """
import os, sys
from functools import partial
sys.path.insert(0, {tests!r})
import task_workers as tw
from plait import tasks
fn = partial(tw.kill_parent_at, os.getpid(), {execs!r}, 9)
tasks.map(fn, range(16), workers=2, results_dir={out!r}, progress=False)
"""


@pytest.mark.slow
def test_rerun_after_the_job_is_sigkilled_computes_only_missing_items(tmp_path):
    out, first, second = tmp_path / "out", tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    script = KILLED_PARENT.format(tests=os.path.dirname(__file__), execs=str(first), out=str(out))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert res.returncode == -9, res.stderr.decode()[-2000:]
    saved = _stored(out, tw.kill_parent_at, range(16))
    assert 9 not in saved  # its job died while item 9 was running
    results = tasks.map(
        partial(tw.kill_parent_at, os.getpid(), str(second), -1),  # the same fn, killing nobody
        range(16),
        workers=2,
        results_dir=out,
        progress=False,
    )
    assert results == [x * x for x in range(16)]
    assert set(tw.executions(second)) == set(range(16)) - saved


def test_interrupted_write_is_never_trusted(tmp_path):
    # A write cut short leaves only a dot-named temp file, never a file with a result's name.
    tasks.map(tw.square_pid, range(3), workers=1, results_dir=tmp_path, progress=False)
    name = f"{tasks.fingerprint(tw.square_pid, 1)}.result"
    (tmp_path / name).unlink()
    (tmp_path / f".{name}.999.tmp").write_bytes(b"\x80partial")
    results = tasks.map(tw.square_pid, range(3), workers=1, results_dir=tmp_path, progress=False)
    assert [r for r, _ in results] == [0, 1, 4]
    assert not list(tmp_path.glob(".*.tmp"))


def test_results_dir_refuses_another_function(tmp_path):
    tasks.map(tw.square_pid, range(2), workers=1, results_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="holds results of 'task_workers.square_pid'"):
        tasks.map(partial(tw.raise_on, 9), range(2), results_dir=tmp_path, progress=False)


def test_key_names_results_so_items_may_be_reordered(tmp_path):
    execs = tmp_path / "exec"
    execs.mkdir()
    fn = partial(tw.recorded_square, str(execs))
    tasks.map(fn, [1, 2, 3], workers=1, results_dir=tmp_path / "o", key=str, progress=False)
    again = tasks.map(fn, [3, 4, 1], workers=1, results_dir=tmp_path / "o", key=str, progress=False)
    assert again == [9, 16, 1]
    assert tw.executions(execs) == {1: 1, 2: 1, 3: 1, 4: 1}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"workers": 0}, "workers must be a positive integer or None, got 0"),
        ({"retries": -1}, "retries must be a non-negative integer, got -1"),
        ({"timeout": 0}, "timeout must be positive seconds or None, got 0"),
        ({"executor": "dask"}, "executor must be a concurrent.futures.Executor"),
        ({"key": str}, "key= names stored results; it needs results_dir="),
    ],
)
def test_bad_arguments_are_refused_before_starting(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        tasks.map(tw.square_pid, range(3), progress=False, **kwargs)


def test_unsafe_key_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"key\(item\) for item 0 returned '../x'"):
        tasks.map(tw.square_pid, [0], results_dir=tmp_path, key=lambda x: "../x", progress=False)


def test_empty_input():
    assert tasks.map(tw.square_pid, [], workers=2) == []


def test_any_executor_threads_and_processes(tmp_path):
    expected = [x * x for x in range(10)]
    with cf.ThreadPoolExecutor(2) as ex:
        got = tasks.map(tw.square_pid, range(10), executor=ex, progress=False)
    assert [r for r, _ in got] == expected
    with cf.ProcessPoolExecutor(2) as ex:
        got = tasks.map(
            tw.use_state,
            range(10),
            executor=ex,
            setup=partial(tw.setup_counter, str(tmp_path)),
            progress=False,
        )
    assert [r for r, _ in got] == [x + 100 for x in range(10)]
    setups = collections.Counter(f.name.split("-")[0] for f in tmp_path.iterdir())
    assert set(setups.values()) == {1}  # setup once per executor process, reused
    with cf.ThreadPoolExecutor(2) as ex, pytest.raises(TaskError, match="item 2 .* bad item 2"):
        tasks.map(partial(tw.raise_on, 2), range(4), executor=ex, progress=False)


def test_lambdas_travel_with_cloudpickle():
    pytest.importorskip("cloudpickle")
    assert tasks.map(lambda x: x + 1, range(4), workers=2, progress=False) == [1, 2, 3, 4]


def test_stored_files_are_named_by_item_fingerprint(tmp_path):
    tasks.map(tw.square_pid, range(4), workers=2, results_dir=tmp_path, progress=False)
    names = {p.name for p in Path(tmp_path).iterdir()}
    fingerprints = {f"{tasks.fingerprint(tw.square_pid, i)}.result" for i in range(4)}
    assert len(fingerprints) == 4 and names == fingerprints | {"plait-tasks.json"}


def test_pool_keeps_workers_and_setup_across_jobs(tmp_path):
    with tasks.Pool(2, setup=partial(tw.setup_counter, str(tmp_path))) as pool:
        first = pool.map(tw.use_state, range(10), progress=False)
        second = pool.map(tw.double_with_state, range(10), progress=False)
        # A job that fails drops only the workers busy on it; the next job is unaffected.
        with pytest.raises(TaskError, match="item 2"):
            pool.map(tw.raise_with_state, range(6), progress=False)
        third = pool.map(tw.use_state, range(10), progress=False)
    assert [r for r, _ in first] == [r for r, _ in third] == [x + 100 for x in range(10)]
    assert [r for r, _ in second] == [2 * x + 100 for x in range(10)]
    setups = collections.Counter(int(f.name.split("-")[0]) for f in tmp_path.iterdir())
    assert set(setups.values()) == {1}
    # The first two jobs ran on the same two processes: setup ran twice, not once per job.
    assert {pid for _, pid in first} | {pid for _, pid in second} <= set(setups)
    assert len({pid for _, pid in first + second}) <= 2
    _assert_gone(set(setups))


def test_pool_refuses_per_job_setup():
    with tasks.Pool(1) as pool, pytest.raises(TypeError, match="setup= is fixed"):
        pool.map(tw.square_pid, [1], setup=tw.failing_setup)
