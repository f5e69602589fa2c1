"""Memory per device: weights, gradients, optimizer states, activations in flight.

The training state is what plait's trainer keeps (:func:`state_bytes_per_param`): parameters in
``dtype`` (float32 masters under mixed precision; autocast's low-precision copy of each weight,
kept for the step, is counted as transient),
gradients in the same dtype, and AdamW's two moments: 16 bytes per parameter in float32 or mixed
precision, 8 for a whole-model bf16 cast. ZeRO-1 divides the moments by ``dp``; FSDP divides all
of it, and adds what it gathers while computing: the stage's root unit (embeddings, head), the
block computing and the one prefetched, and one block's unsharded gradient. Activations are
the per-layer bytes of :meth:`ModelSpec.activation_bytes_per_layer` times the layers of each stage
times the micro-batches in flight, counted as the schedule validator counts them (from a stage's
forward until its last backward action). Full recomputation also needs one layer's complete
activations while that layer is recomputed, and the last stage holds a micro-batch's logits.

Example::

    cm = CostModel(get_model("llama2-70b"), get_hardware("a100-80gb"), ParallelConfig(tp=8, precision="bf16-mixed"))
    memory_per_device(cm, in_flight=[1.0]).total / 1e9   # GB on the busiest device
"""

from __future__ import annotations

from dataclasses import dataclass

from plait.config import ParallelConfig
from plait.plan.cost import CostModel
from plait.plan.hardware import DTYPE_BYTES

__all__ = [
    "MemoryBreakdown",
    "memory_per_device",
    "analytic_in_flight",
    "state_bytes_per_param",
    "training_state_bytes",
]


def state_bytes_per_param(cfg: ParallelConfig) -> float:
    """Bytes one unsharded parameter's training state takes: the parameter, its gradient and
    AdamW's two moments, all in ``cfg.dtype`` (16 for float32 masters, 8 for a bf16 cast)."""
    return 4 * DTYPE_BYTES[cfg.dtype]


def training_state_bytes(params: float, cfg: ParallelConfig) -> float:
    """Bytes of training state one data-parallel rank keeps for ``params`` parameters: all of it
    (plain data parallel), the moments divided over ``dp`` (ZeRO-1), or everything divided over
    ``dp`` (FSDP) -- what ``state_bytes_per_rank`` in ``plait train``'s metrics measures."""
    total = params * state_bytes_per_param(cfg)
    if cfg.fsdp:
        return total / cfg.dp
    if cfg.zero1:
        moments = params * 2 * DTYPE_BYTES[cfg.dtype]
        return total - moments + moments / cfg.dp
    return total


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes on the busiest device of one configuration."""

    rank: int
    weights_grads_optimizer: float
    activations: float
    transient: float

    @property
    def total(self) -> float:
        return self.weights_grads_optimizer + self.activations + self.transient

    def to_dict(self) -> dict:
        gb = 1e9
        return {
            "rank": self.rank,
            "weights_grads_optimizer_gb": self.weights_grads_optimizer / gb,
            "activations_gb": self.activations / gb,
            "transient_gb": self.transient / gb,
            "total_gb": self.total / gb,
        }


def analytic_in_flight(schedule: str, p: int, m: int, v: int = 1) -> list[float]:
    """Peak micro-batches in flight per pipeline rank (in whole-stage units), by formula.

    Matches what the validator counts for the generators: GPipe holds all ``m``; 1F1B and ZB-H1
    hold ``min(p - r, m)`` and ``min(p, m)``; interleaved 1F1B holds Megatron's warm-up
    ``2 (p - r - 1) + (v - 1) p + 1`` chunks of ``1/v`` stage each; ZB-V holds up to ``2p``
    half-stage chunks.

    Example::

        analytic_in_flight("1f1b", 4, 8)  # [4, 3, 2, 1]
    """
    if schedule == "none":
        return [1.0]
    if schedule == "gpipe":
        return [float(m)] * p
    if schedule == "1f1b":
        return [float(min(p - r, m)) for r in range(p)]
    if schedule == "zb-h1":
        return [float(min(p, m))] * p
    if schedule == "interleaved-1f1b":
        return [min(2 * (p - r - 1) + (v - 1) * p + 1, m * v) / v for r in range(p)]
    if schedule == "zb-v":
        return [min(2 * p, 2 * m) / 2] * p
    raise ValueError(f"unknown schedule {schedule!r}")


def memory_per_device(cm: CostModel, in_flight: list[float]) -> MemoryBreakdown:
    """The busiest pipeline rank's memory, given micro-batches in flight per rank."""
    cfg, m = cm.cfg, cm.model
    b = cfg.microbatch_size
    best: MemoryBreakdown | None = None
    last = cfg.num_stages - 1
    for r in range(cfg.pp):
        stages = [s for s, rr in enumerate(cm.stage_rank) if rr == r]
        static = training_state_bytes(cm.rank_params(r), cfg)
        layers = sum(cm.layers[s] for s in stages) / len(stages)  # per chunk, on average
        acts = in_flight[r] * len(stages) * layers * cm.activation_bytes()
        transient = 0.0
        if cfg.precision != "fp32" and not cfg.fsdp:
            # autocast keeps its low-precision copy of each weight for the step's region
            transient += cm.rank_params(r) * cm.dtype_bytes
        if cfg.fsdp:
            block = cm.layer_params()
            root = sum(cm.root_params(s) for s in stages)
            grad = cm.master_bytes + (cm.gather_bytes if cm.gather_bytes != cm.master_bytes else 0)
            transient += (root + 2 * block) * cm.gather_bytes + block * grad
        if cfg.recompute == "full":
            transient += m.working_bytes_per_layer(
                cm.seq, b, cfg.tp, cfg.sequence_parallel, cm.dtype_bytes
            )
        if last in stages:
            transient += m.logits_bytes(cm.seq, b, cfg.tp)
        mb = MemoryBreakdown(r, static, acts, transient)
        if best is None or mb.total > best.total:
            best = mb
    assert best is not None
    return best
