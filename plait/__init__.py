"""plait: split PyTorch models across workers by pipeline, tensor and task parallelism.

The public API::

    plait.launch(fn, world_size, *args)   # run fn on N local workers (or join torchrun)
    plait.Mesh(dp, pp, tp)                # this rank's place and process groups
    plait.models.Transformer              # the reference decoder-only transformer
    plait.ByteDataset                     # byte-level text data, deterministic per seed
    plait.train(TrainConfig(...))         # the training loop
"""

from plait import pipeline as pipeline  # plait.pipeline.partition, build_schedule, PipelineRuntime
from plait import tasks as tasks  # plait.tasks.map(fn, items, workers=N): task parallelism
from plait import tensor as tensor  # plait.tensor.parallelize(...); also loads plait.comm
from plait.data import ByteDataset
from plait.launch import WorkerError, launch
from plait.mesh import Mesh, MeshShape
from plait.train import TrainConfig, train

__version__ = "0.1.0"

__all__ = [
    "ByteDataset",
    "Mesh",
    "MeshShape",
    "TrainConfig",
    "WorkerError",
    "launch",
    "train",
    "__version__",
]
