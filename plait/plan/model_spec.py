"""What a model costs: parameters, FLOPs per token, activation memory per layer.

A :class:`ModelSpec` is the shape of a decoder-only transformer (no weights): layers, hidden width,
attention heads and key/value heads (grouped-query attention), MLP width, vocabulary. From it come
the numbers the planner needs:

* parameters, total and per layer (the published formula for GPT-style models,
  ``P = 12 l h^2 (1 + 13/(12h) + (V+s)/(12 l h))``, falls out of the per-matrix count);
* forward FLOPs per token, counted as Megatron-LM does (every matmul, attention scores over the
  full sequence, the logits);
* activation bytes per layer and micro-batch, by Korthikanti et al. 2022 ("Reducing Activation
  Recomputation in Large Transformer Models"), with and without tensor and sequence parallelism
  and selective or full recomputation.

Example::

    spec = get_model("llama3-8b")
    spec.num_parameters() / 1e9                # 8.03
    spec.activation_bytes_per_layer(seq=8192, micro_batch=1, tp=8, sp=True, recompute="selective")
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

__all__ = [
    "ModelSpec",
    "MODEL_PRESETS",
    "get_model",
    "custom_model",
    "from_hf_config",
    "from_model_config",
    "RECOMPUTE",
]

RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a decoder-only transformer.

    Attributes:
        name: preset name or ``custom``.
        layers, hidden, heads: depth, width, attention heads.
        kv_heads: key/value heads (``heads`` for multi-head attention, fewer for GQA).
        ffn: MLP inner width.
        vocab: vocabulary size.
        seq_len: default training sequence length.
        gated_mlp: SwiGLU-style MLP with three matrices (Llama) instead of two (GPT).
        bias: linear layers and norms carry biases (GPT) or not (Llama).
        tied_embeddings: the output head shares the input embedding matrix.
        pos_embedding: rows of a learned position table (0 for rotary embeddings).
        qkv_bias, out_bias, mlp_bias: biases on the q/k/v projections, the attention output
            projection and the MLP matrices; ``None`` follows ``bias`` (Qwen2: q/k/v only).
        attn_head_dim: width of one attention head when it is not ``hidden // heads``.

    Example::

        ModelSpec("mine", layers=24, hidden=2048, heads=16, ffn=8192, vocab=50304)
    """

    name: str
    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int
    kv_heads: int | None = None
    seq_len: int = 2048
    gated_mlp: bool = False
    bias: bool = True
    tied_embeddings: bool = True
    pos_embedding: int = 0
    qkv_bias: bool | None = None
    out_bias: bool | None = None
    mlp_bias: bool | None = None
    attn_head_dim: int | None = None

    def __post_init__(self) -> None:
        for f in ("layers", "hidden", "heads", "ffn", "vocab", "seq_len"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"model {f} must be a positive integer, got {v!r}")
        if self.kv_heads is None:
            object.__setattr__(self, "kv_heads", self.heads)
        if self.attn_head_dim is not None and self.attn_head_dim < 1:
            raise ValueError(f"attn_head_dim must be positive, got {self.attn_head_dim}")
        if self.attn_head_dim is None and self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} must be divisible by heads={self.heads}")
        if self.kv_heads < 1 or self.heads % self.kv_heads:
            raise ValueError(
                f"kv_heads={self.kv_heads} must be a positive divisor of heads={self.heads}"
            )

    # ---------------------------------------------------------------- shapes
    @property
    def head_dim(self) -> int:
        return self.attn_head_dim or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        """Width of the query (and of the attention output) projection."""
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of the key (and of the value) projection."""
        return self.kv_heads * self.head_dim

    # ---------------------------------------------------------------- parameters
    def matmul_params_per_layer(self) -> int:
        """Weights of the matrices in one block (what the FLOPs scale with)."""
        h, f = self.hidden, self.ffn
        attn = 2 * h * self.q_dim + 2 * h * self.kv_dim  # q, o; k, v
        mlp = (3 if self.gated_mlp else 2) * h * f
        return attn + mlp

    def params_per_layer(self) -> int:
        """All parameters of one block: matrices, biases, the two norms."""
        h, f = self.hidden, self.ffn
        extra = 2 * h  # two norm scales
        if self.bias:
            extra += 2 * h  # norm shifts
        if self._has("qkv_bias"):
            extra += self.q_dim + 2 * self.kv_dim
        if self._has("out_bias"):
            extra += h
        if self._has("mlp_bias"):
            extra += (2 if self.gated_mlp else 1) * f + h
        return self.matmul_params_per_layer() + extra

    def replicated_params_per_layer(self) -> int:
        """Parameters of one block every tensor-parallel rank keeps whole: the norms and the
        biases added after a row-parallel matrix (attention output, MLP output)."""
        h = self.hidden
        n = (4 if self.bias else 2) * h
        if self._has("out_bias"):
            n += h
        if self._has("mlp_bias"):
            n += h
        return n

    def _has(self, which: str) -> bool:
        value = getattr(self, which)
        return self.bias if value is None else value

    def embedding_params(self) -> int:
        """Input embedding (and position table); the head is counted by :meth:`head_params`."""
        return self.vocab * self.hidden + self.pos_embedding * self.hidden

    def head_params(self) -> int:
        """Final norm and the output projection (zero extra if tied to the embedding)."""
        norm = (2 if self.bias else 1) * self.hidden
        return norm + (0 if self.tied_embeddings else self.vocab * self.hidden)

    def num_parameters(self) -> int:
        """Total parameters.

        Example::

            get_model("gpt3-175b").num_parameters()  # about 174.6e9
        """
        return self.embedding_params() + self.layers * self.params_per_layer() + self.head_params()

    # ---------------------------------------------------------------- FLOPs
    def layer_flops_per_token(self, seq: int | None = None) -> float:
        """Forward FLOPs of one block per token: matmuls plus attention over ``seq`` positions.

        Attention counts the full ``seq x seq`` score matrix (``QK^T`` and ``AV``), as the
        Megatron-LM papers do, so figures compare with theirs.
        """
        s = seq or self.seq_len
        return 2.0 * self.matmul_params_per_layer() + 4.0 * s * self.hidden

    def attention_core_flops_per_token(self, seq: int | None = None) -> float:
        """The part of :meth:`layer_flops_per_token` that selective recomputation redoes."""
        return 4.0 * (seq or self.seq_len) * self.hidden

    def logits_flops_per_token(self) -> float:
        return 2.0 * self.hidden * self.vocab

    def flops_per_token(self, seq: int | None = None, recompute: str = "none") -> float:
        """Hardware FLOPs per token of one training step (forward + backward).

        Backward costs twice the forward. Recomputation adds its extra forward of the blocks
        (the logits are never recomputed), which is how Megatron-LM reports hardware FLOPs.

        Example::

            get_model("gpt3-175b").flops_per_token(recompute="full") / 1e12  # ~1.4 TFLOP
        """
        _check_recompute(recompute)
        layer = self.layer_flops_per_token(seq)
        extra = {"none": 0.0, "full": layer, "selective": self.attention_core_flops_per_token(seq)}
        return self.layers * (3 * layer + extra[recompute]) + 3 * self.logits_flops_per_token()

    def model_flops_per_token(self, seq: int | None = None) -> float:
        """FLOPs per token without recomputation (the MFU numerator)."""
        return self.flops_per_token(seq, "none")

    # ---------------------------------------------------------------- activations
    def activation_bytes_per_layer(
        self,
        seq: int | None = None,
        micro_batch: int = 1,
        tp: int = 1,
        sp: bool = False,
        recompute: str = "none",
        dtype_bytes: int = 2,
    ) -> float:
        """Bytes one block keeps for backward, per micro-batch, on one tensor-parallel rank.

        Korthikanti et al. 2022, eq. 1-5, generalised to any MLP width and key/value width: with
        ``s`` sequence, ``b`` micro-batch, ``h`` hidden, ``a`` heads, ``t`` tensor-parallel ranks,
        a GPT block keeps ``s b h (34 + 5 a s / h)`` bytes in 16-bit; tensor parallelism shards all
        but the ``10 s b h`` held by layer norms, dropout masks and the block inputs; sequence
        parallelism shards those too; selective recomputation drops the ``5 a s^2 b`` of the
        attention core; full recomputation keeps only the block input (``2 s b h``, sharded by
        sequence parallelism). ``dtype_bytes`` scales the 16-bit figures (4 for float32).

        Example::

            m = get_model("gpt3-175b")
            m.activation_bytes_per_layer(2048, 1, tp=8, sp=True, recompute="selective")
        """
        _check_recompute(recompute)
        s, b, h, a, t = seq or self.seq_len, micro_batch, self.hidden, self.heads, tp
        scale = dtype_bytes / 2
        if recompute == "full":
            return scale * 2 * s * b * h / (t if sp else 1)
        kv, f = self.kv_dim, self.ffn
        # attention: input (2sbh), Q (2sbh), K and V (2 sb kv each), softmax out, dropout mask and
        # dropout out (5 a s^2 b), out-proj input (2sbh), dropout mask (sbh)
        attn_sharded = 2 * s * b * h + 4 * s * b * kv + 2 * s * b * h
        attn_core = 5 * a * s * s * b
        # MLP: input (2sbh), activations inside (2 per matrix-width tensor), dropout mask (sbh)
        mlp_sharded = (6 if self.gated_mlp else 4) * s * b * f
        replicated = 4 * s * b * h + 2 * s * b * h + s * b * h + 2 * s * b * h + s * b * h
        # = 10 sbh: two norm inputs, attention and MLP inputs, two dropout masks
        sharded = attn_sharded + mlp_sharded + (0 if recompute == "selective" else attn_core)
        kept_replicated = replicated / t if sp else replicated
        return scale * (kept_replicated + sharded / t)

    def working_bytes_per_layer(
        self,
        seq: int | None = None,
        micro_batch: int = 1,
        tp: int = 1,
        sp: bool = False,
        dtype_bytes: int = 2,
    ) -> float:
        """Transient bytes while one block is recomputed and backpropagated (full recompute)."""
        return self.activation_bytes_per_layer(seq, micro_batch, tp, sp, "none", dtype_bytes)

    def logits_bytes(self, seq: int | None = None, micro_batch: int = 1, tp: int = 1) -> float:
        """The last stage's float32 logits and their gradient for one micro-batch (4 s b V / t)."""
        return 4.0 * (seq or self.seq_len) * micro_batch * self.vocab / tp

    def to_dict(self) -> dict:
        d = asdict(self)
        d["parameters"] = self.num_parameters()
        return d


