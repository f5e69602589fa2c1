"""plait.tasks on a real Dask cluster (distributed.LocalCluster on loopback): the many-machine path."""

import collections
from functools import partial

import pytest
import task_workers as tw

from plait import tasks
from plait.tasks import TaskError

distributed = pytest.importorskip("distributed")


@pytest.fixture(autouse=True)
def _private_state_dir(tmp_path_factory, monkeypatch):
    # The key that signs stored results lives in a state dir of this test, not in ~/.local.
    monkeypatch.setenv("PLAIT_STATE_DIR", str(tmp_path_factory.mktemp("state")))


@pytest.fixture(scope="module")
def dask_executor():
    cluster = distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
    )
    client = distributed.Client(cluster)
    try:
        yield client.get_executor()
    finally:
        client.close()
        cluster.close()


@pytest.mark.slow
def test_dask_gives_identical_results_with_setup_once_per_worker(dask_executor, tmp_path):
    items = list(range(24))
    setup_dir, local_dir = tmp_path / "setups", tmp_path / "local"
    setup_dir.mkdir()
    local_dir.mkdir()
    local = tasks.map(
        tw.use_state, items, workers=2, setup=partial(tw.setup_counter, str(local_dir))
    )
    on_dask = tasks.map(
        tw.use_state,
        items,
        executor=dask_executor,
        setup=partial(tw.setup_counter, str(setup_dir)),
        progress=False,
    )
    assert [r for r, _ in on_dask] == [r for r, _ in local] == [x + 100 for x in items]
    # Two Dask worker processes did the work, each building its state once.
    per_worker = collections.Counter(pid for _, pid in on_dask)
    setups = collections.Counter(int(f.name.split("-")[0]) for f in setup_dir.iterdir())
    assert set(setups) == set(per_worker) and set(setups.values()) == {1}


@pytest.mark.slow
def test_dask_reports_a_raising_item_and_resumes(dask_executor, tmp_path):
    with pytest.raises(TaskError, match=r"item 5 \(5\) raised ValueError: bad item 5"):
        tasks.map(partial(tw.raise_on, 5), range(8), executor=dask_executor, progress=False)
    execs = tmp_path / "exec"
    execs.mkdir()
    fn = partial(tw.recorded_square, str(execs))
    out = tmp_path / "out"
    tasks.map(fn, range(4), executor=dask_executor, results_dir=out, progress=False)
    assert tasks.map(fn, range(8), executor=dask_executor, results_dir=out) == [
        x * x for x in range(8)
    ]
    assert tw.executions(execs) == {x: 1 for x in range(8)}
