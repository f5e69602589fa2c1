"""Module-level worker functions for the pipeline tests (launch pickles them by reference)."""

from __future__ import annotations

import contextlib
import time
import weakref

import torch
import torch.distributed as dist

from plait.mesh import Mesh
from plait.models.transformer import ModelConfig, Transformer
from plait.pipeline import PipelineRuntime, build_schedule, partition, shm

CFG = ModelConfig(vocab_size=64, n_layers=8, hidden=32, n_heads=4, ffn=64, max_seq_len=32)
LR = 0.1


def batch(B: int, T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, CFG.vocab_size, (B, T), generator=g)
    y = torch.randint(0, CFG.vocab_size, (B, T), generator=g)
    return x, y


def reference(steps: list[tuple[int, int, int]]) -> tuple[list[float], list[dict]]:
    """Single-process float64 losses and gradients over ``steps``, with SGD in between."""
    model = Transformer(CFG, seed=0).double()
    losses, grads = [], []
    for B, T, seed in steps:
        x, y = batch(B, T, seed)
        model.zero_grad(set_to_none=True)
        loss = model.loss(model(x), y)
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
    return losses, grads


@contextlib.contextmanager
def _ring_bytes(n: int | None):
    """Shared-memory rings of ``n`` bytes while a runtime connects (None: the default)."""
    old = shm.RING_BYTES
    shm.RING_BYTES = n or old
    try:
        yield
    finally:
        shm.RING_BYTES = old


def run_cases(mesh_shape: tuple[int, int, int], cases: list[dict]) -> list[dict]:
    """Run each case's training steps (and an inference pass) on this rank's stages."""
    mesh = Mesh(*mesh_shape)
    out = []
    for case in cases:
        p = mesh.size("pp")
        sched = build_schedule(case["name"], p, case["m"], case.get("v"), case.get("costs"))
        model = Transformer(CFG, seed=0).double()
        stages = partition(model, sched.num_stages, balance=case.get("balance", "layers"))
        mine = {s: stages[s] for s in sched.stages_of(mesh.pp_rank)}
        with _ring_bytes(case.get("ring_bytes")):
            rt = PipelineRuntime(
                mine,
                sched,
                mesh,
                Transformer.loss,
                checkpoint=case.get("checkpoint", False),
                prefetch=case.get("prefetch"),
                transport=case.get("transport", "auto"),
            )
        params = {n: q for s in mine.values() for n, q in s.named_parameters()}
        losses, grads = [], []
        t0 = time.monotonic()
        for B, T, seed in case["steps"]:
            x, y = batch(B, T, seed)
            for q in params.values():
                q.grad = None
            losses.append(rt.train_step(x, y))
            grads.append({n: q.grad.clone() for n, q in params.items()})
            with torch.no_grad():
                for q in params.values():
                    q -= LR * q.grad
        seconds = time.monotonic() - t0
        # the measured timeline of the last training step: one event per action, in order
        acts = sched.actions[mesh.pp_rank]
        ev = rt.timeline.events
        timeline_ok = (
            [e.name for e in ev] == [str(a) for a in acts]
            and all(e.rank == mesh.pp_rank and e.end >= e.start for e in ev)
            and all(a.end <= b.start for a, b in zip(ev, ev[1:]))
        )
        merged = rt.gather_timeline()
        B, T, seed = case["steps"][-1]
        inferred = rt.forward(batch(B, T, seed)[0])
        events = rt.timeline.events
        rt.close()
        out.append(
            {
                "case": case,
                "losses": losses,
                "grads": grads,
                "seconds": seconds,
                "infer": inferred,
                "infer_events": [e.name for e in events],
                "timeline_ok": timeline_ok,
                "merged_ranks": sorted({e.rank for e in merged.events}),
                "bubble": merged.bubble_fraction(),
                "params_after": {n: q.detach().clone() for n, q in params.items()},
                "transport": rt.transport,
            }
        )
    return out