def _check_recompute(recompute: str) -> None:
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute {recompute!r} is not one of {list(RECOMPUTE)}")


def _gpt(name: str, layers: int, hidden: int, heads: int, vocab: int = 51200, seq: int = 2048):
    return ModelSpec(name, layers, hidden, heads, 4 * hidden, vocab, seq_len=seq, pos_embedding=seq)


def _llama(name, layers, hidden, heads, kv, ffn, vocab, seq):
    return ModelSpec(
        name,
        layers,
        hidden,
        heads,
        ffn,
        vocab,
        kv_heads=kv,
        seq_len=seq,
        gated_mlp=True,
        bias=False,
        tied_embeddings=False,
    )


def _plait(name: str) -> ModelSpec:
    from plait.models.config import PRESETS

    return from_model_config(PRESETS[name], name)


def from_model_config(c, name: str = "custom") -> ModelSpec:
    """The spec of plait's reference transformer (a :class:`plait.models.ModelConfig`).

    GELU MLP with biases, learned positions, untied head; the parameter count matches
    ``ModelConfig.num_parameters()`` exactly.
    """
    return ModelSpec(
        name,
        c.n_layers,
        c.hidden,
        c.n_heads,
        c.ffn,
        c.vocab_size,
        seq_len=c.max_seq_len,
        tied_embeddings=False,
        pos_embedding=c.max_seq_len,
    )


