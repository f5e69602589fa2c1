"""Plans for users' models, found by structure: what a module holds, not what its class is called.

:func:`hf_plan` walks a model (or any part of one: a pipeline stage that keeps some decoder
layers, perhaps the embedding or the head, under the model's own dotted names) and recognises:

==================  ===========================================================================
attention           ``q_proj``/``k_proj``/``v_proj``/``o_proj`` (Llama, Mistral, Qwen2 -- with
                    q/k/v biases), fused ``qkv_proj`` + ``o_proj`` (Phi-3), or GPT-2's
                    ``c_attn`` + ``c_proj`` (transposed ``Conv1D``): sharded by heads -- the
                    projections into the heads column-parallel (fused ones cut per part, so each
                    rank holds *its* heads' q, k and v), the output row-parallel; the module is
                    given its local head counts (:func:`~plait.tensor.styles.localize_heads`).
                    Grouped-query attention needs tp to divide the key/value heads too.
MLP                 ``gate_proj``/``up_proj``/``down_proj``, fused ``gate_up_proj`` +
                    ``down_proj`` (cut per part: each rank its share of gate and of up), or
                    GPT-2's ``c_fc`` + ``c_proj``: column- then row-parallel.
decoder layer       a module holding an attention and an MLP; its other parameters (the norms)
                    are replicated.
token embedding     an ``nn.Embedding`` of ``config.vocab_size`` rows (or named ``embed_tokens``,
                    ``wte``, ...): vocabulary-parallel. Position tables stay replicated.
output head         an ``nn.Linear`` onto the vocabulary (or named ``lm_head``): vocabulary-
                    parallel, logits left sharded for :func:`~plait.tensor.loss_fn`. A head tied
                    to the embedding (GPT-2, ``tie_word_embeddings=True``) keeps sharing its one
                    sharded matrix.
==================  ===========================================================================

Sequence parallelism: the decoder layers work on ``(B, T/tp, H)`` -- norms on this rank's tokens,
an all-gather before attention and the MLP, a reduce-scatter after -- while everything outside them
stays whole: the first decoder layer of the module keeps its chunk of the input and the last
all-gathers its output. So the model's own code (position ids, rotary tables, causal masks,
reshapes such as GPT-2's ``view(output_shape)``) sees the full sequence, and a pipeline stage takes
and returns whole sequences.
"""

from __future__ import annotations

from torch import nn

from plait.tensor.layers import linear_dims
from plait.tensor.styles import (
    Colwise,
    Heads,
    Region,
    Rowwise,
    SequenceNorm,
    SequenceSpan,
    Style,
    Vocab,
)

__all__ = ["hf_plan", "describe"]

TOKEN_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "tok_embeddings", "embed_in")
POSITION_EMBEDDINGS = ("wpe", "embed_positions", "position_embeddings")
HEADS = ("lm_head", "embed_out")


def _config(module: nn.Module):
    """The model config ``module`` (or a submodule, e.g. an attention) carries, or None."""
    for m in module.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "num_attention_heads"):
            return cfg
    return None


def _is(m: nn.Module | None, transposed: bool | None = None) -> bool:
    dims = None if m is None else linear_dims(m)
    return dims is not None and (transposed is None or dims[2] == transposed)


def _int(*values) -> int | None:
    for v in values:
        if type(v) is int:
            return v
    return None


def _head_dim(m: nn.Module, cfg, name: str) -> int:
    hd = _int(getattr(m, "head_dim", None), getattr(cfg, "head_dim", None))
    if hd is None and cfg is not None:
        heads, hidden = getattr(cfg, "num_attention_heads", None), getattr(cfg, "hidden_size", None)
        if heads and hidden:
            hd = hidden // heads
    if not hd:
        raise ValueError(f"cannot tell the head size of attention {name!r}: no head_dim, no config")
    return hd


