"""``plait plan`` and ``plait simulate``: the planner's command line.

Registered by :func:`plait.cli.build_parser` through :func:`add_plan_parser` and
:func:`add_simulate_parser`.

Example::

    plait plan --model llama3-70b --hardware h100-sxm --gpus 64 --global-batch 512 --seq-len 8192
    plait plan --model gpt3-175b --hardware a100-80gb --gpus 1024 --global-batch 1536 \\
        --dp 16 --tp 8 --pp 8 --microbatch-size 1 --schedule interleaved-1f1b --json
    plait simulate --schedule zb-h1 --stages 4 --microbatches 8 --png zb.png
"""

from __future__ import annotations

import argparse
import json

from plait.config import ParallelConfig, add_parallel_flags

__all__ = ["add_plan_parser", "add_simulate_parser"]


def add_plan_parser(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="which mix of data, tensor and pipeline parallelism to use (predicted)",
        description="Search dp x tp x pp, schedules, micro-batching, recomputation and sequence "
        "parallelism for a model on some hardware; print the best candidates and a verdict.",
    )
    p.add_argument(
        "--model",
        default=None,
        help="model preset (e.g. llama3-70b, gpt3-175b, small), hf:DIR or PACKAGE.MODULE:FUNCTION",
    )
    for flag in ("--layers", "--hidden", "--heads", "--kv-heads", "--ffn", "--vocab"):
        p.add_argument(flag, type=int, default=None, help="custom model shape (instead of --model)")
    p.add_argument(
        "--hardware",
        default="h100-sxm",
        help="a100-40gb, a100-80gb, h100-sxm, h100-pcie, h200, local",
    )
    p.add_argument(
        "--recalibrate", action="store_true", help="measure this machine again (--hardware local)"
    )
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument(
        "--global-batch", type=int, default=None, help="sequences per step (default 8 per GPU)"
    )
    p.add_argument("--seq-len", type=int, default=None, help="default: the model's")
    # one configuration to evaluate (all of --dp --tp --pp --microbatch-size), or fixed choices
    # for the search; precision defaults to bf16-mixed over fp32 masters (fp32 on --hardware
    # local); --zero1 / --fsdp force that sharding, --no-zero1 / --no-fsdp leave it out
    add_parallel_flags(
        p,
        [
            "dtype",
            "precision",
            "dp",
            "tp",
            "pp",
            "microbatch_size",
            "schedule",
            "virtual",
            "recompute",
            "zero1",
            "fsdp",
        ],
        search=True,
    )
    p.add_argument(
        "--sequence-parallel",
        "--sp",
        dest="sequence_parallel",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="sequence parallelism on or off (default: on whenever tp > 1)",
    )
    p.add_argument(
        "--no-flash",
        action="store_true",
        help="attention keeps its seq x seq matrices (pre-2022 kernels)",
    )
    p.add_argument("--top", type=int, default=8, help="rows of the table")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--png", default=None, help="draw the chosen configuration's simulated timeline")
    p.add_argument("--trace", default=None, help="write its Perfetto (Chrome trace) JSON")
    p.add_argument("--inference", action="store_true", help="compare serving layouts instead")
    p.add_argument("--rate", type=float, default=1.0, help="requests per second (--inference)")
    p.add_argument(
        "--latency", type=float, default=30.0, help="seconds per request target (--inference)"
    )
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.set_defaults(func=_cmd_plan)


def _model(args):
    from plait.plan.model_spec import custom_model, get_model

    shape = [args.layers, args.hidden, args.heads, args.vocab]
    if args.model and any(v is not None for v in shape):
        raise ValueError("give either --model or --layers/--hidden/--heads/--vocab, not both")
    if args.model and ":" in args.model:
        # hf:DIR or PACKAGE.MODULE:FUNCTION -- the shape comes from the model itself
        from plait.models.source import resolve_model

        spec = resolve_model(args.model).spec()
    elif args.model:
        spec = get_model(args.model)
    elif all(v is not None for v in shape):
        spec = custom_model(
            args.layers,
            args.hidden,
            args.heads,
            args.vocab,
            args.kv_heads,
            args.ffn,
            seq_len=args.seq_len if args.seq_len is not None else 2048,
        )
    else:
        raise ValueError("--model NAME, or all of --layers --hidden --heads --vocab, is required")
    if args.seq_len is not None:
        from dataclasses import replace

        spec = replace(spec, seq_len=args.seq_len)
    return spec


