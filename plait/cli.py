"""The ``plait`` command line: train, infer, plan, simulate, compare, demo."""

from __future__ import annotations

import argparse
import sys

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
    p.add_argument("--dtype", default="float32", help="float32, float64 or bfloat16")
    p.add_argument(
        "--data",
        default=None,
        help="a text file; default: the Python standard library's source on this machine",
    )
    mesh = p.add_argument_group("mesh (world = dp x pp x tp local workers)")
    mesh.add_argument("--dp", type=int, default=1, help="data-parallel replicas")
    mesh.add_argument("--pp", type=int, default=1, help="pipeline stages")
    mesh.add_argument("--tp", type=int, default=1, help="tensor-parallel width")
    mesh.add_argument(
        "--schedule",
        default="1f1b",
        help="pipeline schedule: gpipe, 1f1b, interleaved-1f1b, zb-h1, zb-v",
    )
    mesh.add_argument(
        "--microbatches", type=int, default=None, help="micro-batches per step (default: pp)"
    )
    mesh.add_argument(
        "--virtual",
        type=int,
        default=None,
        help="model chunks per pipeline rank (default 2 for interleaved-1f1b and zb-v, else 1)",
    )
    mesh.add_argument(
        "--schedule-costs",
        type=_costs,
        default=None,
        metavar="F,B,W",
        help="relative durations of forward, input-backward and weight-backward that the "
        "zero-bubble generators order by (plait plan prints the ones it assumed); default equal",
    )
    mesh.add_argument(
        "--balance", default="layers", help="how to cut stages: layers, params or time"
    )
    mesh.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute each stage's activations in backward",
    )
    mesh.add_argument(
        "--sequence-parallel",
        action="store_true",
        help="shard norms along the sequence in tensor-parallel regions",
    )
    mesh.add_argument(
        "--zero1",
        action="store_true",
        help="shard optimizer state over the dp replicas (ZeRO stage 1)",
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
    out.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS")
    out.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest complete checkpoint in --checkpoint-dir",
    )
    out.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds a collective may wait before the job fails",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from dataclasses import fields

    from plait.launch import WorkerError
    from plait.train import TrainConfig, train

    # Every train option's dest is the TrainConfig field of the same name.
    names = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(
        **{k: v for k, v in vars(args).items() if k in names}, progress=not args.no_progress
    )
    try:
        history = train(cfg)
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


def _costs(text: str) -> tuple[float, float, float]:
    """``"1,1.2,0.7"`` -> ``(1.0, 1.2, 0.7)``: three positive numbers."""
    try:
        vals = tuple(float(x) for x in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) != 3 or not all(v > 0 for v in vals):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not three positive numbers F,B,W (for example 1,1.2,0.7)"
        )
    return vals


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the guided tour (what `make demo` runs)",
        description="Calibrate this machine, print the verdict for the small "
        "model, train the chosen configuration, and compare every strategy.",
    )
    p.add_argument("--out-dir", default="plait-out/demo")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from plait.demo import run_demo

    return run_demo(out_dir=args.out_dir, workers=args.workers, steps=args.steps)


def _add_compare(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="measure every strategy on this machine beside the plan",
        description="Run the same model with each strategy the worker count "
        "allows; print measured figures beside the planner's predictions.",
    )
    p.add_argument("--model", default="small")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--mode", default="train", choices=["train", "infer"])
    p.add_argument("--steps", type=int, default=8, help="training steps per strategy")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--schedule", default="1f1b", help="pipeline schedule for pipeline mixes")
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
