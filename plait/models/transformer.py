"""A reference decoder-only transformer: small, readable, and deterministic from a seed.

Pre-norm blocks of causal self-attention and a GELU MLP, learned positions, an untied output head.
Attention works out its head count from the width of ``q_proj``'s output, so tensor parallelism can
swap the projections for sharded ones without touching this code; likewise the model is a plain
``embed -> blocks -> norm -> head`` sequence that pipeline parallelism cuts into stages.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from plait.models.config import PRESETS, ModelConfig, get_config

__all__ = [
    "ModelConfig",
    "Transformer",
    "Block",
    "Attention",
    "MLP",
    "Embedding",
    "Head",
    "PRESETS",
    "get_config",
]


class Embedding(nn.Module):
    """Token plus learned position embeddings: ``(B, T) int -> (B, T, hidden)``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.pos = nn.Embedding(cfg.max_seq_len, cfg.hidden)
        self.max_seq_len = cfg.max_seq_len

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        if T > self.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.max_seq_len}")
        return self.tok(idx) + self.pos.weight[:T]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hidden
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(h, h)
        self.k_proj = nn.Linear(h, h)
        self.v_proj = nn.Linear(h, h)
        self.o_proj = nn.Linear(h, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, T, n*d) -> (B, n, T, d)
            return t.view(B, T, -1, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc_in = nn.Linear(cfg.hidden, cfg.ffn)
        self.fc_out = nn.Linear(cfg.ffn, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)))


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Head(nn.Module):
    """Final norm and the output projection to vocabulary logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.proj = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))


class Transformer(nn.Module):
    """The reference decoder-only language model.

    ``forward(idx)`` maps token ids ``(B, T)`` to logits ``(B, T, vocab)``; :meth:`loss` is the
    mean next-token cross-entropy. Two models built with the same config and seed are identical.

    Example::

        model = Transformer(get_config("tiny"), seed=0)
        loss = model.loss(model(x), y)
    """

    def __init__(self, cfg: ModelConfig, seed: int = 0):
        super().__init__()
        self.config = cfg
        self.embed = Embedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.head = Head(cfg)
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """GPT-2 style initialisation drawn from one generator, in parameter order."""
        g = torch.Generator().manual_seed(seed)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif "norm" in name:
                p.fill_(1.0)
            else:
                std = residual_std if name.endswith(("o_proj.weight", "fc_out.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over every position."""
        flat = logits.reshape(-1, logits.shape[-1])
        if flat.dtype not in (torch.float32, torch.float64):
            flat = flat.float()  # half-precision logits: take the softmax in float32
        return F.cross_entropy(flat, targets.reshape(-1))