def _check_numbers(args) -> None:
    """Refuse sizes that are not sizes, before anything is looked up or costed."""
    for flag, value in (
        ("--gpus", args.gpus),
        ("--global-batch", args.global_batch),
        ("--seq-len", args.seq_len),
        ("--dp", args.dp),
        ("--tp", args.tp),
        ("--pp", args.pp),
        ("--microbatch-size", args.microbatch_size),
        ("--virtual", args.virtual),
        ("--top", args.top),
    ):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}")


def _check_split(args, model) -> None:
    """Refuse a given split the model cannot take (one line naming the value and what would be
    valid), before the search runs."""
    from plait.config import SCHEDULE_SPECS, resolve_schedule
    from plait.plan.search import tp_problem, valid_tp

    tp, pp = args.tp, args.pp
    if tp is not None:
        why = tp_problem(model, tp)
        if why:
            ok = ", ".join(map(str, valid_tp(model)))
            raise ValueError(f"--tp {tp} {why} of {model.name}; valid tensor widths: {ok}")
        if args.gpus % tp:
            raise ValueError(f"--tp {tp} does not divide --gpus {args.gpus}")
    if pp is not None:
        if pp > model.layers:
            raise ValueError(
                f"--pp {pp} is more pipeline stages than the {model.layers} layers of "
                f"{model.name}; at most {model.layers}"
            )
        if args.gpus % pp:
            raise ValueError(f"--pp {pp} does not divide --gpus {args.gpus}")
        if pp > 1:
            sched = resolve_schedule(args.schedule or "1f1b")
            v = args.virtual or SCHEDULE_SPECS[sched].default_virtual
            if pp * v > model.layers:
                raise ValueError(
                    f"--pp {pp} x {v} chunks per rank ({sched}) = {pp * v} stages for the "
                    f"{model.layers} layers of {model.name}; at most {model.layers} (fewer "
                    f"stages or chunks)"
                )
    if tp is not None and pp is not None and args.gpus % (tp * pp):
        raise ValueError(f"--tp {tp} x --pp {pp} = {tp * pp} does not divide --gpus {args.gpus}")
    given = [args.dp, tp, pp, args.microbatch_size]
    if any(v is not None for v in given):
        if None in given:
            raise ValueError(
                "to evaluate one configuration give all of --dp --tp --pp --microbatch-size"
            )
        dp, mbs = args.dp, args.microbatch_size
        if dp * tp * pp != args.gpus:
            raise ValueError(
                f"--dp {dp} x --tp {tp} x --pp {pp} = {dp * tp * pp}, not --gpus {args.gpus}"
            )
        if args.global_batch % (dp * mbs):
            raise ValueError(
                f"--global-batch {args.global_batch} is not a multiple of dp x microbatch-size "
                f"= {dp * mbs}"
            )


def _precision(args) -> tuple[str, str]:
    """``(dtype, precision)``: as given, else bf16 mixed precision (fp32 on --hardware local)."""
    from plait.plan.search import resolve_precision

    if args.hardware == "local" and args.dtype is None and args.precision is None:
        return "fp32", "fp32"
    return resolve_precision(args.dtype, args.precision)


def _dp_shards(args) -> list[str]:
    """What the search may shard over dp: --fsdp or --zero1 forces one, --no-... drops it."""
    from plait.plan.search import DP_SHARDS

    if args.fsdp and args.zero1:
        raise ValueError("--fsdp and --zero1 are exclusive: choose one")
    for name in ("fsdp", "zero1"):
        if getattr(args, name):
            return [name]
    return [s for s in DP_SHARDS if getattr(args, s, None) is not False]


