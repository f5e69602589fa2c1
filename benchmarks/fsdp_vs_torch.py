"""plait's fully sharded data parallelism (``--fsdp``) against ``fully_shard`` used directly.

Four systems train the same reference transformer (preset ``small`` by default: 8 blocks,
hidden 256) on the same data, batch, micro-batches and AdamW settings, dp = 2 on CPU with gloo
and one thread per rank:

* ``dp``: ``plait train --dp 2`` (plain data parallel: bucketed gradient all-reduce);
* ``zero1``: ``plait train --dp 2 --zero1`` (optimizer state sharded);
* ``fsdp``: ``plait train --dp 2 --fsdp`` (PyTorch FSDP2 under plait);
* ``direct``: a hand-written loop in this file that calls ``fully_shard`` itself, laid out as
  plait's runtime does: ``fully_shard`` on each transformer block (``reshard_after_forward=True``),
  then on the whole model as the root (FSDP2's default: kept from forward to backward), over a
  1-D ``DeviceMesh`` of
  the two ranks. Its step is plait's step, written out: gradient accumulation over the
  micro-batches (each micro-batch's loss weighted by its share of the replica's batch; FSDP2
  reduce-scatters in every micro-batch's backward, as plait leaves it), clipping by the global
  gradient norm (``torch.nn.utils.get_total_norm`` over the sharded gradients, ``full_tensor()``,
  ``clip_grads_with_norm_``: torchtitan's way), the loss averaged over dp, ``AdamW.step`` and
  ``zero_grad(set_to_none=True)``.

plait's per-step time is ``step_time_s`` from ``--metrics-out`` (each rank times from before the
first micro-batch to after ``zero_grad``; the slower rank counts). The direct loop times the same
span on each rank after a barrier and takes the slower rank too. The systems run round by round
in one run (dp, zero1, fsdp, direct, then rotated), so that a slow spell of the shared machine
falls on all of them; the first ``--warmup`` steps of every run are dropped and the median over
all rounds' remaining steps is reported. ``zero1`` and ``fsdp`` are passed as ``plait train``'s
own flags.

The machine is shared: on 2 cores another job's process takes a core from one rank and the
step waits for it (step times double). A sampler counts the CPU other processes use (from
/proc); before each run the benchmark waits (``--max-wait`` s at most) for a quiet spell, a run
that another job overlapped by more than ``--max-foreign`` cores is run again (``--retries`` in
all), and the summary uses only the runs without other jobs when every system has one. Each
round's line shows the other jobs' cores during each system's run.

The first-step loss and gradient norm of every system are printed: the direct loop and plait's
FSDP start from the same weights (``Transformer(cfg, seed)``) and read the same batches
(``ByteDataset`` with the run's seed), so they compute the same thing.

    .venv/bin/python benchmarks/fsdp_vs_torch.py [--steps 8] [--rounds 4] [--model small]
    .venv/bin/python benchmarks/fsdp_vs_torch.py --paired 16   # and the same-process check

``--paired N`` also runs plait's own FSDP step pieces and the direct loop in the same two
processes, step by step (:func:`paired_worker`), which takes the launch-to-launch difference in
process pace out of the comparison.

The last line printed is the median step-time ratio plait fsdp / direct ``fully_shard``
(target <= 1.05).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DP = 2
PLAIT = {"dp": [], "zero1": ["--zero1"], "fsdp": ["--fsdp"]}
SYSTEMS = [*PLAIT, "direct"]


class ForeignLoad:
    """CPU used by processes outside this benchmark's process tree, sampled from /proc twice a second.

    On this 2-core machine each rank has one core; another job's process (a test run) takes a
    core from a rank and the step waits for it, so a run it overlaps is slower for no fault of
    the system measured. ``cores(t0, t1)`` is the foreign CPU between two times, in cores.
    """

    def __init__(self, period: float = 0.5):
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.period = period
        self.samples: list[tuple[float, float]] = []  # (time, foreign CPU seconds so far)
        self.available = Path("/proc/self/stat").exists()
        self._last: dict[int, float] = {}
        self._total = 0.0
        self._stop = threading.Event()
        if self.available:
            self._sample(count=False)
            threading.Thread(target=self._run, daemon=True).start()

    def _read(self) -> dict[int, tuple[int, float]]:
        procs = {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                rest = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # gone meanwhile
            # after the name: state ppid ... utime (11th) stime (12th), in clock ticks
            procs[int(d.name)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / self.tick)
        return procs

    def _sample(self, count: bool = True) -> None:
        procs = self._read()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in procs.items():
            children.setdefault(ppid, []).append(pid)
        ours, todo = set(), [os.getpid()]
        while todo:
            pid = todo.pop()
            ours.add(pid)
            todo += children.get(pid, [])
        last, self._last = self._last, {}
        for pid, (_, cpu) in procs.items():
            if pid in ours:
                continue
            self._last[pid] = cpu
            if count:  # a process new since the last sample: all its CPU is new
                self._total += cpu - last.get(pid, 0.0)
        self.samples.append((time.perf_counter(), self._total))

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()

    def cores(self, t0: float, t1: float) -> float:
        """Mean foreign CPU between ``t0`` and ``t1``, in cores (0 when unavailable)."""

        def at(t: float) -> float:
            before = [c for ts, c in self.samples if ts <= t]
            return before[-1] if before else 0.0

        return (at(t1) - at(t0)) / (t1 - t0) if self.available and t1 > t0 else 0.0

    def wait_quiet(self, limit: float, window: float = 2.0, max_wait: float = 20.0) -> float:
        """Wait (up to ``max_wait`` s) until the last ``window`` s had under ``limit`` foreign
        cores; returns the seconds waited."""
        start = time.perf_counter()
        while self.available and time.perf_counter() - start < max_wait:
            now = time.perf_counter()
            if self.cores(now - window, now) < limit:
                break
            time.sleep(0.5)
        return time.perf_counter() - start


def plait_run(system: str, args) -> list[dict]:
    """One ``plait train`` run: its per-step records (step, loss, grad_norm, step_time_s)."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "metrics.jsonl"
        cmd = [
            sys.executable,
            "-m",
            "plait.cli",
            "train",
            "--model",
            args.model,
            "--dp",
            str(DP),
            "--steps",
            str(args.steps),
            "--batch-size",
            str(args.batch_size),
            "--seq-len",
            str(args.seq_len),
            "--microbatches",
            str(args.microbatches),
            "--seed",
            str(args.seed),
            "--lr",
            str(args.lr),
            "--weight-decay",
            str(args.weight_decay),
            "--grad-clip",
            str(args.grad_clip),
            "--metrics-out",
            str(out),
            "--no-progress",
            *PLAIT[system],
        ]
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        records = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    return [
        {k: r[k] for k in ("step", "loss", "grad_norm", "step_time_s", "phase_s", "comm_bytes")}
        for r in records
    ]


