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
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--rounds", type=int, default=11)
    args = ap.parse_args()
    import distributed

    items = [(i, args.batch, args.seq_len) for i in range(args.items)]
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
        names = list(systems)
        for r in range(args.rounds):
            # Rotate the order each round so no system always runs after the same neighbour.
            for name in names[r % len(names) :] + names[: r % len(names)]:
                fn = systems[name]
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
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
            f"= {rate[n]:.1f} items/s (median)"
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
