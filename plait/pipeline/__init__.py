"""Depth-wise parallelism: partitioning, the schedule IR and its generators, the runtime.

The pieces, one file each::

    schedule.py    the IR: Action(kind, stage, microbatch), Schedule (pure Python)
    generators.py  build_schedule(name, num_ranks, num_microbatches, virtual) (pure Python)
    walk.py        Walk(schedule): what each action needs, message matching, the stepping loop
                   that the validator, simulator and runtime share (pure Python)
    validate.py    validate(schedule) -> ValidationReport, or ScheduleError (pure Python)
    torch_format.py to/from torch.distributed.pipelining action lists and CSV (pure Python)
    split.py       split_blocks(blocks, stages, balance): the layer split, which the planner
                   costs and the partitioner cuts by (pure Python)
    partitioner.py partition(model, num_stages, balance) -> stage modules
    runtime.py     PipelineRuntime: executes one rank's actions with torch.distributed

The IR, generators and validator never import torch (the planner's simulator uses them); the
partitioner and runtime are imported lazily from here for the same reason.
"""

from plait.pipeline.generators import (
    SCHEDULES,
    add_communication,
    build_schedule,
    stage_to_rank_for,
)
from plait.pipeline.schedule import Action, Kind, Schedule, format_actions, parse_actions
from plait.pipeline.split import split_blocks
from plait.pipeline.torch_format import (
    from_torch_actions,
    from_torch_csv,
    to_torch_actions,
    to_torch_csv,
    to_torch_pipeline_order,
)
from plait.pipeline.validate import ScheduleError, ValidationReport, validate

__all__ = [
    "SCHEDULES",
    "Action",
    "Kind",
    "Schedule",
    "ScheduleError",
    "ValidationReport",
    "add_communication",
    "build_schedule",
    "format_actions",
    "parse_actions",
    "split_blocks",
    "stage_to_rank_for",
    "validate",
    "from_torch_actions",
    "from_torch_csv",
    "to_torch_actions",
    "to_torch_csv",
    "to_torch_pipeline_order",
    "partition",
    "Stage",
    "PipelineRuntime",
    "split_batch",
]

_LAZY = {
    "partition": "partitioner",
    "Stage": "partitioner",
    "PipelineRuntime": "runtime",
    "split_batch": "runtime",
}


def __getattr__(name: str):
    # torch-free import of the IR: the torch parts load on first use.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"plait.pipeline.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'plait.pipeline' has no attribute {name!r}")
