"""The ``plait`` command line: train, export, infer, plan, simulate, compare, demo."""

from __future__ import annotations

import argparse
import sys

from plait.config import TRANSPORTS, add_parallel_flags, parallel_from_args
from plait.infer.cli import add_infer_parser
from plait.plan.cli import add_plan_parser, add_simulate_parser

__all__ = ["main", "build_parser"]


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train the reference transformer on a dp x pp x tp mesh",
        description="Train the reference transformer on byte-level text, on one "
        "process or a dp x pp x tp mesh of local workers.",
    )
    p.add_argument("--model", default="tiny", help="model preset (tiny, small)")
    p.add_argument(
        "--layers",
        dest="n_layers",
        type=int,
        default=None,
        help="override the preset's layer count",
    )
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8, help="global batch, in sequences")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"])
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0, help="global-norm clip; 0 disables")
    p.add_argument(
        "--data",
        default=None,
        help="a text file; default: the Python standard library's source on this machine",
    )
    mesh = p.add_argument_group("how the step is split (world = dp x pp x tp local workers)")
    add_parallel_flags(mesh, TRAIN_PARALLEL_FLAGS)
    mesh.add_argument(
        "--p2p",
        choices=TRANSPORTS,
        default="auto",
        help="how pipeline ranks exchange activations and gradients: shared memory between CPU "
        "workers of one host (auto, or shm to insist), else the process group",
    )
    mesh.add_argument(
        "--loss-scale",
        type=float,
        default=2.0**16,
        help="fp16-mixed: the initial loss scale (halved on an overflow, which skips the step)",
    )
    mesh.add_argument(
        "--loss-scale-window",
        type=int,
        default=1000,
        metavar="STEPS",
        help="fp16-mixed: finite steps in a row before the loss scale doubles",
    )
    out = p.add_argument_group("outputs and fault tolerance")
    out.add_argument(
        "--metrics-out", default=None, metavar="FILE.jsonl", help="write one JSON object per step"
    )
    out.add_argument(
        "--trace-out",
        default=None,
        metavar="FILE.json",
        help="the last step's measured timeline as a Chrome trace (Perfetto)",
    )
    out.add_argument(
        "--timeline-png",
        default=None,
        metavar="FILE.png",
        help="the last step's timeline as a Gantt chart",
    )
    out.add_argument("--checkpoint-dir", default=None)
    out.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="STEPS",
        help="save every STEPS steps and at the end (default 0: at the end only)",
    )
    out.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in --checkpoint-dir that verifies and fits",
    )
    out.add_argument(
        "--allow-change",
        type=lambda text: tuple(t for t in text.split(",") if t),
        default=(),
        metavar="SETTING[,SETTING]",
        help="settings --resume may find changed since the checkpoint (e.g. lr,steps)",
    )
    out.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds a collective may wait, and a worker may make no progress, before the "
        "job fails naming it",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_cmd_train)


# The ParallelConfig fields `plait train` takes (the planner-only micro-batch size is derived
# from --batch-size).
TRAIN_PARALLEL_FLAGS = [
    "dp",
    "pp",
    "tp",
    "schedule",
    "virtual",
    "num_microbatches",
    "schedule_costs",
    "balance",
    "recompute",
    "sequence_parallel",
    "dtype",
    "precision",
    "zero1",
    "fsdp",
]


