"""The reference transformer's shape and its presets (no torch: the planner and the command
line read them without building a model)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

__all__ = ["ModelConfig", "PRESETS", "get_config"]


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the reference transformer.

    Example::

        cfg = get_config("tiny", n_layers=4)
        model = Transformer(cfg, seed=0)
    """

    vocab_size: int = 256
    n_layers: int = 2
    hidden: int = 64
    n_heads: int = 4
    ffn: int = 256
    max_seq_len: int = 128
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layers", "hidden", "n_heads", "ffn", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden % self.n_heads:
            raise ValueError(f"hidden={self.hidden} must be divisible by n_heads={self.n_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    def num_parameters(self) -> int:
        h, f, v, L = self.hidden, self.ffn, self.vocab_size, self.n_layers
        block = 4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h  # attn, mlp, two norms
        return v * h + self.max_seq_len * h + L * block + 2 * h + h * v

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, ModelConfig] = {
    # seconds on a CPU: for tests
    "tiny": ModelConfig(n_layers=2, hidden=64, n_heads=4, ffn=256, max_seq_len=128),
    # benchmarks and the demo
    "small": ModelConfig(n_layers=8, hidden=256, n_heads=8, ffn=1024, max_seq_len=256),
}


def get_config(name: str, **overrides) -> ModelConfig:
    """A preset by name, optionally with some fields replaced."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; presets are {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides) if overrides else PRESETS[name]
