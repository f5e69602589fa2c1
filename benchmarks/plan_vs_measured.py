"""Predicted vs measured step time of `plait train` on this machine (the planner's local truth).

Runs `plait train` on the small model for each mesh (pp=2 1F1B, tp=2, dp=2), in `--rounds` turns
(mesh A, B, C, A, B, C, ...) so that a slow spell of the shared machine falls on every mesh alike,
reads the median `step_time_s` over all turns from --metrics-out (warm-up steps dropped), predicts
the same configuration with the calibrated `local` hardware spec, and prints both, the error, and
where the step went: forward and backward (`fb`, pipeline and tensor communication included),
the data-parallel gradient all-reduce left after backward (`dp`), and clipping plus the optimizer
(`upd`), predicted / measured in milliseconds. Target: within 20%.

    .venv/bin/python benchmarks/plan_vs_measured.py [--steps 12] [--rounds 2] [--recalibrate]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from plait.plan import ParallelConfig, evaluate, get_hardware, get_model

MESHES = [
    {"dp": 1, "tp": 1, "pp": 2, "schedule": "1f1b"},
    {"dp": 1, "tp": 2, "pp": 1, "schedule": "none"},
    {"dp": 2, "tp": 1, "pp": 1, "schedule": "none"},
]


def measure(mesh: dict, args) -> list[dict]:
    """One `plait train` run of ``mesh``: its step records after the warm-up steps."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "m.jsonl"
        cmd = [
            sys.executable,
            "-m",
            "plait.cli",
            "train",
            "--model",
            args.model,
            "--steps",
            str(args.steps),
            "--batch-size",
            str(args.batch_size),
            "--seq-len",
            str(args.seq_len),
            "--dp",
            str(mesh["dp"]),
            "--tp",
            str(mesh["tp"]),
            "--pp",
            str(mesh["pp"]),
            "--microbatches",
            str(args.microbatches),
            "--metrics-out",
            str(out),
            "--no-progress",
        ]
        if mesh["pp"] > 1:
            cmd += ["--schedule", mesh["schedule"]]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        records = [json.loads(line) for line in out.read_text().splitlines()]
    return records[args.warmup :]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--recalibrate", action="store_true")
    args = ap.parse_args()
    hw = get_hardware("local", refresh=args.recalibrate)
    model = get_model(args.model)
    print(f"local: {hw.source}")
    records: dict[int, list[dict]] = {i: [] for i in range(len(MESHES))}
    for _ in range(args.rounds):
        for i, mesh in enumerate(MESHES):
            records[i] += measure(mesh, args)
    print(
        f"{'mesh':<18} {'predicted s':>11} {'measured s':>10} {'error':>7}   ms: {'fb':>9} {'dp':>7} {'upd':>7}"
    )
    worst = 0.0
    for i, mesh in enumerate(MESHES):
        mb = args.batch_size // (mesh["dp"] * args.microbatches)
        cfg = ParallelConfig(
            dp=mesh["dp"],
            tp=mesh["tp"],
            pp=mesh["pp"],
            microbatch_size=mb,
            num_microbatches=args.microbatches,
            schedule=mesh["schedule"],
            dtype="fp32",
        )
        est = evaluate(model, hw, cfg, args.seq_len)
        pred = est.step_time_s
        rs = records[i]
        meas = statistics.median(r["step_time_s"] for r in rs)

        def phase(key, rs=rs):
            return statistics.median(r["phase_s"][key] for r in rs) * 1e3

        pred_fb = (pred - est.dp_comm_s - est.optimizer_s) * 1e3
        err = pred / meas - 1
        worst = max(worst, abs(err))
        label = f"dp{mesh['dp']} tp{mesh['tp']} pp{mesh['pp']} {mesh['schedule']}"
        print(
            f"{label:<18} {pred:>11.4f} {meas:>10.4f} {err:>+7.1%}   "
            f"{pred_fb:>4.0f}/{phase('forward_backward'):<4.0f} "
            f"{est.dp_comm_s * 1e3:>3.0f}/{phase('dp_sync_wait'):<3.0f} "
            f"{est.optimizer_s * 1e3:>3.0f}/{phase('update'):<3.0f}"
        )
    print(f"worst error {worst:.1%} (target 20%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
