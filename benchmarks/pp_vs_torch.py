"""plait's pipeline runtime against torch.distributed.pipelining, side by side, p = 2 on CPU/gloo.

Same model (the same stage modules, shared), same data, same micro-batches; one thread per rank.
Each measured step alternates plait and PyTorch (which goes first alternates too), with a barrier
before and after so a step's time is the slowest rank's. Schedules: GPipe, 1F1B, interleaved 1F1B
(v = 2) and DualPipeV (v = 2, V placement) in both; plait's zb-h1 and zb-v alongside 1F1B for the
bubble comparison, built for the (F, B, W) costs measured on this machine (a few zb-v steps,
``Timeline.schedule_costs``), as ``plait train --schedule-costs`` builds them.

It also prints the bubble check from plait's measured timelines: at p = 2, m = 8, 1F1B's idle
fraction against its theoretical bubble (p - 1) / (m + p - 1), and zb-h1's and zb-v's step times
against 1F1B's (the three alternate step by step).

Allocator: by default the run sets glibc's ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` (for both systems alike) so freed memory is kept for reuse instead of
being returned to the OS and page-faulted back on the next micro-batch; on CPU that churn costs
zero-bubble schedules, which hold W's inputs across other work, about 10% of their backward
(jemalloc or tcmalloc do the same). ``--glibc-defaults`` runs without it.

Usage::

    python benchmarks/pp_vs_torch.py                 # small (8 layers, hidden 256) and tiny models
    python benchmarks/pp_vs_torch.py --models tiny --steps 20

The last line prints the median step-time ratio plait / PyTorch per schedule (and model).
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
from plait.models.transformer import Transformer, get_config  # noqa: E402
from plait.pipeline import PipelineRuntime, build_schedule, partition  # noqa: E402

P = 2
PAIRS = [
    ("gpipe", "ScheduleGPipe", 1),
    ("1f1b", "Schedule1F1B", 1),
    ("interleaved-1f1b", "ScheduleInterleaved1F1B", 2),
    ("dualpipev", "ScheduleDualPipeV", 2),
]
BUBBLE = [("1f1b", 1), ("zb-h1", 1), ("zb-v", 2)]  # plait only, alternating
MODELS = {
    # name: (preset, overrides, batch, seq, steps multiplier: small steps are short, take more)
    "small": ("small", {}, 16, 128, 1),
    "tiny": ("tiny", {"n_layers": 4}, 16, 32, 3),
}


def _data(cfg, batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    y = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    return x, y


def _timed(fn) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0


def torch_stepper(tsched, modules, first: bool, last: bool, x, y):
    """One PyTorch pipelining step on ``modules`` (gradients cleared first), and its losses."""
    losses: list = []

    def run():
        for mod in modules:
            mod.zero_grad(set_to_none=True)
        losses.clear()
        kwargs = {"return_outputs": False}
        if last:
            kwargs.update(target=y, losses=losses)
        if first:
            tsched.step(x, **kwargs)
        else:
            tsched.step(**kwargs)

    return run, losses


def _steppers(model, rt, tsched, mine: dict, num_stages: int, x, y):
    """One training step of plait and of PyTorch on the same stage modules."""
    first, last = 0 in mine, (num_stages - 1) in mine

    def run_plait():
        model.zero_grad(set_to_none=True)
        rt.train_step(x, y)

    run_torch, losses = torch_stepper(tsched, [model], first, last, x, y)
    return run_plait, run_torch, losses


def worker(model_name: str, m: int, steps: int, warmup: int) -> dict:
    from torch.distributed import pipelining as tp

    torch.set_num_threads(1)
    rank = dist.get_rank()
    preset, overrides, batch, seq, more = MODELS[model_name]
    steps *= more
    cfg = get_config(preset, **overrides)
    x, y = _data(cfg, batch, seq, 0)
    out: dict = {"times": {}, "loss": {}, "bubble": {}}

    def plait_runtime(name: str, v: int, model, costs=None):
        sched = build_schedule(name, P, m, v, costs)
        stages = partition(model, P * v)
        mine = {s: stages[s] for s in sched.stages_of(rank)}
        return PipelineRuntime(mine, sched, None, Transformer.loss), stages, mine

    for name, torch_name, v in PAIRS:
        model = Transformer(cfg, seed=0)
        rt, stages, mine = plait_runtime(name, v, model)
        pstages = [tp.PipelineStage(stages[s], s, P * v, torch.device("cpu")) for s in sorted(mine)]
        cls = getattr(tp, torch_name)
        tsched = cls(pstages if v > 1 else pstages[0], m, loss_fn=Transformer.loss)
        run_plait, run_torch, losses = _steppers(model, rt, tsched, mine, P * v, x, y)
        tp_times, pt_times = [], []
        for k in range(warmup + steps):
            order = [(run_plait, tp_times), (run_torch, pt_times)]
            if k % 2:
                order.reverse()
            for fn, sink in order:
                t = _timed(fn)
                if k >= warmup:
                    sink.append(t)
        out["loss"][name] = rt.train_step(x, y)  # every pp rank gets plait's loss
        if losses:  # PyTorch's losses live on the last stage
            out["loss"][f"torch-{name}"] = float(torch.stack(losses).detach().mean())
        out["times"][name] = (tp_times, pt_times)
        rt.close()

    # Bubble: plait's measured idle fraction, 1f1b vs zb-h1 vs zb-v side by side, the zero-bubble
    # schedules built for this machine's (F, B, W) costs, measured on a few zb-v steps first (what
    # `plait train --schedule-costs` takes); every rank gets the same merged timeline.
    model = Transformer(cfg, seed=0)
    probe = plait_runtime("zb-v", 2, model)[0]
    for _ in range(warmup + 1):
        model.zero_grad(set_to_none=True)
        probe.train_step(x, y)
    costs = tuple(round(c, 2) for c in probe.gather_timeline().schedule_costs())
    probe.close()
    out["costs"] = costs
    rts = {n: plait_runtime(n, v, model, costs if n != "1f1b" else None)[0] for n, v in BUBBLE}
    times: dict = {n: [] for n in rts}
    bubbles: dict = {n: [] for n in rts}
    for k in range(warmup + steps):
        for n in list(rts) if k % 2 == 0 else list(rts)[::-1]:
            model.zero_grad(set_to_none=True)
            t = _timed(lambda n=n: rts[n].train_step(x, y))
            tl = rts[n].gather_timeline()
            if k >= warmup:
                times[n].append(t)
                bubbles[n].append(tl.bubble_fraction())
    out["bubble"] = {n: (statistics.median(bubbles[n]), statistics.median(times[n])) for n in rts}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["small", "tiny"], choices=sorted(MODELS))
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--glibc-defaults", action="store_true", help="do not tune malloc")
    args = ap.parse_args()
    if not args.glibc_defaults:
        # read by glibc when each worker process starts (launch's forkserver inherits them)
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 30)
        os.environ["MALLOC_TRIM_THRESHOLD_"] = str(1 << 32)
    print(
        f"machine: {os.cpu_count()} CPUs, {platform.machine()}, torch {torch.__version__}, "
        f"p={P}, m={args.microbatches}, gloo, 1 thread per rank, "
        f"malloc {'glibc defaults' if args.glibc_defaults else 'kept for reuse'}"
    )
    ratios = []
    for model_name in args.models:
        preset, overrides, batch, seq, _ = MODELS[model_name]
        cfg = get_config(preset, **overrides)
        print(
            f"\nmodel {model_name}: {cfg.n_layers} layers, hidden {cfg.hidden}, "
            f"{cfg.num_parameters() / 1e6:.2f}M params; batch {batch} x {seq} tokens"
        )
        res = launch(
            worker, P, model_name, args.microbatches, args.steps, args.warmup, threads_per_worker=1
        )
        losses = {k: v for r in res for k, v in r["loss"].items()}
        for name, torch_name, _ in PAIRS:
            ours, theirs = (statistics.median(t) for t in res[0]["times"][name])
            ratio = ours / theirs
            ratios.append(f"{model_name}/{name} {ratio:.2f}")
            print(
                f"  {name:17s} plait {ours * 1e3:8.1f} ms   torch {torch_name:24s} "
                f"{theirs * 1e3:8.1f} ms   ratio {ratio:.2f}   "
                f"loss {losses[name]:.5f} vs {losses[f'torch-{name}']:.5f}"
            )
        bub = res[0]["bubble"]
        b1, t1 = bub["1f1b"]
        theory = (P - 1) / (args.microbatches + P - 1)
        print(
            f"  bubble: 1f1b measured idle {b1:.1%} vs theoretical {theory:.1%} "
            f"({(b1 - theory) * 100:+.1f} points), step {t1 * 1e3:.1f} ms"
        )
        for n, _ in BUBBLE[1:]:
            b, t = bub[n]
            print(
                f"          {n} (built for costs {res[0]['costs']}) idle {b:.1%}, "
                f"step {t * 1e3:.1f} ms ({t / t1:.2f}x 1f1b's)"
            )
    print("median step-time ratio plait/PyTorch: " + ", ".join(ratios))


if __name__ == "__main__":
    main()
