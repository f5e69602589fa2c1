"""plait.tasks.map against a single process, joblib and Dask on the same CPU-bound job.

The job: score ``--items`` batches with the reference transformer (``--model``), one thread per
process, each worker building the model once. ``plait`` is ``plait.tasks.map`` as a user calls
it (its workers start with the call); ``plait_pool`` a ``plait.tasks.Pool`` kept warm across
rounds, as joblib's and Dask's workers are. Every system runs the same function on the same
items in one run; rounds are interleaved (order rotated each round) so background load hits all
alike, and each system's median round counts. The last line prints the ratios:

    .venv/bin/python benchmarks/tasks_vs_others.py            # 2 workers
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from plait import tasks
from plait.models import Transformer, get_config

_MODEL: dict = {}


def build(model: str) -> Transformer:
    torch.set_num_threads(1)
    return Transformer(get_config(model), seed=0).eval()


def cached(model: str) -> Transformer:
    """joblib and Dask have no per-worker setup: a module-level cache plays its part."""
    if model not in _MODEL:
        _MODEL[model] = build(model)
    return _MODEL[model]


@torch.no_grad()
def score(model: Transformer, item: tuple[int, int, int]) -> float:
    """One CPU-bound item: a forward pass on a batch drawn from the item's seed."""
    seed, batch, seq_len = item
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (batch, seq_len + 1), generator=g)
    return model.loss(model(x[:, :-1]), x[:, 1:]).item()


def score_cached(model_name: str, item) -> float:
    return score(cached(model_name), item)


def cpu_seconds() -> float:
    """CPU time of this process and every descendant, live or reaped (workers, forkserver,
    Dask nannies, loky workers). On a shared machine this, unlike wall time, does not depend on
    how busy the neighbours are: it is what each system spends to do the job.
    """
    import psutil

    total = 0.0
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        # children_*: CPU of descendants already reaped by this process (e.g. by the forkserver).
        total += t.user + t.system + t.children_user + t.children_system
    return total


def burn(n: int) -> int:
    s = 0
    for i in range(n):
        s += i
    return s


def parallel_ceiling(workers: int, repeats: int = 5) -> float:
    """What this machine lets ``workers`` processes gain at all, right now: pure-Python units
    serially vs on a bare ``multiprocessing`` pool (no library involved). Shared machines (other
    jobs, Linux autogroup fair-sharing by session) can cap this far below ``workers``.
    """
    import multiprocessing as mp

    units = [2_000_000] * (2 * workers)
    ratios = []
    with mp.get_context("fork").Pool(workers) as pool:
        pool.map(burn, [1] * workers)
        for _ in range(repeats):
            t0 = time.perf_counter()
            [burn(u) for u in units]
            serial = time.perf_counter() - t0
            t0 = time.perf_counter()
            pool.map(burn, units, chunksize=1)
            ratios.append(serial / (time.perf_counter() - t0))
    return statistics.median(ratios)


def run_single(model_name, items):
    torch.set_num_threads(1)
    model = build(model_name)
    return [score(model, it) for it in items]


def run_plait(model_name, items, workers):
    from functools import partial

    return tasks.map(
        score, items, workers=workers, setup=partial(build, model_name), progress=False
    )


def run_plait_pool(pool, items):
    return pool.map(score, items, progress=False)


def run_joblib(model_name, items, workers):
    from joblib import Parallel, delayed

    return Parallel(n_jobs=workers)(delayed(score_cached)(model_name, it) for it in items)


def run_dask(client, model_name, items):
    futures = client.map(score_cached, [model_name] * len(items), items, pure=False)
    return client.gather(futures)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--model", default="small")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--glibc-defaults", action="store_true", help="do not tune malloc")
    args = ap.parse_args()
    if not args.glibc_defaults:
        # The same allocator settings for every system: plait's workers apply them themselves
        # (plait.alloc); the env reaches joblib's and Dask's workers, and this process runs the
        # single-process baseline.
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(32 << 20)
        os.environ["MALLOC_TRIM_THRESHOLD_"] = str(1 << 30)
        os.environ["MALLOC_TOP_PAD_"] = str(64 << 20)
        from plait.alloc import keep_freed_memory

        keep_freed_memory()
    else:
        os.environ["PLAIT_GLIBC_DEFAULTS"] = "1"
    import distributed

    items = [(i, args.batch, args.seq_len) for i in range(args.items)]
    ceiling_before = parallel_ceiling(args.workers)
    cluster = distributed.LocalCluster(
        n_workers=args.workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
    )
    client = distributed.Client(cluster)
    from functools import partial

    pool = tasks.Pool(args.workers, setup=partial(build, args.model))
    systems = {
        "single": lambda: run_single(args.model, items),
        "plait": lambda: run_plait(args.model, items, args.workers),
        "plait_pool": lambda: run_plait_pool(pool, items),
        "joblib": lambda: run_joblib(args.model, items, args.workers),
        "dask": lambda: run_dask(client, args.model, items),
    }
    try:
        reference = None
        for name, fn in systems.items():  # warm-up: start pools, import, check agreement
            out = fn()
            reference = reference or out
            assert max(abs(a - b) for a, b in zip(out, reference)) < 1e-5, name
        times: dict[str, list[float]] = {name: [] for name in systems}
        cpu: dict[str, list[float]] = {name: [] for name in systems}
        names = list(systems)
        for r in range(args.rounds):
            # Rotate the order each round so no system always runs after the same neighbour.
            for name in names[r % len(names) :] + names[: r % len(names)]:
                fn = systems[name]
                c0, t0 = cpu_seconds(), time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(cpu_seconds() - c0)
            print(f"round {r}: " + "  ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()))
    finally:
        pool.close()
        client.close()
        cluster.close()
    # The median round: robust to the bursts of load a shared machine has (best is also shown).
    rate = {n: args.items / statistics.median(t) for n, t in times.items()}
    for n, t in times.items():
        print(
            f"{n:10s} best {min(t):.2f}s median {statistics.median(t):.2f}s "
            f"= {rate[n]:.1f} items/s (median); "
            f"CPU {1000 * statistics.median(cpu[n]) / args.items:.1f} ms/item"
        )
    ceiling = statistics.median([ceiling_before, parallel_ceiling(args.workers)])
    print(
        f"parallel ceiling of this machine now (bare multiprocessing, pure Python): "
        f"{ceiling:.2f}x with {args.workers} workers; load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}; {args.items} items of "
        f"{args.model} forward on ({args.batch}, {args.seq_len}), {args.workers} workers"
    )
    print(
        f"ratios: plait/single {rate['plait'] / rate['single']:.2f}x  "
        f"plait/joblib {rate['plait'] / rate['joblib']:.2f}x  "
        f"plait/dask {rate['plait'] / rate['dask']:.2f}x  "
        f"(warm Pool: /single {rate['plait_pool'] / rate['single']:.2f}x  "
        f"/joblib {rate['plait_pool'] / rate['joblib']:.2f}x  "
        f"/dask {rate['plait_pool'] / rate['dask']:.2f}x)"
    )


if __name__ == "__main__":
    main()