def _sizes(batch: int, m: int) -> list[int]:
    """Micro-batch sizes as plait splits a batch: equal, or the first ones one larger."""
    return [batch // m + (i < batch % m) for i in range(m)]


def direct_worker(args) -> list[dict]:
    """The hand-written FSDP2 training loop on this rank; per-step records (rank's own time)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from plait.data import ByteDataset
    from plait.models.transformer import Transformer, get_config

    torch.manual_seed(args.seed)
    rank, world = dist.get_rank(), dist.get_world_size()
    model = Transformer(get_config(args.model), seed=args.seed)
    data = ByteDataset(seed=args.seed)
    mesh = init_device_mesh("cpu", (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh)  # the root: FSDP2 keeps it for its backward, as plait
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    local = args.batch_size // world
    rows = slice(rank * local, (rank + 1) * local)
    sizes = _sizes(local, args.microbatches)
    records = []
    for step in range(args.steps):
        x, y = data.batch(step, args.batch_size, args.seq_len)
        x, y = x[rows], y[rows]
        dist.barrier()
        t0 = time.perf_counter()
        total, start = 0.0, 0
        for n in sizes:
            xs, ys = x[start : start + n], y[start : start + n]
            start += n
            logits = model(xs)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ys.reshape(-1))
            loss = loss * (n / local)
            loss.backward()
            total += loss.item()
        t1 = time.perf_counter()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        if args.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(model.parameters(), args.grad_clip, norm)
        mean = torch.tensor([total], dtype=torch.float64)
        dist.all_reduce(mean)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        records.append(
            {
                "step": step,
                "loss": mean.item() / world,
                "grad_norm": norm.item(),
                "time": t3 - t0,
                "phase_s": {"forward_backward": t1 - t0, "update": t3 - t1},
            }
        )
    return records


def direct_run(args) -> list[dict]:
    from plait import launch

    per_rank = launch(direct_worker, DP, args, threads_per_worker=1)
    return [
        {**per_rank[0][i], "step_time_s": max(r[i]["time"] for r in per_rank)}  # rank 0's phases
        for i in range(args.steps)
    ]


def _fsdp_config(args):
    """plait's TrainConfig for ``--fsdp`` at this run's settings."""
    from plait.config import ParallelConfig
    from plait.train import TrainConfig

    common = {"model": args.model, "batch_size": args.batch_size, "seq_len": args.seq_len}
    common.update(seed=args.seed, lr=args.lr, weight_decay=args.weight_decay)
    pc = ParallelConfig(dp=DP, num_microbatches=args.microbatches, fsdp=True)
    return TrainConfig(**common, grad_clip=args.grad_clip, parallel=pc)


def paired_worker(args) -> dict:
    """plait's FSDP step pieces and the direct loop's in the same two processes, step by step.

    plait: the model sharded by plait's own ``build_local`` (its FSDP wrapping) and run by its
    ``step`` (forward and backward over the micro-batches), then the update as plait's loop does
    it (``clip_grad_norm`` over the dp-sharded gradients, the loss averaged over dp, AdamW,
    ``state_bytes``, ``zero_grad``). direct: the loop of :func:`direct_worker`. Which goes first
    alternates; each phase's time is the slower rank's after a barrier. This takes the
    difference between processes (up to ~8% on this VM) out of the comparison.
    """
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from plait import Mesh
    from plait.data import ByteDataset
    from plait.models.transformer import Transformer, get_config
    from plait.train.fsdp import state_bytes
    from plait.train.grads import clip_grad_norm
    from plait.train.metrics import mean_over
    from plait.train.parts import build_local

    cfg = _fsdp_config(args)
    source = cfg.source()
    rank = dist.get_rank()
    mesh = Mesh(DP)
    torch.manual_seed(args.seed)
    local = build_local(source.build(args.seed), mesh, cfg, source)
    params = list(local.params.values())
    popt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)

    model = Transformer(get_config(args.model), seed=args.seed)
    dmesh = init_device_mesh("cpu", (DP,))
    for block in model.blocks:
        fully_shard(block, mesh=dmesh, reshard_after_forward=True)
    fully_shard(model, mesh=dmesh)  # the root: FSDP2 keeps it for its backward, as plait
    dopt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    data = ByteDataset(seed=args.seed)
    n_local = args.batch_size // DP
    rows = slice(rank * n_local, (rank + 1) * n_local)
    sizes = _sizes(n_local, args.microbatches)

    def plait_step(x, y):
        loss = local.step(x, y)
        t1 = time.perf_counter()
        clip_grad_norm(params, args.grad_clip, dp_group=mesh.group("dp"))
        mean_over(loss, mesh.group("dp"))
        popt.step()
        state_bytes(params, popt)
        popt.zero_grad(set_to_none=True)
        return t1

    def direct_step(x, y):
        total = 0.0
        for xs, ys in zip(x.split(sizes), y.split(sizes)):
            logits = model(xs)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ys.reshape(-1))
            loss = loss * (xs.shape[0] / n_local)
            loss.backward()
            total += loss.item()
        t1 = time.perf_counter()
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()], 2.0)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), args.grad_clip, norm)
        dist.all_reduce(torch.tensor([total], dtype=torch.float64))
        dopt.step()
        dopt.zero_grad(set_to_none=True)
        return t1

    out: dict[str, list] = {"plait": [], "direct": []}
    for step in range(args.paired):
        x, y = data.batch(step, args.batch_size, args.seq_len)
        order = [("plait", plait_step), ("direct", direct_step)]
        for name, fn in order if step % 2 == 0 else order[::-1]:
            dist.barrier()
            t0 = time.perf_counter()
            t1 = fn(x[rows], y[rows])
            out[name].append((t1 - t0, time.perf_counter() - t1))
    return out


def paired_run(args) -> None:
    from plait import launch

    res = launch(paired_worker, DP, args, threads_per_worker=1)
    print(f"\nsame processes, step by step ({args.paired} steps, {args.warmup} dropped):")
    med = {}
    for name in ("plait", "direct"):
        steps = list(zip(*(r[name] for r in res)))[args.warmup :]  # per step: each rank's
        fb = [max(t[0] for t in ranks) for ranks in steps]
        upd = [max(t[1] for t in ranks) for ranks in steps]
        tot = [max(t[0] + t[1] for t in ranks) for ranks in steps]
        med[name] = [statistics.median(v) for v in (fb, upd, tot)]
        print(
            f"  {name:7s} forward+backward {med[name][0] * 1e3:6.1f} ms   update "
            f"{med[name][1] * 1e3:5.1f} ms   step {med[name][2] * 1e3:6.1f} ms"
        )
    a, b = med["plait"], med["direct"]
    print(
        f"  plait / direct: forward+backward {a[0] / b[0]:.3f}, update {a[1] / b[1]:.3f} "
        f"({(a[1] - b[1]) * 1e3:+.1f} ms), step {a[2] / b[2]:.3f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small", choices=["tiny", "small"])
    ap.add_argument("--steps", type=int, default=8, help="steps per run (warm-up included)")
    ap.add_argument("--warmup", type=int, default=2, help="first steps of each run dropped")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--microbatches", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument(
        "--max-foreign",
        type=float,
        default=0.2,
        help="cores other jobs may use during a run's timed steps before it is run again",
    )
    ap.add_argument("--retries", type=int, default=2, help="runs repeated at most, in all")
    ap.add_argument(
        "--max-wait", type=float, default=10.0, help="seconds to wait for other jobs before a run"
    )
    ap.add_argument(
        "--paired",
        type=int,
        default=0,
        metavar="STEPS",
        help="also run plait's FSDP step pieces and the direct loop in the same processes, "
        "step by step, for STEPS steps (a diagnostic; 0: not)",
    )
    args = ap.parse_args()
    if args.steps <= args.warmup:
        ap.error("--steps must exceed --warmup")

    import torch

    from plait.models.transformer import get_config

    cfg = get_config(args.model)
    print(
        f"machine: {os.cpu_count()} CPUs, {platform.machine()}, torch {torch.__version__}, "
        f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    print(
        f"model {args.model}: {cfg.n_layers} blocks, hidden {cfg.hidden}, "
        f"{cfg.num_parameters() / 1e6:.2f}M params; dp={DP}, gloo, 1 thread per rank; "
        f"batch {args.batch_size} x {args.seq_len}, {args.microbatches} micro-batches per "
        f"replica; AdamW lr {args.lr} wd {args.weight_decay}, clip {args.grad_clip}; "
        f"{args.rounds} rounds x {args.steps} steps ({args.warmup} warm-up dropped each)"
    )
    load = ForeignLoad()
    runs: list[dict] = []  # system, round, records, foreign cores during its timed steps
    retries, waited = args.retries, 0.0
    t_start = time.perf_counter()
    for r in range(args.rounds):
        order = SYSTEMS[r % len(SYSTEMS) :] + SYSTEMS[: r % len(SYSTEMS)]
        for system in order:
            while True:
                waited += load.wait_quiet(args.max_foreign, max_wait=args.max_wait)
                recs = direct_run(args) if system == "direct" else plait_run(system, args)
                end = time.perf_counter()
                kept = recs[args.warmup :]
                # the timed steps end the run (then about a second of shutdown)
                busy = load.cores(end - 1.0 - sum(x["step_time_s"] for x in kept), end)
                if busy <= args.max_foreign or retries == 0:
                    break
                retries -= 1
                print(f"  {system}: other jobs took {busy:.2f} cores meanwhile, run again")
            runs.append({"system": system, "round": r, "all": recs, "kept": kept, "busy": busy})
        mine = {x["system"]: x for x in runs if x["round"] == r}
        med = {s: statistics.median(x["step_time_s"] for x in mine[s]["kept"]) for s in SYSTEMS}
        print(
            f"round {r + 1} ({','.join(order)}): "
            + "  ".join(f"{s} {med[s] * 1e3:.0f} ms" for s in SYSTEMS)
            + f"  fsdp/direct {med['fsdp'] / med['direct']:.3f}   other jobs' cores "
            + " ".join(f"{mine[s]['busy']:.2f}" for s in SYSTEMS)
        )
    print(
        f"wall time {time.perf_counter() - t_start:.0f} s ({waited:.0f} s waiting for other jobs, "
        f"{args.retries - retries} runs repeated)"
    )

    first = {s: next(x["all"] for x in runs if x["system"] == s) for s in SYSTEMS}
    print("\nfirst-step loss and gradient norm, last-step loss (same weights, data and AdamW):")
    for s in SYSTEMS:
        recs = first[s]
        print(
            f"  {s:7s} step 0 loss {recs[0]['loss']:.9f}  grad norm {recs[0]['grad_norm']:.6f}"
            f"   step {recs[-1]['step']} loss {recs[-1]['loss']:.6f}"
        )
    d0 = first["fsdp"][0]["loss"] - first["direct"][0]["loss"]
    print(f"  step-0 loss plait fsdp - direct: {d0:.3g}")

    # Runs another job overlapped measure that job too: leave them out when every system has a
    # run without (the rounds above show all of them).
    clean = [x for x in runs if x["busy"] <= args.max_foreign]
    use = clean if {x["system"] for x in clean} == set(SYSTEMS) else runs
    which = "all runs" if use is runs else f"the {len(use)} of {len(runs)} runs without other jobs"
    steps = {s: [rec for x in use if x["system"] == s for rec in x["kept"]] for s in SYSTEMS}
    med = {s: statistics.median(rec["step_time_s"] for rec in steps[s]) for s in SYSTEMS}

    def phase(s: str, key: str) -> float:
        return statistics.median(rec["phase_s"][key] for rec in steps[s]) * 1e3

    print(f"\nmedian step time over {which}:")
    for s in SYSTEMS:
        t = [rec["step_time_s"] for rec in steps[s]]
        print(
            f"  {s:7s} median {med[s] * 1e3:7.1f} ms   min {min(t) * 1e3:7.1f} ms   "
            f"forward+backward {phase(s, 'forward_backward'):6.1f} ms   "
            f"update {phase(s, 'update'):5.1f} ms   ({len(t)} steps)"
        )
    print(
        "  plait dp-axis bytes per step (both ranks): "
        + ", ".join(f"{s} {first[s][-1]['comm_bytes']['dp'] / 1e6:.0f} MB" for s in PLAIT)
    )
    mins = {s: min(rec["step_time_s"] for rec in steps[s]) for s in SYSTEMS}
    print(f"fsdp / direct (fastest steps): {mins['fsdp'] / mins['direct']:.3f}")
    print(f"fsdp / dp:     {med['fsdp'] / med['dp']:.3f}")
    print(f"fsdp / zero1:  {med['fsdp'] / med['zero1']:.3f}")
    if args.paired:
        paired_run(args)
    print(
        f"median step-time ratio plait fsdp / direct fully_shard: {med['fsdp'] / med['direct']:.3f}"
    )


if __name__ == "__main__":
    main()
