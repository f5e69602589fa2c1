"""plait's pipeline runtime against torch.distributed.pipelining on a Hugging Face Llama, pp = 2.

The model is a ``transformers.LlamaForCausalLM`` built from a ``LlamaConfig`` with random weights
(nothing is downloaded), eager attention, no dropout, untied embeddings. p = 2 on CPU with gloo,
one thread per rank; the same weights, data and micro-batches for every system:

- **plait**: ``plait.pipeline.partition(model, p * v)`` (the decoder layout: each stage runs the
  model's own forward with its layers swapped for recorders), ``build_schedule(name, 2, m, v)``
  and ``PipelineRuntime(..., Mesh(pp=2), next_token_loss)``.
- **torch (tracer)**: ``torch.distributed.pipelining.pipeline(model, mb_args, split_spec)`` on a
  copy of the same model (same weights; the tracer monkey-patches the modules it splits at),
  ``Pipe.build_stage`` and ``ScheduleGPipe`` / ``Schedule1F1B`` / ``ScheduleInterleaved1F1B``.
  The tracer needs ``use_cache=False``: with the config's default ``use_cache=True`` the forward
  returns a ``DynamicCache``, which torch.export cannot flatten, and ``pipeline()`` fails.
- **torch (manual)**: hand-written stage modules holding the model's own embedding / decoder
  layers / norm / lm_head, each computing position ids, the causal mask
  (``transformers.masking_utils.create_causal_mask``) and the rotary position embeddings
  (``model.model.rotary_emb``) as ``LlamaModel.forward`` does, wrapped in ``PipelineStage``.

Every measured step runs each system once, in an order that rotates step by step, with a barrier
before and after each (``_timed`` from ``pp_vs_torch.py``), so a step's time is the slower
rank's. A step is zero_grad, m micro-batches through the pipeline, mean next-token
cross-entropy, backward (no optimizer update: the weights stay identical for all systems).
The first-step losses of all systems and of the whole model in one process are printed first.

Usage::

    python benchmarks/hf_pp_vs_torch.py --steps 20
    python benchmarks/hf_pp_vs_torch.py --schedules 1f1b --torch manual

The last line prints the median step-time ratio plait / PyTorch per schedule.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pp_vs_torch import _timed, torch_stepper  # noqa: E402

from plait import Mesh, launch  # noqa: E402
from plait.models.source import next_token_loss  # noqa: E402
from plait.pipeline import PipelineRuntime, build_schedule, partition  # noqa: E402

P = 2
# plait name, torch schedule class, virtual stages per rank
PAIRS = {
    "gpipe": ("ScheduleGPipe", 1),
    "1f1b": ("Schedule1F1B", 1),
    "interleaved-1f1b": ("ScheduleInterleaved1F1B", 2),
}


def llama_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seq, 128),
        tie_word_embeddings=False,
        attention_dropout=0.0,
        use_cache=False,  # the tracer cannot export a DynamicCache output
        attn_implementation="eager",
    )


def build_model(cfg, seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.train()
    return model


class ManualStage(nn.Module):
    """Layers ``[lo, hi)`` of a ``LlamaForCausalLM`` (the model's own modules), with the
    embedding on the first stage and the final norm + lm_head on the last; position ids, the
    causal mask and the rotary embeddings are computed as ``LlamaModel.forward`` computes them."""

    def __init__(self, model, lo: int, hi: int, first: bool, last: bool):
        super().__init__()
        base = model.model
        self.config = model.config
        self.first, self.last = first, last
        if first:
            self.embed_tokens = base.embed_tokens
        self.layers = nn.ModuleList(base.layers[lo:hi])
        self.rotary_emb = base.rotary_emb
        if last:
            self.norm = base.norm
            self.lm_head = model.lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        hidden = self.embed_tokens(x) if self.first else x
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=None,
            cache=None,
            position_ids=position_ids,
        )
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        for layer in self.layers:
            out = layer(
                hidden,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=None,
                use_cache=False,
            )
            hidden = out[0] if isinstance(out, tuple) else out
        if self.last:
            hidden = self.lm_head(self.norm(hidden))
        return hidden


def _data(cfg, batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _skip_edges(pipe) -> list[tuple[int, int]]:
    """(from stage, to stage) for every traced-stage input that skips a stage."""
    import operator

    index, edges = {}, set()
    for node in pipe.split_gm.graph.nodes:
        if node.op != "call_module" or not str(node.target).startswith("submod_"):
            continue
        stage = int(str(node.target).rsplit("_", 1)[-1])
        index[node] = stage
        for a in node.all_input_nodes:
            src = a.args[0] if a.op == "call_function" and a.target is operator.getitem else a
            if src in index and index[src] != stage - 1:
                edges.add((index[src], stage))
    return sorted(edges)


def worker(args, schedules: list[str], systems: list[str]) -> dict:
    from torch.distributed import pipelining as tpp

    torch.set_num_threads(1)
    rank = dist.get_rank()
    cfg = llama_config(args)
    m = args.microbatches
    x, y = _data(cfg, args.batch, args.seq, 0)
    mesh = Mesh(pp=P)
    cpu = torch.device("cpu")
    out: dict = {"times": {}, "loss": {}, "errors": {}}
    if rank == 0:
        with torch.no_grad():
            out["loss"]["one process"] = float(next_token_loss(build_model(cfg)(x), y))

    for name in schedules:
        torch_name, v = PAIRS[name]
        n_stages = P * v
        cls = getattr(tpp, torch_name)
        model = build_model(cfg)
        sched = build_schedule(name, P, m, v)
        mine = sorted(sched.stages_of(rank))
        first, last = 0 in mine, (n_stages - 1) in mine
        stages = partition(model, n_stages)
        rt = PipelineRuntime({s: stages[s] for s in mine}, sched, mesh, next_token_loss)

        def run_plait(model=model, rt=rt):
            model.zero_grad(set_to_none=True)
            rt.train_step(x, y)

        runners = {"plait": (run_plait, None)}
        per = cfg.num_hidden_layers // n_stages
        if "manual" in systems:
            mods = [
                ManualStage(model, s * per, (s + 1) * per, s == 0, s == n_stages - 1) for s in mine
            ]
            pst = [tpp.PipelineStage(mod, s, n_stages, cpu) for mod, s in zip(mods, mine)]
            tsched = cls(pst if v > 1 else pst[0], m, loss_fn=next_token_loss)
            runners["manual"] = torch_stepper(tsched, [model], first, last, x, y)
        if "tracer" in systems:
            traced_model = copy.deepcopy(model)  # same weights; pipeline() patches its modules
            split = {
                f"model.layers.{s * per}": tpp.SplitPoint.BEGINNING for s in range(1, n_stages)
            }
            try:
                pipe = tpp.pipeline(traced_model, mb_args=(x[: args.batch // m],), split_spec=split)
                skips = _skip_edges(pipe)
                if skips and v > 1:  # refused at the first step by PipelineScheduleMulti
                    raise RuntimeError(
                        f"the traced stages pass tensors between non-adjacent stages {skips} "
                        f"(stage 0's causal mask and rotary cos/sin go straight to every later "
                        f"stage); {torch_name} supports adjacent-stage communication only"
                    )
                pst = [pipe.build_stage(s, cpu) for s in mine]
                tsched = cls(pst if v > 1 else pst[0], m, loss_fn=next_token_loss)
                runners["tracer"] = torch_stepper(tsched, [traced_model], first, last, x, y)
            except Exception as exc:  # report how the tracer fails, keep the other systems
                cause = exc.__cause__ or exc
                out["errors"][name] = f"{type(cause).__name__}: {str(cause).splitlines()[0][:400]}"

        # first step: every system's loss (plait's on every rank, PyTorch's on the last stage)
        for key, (fn, losses) in runners.items():
            if key == "plait":
                model.zero_grad(set_to_none=True)
                out["loss"][f"plait {name}"] = rt.train_step(x, y)
            else:
                fn()
                if losses:
                    out["loss"][f"torch-{key} {name}"] = float(torch.stack(losses).detach().mean())

        keys = list(runners)
        times: dict = {k: [] for k in keys}
        for k in range(args.warmup + args.steps):
            order = keys[k % len(keys) :] + keys[: k % len(keys)]
            for key in order:
                t = _timed(runners[key][0])
                if k >= args.warmup:
                    times[key].append(t)
        out["times"][name] = times
        rt.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schedules", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    ap.add_argument("--torch", default="both", choices=["tracer", "manual", "both"])
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=688)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--glibc-defaults", action="store_true", help="do not tune malloc")
    args = ap.parse_args()
    if not args.glibc_defaults:
        # as in pp_vs_torch.py: read by glibc when each worker starts, for every system alike
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 30)
        os.environ["MALLOC_TRIM_THRESHOLD_"] = str(1 << 32)
    systems = ["tracer", "manual"] if args.torch == "both" else [args.torch]
    import transformers

    cfg = llama_config(args)
    n_params = sum(p.numel() for p in build_model(cfg).parameters())
    load = os.getloadavg() if hasattr(os, "getloadavg") else ()
    print(
        f"machine: {os.cpu_count()} CPUs, {platform.machine()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, load average "
        f"{' '.join(f'{v:.2f}' for v in load)}; p={P}, m={args.microbatches}, gloo, "
        f"1 thread per rank, malloc {'glibc defaults' if args.glibc_defaults else 'kept for reuse'}"
    )
    print(
        f"model: LlamaForCausalLM, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_attention_heads} heads / {cfg.num_key_value_heads} kv, ffn "
        f"{cfg.intermediate_size}, vocab {cfg.vocab_size}, {n_params / 1e6:.2f}M params; batch "
        f"{args.batch} x {args.seq} tokens; {args.warmup} warm-up + {args.steps} timed steps"
    )
    res = launch(worker, P, args, args.schedules, systems, threads_per_worker=1, timeout=600.0)
    losses = {k: v for r in res for k, v in r["loss"].items()}
    errors = {k: v for r in res for k, v in r["errors"].items()}
    print(f"first-step loss, one process: {losses['one process']:.6f}")
    for name in args.schedules:
        shown = [f"plait {losses[f'plait {name}']:.6f}"] + [
            f"torch-{s} {losses[f'torch-{s} {name}']:.6f}"
            for s in systems
            if f"torch-{s} {name}" in losses
        ]
        print(f"  {name:17s} " + ", ".join(shown))
    for name, err in errors.items():
        print(f"torch tracer failed for {name}: {err}")
    ratios = []
    for name in args.schedules:
        times = res[0]["times"][name]
        med = {k: statistics.median(t) for k, t in times.items()}
        line = f"{name:17s} plait {med['plait'] * 1e3:7.1f} ms"
        for s in systems:
            if s in med:
                r = med["plait"] / med[s]
                line += f"   torch-{s} {med[s] * 1e3:7.1f} ms (ratio {r:.3f})"
                ratios.append(f"{name} {r:.2f} [{s}]")
        print(line)
    print("median step-time ratio plait/PyTorch: " + ", ".join(ratios))


if __name__ == "__main__":
    main()
