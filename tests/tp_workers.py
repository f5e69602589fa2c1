"""Worker functions for the tensor-parallel tests (module level: launch pickles them by name)."""

from __future__ import annotations

import torch
from torch import nn

from plait import comm
from plait.mesh import Mesh
from plait.models.transformer import Block, ModelConfig, Transformer
from plait.tensor import (
    gather_grads,
    gather_state_dict,
    gather_vocab,
    grad_norm_sq,
    is_tp_sharded,
    loss_fn,
    parallelize,
)

# vocab 254 does not divide by 4: tp=4 exercises the padded vocabulary shard.
CFG = ModelConfig(vocab_size=254, n_layers=2, hidden=32, n_heads=4, ffn=64, max_seq_len=16)
B, T = 3, 8
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _batch(cfg: ModelConfig = CFG, seq: int = T):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (B, seq), generator=g)
    y = torch.randint(0, cfg.vocab_size, (B, seq), generator=g)
    return x, y


def _rel(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    """Largest difference relative to the reference's largest magnitude (at least ``floor``)."""
    scale = max(b.abs().max().item(), floor) or 1.0
    return (a.double() - b.double()).abs().max().item() / scale


def _grad_errors(grads: dict, ref: nn.Module, rename=lambda n: n) -> dict[str, float]:
    ref_grads = dict(ref.named_parameters())
    # The key bias's gradient is zero in exact arithmetic (softmax ignores a shift shared by all
    # keys), so its reference is rounding noise: measure every gradient against at least
    # sqrt(eps) of the largest gradient in the model (1.5e-8 in float64, 3.5e-4 in float32).
    eps = torch.finfo(next(ref.parameters()).dtype).eps
    floor = eps**0.5 * max(p.grad.abs().max().item() for p in ref.parameters())
    out = {}
    for name, g in grads.items():
        r = ref_grads[rename(name)].grad
        out[rename(name)] = _rel(g, r, floor)
    return out


def equivalence(tp: int, sequence_parallel: bool, dtype: str, dp: int = 1) -> dict:
    """One forward/backward of the sharded model against the unsharded one on every rank."""
    mesh = Mesh(dp=dp, tp=tp)
    dt = DTYPES[dtype]
    x, y = _batch()
    ref = Transformer(CFG, seed=0).to(dt)
    ref_logits = ref(x)
    ref_loss = ref.loss(ref_logits, y)
    ref_loss.backward()

    model = Transformer(CFG, seed=0).to(dt)
    full_numel = sum(p.numel() for p in model.parameters())
    parallelize(model, mesh, sequence_parallel=sequence_parallel)
    local_numel = sum(p.numel() for p in model.parameters())
    state = gather_state_dict(model)
    logits = model(x)
    loss = model.loss(logits, y)
    loss.backward()
    grads = gather_grads(model)
    full_logits = gather_vocab(logits, mesh.group("tp"), CFG.vocab_size)
    ref_state = ref.state_dict()
    norm_sq = grad_norm_sq(model.parameters(), mesh.group("tp"))
    ref_norm_sq = sum(p.grad.double().pow(2).sum() for p in ref.parameters())
    return {
        "logits": _rel(full_logits, ref_logits),
        "local_logits_width": logits.shape[-1],
        "loss": _rel(loss.detach(), ref_loss.detach()),
        "grads": _grad_errors(grads, ref),
        "state_keys_match": sorted(state) == sorted(ref_state),
        "state_exact": all(torch.equal(state[k], ref_state[k]) for k in ref_state),
        "sharded_fraction": local_numel / full_numel,
        "n_sharded": sum(is_tp_sharded(p) for p in model.parameters()),
        "grad_norm_sq": _rel(norm_sq, ref_norm_sq),
    }


def stages(tp: int, sequence_parallel: bool) -> dict:
    """Shard two pipeline-stage-like parts separately (embed+block0, block1+head) and chain them."""
    mesh = Mesh(tp=tp)
    x, y = _batch()
    ref = Transformer(CFG, seed=0).double()
    ref.loss(ref(x), y).backward()

    m = Transformer(CFG, seed=0).double()
    s0 = parallelize(nn.Sequential(m.embed, m.blocks[0]), mesh, sequence_parallel=sequence_parallel)
    # The second stage gets the ProcessGroup itself rather than the mesh.
    s1 = parallelize(
        nn.Sequential(m.blocks[1], m.head), mesh.group("tp"), sequence_parallel=sequence_parallel
    )
    h = s0(x)
    loss = loss_fn(s1)(s1(h), y)
    loss.backward()
    names0 = {"0": "embed", "1": "blocks.0"}
    names1 = {"0": "blocks.1", "1": "head"}

    def rename(table):
        return lambda n: table[n.split(".", 1)[0]] + "." + n.split(".", 1)[1]

    errors = {
        **_grad_errors(gather_grads(s0), ref, rename(names0)),
        **_grad_errors(gather_grads(s1), ref, rename(names1)),
    }
    ref_loss = ref.loss(ref(x), y)
    return {"hidden_shape": tuple(h.shape), "loss": _rel(loss.detach(), ref_loss), "grads": errors}


def sequence_error(tp: int) -> str:
    """Sequence parallelism with a sequence length that does not divide by tp must refuse."""
    model = parallelize(Transformer(CFG, seed=0), Mesh(tp=tp), sequence_parallel=True)
    x, _ = _batch(seq=tp + 1)
    try:
        model(x)
    except ValueError as e:
        return str(e)
    return "no error"


def block_counts(tp: int, sequence_parallel: bool) -> dict:
    """Collectives of one block's forward and backward, as (calls, bytes) per (op, phase)."""
    mesh = Mesh(tp=tp)
    torch.manual_seed(0)
    block = parallelize(Block(CFG).double(), mesh, sequence_parallel=sequence_parallel)
    seq = T // tp if sequence_parallel else T
    x = torch.randn(B, seq, CFG.hidden, dtype=torch.float64, requires_grad=True)
    comm.stats.reset()
    y = block(x)
    forward = {(op, phase): v for (_, op, phase), v in comm.stats.table().items()}
    comm.stats.reset()
    y.square().sum().backward()
    backward = {(op, phase): v for (_, op, phase), v in comm.stats.table().items()}
    return {"forward": forward, "backward": backward}


def model_counts(tp: int) -> dict:
    """One training step of the whole model: the metrics a trainer would report."""
    mesh = Mesh(tp=tp)
    model = parallelize(Transformer(CFG, seed=0), mesh)
    x, y = _batch()
    comm.stats.reset()
    model.loss(model(x), y).backward()
    return comm.stats.metrics() | {
        "forward_all_reduce": comm.stats.calls("all_reduce", phase="forward"),
        "backward_all_reduce": comm.stats.calls("all_reduce", phase="backward"),
    }


def collectives(tp: int) -> dict:
    """The autograd collectives against their definitions, with gradients."""
    from plait.tensor import (
        copy_to_region,
        gather_from_region,
        gather_from_sequence,
        reduce_from_region,
        reduce_scatter_to_seq,
        scatter_to_sequence,
    )

    group = Mesh(tp=tp).group("tp")
    rank = torch.distributed.get_rank()
    out = {}
    g = torch.Generator().manual_seed(0)
    every = torch.randn(tp, 2, 4, 3, generator=g, dtype=torch.float64)  # each rank's own input
    mine = every[rank].clone().requires_grad_(True)
    total = every.sum(0)

    y = reduce_from_region(mine, group)
    y.backward(torch.ones_like(y))
    out["reduce_fwd"] = torch.allclose(y, total)
    out["reduce_bwd"] = torch.equal(mine.grad, torch.ones_like(mine))

    mine.grad = None
    y = copy_to_region(mine, group)
    y.backward(torch.full_like(y, float(rank + 1)))
    out["copy_fwd"] = torch.equal(y, mine)
    out["copy_bwd"] = torch.allclose(mine.grad, torch.full_like(mine, tp * (tp + 1) / 2))

    mine.grad = None
    y = gather_from_sequence(mine, group, 1)  # (2, 4*tp, 3)
    out["ag_fwd"] = torch.equal(y, torch.cat(list(every), dim=1))
    w = torch.arange(y.numel(), dtype=torch.float64).view_as(y)
    (y * w).sum().backward()  # grad = w on every rank, reduce-scattered: tp * own chunk of w
    out["ag_bwd"] = torch.allclose(mine.grad, tp * w.chunk(tp, dim=1)[rank])

    mine.grad = None
    y = reduce_scatter_to_seq(mine, group, 1) if 4 % tp == 0 else None
    out["rs_fwd"] = torch.allclose(y, total.chunk(tp, dim=1)[rank])
    y.backward(torch.full_like(y, float(rank)))
    expect = torch.cat([torch.full_like(c, float(r)) for r, c in enumerate(mine.chunk(tp, 1))], 1)
    out["rs_bwd"] = torch.equal(mine.grad, expect)

    mine.grad = None
    y = scatter_to_sequence(mine, group, 1)
    out["scatter_fwd"] = torch.equal(y, mine.chunk(tp, 1)[rank])
    y.backward(torch.ones_like(y))
    out["scatter_bwd"] = torch.equal(mine.grad, torch.ones_like(mine))

    mine.grad = None
    y = gather_from_region(mine, group)  # last dim
    out["gather_fwd"] = torch.equal(y, torch.cat(list(every), dim=-1))
    y.backward(torch.arange(y.numel(), dtype=torch.float64).view_as(y))
    out["gather_bwd"] = torch.equal(
        mine.grad, torch.arange(y.numel(), dtype=torch.float64).view_as(y).chunk(tp, -1)[rank]
    )
    return out


def llama_logits(tp: int) -> dict:
    """A Hugging Face Llama built from its config, sharded by llama_plan, against itself whole."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import LlamaConfig, LlamaForCausalLM

    from plait.tensor import llama_plan

    config = LlamaConfig(
        vocab_size=101,  # odd: the vocabulary shard is padded
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    ref = LlamaForCausalLM(config).double().eval()
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).double().eval()
    mesh = Mesh(tp=tp)
    parallelize(model, mesh, plan=llama_plan(model))
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, config.vocab_size, (2, 8), generator=g)
    want = ref(input_ids=ids, labels=ids)
    got = model(input_ids=ids, labels=ids)
    q = model.model.layers[0].self_attn.q_proj
    try:  # a sharded model's save_pretrained would write shard shapes: refused
        model.save_pretrained("/nonexistent/never-written")
        refused = ""
    except ValueError as exc:
        refused = str(exc)
    return {
        "logits": _rel(got.logits, want.logits),
        "loss": _rel(got.loss.detach(), want.loss.detach()),
        "q_proj_rows": q.weight.shape[0],
        "type": type(q).__name__,
        "save_refused": refused,
    }


# --- Hugging Face models, sharded by the structural plan ---------------------------------------

HF_B, HF_T = 2, 8


def hf_model(family: str, layers: int = 2, attn: str = "sdpa"):
    """A tiny Hugging Face causal LM of ``family`` from its config, float64, random weights."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    common = dict(
        vocab_size=101,  # odd: the vocabulary shard is padded
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=32,
        attn_implementation=attn,
    )
    if family == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=101,
            n_embd=32,
            n_layer=layers,
            n_head=4,
            n_positions=32,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
            attn_implementation=attn,
        )  # tie_word_embeddings=True by default
        cls = transformers.GPT2LMHeadModel
    elif family == "phi3":
        cfg = transformers.Phi3Config(
            **common, num_key_value_heads=2, resid_pdrop=0.0, embd_pdrop=0.0, pad_token_id=0
        )
        cls = transformers.Phi3ForCausalLM
    else:
        cls_cfg, cls = {
            "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
            "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        }[family]
        extra = {"tie_word_embeddings": False}
        if family == "llama":
            extra["attention_bias"] = True  # o_proj bias: a replicated row-parallel bias
        cfg = cls_cfg(**common, num_key_value_heads=2, **extra)
    torch.manual_seed(0)
    return cls(cfg).double()


def _hf_ids(vocab: int, step: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, vocab, (HF_B, HF_T), generator=g)


def _next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    )


