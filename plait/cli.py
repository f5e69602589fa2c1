"""The ``plait`` command line: ``plait train``, ``plait demo``."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main", "build_parser"]


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train the reference transformer",
        description="Train the reference transformer on byte-level text.",
    )
    p.add_argument("--model", default="tiny", help="model preset (tiny, small)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8, help="global batch, in sequences")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--dtype", default="float32", help="float32, float64 or bfloat16")
    p.add_argument(
        "--data",
        default=None,
        help="a text file; default: the Python standard library's source on this machine",
    )
    p.add_argument(
        "--metrics-out", default=None, metavar="FILE.jsonl", help="write one JSON object per step"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from plait.train import TrainConfig, train

    cfg = TrainConfig(
        model=args.model,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        seed=args.seed,
        lr=args.lr,
        dtype=args.dtype,
        data=args.data,
        metrics_out=args.metrics_out,
        progress=not args.no_progress,
    )
    history = train(cfg)
    first, last = history[0]["loss"], history[-1]["loss"]
    print(f"loss {first:.4f} -> {last:.4f} over {len(history)} steps")
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
