"""The plain-language verdict: which mix, why, and why not the others.

Example::

    res = search(get_model("llama2-70b"), get_hardware("h100-sxm"), gpus=64, global_batch=512)
    print(explain(res))
"""

from __future__ import annotations

from plait.plan.evaluate import Estimate
from plait.plan.search import SearchResult, strategy_of

__all__ = ["explain", "format_table", "overheads", "schedule_reason"]

_NAMES = {
    "data": "data parallel only",
    "fsdp": "fully sharded data parallel only",
    "tensor": "tensor parallel (with data parallel)",
    "pipeline": "pipeline parallel (with data parallel)",
    "tensor+pipeline": "tensor + pipeline parallel (with data parallel)",
}


def overheads(e: Estimate) -> dict[str, float]:
    """Seconds of the step lost to each overhead (approximate shares of the step)."""
    step = e.step_time_s
    pipe = e.pipeline_time_s
    return {
        "pipeline bubble": e.bubble_fraction * pipe,
        "tensor-parallel communication": e.tp_comm_share * (1 - e.bubble_fraction) * pipe,
        "gradient all-reduce": e.dp_comm_s,
        "FSDP all-gathers and reduce-scatters not hidden by compute": e.fsdp_comm_s,
        "optimizer step": e.optimizer_s,
        "recomputation": (
            0.25
            if e.config.recompute == "full"
            else 0.03
            if e.config.recompute == "selective"
            else 0.0
        )
        * (1 - e.bubble_fraction)
        * pipe,
        "_step": step,
    }


def _main_cost(e: Estimate) -> str:
    o = overheads(e)
    step = o.pop("_step")
    name, sec = max(o.items(), key=lambda kv: kv[1])
    return f"{name} {sec / step:.0%} of the step"


def format_table(res: SearchResult, n: int = 8) -> str:
    head = (
        f"{'#':>2} {'dp':>4} {'shard':<5} {'tp':>3} {'pp':>3} {'schedule':<18} {'mb':>6} {'recomp':<9} "
        f"{'step s':>8} {'TFLOP/s':>8} {'MFU':>5} {'bubble':>7} {'GB/GPU':>7}  how"
    )
    rows = [head]
    for i, e in enumerate(res.ranked[:n], 1):
        c = e.config
        sched = c.schedule + (f" v{c.virtual}" if c.schedule == "interleaved-1f1b" else "")
        rows.append(
            f"{i:>2} {c.dp:>4} {c.dp_shard:<5} {c.tp:>3}{'s' if c.sequence_parallel else ' '}"
            f"{c.pp:>3} {sched:<18} "
            f"{c.microbatch_size:>2}x{c.num_microbatches:<3} {c.recompute:<9} {e.step_time_s:>8.3f} "
            f"{e.tflops_per_gpu:>8.1f} {e.mfu:>5.1%} {e.bubble_fraction:>7.1%} "
            f"{e.memory_gb_per_gpu:>7.1f}  {e.method}"
        )
    return "\n".join(rows)


def _rate(tflops: float) -> str:
    """TFLOP/s for accelerators, GFLOP/s where a CPU reaches well under one TFLOP/s."""
    return f"{tflops:.0f} TFLOP/s" if tflops >= 10 else f"{tflops * 1e3:.1f} GFLOP/s"


def schedule_costs_note(est: Estimate) -> str | None:
    """For a list-scheduled (zero-bubble) estimate: the cost ratio its schedule was built for
    and the ``plait train`` flag that builds the same one; None otherwise."""
    if not est.schedule_costs or est.method == "analytic":
        return None
    f, b, w = est.schedule_costs
    return (
        f"Its schedule is built for forward : input-backward : weight-backward = "
        f"{f:g} : {b:g} : {w:g} (plait train --schedule-costs {f:g},{b:g},{w:g})."
    )


def _sched(e: Estimate) -> str:
    c = e.config
    spec = c.spec
    return c.schedule + (f"/v{c.virtual}" if spec is not None and spec.virtual is None else "")