def _cmd_train(args) -> int:
    from dataclasses import fields

    from plait.train import TrainConfig

    # Every other train option's dest is the TrainConfig field of the same name.
    names = {f.name for f in fields(TrainConfig)} - {"parallel"}
    cfg = TrainConfig(
        **{k: v for k, v in vars(args).items() if k in names},
        parallel=parallel_from_args(args),
        progress=not args.no_progress,
    )
    cfg.validate()  # before torch loads: a bad setting is answered at once
    from plait.launch import WorkerError
    from plait.train import train
    from plait.train.loop import NonFiniteError

    try:
        history = train(cfg)
    except NonFiniteError as exc:  # one process: the message alone
        print(f"plait train: {exc}", file=sys.stderr)
        return 1
    except WorkerError as exc:
        print(f"plait train: {exc}", file=sys.stderr)
        if cfg.checkpoint_dir:
            print(
                "plait train: rerun with --resume to continue from the last complete checkpoint",
                file=sys.stderr,
            )
        return 1
    if history:
        first, last = history[0]["loss"], history[-1]["loss"]
        print(
            f"loss {first:.4f} -> {last:.4f} over steps {history[0]['step']}..{history[-1]['step']}"
        )
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a training checkpoint as a Hugging Face directory",
        description="Write a checkpoint of an hf: model, saved at any mesh, as a "
        "save_pretrained directory (safetensors, with the source directory's tokenizer and "
        "generation config) that transformers.AutoModelForCausalLM.from_pretrained reloads.",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="DIR",
        help="a checkpoint (step-N/) or a --checkpoint-dir root (its newest complete one)",
    )
    p.add_argument("--out", required=True, metavar="HF_DIR", help="the directory to write")
    p.add_argument(
        "--model",
        default=None,
        help="the hf:DIR it was trained from; default: the model the checkpoint records "
        "(checkpoints without plait.json need it)",
    )
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    from plait.train.checkpoint import checkpoint_meta, find_checkpoint
    from plait.train.export import export_hf

    out = export_hf(args.checkpoint, args.out, model=args.model)
    ck = find_checkpoint(args.checkpoint)
    meta = checkpoint_meta(ck) or {}
    step = meta.get("step", ck.name.rpartition("-")[2].lstrip("0") or "0")
    print(f"exported {ck} ({args.model or meta.get('model')}, step {step}) to {out}")
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the guided tour (what `make demo` runs)",
        description="Calibrate this machine, print the verdict for the small "
        "model (or --model), train the chosen configuration, and compare every strategy.",
    )
    p.add_argument(
        "--model",
        default="small",
        help="a preset (default small), hf:DIR or PACKAGE.MODULE:FUNCTION",
    )
    p.add_argument("--out-dir", default="plait-out/demo")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from plait.demo import run_demo

    return run_demo(out_dir=args.out_dir, workers=args.workers, steps=args.steps, model=args.model)


def _add_compare(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="measure every strategy on this machine beside the plan",
        description="Run the same model with each strategy the worker count "
        "allows; print measured figures beside the planner's predictions.",
    )
    p.add_argument(
        "--model",
        default="small",
        help="a preset (default small), hf:DIR or PACKAGE.MODULE:FUNCTION",
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--mode", default="train", choices=["train", "infer"])
    p.add_argument("--steps", type=int, default=8, help="training steps per strategy")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    add_parallel_flags(p, ["schedule", "num_microbatches"], num_microbatches=4)
    p.add_argument(
        "--sequences", type=int, default=64, help="sequences scored per strategy (infer)"
    )
    p.add_argument("--out-dir", default="plait-out/compare")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_compare)


def _cmd_compare(args) -> int:
    import json
    from dataclasses import fields

    from plait.compare import CompareConfig, compare

    names = {f.name for f in fields(CompareConfig)}
    report = compare(CompareConfig(**{k: v for k, v in vars(args).items() if k in names}))
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
        return 0
    from rich.console import Console

    Console(width=140).print(report.rich_table())
    print(f"chart: {report.chart}")
    for name, path in report.timelines.items():
        print(f"timeline ({name}): {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plait",
        description="Split PyTorch models across workers by pipeline, tensor and task "
        "parallelism, and find out which mix fits.",
    )
    sub = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    _add_train(sub)
    _add_export(sub)
    _add_demo(sub)
    _add_compare(sub)
    add_infer_parser(sub)
    add_plan_parser(sub)
    add_simulate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"plait {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