# Families whose blocks are GPT-2-like: LayerNorm with a shift, biases on every linear layer, a
# two-matrix MLP. Those with a learned position table read its size from the config. Any other
# model type is read as Llama-like (RMSNorm, gated MLP, biases only where the config says).
_GPT_LIKE = {"gpt2", "gpt_bigcode", "gpt_neo", "opt", "gptj", "gpt_neox", "phi"}
_LEARNED_POSITIONS = {"gpt2", "gpt_bigcode", "gpt_neo", "opt"}
_QKV_BIAS_ONLY = {"qwen2", "qwen2_moe"}
_PLAN_SEQ_CAP = 8192


def from_hf_config(config_or_dir, name: str | None = None) -> ModelSpec:
    """The spec of a Hugging Face causal language model, from its config (no weights).

    ``config_or_dir`` is a ``transformers`` config object, a dict as in ``config.json`` (with
    ``model_type``), or a directory holding ``config.json``. Reads layers, hidden width, heads,
    key/value heads, MLP width (``intermediate_size`` / ``n_inner`` or 4 x hidden), vocabulary,
    tied embeddings and the family's biases, gating and position table, so that
    ``num_parameters()`` matches the built model's. ``seq_len`` is the model's
    ``max_position_embeddings``, capped at 8192 (plan longer sequences with ``--seq-len``).

    Example::

        from_hf_config("/models/llama").num_parameters()
    """
    config = _hf_config_object(config_or_dir)

    def get(*keys, default=None):
        for k in keys:
            v = getattr(config, k, None)
            if v is not None:
                return v
        return default

    mtype = str(get("model_type", default="")).lower()
    layers = get("num_hidden_layers", "n_layer", "num_layers")
    hidden = get("hidden_size", "n_embd", "d_model")
    heads = get("num_attention_heads", "n_head")
    vocab = get("vocab_size")
    missing = [
        k
        for k, v in {
            "num_hidden_layers": layers,
            "hidden_size": hidden,
            "num_attention_heads": heads,
            "vocab_size": vocab,
        }.items()
        if not isinstance(v, int)
    ]
    if missing:
        raise ValueError(
            f"config of model type {mtype or '?'!r} lacks {', '.join(missing)}: "
            "the planner needs a decoder-only transformer's shape"
        )
    kv = get("num_key_value_heads", "n_head_kv", "num_kv_heads")
    if mtype == "gpt_bigcode" and getattr(config, "multi_query", False):
        kv = 1
    ffn = get("intermediate_size", "n_inner", "ffn_dim") or 4 * hidden
    head_dim = get("head_dim")
    max_pos = get("max_position_embeddings", "n_positions")
    gpt = mtype in _GPT_LIKE
    tied = bool(get("tie_word_embeddings", default=True))
    shape = (name or mtype or "hf", layers, hidden, heads, ffn, vocab)
    common = dict(kv_heads=kv, seq_len=min(max_pos or 2048, _PLAN_SEQ_CAP), tied_embeddings=tied)
    if gpt:
        return ModelSpec(
            *shape,
            **common,
            pos_embedding=(max_pos or 0) if mtype in _LEARNED_POSITIONS else 0,
        )
    attention_bias = bool(get("attention_bias", default=False))
    return ModelSpec(
        *shape,
        **common,
        gated_mlp=True,
        bias=False,
        qkv_bias=attention_bias or mtype in _QKV_BIAS_ONLY,
        out_bias=attention_bias,
        mlp_bias=bool(get("mlp_bias", default=False)),
        attn_head_dim=head_dim
        if isinstance(head_dim, int) and head_dim * heads != hidden
        else None,
    )


