"""``plait demo``: the first thing a new user runs (what ``make demo`` runs).

Within a few minutes on a 2-core CPU it: calibrates this machine (matmul rate, gloo all-reduce and
point-to-point; cached), prints the planner's verdict for the ``small`` model on 2 workers here,
trains the configuration the planner chose with a progress bar, runs ``plait compare`` on every
strategy 2 workers allow, and names the folder with the pictures it drew.

``model`` is any name :func:`plait.models.resolve_model` takes (``small`` by default; ``hf:DIR``
for a Hugging Face directory), the same path ``plait train`` and ``plait compare`` use.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from pathlib import Path

__all__ = ["run_demo"]


def _chosen(est):
    """The planner's chosen :class:`ParallelConfig`, as training runs it: with the costs its
    schedule was built for, and selective recomputation (planner-only) as none."""
    c = est.config
    return replace(
        c,
        schedule_costs=est.schedule_costs if c.pp > 1 else None,
        recompute="full" if c.recompute == "full" else "none",
    )


def run_demo(
    out_dir: str = "plait-out/demo",
    workers: int = 2,
    steps: int = 40,
    model: str = "small",
    batch_size: int = 8,
    seq_len: int = 128,
) -> int:
    from plait.compare import CompareConfig, compare
    from plait.models import resolve_model
    from plait.plan import explain, get_hardware, search
    from plait.train import TrainConfig, train

    spec = replace(resolve_model(model).spec(), seq_len=seq_len)  # bad names fail at once

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    print("1. Calibrating this machine (cached after the first run) ...")
    hw = get_hardware("local")
    print(
        f"   matmul {hw.peak_flops['fp32'] / 1e9:.0f} GFLOP/s (fp32), {hw.intra.name} "
        f"{hw.intra.bandwidth / 1e9:.2f} GB/s with {hw.intra.latency * 1e6:.0f} us latency; "
        f"{hw.memory_bytes / 2**30:.0f} GiB memory"
    )

    print(
        f"\n2. The verdict for '{model}' on {workers} workers here "
        f"(global batch {batch_size} x {seq_len} tokens):"
    )
    res = search(
        spec,
        hw,
        gpus=workers,
        global_batch=batch_size,
        seq=seq_len,
        dtype="fp32",
        max_microbatch=batch_size,
    )
    print("   " + explain(res).replace("\n", "\n   "))
    chosen = _chosen(res.best)

    print(f"\n3. Training the chosen configuration ({res.best.config.label()}) for {steps} steps:")
    hist = train(
        TrainConfig(
            model=model,
            steps=steps,
            batch_size=batch_size,
            seq_len=seq_len,
            timeline_png=str(out / "timeline-chosen.png"),
            trace_out=str(out / "trace-chosen.json"),
            metrics_out=str(out / "metrics-chosen.jsonl"),
            parallel=chosen,
        )
    )
    first = sum(r["loss"] for r in hist[:3]) / 3
    last = sum(r["loss"] for r in hist[-3:]) / 3
    print(f"   loss {first:.3f} -> {last:.3f} (mean of the first and last 3 steps)")
    measured = statistics.median(r["step_time_s"] for r in hist[2:] or hist)  # after warm-up
    predicted = res.best.step_time_s
    print(
        f"   median step {measured:.3f} s against the predicted {predicted:.3f} s "
        f"({predicted / measured - 1:+.0%})"
    )

    print(f"\n4. Measuring every strategy {workers} workers allow, beside the prediction:")
    report = compare(
        CompareConfig(
            model=model,
            workers=workers,
            mode="train",
            batch_size=batch_size,
            seq_len=seq_len,
            out_dir=str(out / "compare"),
        ),
        hardware=hw,
    )
    from rich.console import Console

    Console(width=140).print(report.rich_table())
    best = report.best()
    if best is not None:
        print(
            f"   fastest measured here: {best.strategy} ({best.dp}x{best.pp}x{best.tp}); "
            f"the planner chose {res.best.config.label()}"
        )

    print(
        f"\nPictures and traces are in {out.resolve()}/ "
        f"(timeline-chosen.png, compare/compare-train.png, compare/timeline-*.png; "
        f"the .json traces open in https://ui.perfetto.dev). Took {time.perf_counter() - t0:.0f} s."
    )
    return 0
