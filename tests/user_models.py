"""Models users bring, for tests: ``tests.user_models:mlp`` and ``:cnn`` as model names.

Both return a :class:`plait.models.UserModel` whose ``batch(step, batch_size, seed)`` draws
synthetic data from a generator seeded by ``(seed, step)``, so every process sees the same
batches; the modules are plain ``nn.Sequential`` stacks (built under ``torch.manual_seed`` by
:meth:`plait.models.ModelSource.build`, so identical for a seed).

Name them as ``user_models:mlp`` (``tests/`` is on ``sys.path`` and ``PYTHONPATH`` in the tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from plait.models import UserModel

MLP_IN, MLP_CLASSES = 16, 4
CNN_CLASSES = 10


def _generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def _mlp_batch(step: int, batch_size: int, seed: int = 0):
    """Points in R^16, labelled by which of 4 fixed random directions they lean most along."""
    directions = torch.randn(MLP_IN, MLP_CLASSES, generator=torch.Generator().manual_seed(12345))
    x = torch.randn(batch_size, MLP_IN, generator=_generator(seed, step))
    return x, (x @ directions).argmax(dim=1)


def mlp() -> UserModel:
    """A Linear-GELU-Linear-GELU-Linear classifier of 16-dimensional points into 4 classes."""
    net = nn.Sequential(
        nn.Linear(MLP_IN, 64),
        nn.GELU(),
        nn.Linear(64, 64),
        nn.GELU(),
        nn.Linear(64, MLP_CLASSES),
    )
    return UserModel(net, loss=F.cross_entropy, batch=_mlp_batch)


def _cnn_batch(step: int, batch_size: int, seed: int = 0):
    """1-channel 8x8 images: noise plus one of 10 fixed random patterns; the label is which."""
    patterns = torch.randn(CNN_CLASSES, 1, 8, 8, generator=torch.Generator().manual_seed(54321))
    g = _generator(seed, step)
    y = torch.randint(0, CNN_CLASSES, (batch_size,), generator=g)
    x = patterns[y] + 0.5 * torch.randn(batch_size, 1, 8, 8, generator=g)
    return x, y


def cnn() -> UserModel:
    """Conv2d-ReLU-Conv2d-ReLU-Flatten-Linear on 1x8x8 images, 10 classes."""
    net = nn.Sequential(
        nn.Conv2d(1, 8, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, CNN_CLASSES),
    )
    return UserModel(net, loss=F.cross_entropy, batch=_cnn_batch)


class _Odd(nn.Module):
    """A model of no shape the partitioner knows (two parallel branches, summed)."""

    def __init__(self):
        super().__init__()
        self.left = nn.Linear(MLP_IN, MLP_CLASSES)
        self.right = nn.Linear(MLP_IN, MLP_CLASSES)

    def forward(self, x):
        return self.left(x) + self.right(x)


def odd() -> UserModel:
    return UserModel(_Odd(), loss=F.cross_entropy, batch=_mlp_batch)


POISON_STEP = 3


def _poisoned_batch(step: int, batch_size: int, seed: int = 0):
    x, y = _mlp_batch(step, batch_size, seed)
    if step == POISON_STEP:
        x[0, 0] = float("nan")  # one bad value in the data, as a corrupt record would give
    return x, y


def poisoned() -> UserModel:
    """:func:`mlp` whose batch of step ``POISON_STEP`` holds a NaN."""
    src = mlp()
    return UserModel(src.module, loss=F.cross_entropy, batch=_poisoned_batch)
