"""Published training runs vs the planner's predictions (``/shared/calibration/*.csv``).

Each row of Narayanan et al. 2021 (SC21) Table 1 gives a GPT model, its ``tp x pp`` on some number
of DGX A100 GPUs and the measured TFLOP/s per GPU. The table omits the micro-batch size and the
number of interleaved chunks, so :func:`predict_row` takes the fastest of those that fits, with
the paper's settings otherwise: interleaved 1F1B, full recomputation, fp16 mixed precision, no sequence
parallelism, attention kernels that keep the ``seq x seq`` matrices.

Example::

    rows = load_rows()
    pred = predict_row(rows[0])
    pred.tflops_per_gpu / float(rows[0]["tflops_per_gpu"]) - 1   # relative error
"""

from __future__ import annotations

import csv
from pathlib import Path

from plait.config import ParallelConfig
from plait.plan.calibrate import get_hardware
from plait.plan.evaluate import Estimate, evaluate
from plait.plan.model_spec import MODEL_PRESETS, ModelSpec, custom_model

__all__ = ["load_rows", "model_of_row", "predict_row", "plan_row", "calibration_dir"]


def calibration_dir() -> Path:
    """The published runs: the workspace's ``shared/calibration`` when it sits next to the
    repository (it may hold more tables), else the copy shipped in ``plait/plan/data`` (the
    Megatron-LM 2021 table, with its source on every row)."""
    here = Path(__file__).resolve()
    for cand in (
        here.parents[2] / "shared" / "calibration",
        here.parents[3] / "shared" / "calibration",
    ):
        if cand.is_dir() and any(cand.glob("*.csv")):
            return cand
    return here.parent / "data"


def load_rows(directory: Path | None = None) -> list[dict]:
    rows = []
    for f in sorted((directory or calibration_dir()).glob("*.csv")):
        with f.open() as fh:
            rows += [dict(r, file=f.name) for r in csv.DictReader(fh)]
    return rows


def model_of_row(row: dict) -> ModelSpec:
    h, L = int(row["hidden"]), int(row["layers"])
    for m in MODEL_PRESETS.values():
        if m.hidden == h and m.layers == L and m.name.startswith("megatron"):
            return m
    return custom_model(L, h, int(row["heads"]), int(row["vocab"]), seq_len=int(row["seq_len"]))


def _paper_configs(row: dict, model: ModelSpec):
    tp, pp, gpus, B = int(row["tp"]), int(row["pp"]), int(row["gpus"]), int(row["global_batch"])
    dp = gpus // (tp * pp)
    for mbs in (1, 2, 4, 8):
        if (B // dp) % mbs:
            continue
        m = B // dp // mbs
        vs = [1] if pp == 1 else [v for v in (1, 2, 3, 4, 6, 8) if model.layers % (pp * v) == 0]
        for v in vs:
            sched = "none" if pp == 1 else ("interleaved-1f1b" if v > 1 else "1f1b")
            if sched == "interleaved-1f1b" and m % pp:
                continue
            yield ParallelConfig(
                dp=dp,
                tp=tp,
                pp=pp,
                microbatch_size=mbs,
                num_microbatches=m,
                schedule=sched,
                virtual=v,
                recompute="full",
                precision="fp16-mixed",
            )


def predict_row(row: dict, simulate: bool = True) -> Estimate:
    """The predicted step of the published configuration (best unpublished knobs that fit)."""
    model, hw = model_of_row(row), get_hardware("a100-80gb")
    best = None
    for cfg in _paper_configs(row, model):
        e = evaluate(model, hw, cfg, int(row["seq_len"]), simulate=simulate, flash_attention=False)
        if e.fits and (best is None or e.step_time_s < best.step_time_s):
            best = e
    if best is None:
        raise ValueError(f"the published configuration of {model.name} does not fit the model")
    return best


def plan_row(row: dict, simulate_top: int = 4) -> Estimate:
    """The planner's own choice for the row's model, GPUs and batch, under the paper's kernels."""
    from plait.plan.search import search

    model = model_of_row(row)
    res = search(
        model,
        get_hardware("a100-80gb"),
        int(row["gpus"]),
        int(row["global_batch"]),
        int(row["seq_len"]),
        precision="fp16-mixed",
        flash_attention=False,
        simulate_top=simulate_top,
    )
    return res.best