def _given_config(args, model, hw, seq, dtype, flash):
    from plait.plan.evaluate import evaluate

    dp, tp, pp, mbs = args.dp, args.tp, args.pp, args.microbatch_size
    m = args.global_batch // (dp * mbs)
    sched = args.schedule or "1f1b"
    sp = args.sequence_parallel if args.sequence_parallel is not None else tp > 1
    rcs = [args.recompute] if args.recompute else ["none", "selective", "full"]
    est = None
    for rc in rcs:
        cfg = ParallelConfig(
            dp=dp,
            tp=tp,
            pp=pp,
            microbatch_size=mbs,
            num_microbatches=m,
            schedule=sched,
            virtual=args.virtual,
            recompute=rc,
            sequence_parallel=sp,
            dtype=dtype[0],
            precision=dtype[1],
            zero1=bool(args.zero1),
            fsdp=bool(args.fsdp),
        )
        est = evaluate(model, hw, cfg, seq, simulate=True, flash_attention=flash)
        if est.fits:
            break
    return est


def _cmd_plan(args) -> int:
    from plait.plan.calibrate import get_hardware
    from plait.plan.inference import plan_inference
    from plait.plan.search import search
    from plait.plan.verdict import explain, format_table, schedule_costs_note

    _check_numbers(args)
    if args.global_batch is None:
        args.global_batch = 8 * args.gpus
    model = _model(args)
    if not args.inference:
        _check_split(args, model)
    hw = get_hardware(args.hardware, refresh=args.recalibrate)
    dtype = _precision(args)
    shards = _dp_shards(args)
    seq = model.seq_len
    flash = not args.no_flash
    if args.inference:
        compute = ParallelConfig(dtype=dtype[0], precision=dtype[1]).compute_dtype
        res = plan_inference(
            model, hw, args.gpus, args.rate, args.latency, args.prompt_len, args.output_len, compute
        )
        if args.json:
            print(
                json.dumps(
                    {"best": res.best.to_dict(), "options": [o.to_dict() for o in res.options]},
                    indent=1,
                )
            )
        else:
            print(res.verdict())
        return 0
    res = search(
        model,
        hw,
        args.gpus,
        args.global_batch,
        seq,
        recompute=[args.recompute] if args.recompute else None,
        sequence_parallel=args.sequence_parallel,
        dtype=dtype[0],
        precision=dtype[1],
        dp_shards=shards,
        flash_attention=flash,
        keep=max(args.top, 10),
        simulate_top=max(args.top, 6),
    )
    given = any(v is not None for v in (args.dp, args.tp, args.pp, args.microbatch_size))
    chosen = _given_config(args, model, hw, seq, dtype, flash) if given else res.best
    if args.png or args.trace:
        from plait.plan.evaluate import evaluate

        if chosen.sim is None:
            chosen = evaluate(model, hw, chosen.config, seq, simulate=True, flash_attention=flash)
        if chosen.sim is None:
            raise ValueError(
                "this schedule is too large to simulate for a picture; try fewer micro-batches"
            )
        if args.png:
            chosen.sim.timeline.draw(args.png, title=f"predicted: {chosen.config.label()}")
        if args.trace:
            chosen.sim.timeline.write_chrome_trace(args.trace)
    if args.json:
        out = chosen.to_dict()
        out["model"] = model.name
        out["parameters"] = model.num_parameters()
        out["hardware"] = hw.name
        out["gpus"] = args.gpus
        out["global_batch"] = args.global_batch
        out["seq_len"] = seq
        out["alternatives"] = [e.to_dict() for e in res.ranked]
        print(json.dumps(out, indent=1))
        return 0
    print(
        f"{model.name} ({_count(model.num_parameters())} parameters) on {args.gpus} x {hw.name}, "
        f"global batch {args.global_batch} x {seq} tokens; {res.considered} configurations costed, "
        f"{res.rejected_memory} did not fit"
    )
    print(format_table(res, args.top))
    if given:
        c = chosen
        print(
            f"\nGiven {c.config.label()}: {c.step_time_s:.3f} s per step, {c.tflops_per_gpu:.0f} "
            f"TFLOP/s per GPU (MFU {c.mfu:.0%}), bubble {c.bubble_fraction:.1%}, "
            f"{c.memory_gb_per_gpu:.1f} GB per GPU{'' if c.fits else ' — DOES NOT FIT'}; "
            f"the best found is {res.best.step_time_s / c.step_time_s:.2f}x its step time."
        )
        note = schedule_costs_note(c)
        if note:
            print(note)
    print()
    print(explain(res))
    return 0