def _replicated_identical(module: nn.Module, group) -> bool:
    """Every replicated parameter bit-identical on every rank of the tensor group."""
    size = torch.distributed.get_world_size(group)
    for p in module.parameters():
        if is_tp_sharded(p):
            continue
        copies = [torch.empty_like(p.detach()) for _ in range(size)]
        torch.distributed.all_gather(copies, p.detach().contiguous(), group=group)
        if not all(torch.equal(c, p.detach()) for c in copies):
            return False
    return True


def hf_equivalence(family: str, tp: int, sequence_parallel: bool, optim: str, steps: int) -> dict:
    """A tiny HF model sharded by its default (structural) plan against the unsharded model: logits,
    loss (loss_fn and the model's own labels= loss), gathered gradients, then a few clipped steps."""
    import copy

    from plait.tensor import clip_grad_norm_

    mesh = Mesh(tp=tp)
    group = mesh.group("tp")
    from plait.tensor.hf import describe

    ref = hf_model(family, attn="eager" if family == "llama" else "sdpa")
    model = parallelize(copy.deepcopy(ref), mesh, sequence_parallel=sequence_parallel)
    vocab = ref.config.vocab_size
    ids = _hf_ids(vocab)
    first_norm = next(n for n, what in describe(ref).items() if what.startswith("norm"))
    seen = []
    model.get_submodule(first_norm).register_forward_hook(
        lambda m, a, o: seen.append(a[0].shape[1])
    )

    want = ref(input_ids=ids).logits
    ref_loss = _next_token_loss(want, ids)
    ref_loss.backward()
    out = model(input_ids=ids)
    loss = loss_fn(model)(out.logits[:, :-1], ids[:, 1:])
    loss.backward()
    grads = gather_grads(model)
    own = model(input_ids=ids, labels=ids).loss  # the model's own loss_function, now sharded
    head = model.get_output_embeddings()
    result = {
        "local_vocab": out.logits.shape[-1],
        "logits": _rel(gather_vocab(out.logits, group, vocab), want),
        "loss": _rel(loss.detach(), ref_loss.detach()),
        "own_loss": _rel(own.detach(), ref_loss.detach()),
        "grads": _grad_errors(grads, ref),
        "grad_names_match": sorted(grads) == sorted(n for n, _ in ref.named_parameters()),
        "tied": head.weight is model.get_input_embeddings().weight,
        "head_sharded": is_tp_sharded(head.weight),
        "norm_tokens": seen[0],  # the sequence length a decoder layer's norm works on
    }

    def make(params):
        if optim == "adamw":
            return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
        return torch.optim.SGD(params, lr=0.5, momentum=0.9)

    opt, ref_opt = make(model.parameters()), make(ref.parameters())
    norms = []
    for step in range(steps):
        ids = _hf_ids(vocab, step + 1)
        opt.zero_grad()
        ref_opt.zero_grad()
        _next_token_loss(ref(input_ids=ids).logits, ids).backward()
        loss_fn(model)(model(input_ids=ids).logits[:, :-1], ids[:, 1:]).backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        norm = clip_grad_norm_(model.parameters(), 0.5, mesh)
        norms.append(_rel(norm, ref_norm))
        opt.step()
        ref_opt.step()
    state = gather_state_dict(model)
    ref_state = ref.state_dict()
    result["norms"] = norms
    result["clipped"] = steps == 0 or float(ref_norm) > 0.5
    result["replicated_identical"] = _replicated_identical(model, group)
    result["params_after"] = max(_rel(state[k], ref_state[k]) for k in ref_state)
    return result


