"""Byte-level language-modelling data, deterministic for a seed.

The built-in default corpus is the source of the Python standard library found on this machine at
run time (nothing is downloaded or copied into the repository); any text file can be used instead.
Batch ``step`` of a run is a pure function of ``(seed, step)``, so a resumed run sees exactly the
batches an uninterrupted one would, and every data-parallel rank can slice the same global batch.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import numpy as np
import torch

__all__ = ["ByteDataset", "stdlib_corpus"]

DEFAULT_MAX_BYTES = 8 * 1024 * 1024


def stdlib_corpus(max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The Python standard library's ``.py`` sources, in sorted path order, up to ``max_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                data = (Path(dirpath) / name).read_bytes()
            except OSError:
                continue
            chunks.append(data)
            total += len(data)
            if total >= max_bytes:
                return b"".join(chunks)[:max_bytes]
    if not chunks:
        raise FileNotFoundError(f"no Python sources found under the standard library at {root}")
    return b"".join(chunks)


class ByteDataset:
    """Random windows of a byte string as ``(inputs, next-byte targets)`` batches.

    Args:
        data: the corpus as bytes; default the standard library's source (:func:`stdlib_corpus`).
        seed: batches depend only on ``(seed, step)``.

    Example::

        ds = ByteDataset.from_path(None)        # the built-in default
        x, y = ds.batch(step=0, batch_size=8, seq_len=64)
    """

    vocab_size = 256

    def __init__(self, data: bytes | None = None, seed: int = 0, name: str = "stdlib"):
        data = stdlib_corpus() if data is None else data
        # Bytes stay bytes (uint8) in memory; batches are widened to int64 when sliced.
        self.tokens = torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())
        self.seed = seed
        self.name = name

    @classmethod
    def from_path(cls, path: str | os.PathLike | None, seed: int = 0) -> ByteDataset:
        """A dataset over a text file, or the built-in default when ``path`` is None."""
        if path is None:
            return cls(None, seed=seed)
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"--data {str(path)!r} is not a readable file")
        return cls(p.read_bytes(), seed=seed, name=str(p))

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, step: int, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number ``step``: ``batch_size`` windows of ``seq_len`` inputs and targets."""
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        if len(self.tokens) < seq_len + 1:
            raise ValueError(
                f"corpus {self.name!r} has {len(self.tokens)} bytes; seq_len={seq_len} needs "
                f"at least {seq_len + 1}"
            )
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.tokens) - seq_len, (batch_size,), generator=g)
        windows = torch.stack([self.tokens[s : s + seq_len + 1] for s in starts.tolist()]).long()
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def sequences(self, seq_len: int, limit: int | None = None) -> torch.Tensor:
        """Consecutive non-overlapping windows of ``seq_len + 1`` bytes (for scoring/inference)."""
        n = (len(self.tokens) - 1) // seq_len
        if limit is not None:
            n = min(n, limit)
        return torch.stack(
            [self.tokens[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)]
        ).long()
