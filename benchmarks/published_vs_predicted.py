"""The planner against the published Megatron-LM 2021 runs: the table of docs/calibration.md.

For every row of the calibration CSVs: the published TFLOP/s per GPU, the prediction for the
published configuration (`plait.plan.published.predict_row`), the error, and the planner's own
choice for the same model, GPUs and batch (`plan_row`). Prints Markdown; target: every error
within 15% and the planner's choice at least as fast.

    .venv/bin/python benchmarks/published_vs_predicted.py
"""

from __future__ import annotations

import statistics
import sys

from plait.plan.published import load_rows, plan_row, predict_row


def main() -> int:
    print(
        "| model | GPUs | tp | pp | published TFLOP/s/GPU | predicted | error | predicted config "
        "(unpublished knobs chosen) | planner's choice | its TFLOP/s | step s published cfg → "
        "planner |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    errors, ok = [], True
    for row in load_rows():
        pub = float(row["tflops_per_gpu"])
        pred, mine = predict_row(row), plan_row(row)
        err = pred.tflops_per_gpu / pub - 1
        errors.append(abs(err))
        ok &= abs(err) <= 0.15 and mine.step_time_s <= pred.step_time_s * 1.001
        print(
            f"| {float(row['params_b']):.1f}B | {row['gpus']} | {row['tp']} | {row['pp']} | "
            f"{pub:.0f} | {pred.tflops_per_gpu:.1f} | {err:+.1%} | {pred.config.label()} | "
            f"{mine.config.label()} | {mine.tflops_per_gpu:.1f} | "
            f"{pred.step_time_s:.2f} → {mine.step_time_s:.2f} |"
        )
    print(f"\nmax |error| {max(errors):.1%}, mean |error| {statistics.mean(errors):.1%}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