def add_simulate_parser(sub) -> None:
    p = sub.add_parser(
        "simulate",
        help="simulate a pipeline schedule and draw its timeline",
        description="Run a schedule through the discrete-event simulator with uniform costs "
        "(F, B, W in seconds) and report step time, bubble and micro-batches in flight.",
    )
    p.add_argument("--stages", type=int, required=True, help="pipeline ranks p")
    add_parallel_flags(p, ["schedule", "virtual", "num_microbatches"])
    p.add_argument("--f", type=float, default=1.0, help="forward time of a stage")
    p.add_argument("--b", type=float, default=1.0, help="backward-for-inputs time")
    p.add_argument("--w", type=float, default=1.0, help="backward-for-weights time")
    p.add_argument("--comm", type=float, default=0.0, help="transfer time between stages")
    p.add_argument("--png", default=None)
    p.add_argument("--trace", default=None, help="Perfetto (Chrome trace) JSON")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_simulate)


def _cmd_simulate(args) -> int:
    from plait.pipeline.generators import build_schedule
    from plait.plan.cost import UniformCosts
    from plait.plan.simulator import simulate

    for name in ("f", "b", "w", "comm"):
        value = getattr(args, name)
        if not (value > 0 or (name == "comm" and value == 0)) or value == float("inf"):
            valid = "finite and >= 0" if name == "comm" else "finite and > 0"
            raise ValueError(f"--{name} {value} is not a time: it must be {valid}")
    if args.stages < 2:
        raise ValueError(f"--stages must be at least 2 for a pipeline, got {args.stages}")
    cfg = ParallelConfig(
        pp=args.stages,
        schedule=args.schedule,
        virtual=args.virtual,
        num_microbatches=args.num_microbatches,
    )
    sched = build_schedule(cfg.schedule, cfg.pp, cfg.num_microbatches, cfg.virtual)
    v = sched.virtual
    # A chunk of an interleaved or V schedule holds 1/v of the rank's layers.
    res = simulate(sched, UniformCosts(args.f / v, args.b / v, args.w / v, args.comm))
    p, m = cfg.pp, cfg.num_microbatches
    out = {
        "schedule": sched.name,
        "stages": p,
        "virtual": v,
        "microbatches": m,
        "step_time_s": res.pipeline_time,
        "bubble_fraction": res.bubble_fraction,
        "gpipe_1f1b_bubble_formula": (p - 1) / (m + p - 1),
        "peak_in_flight": res.peak_in_flight,
    }
    if args.png:
        res.timeline.draw(
            args.png,
            title=f"simulated {sched.name} p={p} m={m} v={v} — bubble {res.bubble_fraction:.1%}",
        )
    if args.trace:
        res.timeline.write_chrome_trace(args.trace)
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(
            f"{sched.name}: p={p} v={v} m={m}: step {res.pipeline_time:.3f} s, bubble "
            f"{res.bubble_fraction:.1%} ((p-1)/(m+p-1) = {(p - 1) / (m + p - 1):.1%}), "
            f"peak micro-batches in flight per rank {[round(x, 2) for x in res.peak_in_flight]}"
        )
    return 0


def _count(n: int) -> str:
    """``8.03B``, ``124M``, ``85.3K``: a parameter count a reader can take in."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.4g}{unit}"
    return str(n)