def _attention(m: nn.Module, name: str, cfg) -> tuple[str, Heads, dict[str, Style]] | None:
    """``(kind, style of the module, styles of its children)`` for an attention module."""
    ch = dict(m.named_children())
    cfg = getattr(m, "config", cfg)
    if all(_is(ch.get(k), False) for k in ("q_proj", "k_proj", "v_proj", "o_proj")):
        hd = _head_dim(m, cfg, name)
        q, k, v = (ch[n].out_features for n in ("q_proj", "k_proj", "v_proj"))
        if q % hd or k % hd or k != v:
            raise ValueError(
                f"attention {name!r}: q/k/v widths {q}/{k}/{v} are not whole heads of {hd}"
            )
        heads, kv = q // hd, k // hd
        children = {
            "q_proj": Colwise(what="num_attention_heads * head_dim"),
            "k_proj": Colwise(what="num_key_value_heads * head_dim"),
            "v_proj": Colwise(what="num_key_value_heads * head_dim"),
            "o_proj": Rowwise(what="num_attention_heads * head_dim"),
        }
        return "q/k/v/o", Heads(heads=heads, kv_heads=kv, head_dim=hd), children
    if _is(ch.get("qkv_proj"), False) and _is(ch.get("o_proj"), False):
        hd = _head_dim(m, cfg, name)
        out = ch["qkv_proj"].out_features
        kv = _int(
            getattr(m, "num_key_value_heads", None), getattr(cfg, "num_key_value_heads", None)
        )
        heads = _int(getattr(m, "num_heads", None), getattr(cfg, "num_attention_heads", None))
        if kv is None and heads is not None:
            kv = heads
        if heads is None or (heads + 2 * kv) * hd != out:
            raise ValueError(
                f"attention {name!r}: cannot split qkv_proj's {out} outputs into query and "
                f"key/value heads of {hd} (num_attention_heads={heads}, num_key_value_heads={kv})"
            )
        children = {
            "qkv_proj": Colwise(what="heads", parts=(heads * hd, kv * hd, kv * hd)),
            "o_proj": Rowwise(what="num_attention_heads * head_dim"),
        }
        return "fused qkv_proj", Heads(heads=heads, kv_heads=kv, head_dim=hd), children
    if _is(ch.get("c_attn"), True) and _is(ch.get("c_proj"), True):
        if getattr(m, "is_cross_attention", False) or "q_attn" in ch:
            raise ValueError(
                f"cross-attention {name!r} (q_attn + c_attn over the encoder's states) is not "
                f"supported by tensor parallelism; shard a decoder-only model"
            )
        hd = _head_dim(m, cfg, name)
        heads = _int(getattr(m, "num_heads", None), getattr(cfg, "num_attention_heads", None))
        width = heads * hd if heads else None
        if width is None or ch["c_attn"].nf != 3 * width:
            raise ValueError(
                f"attention {name!r}: c_attn has {ch['c_attn'].nf} outputs, not 3 x "
                f"num_heads={heads} x head_dim={hd}"
            )
        children = {
            "c_attn": Colwise(what="heads", parts=(width, width, width)),
            "c_proj": Rowwise(what="num_heads * head_dim"),
        }
        return "fused c_attn (Conv1D)", Heads(heads=heads, kv_heads=heads, head_dim=hd), children
    return None


