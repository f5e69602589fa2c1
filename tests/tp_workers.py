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
    return {
        "logits": _rel(got.logits, want.logits),
        "loss": _rel(got.loss.detach(), want.loss.detach()),
        "q_proj_rows": q.weight.shape[0],
        "type": type(q).__name__,
    }
