"""Predicted vs measured step time of `plait train` on this machine (the planner's local truth).

Runs `plait train` on the small model for each mesh (pp=2 1F1B, tp=2, dp=2), reads the median
`step_time_s` from its --metrics-out (warm-up steps dropped), predicts the same configuration with
the calibrated `local` hardware spec, and prints both and the error. Target: within 20%.

    .venv/bin/python benchmarks/plan_vs_measured.py [--steps 12] [--batch-size 8] [--seq-len 128]
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


def measure(mesh: dict, args) -> float:
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
        times = [json.loads(line)["step_time_s"] for line in out.read_text().splitlines()]
    return statistics.median(times[args.warmup :])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--recalibrate", action="store_true")
    args = ap.parse_args()
    hw = get_hardware("local", refresh=args.recalibrate)
    model = get_model(args.model)
    print(f"local: {hw.source}")
    print(f"{'mesh':<22} {'predicted s':>12} {'measured s':>11} {'error':>8}")
    worst = 0.0
    for mesh in MESHES:
        mb = args.batch_size // (mesh["dp"] * args.microbatches)
        cfg = ParallelConfig(
            mesh["dp"],
            mesh["tp"],
            mesh["pp"],
            mb,
            args.microbatches,
            mesh["schedule"],
            1,
            "none",
            False,
            "fp32",
        )
        pred = evaluate(model, hw, cfg, args.seq_len).step_time_s
        meas = measure(mesh, args)
        err = pred / meas - 1
        worst = max(worst, abs(err))
        label = f"dp{mesh['dp']} tp{mesh['tp']} pp{mesh['pp']} {mesh['schedule']}"
        print(f"{label:<22} {pred:>12.4f} {meas:>11.4f} {err:>+8.1%}")
    print(f"worst error {worst:.1%} (target 20%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
