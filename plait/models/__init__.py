"""Models plait knows how to split: the reference decoder-only transformer and its presets."""

from plait.models.transformer import (
    MLP,
    PRESETS,
    Attention,
    Block,
    Embedding,
    Head,
    ModelConfig,
    Transformer,
    get_config,
)

__all__ = [
    "PRESETS",
    "Attention",
    "Block",
    "Embedding",
    "Head",
    "ModelConfig",
    "MLP",
    "Transformer",
    "get_config",
]
