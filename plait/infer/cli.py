"""The argparse of ``plait infer`` (registered by :func:`plait.cli.build_parser`)."""

from __future__ import annotations

import argparse
import json

__all__ = ["add_infer_parser"]


def add_infer_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``plait infer`` to a ``parser.add_subparsers()`` object.

    Example::

        sub = parser.add_subparsers(dest="command")
        add_infer_parser(sub)
    """
    p = subparsers.add_parser(
        "infer",
        help="score every sequence of a text with task, pipeline or tensor parallelism",
        description="Score every sequence of the input (its mean next-token loss) with the "
        "chosen strategy; every strategy gives the same losses. Prints throughput and "
        "per-request latency percentiles as one JSON line.",
    )
    p.add_argument(
        "--model",
        default=None,
        help="a preset (tiny, small), hf:DIR (a Hugging Face model directory) or "
        "PACKAGE.MODULE:FUNCTION; default tiny, or with --checkpoint the model it records",
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        metavar="DIR",
        help="score a trained model: load its parameters from this training checkpoint "
        "(step-N/, or a --checkpoint-dir root: its newest complete one), saved at any mesh",
    )
    p.add_argument(
        "--data", default=None, help="a text file; default: the Python standard library's source"
    )
    p.add_argument(
        "--strategy",
        default="single",
        help="single | task | pipeline | tensor, or a comma-separated mix such as "
        "task,pipeline (task = whole replicas, pipeline = stages, tensor = a tensor group)",
    )
    p.add_argument("--workers", type=int, default=1, help="processes in all (default 1)")
    p.add_argument("--stages", type=int, default=None, help="pipeline stages when mixed")
    p.add_argument("--tp", type=int, default=None, help="tensor group size when mixed")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4, help="sequences per request")
    p.add_argument(
        "--limit", type=int, default=256, help="score the first N sequences (0: every one)"
    )
    p.add_argument("--seed", type=int, default=0, help="model initialisation seed")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads per process (default 1: pinned)"
    )
    p.add_argument("--out", default=None, metavar="FILE.jsonl", help="one JSON line per sequence")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_cmd_infer)
    return p


def _cmd_infer(args) -> int:
    from plait.infer import InferConfig, infer

    report = infer(
        InferConfig(
            model=args.model if args.model or args.checkpoint else "tiny",
            checkpoint=args.checkpoint,
            data=args.data,
            strategy=args.strategy,
            workers=args.workers,
            stages=args.stages,
            tp=args.tp,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            limit=args.limit or None,
            seed=args.seed,
            threads=args.threads,
            out=args.out,
            progress=not args.no_progress,
        )
    )
    s = report.summary()
    print(
        f"{s['strategy']} (dp={s['mesh']['dp']} pp={s['mesh']['pp']} tp={s['mesh']['tp']}): "
        f"{s['sequences']} sequences, mean loss {s['mean_loss']:.4f}, in {s['seconds']:.2f} s = "
        f"{s['sequences_per_s']:.1f} seq/s; "
        f"latency per request p50 {s['latency_p50_ms']:.1f} ms, p90 {s['latency_p90_ms']:.1f} ms, "
        f"p99 {s['latency_p99_ms']:.1f} ms"
    )
    print(json.dumps(s))
    return 0