def _hf_config_object(config_or_dir):
    if hasattr(config_or_dir, "to_dict") and hasattr(config_or_dir, "model_type"):
        return config_or_dir
    from transformers import AutoConfig

    if isinstance(config_or_dir, dict):
        d = dict(config_or_dir)
        mtype = d.pop("model_type", None)
        if not mtype:
            raise ValueError("a config dict needs its model_type (as in config.json)")
        return AutoConfig.for_model(mtype, **d)
    from pathlib import Path

    p = Path(config_or_dir)
    if not (p / "config.json").is_file():
        raise ValueError(f"{str(config_or_dir)!r} is not a directory with a config.json")
    return AutoConfig.from_pretrained(str(p), local_files_only=True)


MODEL_PRESETS: dict[str, ModelSpec] = {
    "gpt3-175b": _gpt("gpt3-175b", 96, 12288, 96, vocab=50257),
    "llama2-7b": _llama("llama2-7b", 32, 4096, 32, 32, 11008, 32000, 4096),
    "llama2-70b": _llama("llama2-70b", 80, 8192, 64, 8, 28672, 32000, 4096),
    "llama3-8b": _llama("llama3-8b", 32, 4096, 32, 8, 14336, 128256, 8192),
    "llama3-70b": _llama("llama3-70b", 80, 8192, 64, 8, 28672, 128256, 8192),
    "llama3-405b": _llama("llama3-405b", 126, 16384, 128, 8, 53248, 128256, 8192),
    # The weak-scaling family of Narayanan et al. 2021 (SC21), Table 1.
    "megatron-1.7b": _gpt("megatron-1.7b", 24, 2304, 24),
    "megatron-3.6b": _gpt("megatron-3.6b", 30, 3072, 32),
    "megatron-7.5b": _gpt("megatron-7.5b", 36, 4096, 32),
    "megatron-18b": _gpt("megatron-18b", 40, 6144, 48),
    "megatron-39b": _gpt("megatron-39b", 48, 8192, 64),
    "megatron-76b": _gpt("megatron-76b", 60, 10240, 80),
    "megatron-145b": _gpt("megatron-145b", 80, 12288, 96),
    "megatron-310b": _gpt("megatron-310b", 96, 16384, 128),
    "megatron-530b": _gpt("megatron-530b", 105, 20480, 128),
    "megatron-1t": _gpt("megatron-1t", 128, 25600, 160),
    "tiny": _plait("tiny"),
    "small": _plait("small"),
}


