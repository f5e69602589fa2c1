"""Measure this machine: the ``local`` hardware spec.

What matters for a plait run on CPU workers is measured directly, one thread per worker as
``plait train`` pins them: matrix-multiply FLOP/s at transformer widths, the attention kernel,
element-wise memory bandwidth, the per-op dispatch overhead, an AdamW step per parameter, and
gloo all-reduce latency and bandwidth and point-to-point ones (over the transport the pipeline
runtime uses: shared memory between CPU workers on one host) between two :func:`plait.launch`
workers.
Those two workers then time the real reference model at full and at half width, both at once as
in a parallel job, which gives the factors the rates alone miss and how far the slower worker
lags (see :func:`_fit_scales`). Every figure is a mean or median over many turns, interleaved, so
that calibrating again gives the same predictions to within a few per cent.
The result is cached in ``~/.cache/plait/local-<key>.json`` keyed by the measurement's version,
torch version and CPU count;
``refresh=True`` (``plait plan --hardware local --recalibrate``) measures again.

Example::

    hw = calibrate_local()          # ~20 s the first time
    hw.gemm_rate(256, "fp32") / 1e9  # GFLOP/s of a 256-wide matmul on one thread
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

from plait.plan.hardware import HARDWARE_PRESETS, HardwareSpec, Link

__all__ = ["get_hardware", "calibrate_local", "cache_path"]

_WIDTHS = (64, 128, 256, 512, 1024)


def cache_path() -> Path:
    import torch

    root = Path(os.environ.get("PLAIT_CACHE", Path.home() / ".cache" / "plait"))
    # v2: point-to-point measured over the pipeline's shared-memory transport
    key = f"v2-torch{torch.__version__}-cpu{os.cpu_count()}".replace("+", "_")
    return root / f"local-{key}.json"


def calibrate_local(refresh: bool = False, verbose: bool = False) -> HardwareSpec:
    """The ``local`` spec, from the cache or measured now (about 20 s)."""
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


def _narrow(model, t: int) -> None:
    """Cut ``model`` (a :class:`plait.models.Transformer`) in place to what one of ``t`` tensor
    ranks computes: 1/t of the attention heads and MLP columns, 1/t of the vocabulary's logits;
    the norms, residuals and embedding stay whole, as they do on a tensor-parallel rank."""
    from torch import nn

    def cut(lin: nn.Linear, dim: int) -> nn.Linear:
        i, o = lin.in_features, lin.out_features
        return nn.Linear(
            i // t if dim == 1 else i, o // t if dim == 0 else o, bias=lin.bias is not None
        )

    for blk in model.blocks:
        a, m = blk.attn, blk.mlp
        a.q_proj, a.k_proj, a.v_proj = (cut(x, 0) for x in (a.q_proj, a.k_proj, a.v_proj))
        a.o_proj, m.fc_in, m.fc_out = cut(a.o_proj, 1), cut(m.fc_in, 0), cut(m.fc_out, 1)
    model.head.proj = cut(model.head.proj, 0)


_SIZES = (1, 2, 4)  # micro-batches of 128-token sequences the reference model is timed at


def _layer_timings() -> dict[str, float]:
    """Training steps of the real ``small`` reference model on one thread, as ``plait train``
    runs them: 512 tokens per step in micro-batches of 1, 2 or 4 x 128 tokens (forward, loss and
    backward of each, gradients accumulating), then global-norm clipping, AdamW and
    ``zero_grad``. At full width and cut to one of two tensor ranks (:func:`_narrow`), in turns.
    Returns seconds per micro-batch (``"b4t1"``, ``"b4t2"``, ...) and the update's seconds per
    parameter (``"update"``)."""
    import statistics

    import torch

    from plait.models import Transformer, get_config
    from plait.train.grads import clip_grad_norm

    models = {1: Transformer(get_config("small")), 2: Transformer(get_config("small"))}
    _narrow(models[2], 2)
    opts = {t: torch.optim.AdamW(m.parameters(), lr=1e-4) for t, m in models.items()}
    fb: dict[str, list[float]] = {}
    update: list[float] = []
    for b in _SIZES:
        x = torch.randint(0, 128, (4, 129))
        for rep in range(5):
            for t, model in models.items():
                t0 = time.perf_counter()
                for i in range(0, 4, b):
                    model.loss(model(x[i : i + b, :-1]), x[i : i + b, 1:]).backward()
                t1 = time.perf_counter()
                clip_grad_norm(list(model.parameters()), 1.0)
                opts[t].step()
                opts[t].zero_grad(set_to_none=True)
                if rep:  # the first turn warms up
                    fb.setdefault(f"b{b}t{t}", []).append((t1 - t0) * b / 4)
                    if t == 1:
                        n = sum(p.numel() for p in model.parameters())
                        update.append((time.perf_counter() - t1) / n)
    out = {k: statistics.median(v) for k, v in fb.items()}
    out["update"] = statistics.median(update)
    return out


def _fit_scales(spec: HardwareSpec, timings: dict[str, float]) -> tuple[tuple, tuple]:
    """Solve, per micro-batch size, for the two factors the measured rates miss: one on the work
    that tensor parallelism divides (backward kernels and layouts, small micro-batches running
    less efficiently) and one on the rest of a layer (norms, residuals, per-operation overheads),
    which barely shrinks when the layer is split: two unknowns from the full and the half-width
    timings of :func:`_layer_timings`. Returns both as ``(tokens, factor)`` pairs."""
    from plait.config import ParallelConfig
    from plait.plan.cost import CostModel
    from plait.plan.model_spec import get_model

    split, other = [], []
    for b in _SIZES:
        rows = []
        for t in (1, 2):
            pc = ParallelConfig(tp=t, microbatch_size=b, dtype="fp32")
            cm = CostModel(get_model("small", seq_len=128), spec, pc, seq=128)
            parts = [cm.layer_parts()] * cm.model.layers + [cm.head_parts(), cm.embed_parts()]
            s_ = sum(p[k][0] for p in parts for k in ("F", "B", "W"))
            o_ = sum(p[k][1] for p in parts for k in ("F", "B", "W"))
            rows.append((s_, o_, timings[f"b{b}t{t}"]))
        (s1, o1, m1), (s2, o2, m2) = rows
        det = s1 * o2 - s2 * o1
        a = (m1 * o2 - m2 * o1) / det if det else 0.0
        c = (s1 * m2 - s2 * m1) / det if det else 0.0
        if not (a > 0 and c > 0):  # noise swamped the difference: one factor for both
            a = c = m1 / (s1 + o1)
        split.append((128.0 * b, a))
        other.append((128.0 * b, c))
    return tuple(split), tuple(other)


def _best(fn, reps: int = 5, min_time: float = 0.02) -> float:
    """Best time of ``fn`` over ``reps`` runs of at least ``min_time``: the least disturbed by
    other processes on a shared machine (for kernel rates, which the layer timings then scale)."""
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
    return min(times)


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
    finally:
        torch.set_num_threads(threads)
    if verbose:
        print("gemm GFLOP/s by width:", {int(w): round(r / 1e9, 1) for w, r in gemm})
    return {
        "gemm_rates": tuple(gemm),
        "attention_rate": attention_rate,
        "memory_bandwidth": bandwidth,
        "kernel_overhead_s": overhead,
    }


def _fixed(fn, reps: int = 3, iters: int = 10) -> float:
    """Best mean time over ``reps`` runs of ``iters`` calls: the same count on every rank, so
    collectives and send/receive pairs match up (a time-based loop would not)."""
    import torch.distributed as dist

    fn()
    times = []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        times.append((time.perf_counter() - t0) / iters)
    return min(times)


def _comm_worker() -> dict:
    """Runs on two launched workers: gloo all-reduce and send/recv at two sizes each, alone and
    inside a compute loop, then the reference model's compute (:func:`_layer_timings`)."""
    import torch
    import torch.distributed as dist

    from plait.pipeline import shm

    rank = dist.get_rank()
    out = {}
    # Point-to-point as the pipeline runtime sends it: through shared-memory rings between CPU
    # workers on one host (plait.pipeline.shm), else the process group.
    p2p, _ = shm.connect({(0, 1, 0), (1, 0, 0)}, rank, lambda r: r)
    p2p = p2p or dist.group.WORLD
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
                p2p.send([buf], 1, 0).wait()
                p2p.recv([buf], 1, 0).wait()
            else:
                p2p.recv([buf], 0, 0).wait()
                p2p.send([buf], 0, 0).wait()

        out[f"allreduce_{label}"] = _fixed(allreduce)
        dist.barrier()
        out[f"p2p_{label}"] = _fixed(pingpong) / 2
        out[f"bytes_{label}"] = 4 * n
    # What an all-reduce costs inside a training step: between bursts of compute the peer's
    # thread must wake and the two must meet, which a loop of collectives alone hides; and gloo's
    # cost is far from linear in size, so it is measured at the sizes steps use. Each round does
    # it both ways a step does: blocking (a forward's all-reduce) and started before compute that
    # it should hide behind (a backward's), which on shared cores it does not. Single calls have
    # a heavy tail (a thread left waiting for a time slice), and a step pays the mean of many, so
    # the figure is the mean over every round; sizes take turns, so a slow spell hits all alike.
    sizes = (0, 1, 1 << 16, 1 << 17, 1 << 18, 1 << 20, 1 << 22, 1 << 24)  # none, 4 B .. 64 MiB
    bufs = {n: torch.zeros(max(n, 1)) for n in sizes}
    total = dict.fromkeys(sizes, 0.0)
    count = dict.fromkeys(sizes, 0)

    def round_trip(n: int) -> None:
        compute()
        if n:
            dist.all_reduce(bufs[n])
            work = dist.all_reduce(bufs[n], async_op=True)
        compute()
        if n:
            work.wait()

    for n in sizes:
        round_trip(n)  # warm every buffer and connection
    for turn in range(20):
        for n in sizes:
            # About 30 ms per turn; the big sizes, whose cost is bandwidth, not waiting, take
            # fewer turns. Every rank follows the same fixed plan, so the collectives match.
            if turn >= (20 if n <= 1 << 18 else 8 if n <= 1 << 22 else 3):
                continue
            iters = max(2, min(20, int(0.03 / (0.002 + n * 4 / 1e9))))
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(iters):
                round_trip(n)
            total[n] += time.perf_counter() - t0
            count[n] += iters
    alone = total[0] / count[0]
    # The reference model's compute, on both workers at once as in every multi-worker job.
    dist.barrier()
    out["layer_times"] = _layer_timings()
    out["all_reduce_curve"] = _monotone(
        [(4.0 * n, (total[n] / count[n] - alone) / 2, count[n]) for n in sizes if n]
    )
    return out