def refusals(m: int) -> dict:
    """Bad batches are refused on every rank before any message; a good step still works."""
    sched = build_schedule("1f1b", dist.get_world_size(), m)
    model = Transformer(CFG, seed=0).double()
    stages = partition(model, sched.num_stages)
    r = dist.get_rank()
    found = {}
    for label, B, uneven in (("too_small", m - 1, True), ("indivisible", m + 1, False)):
        rt = PipelineRuntime({r: stages[r]}, sched, None, Transformer.loss, uneven=uneven)
        x, y = batch(B, 8, 0)
        try:
            rt.train_step(x, y)
            found[label] = None
        except ValueError as e:
            found[label] = str(e)
        rt.close()
    rt = PipelineRuntime({r: stages[r]}, sched, None, Transformer.loss)
    x, y = batch(m + 1, 8, 0)  # uneven split, allowed
    found["uneven_loss"] = rt.train_step(x, y)
    return found


def saved_activation_peak(name: str, m: int) -> dict:
    """Peak bytes of tensors saved for backward (parameters excluded) during one step.

    Returned in units of one micro-batch's saved bytes on this rank, i.e. micro-batches in flight.
    """
    p = dist.get_world_size()
    sched = build_schedule(name, p, m)
    model = Transformer(CFG, seed=0).double()
    stages = partition(model, sched.num_stages)
    r = dist.get_rank()
    mine = {s: stages[s] for s in sched.stages_of(r)}
    rt = PipelineRuntime(mine, sched, None, Transformer.loss)
    param_storage = {q.untyped_storage().data_ptr() for s in mine.values() for q in s.parameters()}
    live = {"bytes": 0, "peak": 0, "total": 0}

    class Saved:
        """Holds one saved tensor; its death (graph freed) releases its bytes."""

        def __init__(self, t: torch.Tensor):
            self.t = t

    def pack_counted(t: torch.Tensor):
        box = Saved(t)
        if t.untyped_storage().data_ptr() in param_storage:
            return box
        n = t.numel() * t.element_size()
        live["bytes"] += n
        live["total"] += n
        live["peak"] = max(live["peak"], live["bytes"])
        weakref.finalize(box, _release, live, n)
        return box

    x, y = batch(2 * m, 8, 0)
    with torch.autograd.graph.saved_tensors_hooks(pack_counted, lambda box: box.t):
        rt.train_step(x, y)
    per_mb = live["total"] / (m * len(mine))
    return {"in_flight": live["peak"] / per_mb, "validator": rt.report.peak_in_flight[r]}


def _release(live: dict, n: int) -> None:
    live["bytes"] -= n


def hf_reference(directory: str, steps: list[tuple[int, int, int]]):
    """Single-process float64 losses and gradients of the model in ``directory`` (SGD between).

    On one intra-op thread, as the pipeline workers it is compared with: Hugging Face's eager
    attention takes its softmax in float32 even in a float64 model, and a float32 reduction's
    rounding depends on how many threads share it (about 1e-9 in the gradients at T=12)."""
    from plait.models import resolve_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _hf_reference(resolve_model(f"hf:{directory}"), steps)
    finally:
        torch.set_num_threads(threads)


def _hf_reference(source, steps):
    model = source.build(0).double()
    losses, grads = [], []
    for B, T, seed in steps:
        x, y = batch(B, T, seed)
        model.zero_grad(set_to_none=True)
        loss = source.loss(model(x), y)
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters(remove_duplicate=False)})
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
    return losses, grads


def hf_pipeline(mesh_shape, directory: str, schedule: str, m: int, steps):
    """The same steps through plait's pipeline (and tensor parallelism when tp > 1): this rank's
    losses and full-shaped gradients of its stages' parameters."""
    from plait.models import resolve_model
    from plait.models.layout import tied_parameter_names
    from plait.tensor import gather_grads, parallelize

    mesh = Mesh(*mesh_shape)
    source = resolve_model(f"hf:{directory}")
    model = source.build(0).double()
    tied = tied_parameter_names(model)
    sched = build_schedule(schedule, mesh.size("pp"), m)
    stages = partition(model, sched.num_stages)
    mine = {s: stages[s] for s in sched.stages_of(mesh.pp_rank)}
    tp = mesh.size("tp")
    if tp > 1:
        for stage in mine.values():
            parallelize(stage, mesh)
    last = sched.num_stages - 1
    if tp > 1 and last in mine:
        from plait.tensor import loss_fn

        loss = loss_fn(mine[last])
    else:
        loss = source.loss
    rt = PipelineRuntime(mine, sched, mesh, loss)
    params = {}
    for st in mine.values():
        params.update(dict(st.named_parameters(remove_duplicate=False)))
    from plait.train.grads import TiedGrads

    tied_grads = TiedGrads(params, tied, mesh, sched)
    unique = list({id(p): p for p in params.values()}.values())
    losses, grads = [], []
    for B, T, seed in steps:
        x, y = batch(B, T, seed)
        for p in unique:
            p.grad = None
        losses.append(rt.train_step(x, y))
        tied_grads.reduce()
        full = {}
        for st in mine.values():
            full.update(gather_grads(st) if tp > 1 else {})
        grads.append({n: (full[n] if n in full else p.grad).clone() for n, p in params.items()})
        with torch.no_grad():
            for p in unique:
                p -= LR * p.grad
    return {"losses": losses, "grads": grads}


