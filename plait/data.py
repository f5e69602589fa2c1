"""Language-modelling data (bytes or a tokenizer's ids), deterministic for a seed.

The built-in default corpus is the source of the Python standard library found on this machine at
run time (nothing is downloaded or copied into the repository); any text file can be used instead.
Batch ``step`` of a run is a pure function of ``(seed, step)``, so a resumed run sees exactly the
batches an uninterrupted one would, and every data-parallel rank can slice the same global batch.

:class:`ByteDataset` reads a corpus as bytes (ids 0..255); :class:`TokenDataset` holds any
tokenizer's ids; :func:`dataset_for` picks the one a model (a :class:`plait.models.ModelSource`)
needs.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import numpy as np
import torch

__all__ = ["ByteDataset", "TokenDataset", "UserBatches", "dataset_for", "stdlib_corpus"]

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


class TokenDataset:
    """Random windows of a sequence of token ids as ``(inputs, next-token targets)`` batches.

    Args:
        tokens: the corpus as token ids (a list or a 1-D integer tensor).
        seed: batches depend only on ``(seed, step)``.
        name: what to call the corpus in messages.
        vocab_size: the tokenizer's vocabulary (default: the largest id + 1).

    Example::

        ds = TokenDataset.from_path("corpus.txt", source.tokenizer(), seed=0)
        x, y = ds.batch(step=0, batch_size=8, seq_len=64)
    """

    unit = "tokens"

    def __init__(self, tokens, seed: int = 0, name: str = "tokens", vocab_size: int | None = None):
        t = torch.as_tensor(tokens)
        if t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"token ids must be a 1-D integer sequence, got {tuple(t.shape)}")
        if len(t) and int(t.min()) < 0:
            raise ValueError(f"corpus {name!r} has negative token ids")
        top = int(t.max()) + 1 if len(t) else 0
        if vocab_size is not None and top > vocab_size:
            raise ValueError(f"corpus {name!r} has token id {top - 1} >= vocab_size {vocab_size}")
        # int32 in memory (half of int64); batches are widened to int64 when sliced.
        self.tokens = t.to(torch.int32) if top <= 2**31 - 1 else t.long()
        self.seed = seed
        self.name = name
        self.vocab_size = vocab_size if vocab_size is not None else top

    @classmethod
    def from_path(
        cls, path: str | os.PathLike | None, tokenizer, seed: int = 0, max_bytes: int | None = None
    ) -> TokenDataset:
        """A text file (the built-in default when ``path`` is None) encoded by ``tokenizer``
        (anything with ``encode(text) -> list[int]``; its ``vocab_size`` or ``len()`` is used)."""
        if path is None:
            text, name = stdlib_corpus(max_bytes or DEFAULT_MAX_BYTES), "stdlib"
        else:
            p = Path(path)
            if not p.is_file():
                raise FileNotFoundError(f"--data {str(path)!r} is not a readable file")
            text, name = p.read_bytes(), str(p)
            if max_bytes is not None:
                text = text[:max_bytes]
        ids = tokenizer.encode(text.decode("utf-8", errors="replace"))
        vocab = getattr(tokenizer, "vocab_size", None)
        if vocab is None and hasattr(tokenizer, "__len__"):
            vocab = len(tokenizer)
        return cls(torch.tensor(ids, dtype=torch.long), seed=seed, name=name, vocab_size=vocab)

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, step: int, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number ``step``: ``batch_size`` windows of ``seq_len`` inputs and targets."""
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        if len(self.tokens) < seq_len + 1:
            raise ValueError(
                f"corpus {self.name!r} has {len(self.tokens)} {self.unit}; seq_len={seq_len} needs "
                f"at least {seq_len + 1}"
            )
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.tokens) - seq_len, (batch_size,), generator=g)
        windows = torch.stack([self.tokens[s : s + seq_len + 1] for s in starts.tolist()]).long()
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def sequences(self, seq_len: int, limit: int | None = None) -> torch.Tensor:
        """Consecutive non-overlapping windows of ``seq_len + 1`` ids (for scoring/inference)."""
        n = (len(self.tokens) - 1) // seq_len
        if limit is not None:
            n = min(n, limit)
        return torch.stack(
            [self.tokens[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)]
        ).long()


class ByteDataset(TokenDataset):
    """Random windows of a byte string as ``(inputs, next-byte targets)`` batches.

    Args:
        data: the corpus as bytes; default the standard library's source (:func:`stdlib_corpus`).
        seed: batches depend only on ``(seed, step)``.

    Example::

        ds = ByteDataset.from_path(None)        # the built-in default
        x, y = ds.batch(step=0, batch_size=8, seq_len=64)
    """

    vocab_size = 256
    unit = "bytes"

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


class UserBatches:
    """A :class:`plait.models.UserModel`'s own batches behind the dataset contract:
    ``batch(step, batch_size, seq_len=None)`` calls ``source.batch(step, batch_size, seed)``
    (``seq_len`` is ignored)."""

    def __init__(self, source, seed: int = 0):
        self.source = source
        self.seed = seed
        self.name = source.name

    def batch(self, step: int, batch_size: int, seq_len: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return self.source.batch(step, batch_size, self.seed)

    def sequences(self, seq_len: int, limit: int | None = None):
        raise ValueError(f"{self.name}: not a language model, so it has no token sequences")


def dataset_for(source, path: str | os.PathLike | None, seed: int = 0, seq_len: int | None = None):
    """The data a model trains on: a :class:`ByteDataset` when its tokenizer is byte-level, a
    :class:`TokenDataset` encoded by its own tokenizer otherwise, or :class:`UserBatches` for a
    model that is not a language model (``path`` must then be None).

    ``source`` is a :class:`plait.models.ModelSource` (or a name for
    :func:`plait.models.resolve_model`). A corpus shorter than one window (``seq_len + 1``
    tokens; 2 when ``seq_len`` is not given) is refused.

    Example::

        ds = dataset_for(resolve_model("hf:./my-llama"), "corpus.txt", seed=0, seq_len=128)
    """
    if isinstance(source, str):
        from plait.models.source import resolve_model

        source = resolve_model(source)
    if not source.is_language_model:
        if path is not None:
            raise ValueError(
                f"{source.name} is not a language model: it makes its own batches, so it takes "
                f"no --data (got {str(path)!r})"
            )
        return UserBatches(source, seed)
    from plait.models.source import ByteTokenizer

    tok = source.tokenizer()
    if isinstance(tok, ByteTokenizer):
        ds = ByteDataset.from_path(path, seed=seed)
    else:
        ds = TokenDataset.from_path(path, tok, seed=seed)
    need = (seq_len or 1) + 1
    if len(ds) < need:
        raise ValueError(
            f"corpus {ds.name!r} has {len(ds)} {ds.unit} under {source.name}'s tokenizer; one "
            f"batch window of seq_len={seq_len or 1} needs at least {need}"
        )
    return ds
