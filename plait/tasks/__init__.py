"""Task parallelism: independent work items on a pool of workers that each hold a whole model.

The right choice when the model fits one worker and the work is many independent requests,
batches or jobs: workers never talk while working, so throughput scales with workers.

    plait.tasks.map(fn, items, workers=2)          # results in input order
    plait.tasks.stream(fn, items, workers=2)       # (index, result) as they finish
    plait.tasks.map(fn, items, setup=load_model)   # fn(model, item); setup once per worker
    plait.tasks.map(fn, items, results_dir="out")  # resumable: a rerun computes what is missing
    plait.tasks.map(fn, items, executor=distributed.Client(addr).get_executor())  # many machines
    with plait.tasks.Pool(2, setup=load_model) as pool:  # workers (and models) kept across jobs
        pool.map(fn, items)

Files: ``api`` (map, stream, Pool), ``pool`` (the local process pool: dispatch, deaths, retries),
``executor`` (any concurrent.futures.Executor, Dask included), ``worker`` (what runs in a worker),
``store`` (atomic, signed results keyed by item fingerprint), ``errors``.
"""

from plait.tasks.api import Pool, ResultsRejectedWarning, map, stream
from plait.tasks.errors import SetupError, TaskError, WorkerLostError
from plait.tasks.pool import LocalPool
from plait.tasks.store import ResultStore, fingerprint

__all__ = [
    "map",
    "stream",
    "Pool",
    "TaskError",
    "WorkerLostError",
    "SetupError",
    "LocalPool",
    "ResultStore",
    "ResultsRejectedWarning",
    "fingerprint",
]
