"""plait: split PyTorch models across workers by pipeline, tensor and task parallelism.

The public API::

    plait.launch(fn, world_size, *args)   # run fn on N local workers (or join torchrun)
    plait.Mesh(dp, pp, tp)                # this rank's place and process groups
    plait.models.Transformer              # the reference decoder-only transformer
    plait.ByteDataset                     # byte-level text data, deterministic per seed
    plait.ParallelConfig(dp, pp, tp, ...) # how a step is split: one config for every command
    plait.train(TrainConfig(...))         # the training loop
    plait.resolve_model("hf:./my-llama")  # a model by name: preset, hf:PATH or pkg.mod:fn
    plait.clip_grad_norm_(params, 1.0, mesh)  # global-norm clipping that counts shards once
    plait.GradSync(params, mesh.group("dp"))  # data-parallel gradient averaging, overlapped

Names load on first use, so ``import plait`` (and the command line's argument parsing) does not
import torch until something needs it.
"""

from __future__ import annotations

import importlib
import sys
import types

from plait.config import ParallelConfig

__version__ = "0.1.0"

# public name -> module that defines it (loaded on first access)
_LAZY = {
    "ByteDataset": "plait.data",
    "Mesh": "plait.mesh",
    "MeshShape": "plait.mesh_shape",
    "TrainConfig": "plait.train",
    "WorkerError": "plait.launch",
    "clip_grad_norm_": "plait.tensor.clip",
    "GradSync": "plait.train.grads",
    "resolve_model": "plait.models.source",
    "UserModel": "plait.models.source",
    "launch": "plait.launch",
    "train": "plait.train",
}
_SUBPACKAGES = ("pipeline", "tasks", "tensor", "models", "plan", "infer")

__all__ = [
    "ByteDataset",
    "GradSync",
    "Mesh",
    "MeshShape",
    "ParallelConfig",
    "TrainConfig",
    "UserModel",
    "WorkerError",
    "clip_grad_norm_",
    "launch",
    "resolve_model",
    "train",
    "__version__",
]


# `plait.launch` and `plait.train` are functions that share their names with the submodule (or
# package) defining them. Importing such a submodule would bind the module under the name;
# this package keeps the name for the function (the submodule stays importable by full name).
_FUNCTIONS = ("launch", "train")


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        if name in _FUNCTIONS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"plait.{name}")
    else:
        raise AttributeError(f"module 'plait' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY, *_SUBPACKAGES])