def _monotone(points: list[tuple[float, float, int]]) -> list[tuple[float, float]]:
    """``(bytes, seconds, samples)`` made non-decreasing in size by pooling neighbours that
    disagree (weighted by samples): a bigger message never costs less, so such a dip is noise, and
    pooling it averages the noise away instead of keeping it."""
    blocks: list[list[float]] = []  # [seconds, weight, first index, last index]
    for i, (_, t, w) in enumerate(points):
        blocks.append([t, float(w), i, i])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (t1, w1, a, _), (t2, w2, _, b) = blocks[-2], blocks.pop()
            blocks[-1] = [(t1 * w1 + t2 * w2) / (w1 + w2), w1 + w2, a, b]
    out = []
    for t, _, a, b in blocks:
        out += [(points[i][0], max(t, 1e-6)) for i in range(a, b + 1)]
    return out


def _comm_rates() -> tuple[Link, dict]:
    from plait.launch import launch

    both = launch(_comm_worker, 2, threads_per_worker=1, timeout=120)
    res = dict(both[0])
    # Identical workers differ by several per cent from process to process on a shared machine
    # (memory layout, placement), and a job whose workers wait for each other every step runs
    # at the slowest one's pace: the mean fits the scales, the slower over the mean is that pace.
    keys = both[0]["layer_times"]
    res["layer_times"] = {k: sum(r["layer_times"][k] for r in both) / 2 for k in keys}
    res["straggler_factor"] = sum(
        max(r["layer_times"][k] for r in both) / res["layer_times"][k] for k in keys
    ) / len(keys)
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
        optimizer_s_per_param=raw["layer_times"]["update"],
        gemm_rates=rates["gemm_rates"],
        attention_rate=rates["attention_rate"],
        shared_cores=cores,
        straggler_factor=raw["straggler_factor"],
        source=(
            f"measured on this machine ({cores} CPUs, torch {torch.__version__}) in "
            f"{time.perf_counter() - t0:.1f} s; all-reduce between bursts of compute: "
            + ", ".join(f"{b / 2**10:.0f} KiB {t * 1e3:.2f} ms" for b, t in link.all_reduce_curve)
        ),
    )
    # What the rates alone miss, measured on the real model (see _fit_scales).
    split, other = _fit_scales(spec, raw["layer_times"])
    return replace(
        spec,
        compute_scale=split[1][1],
        compute_scale_by_tokens=split,
        elementwise_scale_by_tokens=other,
    )


def get_hardware(name: str, refresh: bool = False, **overrides) -> HardwareSpec:
    """A hardware preset by name; ``local`` measures this machine (cached after the first time).

    Example::

        get_hardware("a100-80gb")
        get_hardware("local")   # ~10 s the first time, then read from ~/.cache/plait
    """
    if name == "local":
        spec = calibrate_local(refresh=refresh)
    elif name in HARDWARE_PRESETS:
        spec = HARDWARE_PRESETS[name]
    else:
        raise ValueError(
            f"unknown hardware {name!r}; presets are {sorted(HARDWARE_PRESETS) + ['local']}"
        )
    return replace(spec, **overrides) if overrides else spec
