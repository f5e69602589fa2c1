"""What a machine can do: FLOP/s by dtype, memory, links inside and between nodes.

Presets describe common GPUs from their data sheets; ``local`` is this machine, measured by
:func:`plait.plan.calibrate.calibrate_local` (and cached; :func:`plait.plan.get_hardware` takes a name). Bandwidths are achievable figures in
bytes per second per device and direction (what NCCL's "bus bandwidth" reports), not the marketing
bidirectional totals.

Example::

    hw = get_hardware("h100-sxm")
    hw.flops("bf16") / 1e12      # 989.0
    hw.link_between(0, 9)        # the inter-node link: ranks 0 and 9 sit on different nodes
"""

from __future__ import annotations

import bisect
import math
from dataclasses import asdict, dataclass, field

__all__ = ["HardwareSpec", "Link", "HARDWARE_PRESETS", "DTYPE_BYTES"]

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp8": 1}

GB = 1e9


@dataclass(frozen=True)
class Link:
    """A link: ``name``, achievable bandwidth (bytes/s per device and direction), latency (s).

    ``all_reduce_curve`` holds measured ``(bytes, seconds)`` of a two-rank all-reduce (``local``:
    between bursts of compute, as a training step sees it); when given it replaces the
    latency-bandwidth formula for collectives, since gloo's cost is far from linear in size.
    """

    name: str
    bandwidth: float
    latency: float
    all_reduce_curve: tuple[tuple[float, float], ...] = ()

    def _curve(self, nbytes: float) -> float:
        pts = self.all_reduce_curve
        if nbytes <= pts[0][0]:
            return pts[0][1]
        for (b0, t0), (b1, t1) in zip(pts, pts[1:]):
            if nbytes <= b1 or (b1, t1) == pts[-1]:
                return t0 + (t1 - t0) * (nbytes - b0) / (b1 - b0)  # extrapolates past the end
        return pts[-1][1]

    def p2p_time(self, nbytes: float) -> float:
        """One point-to-point transfer."""
        return self.latency + nbytes / self.bandwidth

    def all_reduce_time(self, nbytes: float, n: int) -> float:
        """All-reduce of ``nbytes`` over ``n`` devices: a ring's ``2 (n-1)/n`` of the data each
        way, and a tree's ``2 log2 n`` latencies (NCCL picks a tree or low-latency protocol for
        small messages)."""
        if n <= 1:
            return 0.0
        if self.all_reduce_curve:  # measured at n = 2; a ring moves 2(n-1)/n of it
            return self._curve(nbytes * (n - 1) / n * 2) * math.ceil(math.log2(n))
        return (
            2 * math.ceil(math.log2(n)) * self.latency + 2 * (n - 1) / n * nbytes / self.bandwidth
        )

    def all_gather_time(self, nbytes: float, n: int) -> float:
        """Ring all-gather (or reduce-scatter) whose full result is ``nbytes``."""
        if n <= 1:
            return 0.0
        if self.all_reduce_curve:  # half an all-reduce's traffic
            return self.all_reduce_time(nbytes, n) / 2
        return math.ceil(math.log2(n)) * self.latency + (n - 1) / n * nbytes / self.bandwidth