def get_model(name: str, **overrides) -> ModelSpec:
    """A preset by name (see :data:`MODEL_PRESETS`), optionally with fields replaced.

    Example::

        get_model("llama3-70b", seq_len=4096)
    """
    if name not in MODEL_PRESETS:
        raise ValueError(
            f"unknown model {name!r}; presets are {sorted(MODEL_PRESETS)} "
            "(or give --layers --hidden --heads --vocab for a custom model)"
        )
    spec = MODEL_PRESETS[name]
    return replace(spec, **overrides) if overrides else spec


def custom_model(
    layers: int,
    hidden: int,
    heads: int,
    vocab: int,
    kv_heads: int | None = None,
    ffn: int | None = None,
    seq_len: int = 2048,
    gated_mlp: bool | None = None,
) -> ModelSpec:
    """A model from its shape alone; GQA (``kv_heads < heads``) implies a Llama-style block.

    Example::

        custom_model(layers=32, hidden=4096, heads=32, kv_heads=8, vocab=128256)
    """
    llama = gated_mlp if gated_mlp is not None else (kv_heads is not None and kv_heads != heads)
    if ffn is None:
        # Llama rounds 8h/3 up to a multiple of 256; GPT uses 4h.
        ffn = 256 * -(-(8 * hidden // 3) // 256) if llama else 4 * hidden
    if llama:
        return ModelSpec(
            "custom",
            layers,
            hidden,
            heads,
            ffn,
            vocab,
            kv_heads=kv_heads,
            seq_len=seq_len,
            gated_mlp=True,
            bias=False,
            tied_embeddings=False,
        )
    return ModelSpec(
        "custom", layers, hidden, heads, ffn, vocab, kv_heads=kv_heads, seq_len=seq_len
    )