class _LlamaStage(nn.Module):
    """Part of an HF Llama under its own names: some decoder layers, perhaps the embedding (first)
    or the final norm and head (last), as a pipeline stage would hold them."""

    def __init__(self, full: nn.Module, layers: list[int], first: bool, last: bool):
        super().__init__()
        self.model = nn.Module()
        if first:
            self.model.embed_tokens = full.model.embed_tokens
        self.model.layers = nn.ModuleDict({str(i): full.model.layers[i] for i in layers})
        if last:
            self.model.norm = full.model.norm
            self.lm_head = full.lm_head
        self.rotary = [full.model.rotary_emb]  # a list: not a submodule (no parameters anyway)
        self.first, self.last = first, last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.model.embed_tokens(x) if self.first else x
        pos = torch.arange(h.shape[1]).unsqueeze(0)
        cos_sin = self.rotary[0](h, pos)
        for layer in self.model.layers.values():  # sdpa, no mask: causal
            h = layer(h, attention_mask=None, position_embeddings=cos_sin, position_ids=pos)
        return self.lm_head(self.model.norm(h)) if self.last else h


def hf_equivalence_many(tp: int, cases: list[tuple[str, bool, str, int]]) -> dict:
    """:func:`hf_equivalence` for several ``(family, sequence_parallel, optim, steps)`` in one
    launch (starting workers costs more than these tiny models)."""
    return {case: hf_equivalence(case[0], tp, *case[1:]) for case in cases}