@dataclass(frozen=True)
class HardwareSpec:
    """One kind of device and how devices connect.

    Attributes:
        name: preset name.
        peak_flops: dense peak FLOP/s by dtype (``bf16``, ``fp16``, ``fp32``, ``fp8``).
        memory_bytes: device memory.
        memory_bandwidth: device memory bandwidth (bytes/s): the rate of element-wise kernels.
        devices_per_node: devices that share the intra-node link.
        intra: the link inside a node (NVLink/NVSwitch, PCIe, or shared memory for ``local``).
        inter: the link between nodes, per device.
        gemm_efficiency: fraction of peak a large matrix multiply reaches.
        gemm_half_dim: the matrix width at which a multiply reaches half of that (small
            matrices run slower).
        attention_efficiency: fraction of peak the attention core reaches.
        kernel_overhead_s: fixed cost per kernel (launch, Python dispatch on CPU).
        reserved_bytes: memory the framework keeps for itself (context, communication buffers).
        p2p_blocks_compute: a send occupies the sender (CPU with gloo) instead of running beside
            compute on its own engine (GPU with NCCL).
        optimizer_s_per_param: measured optimizer step time per parameter (None: derived from
            memory bandwidth).
        gemm_rates: measured ``(width, FLOP/s)`` pairs (``local``); overrides the efficiency curve.
        attention_rate: measured attention FLOP/s (``local``).
        shared_cores: all devices of a job share this many cores (``local``: worker processes on
            one CPU), so more workers than cores slow each other down; 0 for independent devices.
        straggler_factor: how much slower than its average worker a job runs whose workers wait
            for one another every step: on a shared machine identical worker processes differ
            by several per cent, and the slowest sets the pace (``local``: the slower of the
            calibration's two workers over their mean; 1.0 for data-sheet presets).
        compute_scale: measured time of a real transformer layer's forward and backward over the
            cost model's estimate from the rates above (``local``; 1.0 for data-sheet presets);
            ``compute_scale_by_tokens`` gives it per micro-batch size in tokens, since small
            micro-batches run less efficiently. It scales the work tensor parallelism divides
            (matrix multiplies, the attention core).
        elementwise_scale_by_tokens: the same for the rest of a layer (norms, activations,
            residual adds, per-kernel overheads), which shrinks far less than ``1/tp`` when a
            layer is split; empty means ``compute_scale``. ``local`` separates the two by timing
            the layer at its full width and at half width.
        source: where the numbers come from.
    """

    name: str
    peak_flops: dict[str, float]
    memory_bytes: float
    memory_bandwidth: float
    devices_per_node: int
    intra: Link
    inter: Link
    gemm_efficiency: float = 0.67
    gemm_half_dim: float = 48.0
    attention_efficiency: float = 0.5
    kernel_overhead_s: float = 0.0
    reserved_bytes: float = 2 * GB
    p2p_blocks_compute: bool = False
    optimizer_s_per_param: float | None = None
    gemm_rates: tuple[tuple[float, float], ...] = field(default_factory=tuple)
    attention_rate: float | None = None
    shared_cores: int = 0
    straggler_factor: float = 1.0
    compute_scale: float = 1.0
    compute_scale_by_tokens: tuple[tuple[float, float], ...] = ()
    elementwise_scale_by_tokens: tuple[tuple[float, float], ...] = ()
    source: str = ""

    def compute_scale_at(self, tokens: float) -> float:
        """:attr:`compute_scale` for a micro-batch of ``tokens`` (interpolated in log tokens)."""
        return _interp_log(self.compute_scale_by_tokens, tokens, self.compute_scale)

    def elementwise_scale_at(self, tokens: float) -> float:
        """The scale of a layer's element-wise work and kernel overheads at ``tokens``."""
        pts = self.elementwise_scale_by_tokens
        return _interp_log(pts, tokens, 0.0) if pts else self.compute_scale_at(tokens)

    def flops(self, dtype: str = "bf16") -> float:
        """Peak FLOP/s in ``dtype``."""
        if dtype not in self.peak_flops:
            raise ValueError(
                f"hardware {self.name!r} has no peak for dtype {dtype!r}; known: "
                f"{sorted(self.peak_flops)}"
            )
        return self.peak_flops[dtype]

    def gemm_rate(self, dim: float, dtype: str = "bf16") -> float:
        """Achieved FLOP/s of a matrix multiply whose smaller weight dimension is ``dim``."""
        if self.gemm_rates:
            dims = [d for d, _ in self.gemm_rates]
            i = bisect.bisect_left(dims, dim)
            if i == 0:
                return self.gemm_rates[0][1] * min(1.0, dim / dims[0])
            if i == len(dims):
                return self.gemm_rates[-1][1]
            (d0, r0), (d1, r1) = self.gemm_rates[i - 1], self.gemm_rates[i]
            return r0 + (r1 - r0) * (dim - d0) / (d1 - d0)
        return self.flops(dtype) * self.gemm_efficiency * dim / (dim + self.gemm_half_dim)

    def attn_rate(self, dtype: str = "bf16") -> float:
        if self.attention_rate:
            return self.attention_rate
        return self.flops(dtype) * self.attention_efficiency

    @property
    def usable_memory(self) -> float:
        return self.memory_bytes - self.reserved_bytes

    def node_of(self, device: int) -> int:
        return device // self.devices_per_node

    def link_between(self, a: int, b: int) -> Link:
        """The link two devices (global ranks) talk over."""
        return self.intra if self.node_of(a) == self.node_of(b) else self.inter

    def group_link(self, ranks: list[int]) -> Link:
        """The bottleneck link of a collective over ``ranks``.

        Inside one node it is the intra-node link; across nodes the ring crosses node boundaries,
        and each node contributes as many network ports as it has members in the group.
        """
        nodes: dict[int, int] = {}
        for r in ranks:
            nodes[self.node_of(r)] = nodes.get(self.node_of(r), 0) + 1
        if len(nodes) == 1:
            return self.intra
        per_node = min(nodes.values())
        bw = min(self.intra.bandwidth, self.inter.bandwidth * per_node)
        return Link(self.inter.name, bw, self.inter.latency)

    def optimizer_time(self, params: float) -> float:
        """Seconds for one Adam step over ``params`` parameters on one device."""
        if self.optimizer_s_per_param is not None:
            return params * self.optimizer_s_per_param
        # fp32 master weights, two moments and the gradient read; weights and moments written,
        # plus the 16-bit copy of the weights: about 30 bytes per parameter.
        return params * 30 / self.memory_bandwidth

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> HardwareSpec:
        d = dict(d)
        for k in ("intra", "inter"):
            link = dict(d[k])
            link["all_reduce_curve"] = tuple(tuple(x) for x in link.get("all_reduce_curve", ()))
            d[k] = Link(**link)
        d["gemm_rates"] = tuple(tuple(x) for x in d.get("gemm_rates", ()))
        for k in ("compute_scale_by_tokens", "elementwise_scale_by_tokens"):
            d[k] = tuple(tuple(x) for x in d.get(k, ()))
        return cls(**d)


