"""plait's shared-memory point-to-point against gloo's, side by side: two CPU workers, one host.

The pipeline runtime sends activations and gradients between CPU ranks on one host through
shared-memory rings (``plait.pipeline.shm``) instead of gloo's loopback TCP. This times a round
trip (rank 0 sends, rank 1 sends the same bytes back) at the sizes pipeline messages have, each
round alternating gloo (``ProcessGroup.send``/``recv``, what ``dist.send`` calls) and plait's
transport on the same buffers, one thread per worker; medians over the rounds, and the ratio.

Usage::

    python benchmarks/p2p_vs_gloo.py
    python benchmarks/p2p_vs_gloo.py --rounds 400
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from plait import launch  # noqa: E402
from plait.pipeline import shm  # noqa: E402

SIZES = (16 << 10, 256 << 10, 4 << 20)  # tiny's and small's activations, and a large one


def worker(rounds: int) -> dict:
    torch.set_num_threads(1)
    rank, peer = dist.get_rank(), 1 - dist.get_rank()
    ring, why = shm.connect({(0, 1, 0), (1, 0, 0)}, rank, lambda r: r)
    if ring is None:
        raise RuntimeError(f"no shared-memory transport here: {why}")
    gloo = dist.group.WORLD
    out = {}
    for n in SIZES:
        buf = torch.zeros(n // 4)
        times: dict = {"gloo": [], "plait": []}

        def trip(p2p, buf=buf) -> float:
            t0 = time.perf_counter()
            if rank == 0:
                p2p.send([buf], peer, 0).wait()
                p2p.recv([buf], peer, 0).wait()
            else:
                p2p.recv([buf], peer, 0).wait()
                p2p.send([buf], peer, 0).wait()
            return time.perf_counter() - t0

        for k in range(rounds + 10):  # 10 warm-up rounds
            order = [("gloo", gloo), ("plait", ring)]
            for name, p2p in order if k % 2 else order[::-1]:
                t = trip(p2p)
                if k >= 10:
                    times[name].append(t)
        out[n] = {name: statistics.median(v) for name, v in times.items()}
    ring.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=200)
    args = ap.parse_args()
    print(
        f"machine: {os.cpu_count()} CPUs, {platform.machine()}, torch {torch.__version__}, "
        f"2 workers, 1 thread each, {args.rounds} round trips per size, alternating"
    )
    res = launch(worker, 2, args.rounds, threads_per_worker=1)[0]
    ratios = []
    for n in SIZES:
        g, p = res[n]["gloo"], res[n]["plait"]
        ratios.append(f"{n >> 10} KB {p / g:.2f}")
        print(
            f"  {n >> 10:5d} KB round trip: gloo {g * 1e6:8.1f} us   plait shm {p * 1e6:8.1f} us"
            f"   ratio {p / g:.2f}"
        )
    print("median round-trip ratio plait/gloo: " + ", ".join(ratios))


if __name__ == "__main__":
    main()
