"""Serving: task, pipeline or tensor parallel for a request rate and a latency target.

A request is a prompt of ``prompt_len`` tokens (prefill: compute-bound) and ``output_len`` generated
tokens (decode: each step reads every weight once, so memory-bound at small batch). With ``g``
devices per model copy:

* task parallel: independent copies, each on the fewest devices that hold the weights (split by
  tensor parallelism when one device is not enough): no communication, most copies.
* pipeline parallel: one copy split into ``g`` stages; a token still visits every stage in turn
  (latency is not cut) but ``g`` batches are in flight, and stages talk only at boundaries.
* tensor parallel: every layer split over ``g`` devices; each token's time is divided by ``g``
  but every layer pays two all-reduces, which needs a fast link.

Example::

    res = plan_inference(get_model("llama2-70b"), get_hardware("h100-sxm"), gpus=8,
                         rate=2.0, latency_s=20.0)
    res.best.strategy   # 'tensor'
"""

from __future__ import annotations

from dataclasses import dataclass

from plait.mesh_shape import MeshShape
from plait.plan.hardware import DTYPE_BYTES, HardwareSpec
from plait.plan.model_spec import ModelSpec

__all__ = ["ServingOption", "InferenceResult", "plan_inference"]

_WEIGHT_READ_EFFICIENCY = 0.8  # share of memory bandwidth a decode step reaches


@dataclass
class ServingOption:
    strategy: str
    replicas: int
    tp: int
    pp: int
    batch: int
    ttft_s: float
    tpot_s: float
    latency_s: float
    capacity_rps: float
    memory_gb_per_gpu: float
    fits: bool
    meets_target: bool
    note: str = ""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class InferenceResult:
    options: list[ServingOption]
    rate: float
    latency_s: float

    @property
    def best(self) -> ServingOption:
        ok = [o for o in self.options if o.fits]
        if not ok:
            raise ValueError("the model fits none of the serving layouts on these GPUs")
        return min(ok, key=lambda o: (not o.meets_target, o.latency_s, -o.capacity_rps))

    def verdict(self) -> str:
        b = self.best
        lines = [
            f"Serve with {b.strategy} parallelism ({b.replicas} cop{'y' if b.replicas == 1 else 'ies'}"
            f" x tp{b.tp} pp{b.pp}): {b.latency_s:.2f} s per request at batch {b.batch}, "
            f"{b.capacity_rps:.2f} requests/s capacity"
            + ("" if b.meets_target else " (misses the target: add GPUs)")
        ]
        for o in self.options:
            if o is b:
                continue
            if not o.fits:
                lines.append(f"  not {o.strategy}: {o.note}")
            else:
                lines.append(
                    f"  not {o.strategy}: {o.latency_s:.2f} s per request "
                    f"({o.latency_s / b.latency_s:.1f}x), {o.capacity_rps:.2f} requests/s; {o.note}"
                )
        return "\n".join(lines)


def _layout(model, hw, tp, pp, batch, ctx, prompt_len, output_len, dtype):
    """Latencies of one copy on ``tp x pp`` devices serving ``batch`` requests together."""
    db = DTYPE_BYTES[dtype]
    params = model.num_parameters()
    weights = params * db / (tp * pp)
    kv_per_token = 2 * model.layers * model.kv_dim * db
    kv = kv_per_token * ctx * batch / (tp * pp)
    mem = weights + kv
    bw = hw.memory_bandwidth * _WEIGHT_READ_EFFICIENCY
    mesh = MeshShape(pp=pp, tp=tp)
    tp_link = hw.group_link(mesh.group_ranks("tp", 0))
    pp_link = hw.link_between(mesh.rank(pp=0), mesh.rank(pp=min(1, pp - 1)))
    rate = hw.gemm_rate(model.hidden / tp, dtype)
    flops_tok = 2 * params
    # Decode step: every stage reads its weights and cache, in sequence along the pipeline.
    stage_read = (weights + kv) / bw
    stage_flops = flops_tok * batch / (tp * pp) / rate
    act = batch * model.hidden * db
    tp_comm = 2 * (model.layers / pp) * tp_link.all_reduce_time(act, tp)
    stage_step = (
        max(stage_read, stage_flops) + tp_comm + hw.kernel_overhead_s * 20 * model.layers / pp
    )
    hop = pp_link.p2p_time(act) if pp > 1 else 0.0
    tpot = pp * stage_step + (pp - 1) * hop
    # Prefill: compute-bound over the prompt.
    pre_tokens = batch * prompt_len
    pre_comm = 2 * model.layers * tp_link.all_reduce_time(act * prompt_len, tp)
    ttft = (
        flops_tok * pre_tokens / (tp * rate)
        + pre_comm
        + (pp - 1) * pp_link.p2p_time(act * prompt_len)
    )
    latency = ttft + output_len * tpot
    # A pipeline keeps pp batches in flight, one per stage.
    in_flight = batch * pp
    return ttft, tpot, latency, in_flight, mem