def _mlp(m: nn.Module, name: str) -> tuple[str, Style | None, dict[str, Style]] | None:
    ch = dict(m.named_children())
    if all(_is(ch.get(k), False) for k in ("gate_proj", "up_proj", "down_proj")):
        children = {
            "gate_proj": Colwise(what="intermediate_size"),
            "up_proj": Colwise(what="intermediate_size"),
            "down_proj": Rowwise(what="intermediate_size"),
        }
        return "gate/up/down", Region(), children
    if _is(ch.get("gate_up_proj"), False) and _is(ch.get("down_proj"), False):
        out = ch["gate_up_proj"].out_features
        if out % 2:
            raise ValueError(f"MLP {name!r}: gate_up_proj has an odd width {out}")
        children = {
            "gate_up_proj": Colwise(what="intermediate_size", parts=(out // 2, out // 2)),
            "down_proj": Rowwise(what="intermediate_size"),
        }
        return "fused gate_up_proj", None, children
    if _is(ch.get("c_fc"), True) and _is(ch.get("c_proj"), True):
        children = {
            "c_fc": Colwise(what="intermediate_size"),
            "c_proj": Rowwise(what="intermediate_size"),
        }
        return "c_fc/c_proj (Conv1D)", None, children
    return None


def describe(module: nn.Module) -> dict[str, str]:
    """What :func:`hf_plan` recognised, by module name (for messages and tests).

    Example::

        describe(GPT2LMHeadModel(cfg))["transformer.h.0.attn"]   # 'attention: fused c_attn (Conv1D)'
    """
    return _walk(module)[1]


def hf_plan(module: nn.Module, *, gather_output: bool = False) -> dict[str, Style]:
    """The plan for whatever decoder-model parts ``module`` holds, found by structure (exact
    names); empty when it recognises nothing.

    Args:
        module: a Hugging Face causal LM (Llama, Mistral, Qwen2, Phi-3, GPT-2, ...), or any part
            of one under the model's own names.
        gather_output: all-gather the head's logits to the full vocabulary (for the model's own
            ``generate``); by default they stay sharded for :func:`~plait.tensor.loss_fn`.

    Example::

        plan = hf_plan(LlamaForCausalLM(cfg))
        plan["model.layers.0.self_attn.q_proj"]   # Colwise(...)
        parallelize(model, mesh, plan=plan)        # what parallelize does by default
    """
    return _walk(module, gather_output)[0]


def _walk(module: nn.Module, gather_output: bool = False):
    cfg = _config(module)
    vocab = _int(getattr(cfg, "vocab_size", None))
    plan: dict[str, Style] = {}
    found: dict[str, str] = {}
    inner: dict[str, str] = {}  # attention / MLP modules found: name -> "attention" | "mlp"
    for name, m in module.named_modules():
        p = f"{name}." if name else ""
        if any(name.startswith(n + ".") for n in inner):
            continue
        attn = _attention(m, name, cfg)
        if attn is not None:
            kind, style, children = attn
            inner[name] = "attention"
            found[name] = f"attention: {kind}"
            plan[name] = style
            plan.update({p + k: s for k, s in children.items()})
            continue
        mlp = _mlp(m, name)
        if mlp is not None:
            kind, style, children = mlp
            inner[name] = "mlp"
            found[name] = f"mlp: {kind}"
            if style is not None:
                plan[name] = style
            plan.update({p + k: s for k, s in children.items()})
    layers = [
        name
        for name, m in module.named_modules()
        if {inner.get(f"{name}.{c}" if name else c) for c, _ in m.named_children()}
        >= {"attention", "mlp"}
    ]
    for i, name in enumerate(layers):
        found[name] = "decoder layer"
        plan[name] = SequenceSpan(scatter_input=i == 0, gather_output=i == len(layers) - 1)
        for sub, m in module.get_submodule(name).named_modules(prefix=name):
            if any(sub == n or sub.startswith(n + ".") for n in inner):
                continue
            if sub != name and any(True for _ in m.parameters(recurse=False)):
                found[sub] = "norm (replicated)"
                plan[sub] = SequenceNorm()
    for name, m in module.named_modules():
        if any(name == n or name.startswith(n + ".") for n in [*inner, *layers]):
            continue
        leaf = name.rpartition(".")[2]
        if isinstance(m, nn.Embedding) and (
            leaf in TOKEN_EMBEDDINGS
            or (m.num_embeddings == vocab and leaf not in POSITION_EMBEDDINGS)
        ):
            found[name] = "token embedding"
            plan[name] = Vocab(sequence_sharded=False)
        elif isinstance(m, nn.Linear) and (leaf in HEADS or m.out_features == vocab):
            found[name] = "output head"
            plan[name] = Vocab(gather_output=gather_output, sequence_sharded=False)
    return plan, found
