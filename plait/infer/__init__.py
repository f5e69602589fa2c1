"""``plait infer``: score every sequence of an input with any mix of task, pipeline and tensor.

Every strategy does the same work and must give the same per-sequence losses (float32 tolerance):

    plait infer --model tiny --data notes.txt --strategy task --workers 2 --out losses.jsonl

Files: ``core`` (config, requests, scoring, report), ``local`` (single process and the task
strategy via :func:`plait.tasks.map`), ``mesh`` (pipeline / tensor / composed, via
:func:`plait.launch` on a :class:`plait.Mesh`), ``cli`` (the argparse of ``plait infer``).
"""

from __future__ import annotations

from plait.infer.core import InferConfig, InferReport, load_requests, parse_strategy

__all__ = ["infer", "InferConfig", "InferReport", "parse_strategy"]


def infer(cfg: InferConfig) -> InferReport:
    """Score every sequence of ``cfg.data`` by ``cfg.strategy``; write ``cfg.out`` if set.

    Example::

        report = infer(InferConfig(data="notes.txt", strategy="task,pipeline", workers=4))
        report.summary()["sequences_per_s"]
    """
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
