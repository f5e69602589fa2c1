"""The ``plait`` command line: ``plait train``, ``plait demo``."""

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


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the guided tour (what `make demo` runs)")
    p.add_argument("--steps", type=int, default=60)
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from plait.train import TrainConfig, train

    print(
        "plait demo: training the 'tiny' reference transformer on this machine's Python "
        "standard library source"
    )
    history = train(TrainConfig(model="tiny", steps=args.steps))
    n = max(1, len(history) // 6)
    for rec in history[::n] + ([history[-1]] if (len(history) - 1) % n else []):
        print(
            f"  step {rec['step']:4d}  loss {rec['loss']:.4f}  {rec['tokens_per_s']:,.0f} tokens/s"
        )
    print(f"loss fell from {history[0]['loss']:.4f} to {history[-1]['loss']:.4f}")
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