def schedule_reason(res: SearchResult) -> str | None:
    """One line: why the winner's pipeline schedule, against 1F1B and against the schedules that
    would be faster but do not fit, with numbers (from :attr:`SearchResult.schedules`, every
    schedule simulated at the winner's shape). None without a pipeline.

    Example::

        schedule_reason(res)
        # 'zb-v: 6.1 points less bubble than 1f1b (2.0% vs 8.1%), 5% faster, at the same
        #  activation memory; interleaved-1f1b/v4 would be 1% faster but needs 1.5x 1f1b's
        #  activation memory (81 GB per GPU, over the 78 GB limit)'
    """
    if not res.ranked or not res.schedules:
        return None
    b = res.best
    ref = next((e for e in res.schedules if e.config.schedule == "1f1b"), None)
    parts = []
    if ref is not None and ref is not b and ref.config.schedule != b.config.schedule:
        pts = (ref.bubble_fraction - b.bubble_fraction) * 100
        faster = ref.step_time_s / b.step_time_s - 1
        act = b.memory.activations / max(ref.memory.activations, 1e-30)
        mem = (
            "at the same activation memory"
            if abs(act - 1) < 0.005
            else f"at {act:.2f}x its activation memory"
        )
        less = f"{pts:.1f} points less bubble" if pts >= 0 else f"{-pts:.1f} points more bubble"
        parts.append(
            f"{_sched(b)}: {less} than 1f1b ({b.bubble_fraction:.1%} vs "
            f"{ref.bubble_fraction:.1%}), {faster:.0%} faster, {mem}"
        )
    else:
        others = [e for e in res.schedules if e is not b and e.fits]
        nxt = min(others, key=lambda e: e.step_time_s, default=None)
        if nxt is None:
            parts.append(f"{_sched(b)}: the only schedule that fits")
        else:
            parts.append(
                f"{_sched(b)}: the fastest schedule that fits; next {_sched(nxt)} is "
                f"{nxt.step_time_s / b.step_time_s - 1:.0%} slower (bubble "
                f"{nxt.bubble_fraction:.1%} vs {b.bubble_fraction:.1%})"
            )
    over = [e for e in res.schedules if not e.fits and e.step_time_s < b.step_time_s]
    if over:
        o = min(over, key=lambda e: e.step_time_s)
        base = ref if ref is not None else b
        act = o.memory.activations / max(base.memory.activations, 1e-30)
        parts.append(
            f"{_sched(o)} would be {b.step_time_s / o.step_time_s - 1:.0%} faster but needs "
            f"{act:.2f}x {_sched(base)}'s activation memory ({o.memory_gb_per_gpu:.0f} GB per "
            f"GPU, over the {o.memory_limit / 1e9:.0f} GB limit)"
        )
    return "; ".join(parts)


def explain(res: SearchResult) -> str:
    """Why the best configuration wins and why each other family loses, with numbers."""
    b = res.best
    c = b.config
    hw = res.hw
    fam = strategy_of(c)
    lines = [
        f"Verdict: {_NAMES[fam]} — {c.label()}",
        f"  {b.step_time_s:.3f} s per step of {res.global_batch} x {res.seq} tokens, "
        f"{_rate(b.tflops_per_gpu)} per GPU (MFU {b.mfu:.0%}), bubble {b.bubble_fraction:.1%}, "
        f"{b.memory_gb_per_gpu:.1f} of {hw.usable_memory / 1e9:.0f} GB per GPU.",
    ]
    why = []
    if c.tp > 1:
        link = hw.group_link(list(range(c.tp))).name
        where = "inside one node" if c.tp <= hw.devices_per_node else "across nodes"
        why.append(
            f"tensor parallel over {c.tp} GPUs {where} ({link}) costs {b.tp_comm_share:.0%} of "
            f"compute time in collectives"
        )
    if c.pp > 1:
        why.append(
            f"{c.pp} pipeline stages with {c.num_microbatches} micro-batches ({c.schedule}) idle "
            f"{b.bubble_fraction:.1%} of the time"
        )
    if c.fsdp:
        state = b.memory.weights_grads_optimizer
        why.append(
            f"FSDP shards the {state * c.dp / 1e9:.0f} GB of weights, gradients and Adam states "
            f"over {c.dp} replicas ({state / 1e9:.1f} GB per GPU), and its per-block all-gathers "
            f"and reduce-scatters leave {b.fsdp_comm_s:.3f} s of the step not hidden by compute"
        )
    elif c.zero1 and c.dp > 1:
        why.append(
            f"{c.dp} data-parallel replicas shard the Adam states (ZeRO-1) and spend "
            f"{b.dp_comm_s:.3f} s on the gradient reduce-scatter and parameter all-gather"
        )
    elif c.dp > 1:
        why.append(
            f"{c.dp} data-parallel replicas spend {b.dp_comm_s:.3f} s on the gradient all-reduce"
        )
    if c.recompute != "none":
        why.append(f"{c.recompute} recomputation is the cheapest that fits memory")
    lines.append("  Why: " + "; ".join(why) + "." if why else "  Why: one device does it all.")
    reason = schedule_reason(res)
    if reason:
        lines.append("  Schedule " + reason + ".")
    note = schedule_costs_note(b)
    if note:
        lines.append("  " + note)
    for name, e in res.by_strategy.items():
        if name == fam:
            continue
        if not e.fits:
            lines.append(
                f"  Not {_NAMES[name]}: does not fit — needs {e.memory_gb_per_gpu:.0f} GB per GPU "
                f"even at its best ({e.config.label()})."
            )
        else:
            lines.append(
                f"  Not {_NAMES[name]}: {e.step_time_s / b.step_time_s:.2f}x slower at its best "
                f"({e.config.label()}); its main cost is {_main_cost(e)}."
            )
    return "\n".join(lines)
