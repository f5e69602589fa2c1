"""plait.tasks refuses what it cannot do safely: crafted result files, stale results of changed
items, unpicklable functions and items, bad arguments; each in one line, before any worker."""

import concurrent.futures as cf
import json
import os
import pickle
import stat
import subprocess
import sys
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import task_workers as tw
import torch

from plait import tasks
from plait.tasks import ResultsRejectedWarning
from plait.tasks.pool import LocalPool


@pytest.fixture(autouse=True)
def state_dir(tmp_path_factory, monkeypatch):
    # The key that signs stored results lives in a state dir of this test, not in ~/.local.
    path = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("PLAIT_STATE_DIR", str(path))
    return path


@pytest.fixture
def no_workers(monkeypatch):
    """Fail the test if any local worker process is started."""
    started = []

    def refuse(self):
        started.append(True)
        raise AssertionError("a worker was started")

    monkeypatch.setattr(LocalPool, "_start", refuse)
    return started


def _result_file(out, fn, item) -> Path:
    return Path(out) / f"{tasks.fingerprint(fn, item)}.result"


class _Exploit:
    """Unpickling this creates ``marker``: what an attacker's results file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


# ---- crafted results files ---------------------------------------------------------------------


def test_crafted_results_files_never_run_code_and_are_recomputed(tmp_path):
    out, marker, execs = tmp_path / "out", tmp_path / "pwned", tmp_path / "exec"
    execs.mkdir()
    fn = partial(tw.recorded_square, str(execs))
    assert tasks.map(fn, range(5), workers=1, results_dir=out, progress=False) == [0, 1, 4, 9, 16]
    evil = pickle.dumps(_Exploit(marker))
    # Item 2: a bare pickle under its name. Item 3: plait's header with a forged tag. Item 4: a
    # valid file of item 0 renamed to item 4's name. And a file under the old index-keyed name.
    _result_file(out, tw.recorded_square, 2).write_bytes(evil)
    valid = _result_file(out, tw.recorded_square, 3).read_bytes()
    head = len(b"plait-task-result-2\n")
    _result_file(out, tw.recorded_square, 3).write_bytes(valid[:head] + os.urandom(32) + evil)
    _result_file(out, tw.recorded_square, 4).write_bytes(
        _result_file(out, tw.recorded_square, 0).read_bytes()
    )
    (out / "00000001.pkl").write_bytes(evil)
    for f in execs.iterdir():
        f.unlink()

    with pytest.warns(ResultsRejectedWarning, match=r"3 stored result\(s\) failed verification"):
        again = tasks.map(fn, range(5), workers=1, results_dir=out, progress=False)
    assert not marker.exists()  # nothing of the crafted files was unpickled
    assert again == [0, 1, 4, 9, 16]
    assert tw.executions(execs) == {2: 1, 3: 1, 4: 1}  # recomputed; 0 and 1 reused

    # The recomputed results were written back signed: a third run trusts all five.
    for f in execs.iterdir():
        f.unlink()
    assert tasks.map(fn, range(5), workers=1, results_dir=out, progress=False) == again
    assert tw.executions(execs) == {}
    assert not marker.exists()


def test_results_signed_with_another_users_key_are_recomputed(tmp_path, monkeypatch):
    out, execs = tmp_path / "out", tmp_path / "exec"
    execs.mkdir()
    fn = partial(tw.recorded_square, str(execs))
    tasks.map(fn, range(3), workers=1, results_dir=out, progress=False)
    monkeypatch.setenv("PLAIT_STATE_DIR", str(tmp_path / "someone-else"))
    with pytest.warns(ResultsRejectedWarning, match=r"3 stored result"):
        assert tasks.map(fn, range(3), workers=1, results_dir=out, progress=False) == [0, 1, 4]
    assert tw.executions(execs) == {0: 2, 1: 2, 2: 2}


def test_the_signing_key_is_private_and_refused_otherwise(tmp_path, state_dir):
    tasks.map(tw.square_pid, [1], workers=1, results_dir=tmp_path / "a", progress=False)
    key = state_dir / "tasks-results.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and key.stat().st_size == 32
    assert not list((tmp_path / "a").glob("*.key"))  # never stored with the results
    key.chmod(0o644)
    with pytest.raises(PermissionError, match="must be a 32-byte file only you can read") as info:
        tasks.map(tw.square_pid, [1], workers=1, results_dir=tmp_path / "a", progress=False)
    _one_line(info)
    key.chmod(0o600)
    state_dir.chmod(0o777)
    with pytest.raises(PermissionError, match="writable by other users") as info:
        tasks.map(tw.square_pid, [1], workers=1, results_dir=tmp_path / "a", progress=False)
    _one_line(info)
    state_dir.chmod(0o700)


# ---- fingerprints ------------------------------------------------------------------------------


def test_a_changed_item_is_recomputed_and_no_stale_result_is_returned(tmp_path):
    out, execs = tmp_path / "out", tmp_path / "exec"
    execs.mkdir()
    fn = partial(tw.recorded_square, str(execs))
    items = [0, 1, 2, 3, 4, 5]
    assert tasks.map(fn, items, workers=2, results_dir=out, progress=False) == [0, 1, 4, 9, 16, 25]
    changed = [0, 1, 2, 30, 4, 5]  # same length, one item different at the same index
    assert tasks.map(fn, changed, workers=2, results_dir=out, progress=False) == [
        0,
        1,
        4,
        900,
        16,
        25,
    ]
    assert tw.executions(execs) == {0: 1, 1: 1, 2: 1, 3: 1, 4: 1, 5: 1, 30: 1}
    # Reordered and extended: only the new item runs, each result follows its item.
    assert tasks.map(fn, [5, 30, 7, 0], workers=2, results_dir=out, progress=False) == [
        25,
        900,
        49,
        0,
    ]
    assert tw.executions(execs) == {0: 1, 1: 1, 2: 1, 3: 1, 4: 1, 5: 1, 30: 1, 7: 1}


FINGERPRINT = """
import sys
sys.path.insert(0, {tests!r})
import numpy as np, torch, task_workers as tw
from plait.tasks import fingerprint
item = {item}
print(fingerprint(tw.square_pid, item))
"""

ITEM = (
    "{'ids': torch.arange(6, dtype=torch.int32).reshape(2, 3), 'names': {'b', 'a', 'c'}, "
    "'point': tw.Point(3, frozenset({'x', 'y'})), 'array': np.ones((2, 2)), 'x': (1, 2.5, None)}"
)


def test_fingerprints_are_stable_across_processes_and_hash_seeds():
    local = tasks.fingerprint(
        tw.square_pid,
        eval(ITEM, {"torch": torch, "np": np, "tw": tw}),  # noqa: S307 - the same literal
    )
    script = FINGERPRINT.format(tests=os.path.dirname(__file__), item=ITEM)
    for seed in ("0", "1"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        res = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
        )
        assert res.returncode == 0, res.stderr[-2000:]
        assert res.stdout.strip() == local


def test_fingerprints_read_content_type_and_function():
    fp = partial(tasks.fingerprint, tw.square_pid)
    assert len({fp(1), fp(1.0), fp(True), fp("1"), fp((1,)), fp([1])}) == 6
    assert fp({"a": 1, "b": 2}) == fp({"b": 2, "a": 1})  # dict order does not matter
    assert fp([1, 2]) != fp([2, 1])  # list order does
    t = torch.arange(4.0)
    assert fp(t) == fp(t.clone()) == fp(t.reshape(2, 2).t().t().reshape(4))
    assert fp(t) != fp(t.double()) and fp(t) != fp(t.reshape(2, 2))
    assert fp(t) != fp(t + 1e-6)
    assert fp(np.arange(3)) != fp(np.arange(3).astype(np.int32))
    assert tasks.fingerprint(tw.square_pid, 1) != tasks.fingerprint(tw.recorded_square, 1)
    # A partial is named by its function (its arguments are the caller's business).
    assert tasks.fingerprint(partial(tw.recorded_square, "a"), 1) == tasks.fingerprint(
        tw.recorded_square, 1
    )


def test_an_item_that_cannot_be_fingerprinted_is_refused_and_key_is_the_way_out(
    tmp_path, no_workers
):
    items = [tw.Opaque(1), tw.Opaque(2)]
    with pytest.raises(ValueError, match=r"item 0 \(<task_workers.Opaque") as info:
        tasks.map(tw.opaque_square, items, results_dir=tmp_path / "o", progress=False)
    text = _one_line(info)
    assert "a task_workers.Opaque" in text and "pass key= to name each result" in text
    cycle: list = [1]
    cycle.append(cycle)
    with pytest.raises(ValueError, match=r"item 0 .*it contains itself") as info:
        tasks.map(tw.square_pid, [cycle], results_dir=tmp_path / "c", progress=False)
    _one_line(info)
    assert not no_workers


def test_key_names_results_of_items_without_a_fingerprint(tmp_path):
    items = [tw.Opaque(1), tw.Opaque(2)]
    out = tmp_path / "o"
    got = tasks.map(tw.opaque_square, items, workers=1, results_dir=out, key=lambda o: f"n{o.n}")
    assert got == [1, 4]
    assert {p.name for p in out.glob("*.result")} == {"n1.result", "n2.result"}


# ---- what cannot travel to a worker ------------------------------------------------------------


def _closure_over_a_lock():
    lock = threading.Lock()

    def locked_square(x):
        with lock:
            return x * x

    return locked_square


def test_unpicklable_fn_is_refused_before_any_worker_starts(no_workers):
    with pytest.raises(TypeError) as info:
        tasks.map(_closure_over_a_lock(), range(3), workers=2, progress=False)
    text = _one_line(info)
    assert "fn=test_tasks_safety._closure_over_a_lock.<locals>.locked_square" in text
    assert "cannot pickle '_thread.lock'" in text and "module-level function" in text
    lock = threading.Lock()
    with pytest.raises(TypeError, match=r"fn=task_workers.recorded_square cannot be sent"):
        tasks.map(partial(tw.recorded_square, lock), range(3), workers=2, progress=False)
    assert not no_workers


def test_unpicklable_setup_is_refused_before_any_worker_starts(no_workers):
    lock = threading.Lock()
    with pytest.raises(TypeError, match=r"^setup=.*cannot pickle '_thread.lock'") as info:
        tasks.map(tw.use_state, range(3), workers=2, setup=lambda: lock, progress=False)
    _one_line(info)
    with pytest.raises(TypeError, match=r"^setup=.*cannot pickle '_thread.lock'") as info:
        tasks.Pool(2, setup=lambda: lock)
    _one_line(info)
    assert not no_workers


def test_unpicklable_item_is_refused_before_any_worker_starts(no_workers):
    items = [1, 2, threading.Lock(), 4]
    with pytest.raises(TypeError, match=r"^item 2 \(<unlocked _thread.lock") as info:
        tasks.map(tw.square_pid, items, workers=2, progress=False)
    text = _one_line(info)
    assert "cannot be sent to worker processes" in text and "items must be picklable" in text
    with pytest.raises(TypeError, match=r"^item 1 \(<generator"):
        tasks.map(tw.square_pid, [1, (x for x in range(2))], workers=2, progress=False)
    assert not no_workers


def test_nothing_is_pickled_for_a_thread_pool_and_lambdas_reach_process_pools():
    with cf.ThreadPoolExecutor(2) as ex:
        got = tasks.map(_closure_over_a_lock(), [3, 4], executor=ex, progress=False)
    assert got == [9, 16]
    pytest.importorskip("cloudpickle")
    with cf.ProcessPoolExecutor(1) as ex:  # fn travels as plait's pickled bytes
        assert tasks.map(lambda x: x + 1, range(3), executor=ex, progress=False) == [1, 2, 3]


# ---- bad arguments -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn, items, kwargs, message",
    [
        (tw.square_pid, 5, {}, "items must be an iterable of work items"),
        (tw.square_pid, "abc", {}, r"got str 'abc' \(for one item, pass \[item\]\)"),
        (3, [1], {}, "fn must be callable, got 3"),
        (tw.square_pid, [1], {"setup": 3}, "setup must be callable or None, got 3"),
        (tw.square_pid, [1], {"timeout": "5"}, "timeout must be positive seconds or None"),
        (tw.square_pid, [1], {"workers": True}, "workers must be a positive integer"),
        (tw.square_pid, [1], {"threads_per_worker": 0}, "threads_per_worker must be a positive"),
        (tw.square_pid, [1], {"threads_per_worker": True}, "threads_per_worker must be a positive"),
        (tw.square_pid, [1], {"retries": 1.5}, "retries must be a non-negative integer"),
    ],
)
def test_bad_arguments_are_refused_in_one_line(fn, items, kwargs, message, no_workers):
    with pytest.raises((TypeError, ValueError), match=message) as info:
        tasks.map(fn, items, progress=False, **kwargs)
    _one_line(info)
    assert not no_workers


def test_bad_results_dir_and_keys_are_refused_in_one_line(tmp_path, no_workers):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match=r"results_dir '.*file' is not a writable directory"):
        tasks.map(tw.square_pid, [1], results_dir=a_file, progress=False)
    with pytest.raises(ValueError, match=r"returned 'a' for both item 0 and item 2") as info:
        tasks.map(tw.square_pid, ["a1", "b", "a2"], results_dir=tmp_path / "k", key=lambda s: s[0])
    _one_line(info)
    with pytest.raises(TypeError, match="key must be a function of an item"):
        tasks.map(tw.square_pid, [1], results_dir=tmp_path / "k", key="name", progress=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "plait-tasks.json").write_text("{not json")
    with pytest.raises(ValueError, match="has an unreadable plait-tasks.json") as info:
        tasks.map(tw.square_pid, [1], results_dir=broken, progress=False)
    _one_line(info)
    assert not no_workers


def test_an_old_index_keyed_results_dir_is_recomputed_not_trusted(tmp_path):
    out, execs = tmp_path / "out", tmp_path / "exec"
    out.mkdir()
    execs.mkdir()
    (out / "plait-tasks.json").write_text(
        json.dumps({"fn": "task_workers.recorded_square", "format": 1})
    )
    (out / "00000000.pkl").write_bytes(pickle.dumps(12345))  # a stale result for index 0
    fn = partial(tw.recorded_square, str(execs))
    assert tasks.map(fn, [2], workers=1, results_dir=out, progress=False) == [4]
    assert tw.executions(execs) == {2: 1}
    assert json.loads((out / "plait-tasks.json").read_text())["format"] == 2