def plan_inference(
    model: ModelSpec,
    hw: HardwareSpec,
    gpus: int,
    rate: float,
    latency_s: float,
    prompt_len: int = 512,
    output_len: int = 256,
    dtype: str = "bf16",
) -> InferenceResult:
    """Compare task, pipeline and tensor parallel serving; see the module docstring."""
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    if rate <= 0 or latency_s <= 0:
        raise ValueError(f"--rate and --latency must be positive, got {rate} and {latency_s}")
    ctx = prompt_len + output_len
    limit = hw.usable_memory
    db = DTYPE_BYTES[dtype]
    min_devices = 1
    while model.num_parameters() * db / min_devices > 0.9 * limit and min_devices < gpus:
        min_devices *= 2
    layouts = {
        "task": (gpus // min_devices, min_devices if model.heads % min_devices == 0 else 1, 1),
        "pipeline": (1, 1, gpus),
        "tensor": (1, gpus, 1),
    }
    options = []
    for strategy, (replicas, tp, pp) in layouts.items():
        if strategy == "task" and tp == 1 and min_devices > 1:
            tp, pp = 1, min_devices
        if strategy == "tensor" and model.heads % tp:
            options.append(
                ServingOption(
                    strategy,
                    1,
                    tp,
                    pp,
                    0,
                    0,
                    0,
                    float("inf"),
                    0,
                    0,
                    False,
                    False,
                    f"{model.heads} heads do not split over {tp} devices",
                )
            )
            continue
        best = None
        b = 1
        while b <= 1024:
            ttft, tpot, lat, in_flight, mem = _layout(
                model, hw, tp, pp, b, ctx, prompt_len, output_len, dtype
            )
            if mem > limit:
                break
            cap = replicas * in_flight / lat
            cand = ServingOption(
                strategy,
                replicas,
                tp,
                pp,
                b,
                ttft,
                tpot,
                lat,
                cap,
                mem / 1e9,
                True,
                lat <= latency_s and cap >= rate,
            )
            if best is None or (
                cand.meets_target and (not best.meets_target or cand.latency_s < best.latency_s)
            ):
                best = cand
            if cand.meets_target:
                break  # the smallest batch that carries the load has the lowest latency
            b *= 2
        if best is None:
            need = model.num_parameters() * db / (tp * pp) / 1e9
            options.append(
                ServingOption(
                    strategy,
                    replicas,
                    tp,
                    pp,
                    0,
                    0,
                    0,
                    float("inf"),
                    0,
                    need,
                    False,
                    False,
                    f"weights alone need {need:.0f} GB per GPU > {limit / 1e9:.0f} GB usable",
                )
            )
            continue
        link = hw.group_link(list(range(tp))).name if tp > 1 else None
        if strategy == "tensor":
            best.note = f"2 all-reduces per layer per token over {link}"
        elif strategy == "pipeline":
            best.note = f"every token crosses {pp} stages in turn; {pp} batches in flight"
        else:
            best.note = f"{replicas} independent cop{'y' if replicas == 1 else 'ies'}, no communication between them"
        options.append(best)
    return InferenceResult(options, rate, latency_s)