def _interp_log(pts: tuple[tuple[float, float], ...], x: float, default: float) -> float:
    """``pts`` (sorted ``(x, y)`` pairs) read at ``x``, linearly in ``log x``, flat past the ends."""
    if not pts:
        return default
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
    return pts[-1][1]


_NVSWITCH_A100 = Link("nvswitch", 230 * GB, 4e-6)
_NVSWITCH_H100 = Link("nvswitch", 370 * GB, 3e-6)
_PCIE5 = Link("pcie", 25 * GB, 10e-6)  # 8 GPUs behind PCIe switches, through the host
_HDR = Link("infiniband", 23 * GB, 8e-6)  # 8 x 200 Gb/s HDR per 8-GPU node: one NIC per GPU
_NDR = Link("infiniband", 46 * GB, 6e-6)  # 8 x 400 Gb/s NDR per node
_ETH100 = Link("ethernet", 11 * GB, 15e-6)  # 100 Gb/s per GPU, typical of PCIe servers

HARDWARE_PRESETS: dict[str, HardwareSpec] = {
    "a100-40gb": HardwareSpec(
        "a100-40gb",
        {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
        40 * GB,
        1.555e12,
        8,
        _NVSWITCH_A100,
        _HDR,
        source="NVIDIA A100 datasheet; DGX A100 (NVSwitch, 8x HDR)",
    ),
    "a100-80gb": HardwareSpec(
        "a100-80gb",
        {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
        80 * GB,
        2.039e12,
        8,
        _NVSWITCH_A100,
        _HDR,
        source="NVIDIA A100 datasheet; DGX A100 (NVSwitch, 8x HDR)",
    ),
    "h100-sxm": HardwareSpec(
        "h100-sxm",
        {"fp8": 1979e12, "bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
        80 * GB,
        3.35e12,
        8,
        _NVSWITCH_H100,
        _NDR,
        source="NVIDIA H100 SXM datasheet; DGX H100 (NVSwitch, 8x NDR)",
    ),
    "h100-pcie": HardwareSpec(
        "h100-pcie",
        {"fp8": 1513e12, "bf16": 756e12, "fp16": 756e12, "fp32": 51e12},
        80 * GB,
        2.0e12,
        8,
        _PCIE5,
        _ETH100,
        source="NVIDIA H100 PCIe datasheet; 8 GPUs per server on PCIe 5.0, no NVLink",
    ),
    "h200": HardwareSpec(
        "h200",
        {"fp8": 1979e12, "bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
        141 * GB,
        4.8e12,
        8,
        _NVSWITCH_H100,
        _NDR,
        source="NVIDIA H200 SXM datasheet; HGX H200 (NVSwitch, 8x NDR)",
    ),
}
