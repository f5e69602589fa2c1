"""``plait infer``: score every sequence of an input with any mix of task, pipeline and tensor.

Every strategy does the same work and must give the same per-sequence losses (float32 tolerance):

    plait infer --model tiny --data notes.txt --strategy task --workers 2 --out losses.jsonl

Files: ``core`` (config, requests, scoring, report), ``local`` (single process and the task
strategy via :func:`plait.tasks.map`), ``mesh`` (pipeline / tensor / composed, via
:func:`plait.launch` on a :class:`plait.Mesh`), ``cli`` (the argparse of ``plait infer``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from plait.infer.core import InferConfig, InferReport

__all__ = ["infer", "InferConfig", "InferReport", "parse_strategy"]

_FROM_CORE = ("InferConfig", "InferReport", "parse_strategy")


def __getattr__(name: str):
    # torch loads with the first use, not with ``plait infer --help``
    if name in _FROM_CORE:
        from plait.infer import core

        return getattr(core, name)
    raise AttributeError(f"module 'plait.infer' has no attribute {name!r}")


def infer(cfg: InferConfig) -> InferReport:
    """Score every sequence of ``cfg.data`` by ``cfg.strategy``; write ``cfg.out`` if set.

    Example::

        report = infer(InferConfig(data="notes.txt", strategy="task,pipeline", workers=4))
        report.summary()["sequences_per_s"]
    """
    from plait.infer.core import load_requests

    shape = cfg.validate()
    requests = load_requests(cfg)
    if cfg.strategy.strip() == "single":
        from plait.infer.local import run_single

        report = run_single(cfg, requests)
    elif shape.pp == 1 and shape.tp == 1:
        from plait.infer.local import run_task

        report = run_task(cfg, requests)
    else:
        from plait.infer.mesh import run_mesh

        report = run_mesh(cfg, shape, requests)
    if cfg.out:
        report.write_jsonl(cfg.out)
    return report
