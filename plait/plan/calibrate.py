"""Measure this machine: the ``local`` hardware spec.

What matters for a plait run on CPU workers is measured directly, one thread per worker as
``plait train`` pins them: matrix-multiply FLOP/s at transformer widths, the attention kernel,
element-wise memory bandwidth, the per-op dispatch overhead, an AdamW step per parameter, and
gloo all-reduce and point-to-point latency and bandwidth between two :func:`plait.launch` workers.
The result is cached in ``~/.cache/plait/local-<key>.json`` keyed by torch version and CPU count;
``refresh=True`` (``plait plan --hardware local --recalibrate``) measures again.

Example::

    hw = calibrate_local()          # ~10 s the first time
    hw.gemm_rate(256, "fp32") / 1e9  # GFLOP/s of a 256-wide matmul on one thread
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

from plait.plan.hardware import HardwareSpec, Link

__all__ = ["calibrate_local", "cache_path"]

_WIDTHS = (64, 128, 256, 512, 1024)


def cache_path() -> Path:
    import torch

    root = Path(os.environ.get("PLAIT_CACHE", Path.home() / ".cache" / "plait"))
    key = f"torch{torch.__version__}-cpu{os.cpu_count()}".replace("+", "_")
    return root / f"local-{key}.json"


def calibrate_local(refresh: bool = False, verbose: bool = False) -> HardwareSpec:
    """The ``local`` spec, from the cache or measured now (< 20 s)."""
    path = cache_path()
    if path.exists() and not refresh:
        try:
            return HardwareSpec.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError, KeyError):
            pass  # a stale or corrupt cache is measured again
    spec = _measure(verbose)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(spec.to_dict(), indent=1))
    os.replace(tmp, path)
    return spec


def _layer_scales(spec: HardwareSpec) -> tuple[tuple[float, float], ...]:
    """Time the real ``small`` reference model (forward, loss and backward, one thread) on
    micro-batches of 1, 2 and 4 x 128 tokens against what the cost model estimates for it from
    the measured rates: the factor the rates alone miss (backward kernels, layouts, allocation,
    the embedding, head and loss, and small micro-batches running less efficiently)."""
    import torch

    from plait.models import Transformer, get_config
    from plait.plan.config import ParallelConfig
    from plait.plan.cost import CostModel
    from plait.plan.model_spec import get_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = Transformer(get_config("small"))
    out = []
    try:
        for b in (1, 2, 4):
            x = torch.randint(0, 256, (b, 129))

            def fwd_bwd(x=x):
                model.loss(model(x[:, :-1]), x[:, 1:]).backward()

            measured = _best(fwd_bwd, reps=7, min_time=0.1, typical=True)
            pc = ParallelConfig(microbatch_size=b, dtype="fp32")
            cm = CostModel(get_model("small", seq_len=128), spec, pc, seq=128)
            predicted = sum(cm.compute(k, 0) for k in ("F", "B", "W"))
            out.append((128.0 * b, measured / predicted))
    finally:
        torch.set_num_threads(threads)
    return tuple(out)


def _best(fn, reps: int = 5, min_time: float = 0.02, typical: bool = False) -> float:
    """Best time of ``fn`` (the least disturbed by other processes on a shared machine), or with
    ``typical`` the median over ``reps``."""
    import statistics

    fn()
    times = []
    for _ in range(reps):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_time:
                break
        times.append(dt / n)
    return statistics.median(times) if typical else min(times)


def _compute_rates(verbose: bool) -> dict:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # plait pins one thread per worker
    try:
        tokens = 1024
        gemm = []
        for w in _WIDTHS:
            x, wt = torch.randn(tokens, w), torch.randn(w, 4 * w)
            t = _best(lambda x=x, wt=wt: x @ wt)
            gemm.append((float(w), 2.0 * tokens * w * 4 * w / t))
        b, heads, s, d = 8, 8, 128, 32
        q, k, v = (torch.randn(b, heads, s, d) for _ in range(3))
        sdpa = torch.nn.functional.scaled_dot_product_attention
        t = _best(lambda: sdpa(q, k, v, is_causal=True))
        attention_rate = 4.0 * s * (heads * d) * (b * s) / t  # full-square count, as costed
        big = torch.randn(4 * 1024 * 1024)
        t = _best(lambda: torch.nn.functional.gelu(big))
        bandwidth = 2 * big.numel() * 4 / t  # one read, one write
        tiny = torch.randn(4)
        overhead = _best(lambda: tiny + tiny, min_time=0.005)
        # What `plait train` does after backward, on a real model's parameter list (many
        # tensors, not one): global-norm clipping and an AdamW step.
        from plait.grads import clip_grad_norm
        from plait.models import Transformer, get_config

        params = list(Transformer(get_config("small")).parameters())
        for p in params:
            p.grad = torch.randn_like(p)
        opt = torch.optim.AdamW(params, lr=1e-3)

        def update():
            clip_grad_norm(params, 1.0)
            opt.step()

        t = _best(update, reps=3)
        opt_per_param = t / sum(p.numel() for p in params)
    finally:
        torch.set_num_threads(threads)
    if verbose:
        print("gemm GFLOP/s by width:", {int(w): round(r / 1e9, 1) for w, r in gemm})
    return {
        "gemm_rates": tuple(gemm),
        "attention_rate": attention_rate,
        "memory_bandwidth": bandwidth,
        "kernel_overhead_s": overhead,
        "optimizer_s_per_param": opt_per_param,
    }


def _fixed(fn, reps: int = 3, iters: int = 10, typical: bool = False) -> float:
    """Best (or, with ``typical``, median) mean time over ``reps`` runs of ``iters`` calls: the
    same count on every rank, so collectives and send/receive pairs match up (a time-based loop
    would not)."""
    import statistics

    import torch.distributed as dist

    fn()
    times = []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times) if typical else min(times)


def _comm_worker() -> dict:
    """Runs on two launched workers: gloo all-reduce and send/recv at two sizes each, alone and
    inside a compute loop."""
    import torch
    import torch.distributed as dist

    rank = dist.get_rank()
    out = {}
    # A short matmul chain stands in for the compute between two collectives of a step.
    a, w = torch.randn(256, 256), torch.randn(256, 256)

    def compute():
        for _ in range(4):
            a @ w

    for label, n in (("small", 1), ("large", 1 << 20)):  # 4 B and 4 MiB
        buf = torch.zeros(n)
        dist.barrier()

        def allreduce(buf=buf):
            dist.all_reduce(buf)

        def pingpong(buf=buf):
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            else:
                dist.recv(buf, 0)
                dist.send(buf, 0)

        out[f"allreduce_{label}"] = _fixed(allreduce)
        dist.barrier()
        out[f"p2p_{label}"] = _fixed(pingpong) / 2
        out[f"bytes_{label}"] = 4 * n
    # What an all-reduce costs inside a training step: between bursts of compute the peer's
    # thread must wake and the two must meet, which a loop of collectives alone hides; and gloo's
    # cost is far from linear in size, so it is measured at the sizes steps use.
    # Medians, not minima: a step pays the typical meeting cost, not the luckiest one.
    alone = _fixed(compute, reps=9, iters=20, typical=True)
    curve = []
    for n in (1, 1 << 16, 1 << 17, 1 << 18, 1 << 20, 1 << 22):  # 4 B .. 16 MiB
        buf = torch.zeros(n)

        def step(buf=buf):
            compute()
            dist.all_reduce(buf)

        curve.append((4.0 * n, max(_fixed(step, reps=9, iters=20, typical=True) - alone, 1e-6)))
    out["all_reduce_curve"] = curve
    return out


def _comm_rates() -> Link:
    from plait.launch import launch

    res = launch(_comm_worker, 2, threads_per_worker=1, timeout=120)[0]
    lat = res["p2p_small"]
    bw = (res["bytes_large"] - res["bytes_small"]) / max(res["p2p_large"] - lat, 1e-9)
    curve = tuple(sorted(res["all_reduce_curve"]))
    return Link("gloo-shm", bw, lat, curve), res


def _measure(verbose: bool) -> HardwareSpec:
    import torch

    t0 = time.perf_counter()
    rates = _compute_rates(verbose)
    link, raw = _comm_rates()
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        mem = 8e9
    cores = os.cpu_count() or 1
    peak = max(r for _, r in rates["gemm_rates"])
    spec = HardwareSpec(
        "local",
        {"fp32": peak, "bf16": peak / 4},  # CPUs without AMX run bf16 matmuls slowly
        float(mem),
        rates["memory_bandwidth"],
        devices_per_node=max(64, cores),  # all workers of a local job share one machine
        intra=link,
        inter=link,
        reserved_bytes=0.5e9,
        p2p_blocks_compute=True,  # gloo copies on the worker's own CPU thread
        kernel_overhead_s=rates["kernel_overhead_s"],
        optimizer_s_per_param=rates["optimizer_s_per_param"],
        gemm_rates=rates["gemm_rates"],
        attention_rate=rates["attention_rate"],
        shared_cores=cores,
        source=(
            f"measured on this machine ({cores} CPUs, torch {torch.__version__}) in "
            f"{time.perf_counter() - t0:.1f} s; all-reduce between bursts of compute: "
            + ", ".join(f"{b / 2**10:.0f} KiB {t * 1e3:.2f} ms" for b, t in link.all_reduce_curve)
        ),
    )
    # What the rates alone miss, measured on a real layer (see _layer_scale).
    scales = _layer_scales(spec)
    spec = replace(spec, compute_scale=scales[1][1], compute_scale_by_tokens=scales)
    return spec
