"""Models plait knows how to split: the reference decoder-only transformer and its presets, and
the models users bring (``resolve_model``: a preset, ``hf:DIR`` or ``PACKAGE.MODULE:FUNCTION``).

``ModelConfig``, ``PRESETS`` and ``get_config`` load without torch; the modules on first use.
"""

from __future__ import annotations

import importlib

from plait.models.config import PRESETS, ModelConfig, get_config
from plait.models.source import ModelSource, UserModel, resolve_model

__all__ = [
    "PRESETS",
    "Attention",
    "Block",
    "Embedding",
    "Head",
    "ModelConfig",
    "ModelSource",
    "MLP",
    "Transformer",
    "UserModel",
    "get_config",
    "resolve_model",
]

_MODULES = ("Attention", "Block", "Embedding", "Head", "MLP", "Transformer")


def __getattr__(name: str):
    if name in _MODULES:
        return getattr(importlib.import_module("plait.models.transformer"), name)
    raise AttributeError(f"module 'plait.models' has no attribute {name!r}")