def _hf_clip_run(mesh, directory: str, steps: int, max_norm: float):
    """AdamW steps with global-norm clipping of an HF model split over ``mesh`` (pp stages with
    1F1B, each sharded over tp): per step the loss and the global norm, and whether every
    replicated parameter is bit-identical across the tensor group at the end."""
    import plait
    from plait.models import resolve_model
    from plait.tensor import is_tp_sharded, loss_fn, parallelize

    source = resolve_model(f"hf:{directory}")
    model = source.build(0).double()
    pp, tp = mesh.size("pp"), mesh.size("tp")
    sched = build_schedule("1f1b", pp, 2)
    stages = partition(model, sched.num_stages)
    mine = {s: stages[s] for s in sched.stages_of(mesh.pp_rank)}
    for stage in mine.values():
        parallelize(stage, mesh)
    last = sched.num_stages - 1
    loss = loss_fn(mine[last]) if last in mine else source.loss
    rt = PipelineRuntime(mine, sched, mesh, loss)
    params = [p for st in mine.values() for p in st.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-2)
    norms, losses = [], []
    for step in range(steps):
        x, y = batch(4, 16, 100 + step)
        opt.zero_grad(set_to_none=True)
        losses.append(rt.train_step(x, y))
        norms.append(float(plait.clip_grad_norm_(params, max_norm, mesh)))
        opt.step()
    same = True
    group = mesh.group("tp")
    for p in params:
        if is_tp_sharded(p):
            continue
        copies = [torch.empty_like(p) for _ in range(tp)]
        dist.all_gather(copies, p.detach().contiguous(), group=group)
        same = same and all(torch.equal(c, copies[0]) for c in copies)
    return {"norms": norms, "losses": losses, "replicated_identical": same}


def hf_clip(mesh_shape, directory: str, steps: int, max_norm: float):
    return _hf_clip_run(Mesh(*mesh_shape), directory, steps, max_norm)


def hf_clip_reference(directory: str, steps: int, max_norm: float):
    """The same AdamW steps in one process, clipped by torch.nn.utils.clip_grad_norm_."""
    from plait.models import resolve_model

    source = resolve_model(f"hf:{directory}")
    model = source.build(0).double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    norms, losses = [], []
    for step in range(steps):
        x, y = batch(4, 16, 100 + step)
        opt.zero_grad(set_to_none=True)
        loss = source.loss(model(x), y)
        loss.backward()
        losses.append(loss.item())
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)))
        opt.step()
    return {"norms": norms, "losses": losses}


def shm_connect(blocked_rank: int | None) -> dict:
    """connect() on every rank, one of them refusing: do they agree, and is /dev/shm clean?"""
    import os

    r = dist.get_rank()
    pairs = {(0, 1, 0), (1, 0, 0), (1, 0, 1)}
    blocked = "told not to" if r == blocked_rank else None
    before = set(os.listdir("/dev/shm"))
    transport, why = shm.connect(pairs, r, lambda k: k, blocked=blocked)
    out = {"connected": transport is not None, "why": why}
    if transport is not None:
        x = torch.arange(1000, dtype=torch.float64) * (r + 1)
        buf = torch.empty_like(x)
        transport.send([x], 1 - r, 0)
        transport.recv([buf], 1 - r, 0).wait()
        out["got"] = buf
        transport.close()
    dist.barrier()
    out["left"] = [n for n in set(os.listdir("/dev/shm")) - before if n.startswith("plait-p2p-")]
    return out