def hf_stages(tp: int) -> dict:
    """:func:`hf_stage_pair` without and with sequence parallelism."""
    return {sp: hf_stage_pair(tp, sp) for sp in (False, True)}


def hf_stage_pair(tp: int, sequence_parallel: bool) -> dict:
    """A 3-layer Llama cut into two stages (embed + layer 0; layers 1-2 + norm + head), each
    sharded by the default plan on its own, chained, against the whole unsharded model."""
    import copy

    mesh = Mesh(tp=tp)
    ref = hf_model("llama", layers=3)
    full = copy.deepcopy(ref)
    s0 = _LlamaStage(full, [0], first=True, last=False)
    s1 = _LlamaStage(full, [1, 2], first=False, last=True)
    names1 = sorted(n for n, _ in s1.named_parameters())
    s0 = parallelize(s0, mesh, sequence_parallel=sequence_parallel)
    s1 = parallelize(s1, mesh, sequence_parallel=sequence_parallel)
    ids = _hf_ids(ref.config.vocab_size)
    want = ref(input_ids=ids).logits
    ref_loss = _next_token_loss(want, ids)
    ref_loss.backward()
    h = s0(ids)
    logits = s1(h)
    loss = loss_fn(s1)(logits[:, :-1], ids[:, 1:])
    loss.backward()
    grads = {**gather_grads(s0), **gather_grads(s1)}
    return {
        "stage1_names": names1,
        "hidden_shape": tuple(h.shape),
        "logits": _rel(gather_vocab(logits, mesh.group("tp"), ref.config.vocab_size), want),
        "loss": _rel(loss.detach(), ref_loss.detach()),
        "grads": _grad_errors(grads, ref),
        "all_grads": sorted(grads) == sorted(n for n, _ in ref.named_parameters()),
    }
