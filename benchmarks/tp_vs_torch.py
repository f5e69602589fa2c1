"""One tensor-parallel training step, plait against PyTorch's own tensor parallelism.

The same stack of reference transformer blocks (hidden 256, 8 heads, ffn 1024, 8 blocks), the same
weights and the same batch (8 x 64 tokens), at tp = 2 on CPU with gloo and one thread per rank:

* plait: ``plait.tensor.parallelize`` -- q/k/v column-parallel behind one region, o_proj and fc_out
  row-parallel; plain tensors.
* PyTorch: ``torch.distributed.tensor.parallel.parallelize_module`` with ``ColwiseParallel`` on
  q/k/v and fc_in, ``RowwiseParallel`` on o_proj and fc_out (DTensor parameters).

A step is zero_grad, forward, MSE loss, backward and an SGD update. The two alternate step by step
in one run so that load on the machine hits both alike; the last line printed is the median step
time ratio plait / PyTorch (lower is better for plait).

    .venv/bin/python benchmarks/tp_vs_torch.py [--steps 30] [--warmup 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

HIDDEN, HEADS, FFN, BLOCKS, BATCH, SEQ, TP = 256, 8, 1024, 8, 8, 64, 2


def _stack() -> nn.Sequential:
    from plait.models.transformer import Block, ModelConfig

    cfg = ModelConfig(hidden=HIDDEN, n_heads=HEADS, ffn=FFN, n_layers=BLOCKS, max_seq_len=SEQ)
    torch.manual_seed(0)  # the same weights for both systems
    return nn.Sequential(*[Block(cfg) for _ in range(BLOCKS)])


def _torch_tp(stack: nn.Sequential) -> nn.Sequential:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh = init_device_mesh("cpu", (TP,))
    plan = {}
    for i in range(BLOCKS):
        for proj in ("q_proj", "k_proj", "v_proj"):
            plan[f"{i}.attn.{proj}"] = ColwiseParallel()
        plan[f"{i}.attn.o_proj"] = RowwiseParallel()
        plan[f"{i}.mlp.fc_in"] = ColwiseParallel()
        plan[f"{i}.mlp.fc_out"] = RowwiseParallel()
    return parallelize_module(stack, mesh, plan)


def _bench(steps: int, warmup: int) -> dict:
    from plait import Mesh
    from plait.tensor import parallelize

    ours = parallelize(_stack(), Mesh(tp=TP))
    theirs = _torch_tp(_stack())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, SEQ, HIDDEN, generator=g)
    target = torch.randn(BATCH, SEQ, HIDDEN, generator=g)
    systems = {
        "plait": (ours, torch.optim.SGD(ours.parameters(), lr=1e-3)),
        "torch": (theirs, torch.optim.SGD(theirs.parameters(), lr=1e-3)),
    }
    times: dict[str, list[float]] = {name: [] for name in systems}
    first_loss = {}
    for step in range(warmup + steps):
        for name, (model, opt) in systems.items():
            dist.barrier()  # both ranks start the step together
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(model(x), target)
            loss.backward()
            opt.step()
            dt = time.perf_counter() - t0
            if step == 0:
                first_loss[name] = loss.item()
            if step >= warmup:
                times[name].append(dt)
    return {"times": times, "first_loss": first_loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()

    from plait import launch

    results = launch(_bench, TP, args.steps, args.warmup, threads_per_worker=1)
    # A step ends when the slower rank ends: take each step's time as the max over ranks.
    times = {
        name: [max(r["times"][name][i] for r in results) for i in range(args.steps)]
        for name in ("plait", "torch")
    }
    loss = results[0]["first_loss"]
    print(
        f"tp={TP} hidden={HIDDEN} blocks={BLOCKS} batch={BATCH} seq={SEQ}, gloo, 1 thread per rank, "
        f"{args.steps} steps after {args.warmup} warm-up"
    )
    print(f"first-step loss: plait {loss['plait']:.6f}  torch {loss['torch']:.6f}")
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name:6s} median {med[name] * 1e3:8.2f} ms   min {min(t) * 1e3:8.2f} ms")
    print(f"median step-time ratio plait/torch: {med['plait'] / med['torch']:.3f}")


if __name__ == "__main__":
    main()
