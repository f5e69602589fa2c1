"""The verdict: model and hardware specs, cost model, simulator, search, explanation.

Example::

    from plait.plan import get_model, get_hardware, search, explain
    res = search(get_model("llama3-70b"), get_hardware("h100-sxm"), gpus=64, global_batch=512)
    print(explain(res))
"""

from plait.config import SCHEDULES, ParallelConfig
from plait.plan.calibrate import get_hardware
from plait.plan.cost import CostModel, UniformCosts
from plait.plan.evaluate import Estimate, evaluate
from plait.plan.hardware import HARDWARE_PRESETS, HardwareSpec, Link
from plait.plan.inference import plan_inference
from plait.plan.model_spec import MODEL_PRESETS, ModelSpec, custom_model, get_model
from plait.plan.search import SearchResult, search
from plait.plan.simulator import ScheduleError, SimResult, simulate
from plait.plan.verdict import explain, format_table

__all__ = [
    "CostModel",
    "Estimate",
    "HARDWARE_PRESETS",
    "HardwareSpec",
    "Link",
    "MODEL_PRESETS",
    "ModelSpec",
    "ParallelConfig",
    "SCHEDULES",
    "ScheduleError",
    "SearchResult",
    "SimResult",
    "UniformCosts",
    "custom_model",
    "evaluate",
    "explain",
    "format_table",
    "get_hardware",
    "get_model",
    "plan_inference",
    "search",
    "simulate",
]
