"""Seconds for each piece of a training step, for one model, machine and configuration.

:class:`CostModel` answers the questions the simulator asks: how long does the forward
(``F``), the backward for inputs (``B``), the backward for weights (``W``) of a stage take for one
micro-batch on one device, and how long does an activation or gradient take to cross each stage
boundary. It also costs the tensor-parallel collectives inside every layer (on the link the tensor
group sits on), the data-parallel gradient all-reduce and the optimizer step.

Compute time of a layer is the sum of its matrix multiplies (each at the rate the hardware reaches
at that width), the attention core, the element-wise kernels (memory-bound: bytes over memory
bandwidth) and a fixed cost per kernel. Where ranks sit comes from :class:`plait.mesh.MeshShape`
(tensor ranks innermost): a group inside one node talks over the intra-node link, otherwise over
the network.

Example::

    cfg = ParallelConfig(tp=8, precision="bf16-mixed")
    cm = CostModel(get_model("llama3-8b"), get_hardware("h100-sxm"), cfg, seq=8192)
    cm.compute("F", stage=0)       # seconds for one micro-batch's forward of stage 0
    cm.dp_allreduce_time()
"""

from __future__ import annotations

from functools import cached_property

from plait.config import ParallelConfig
from plait.mesh_shape import MeshShape
from plait.pipeline.generators import stage_to_rank_for
from plait.pipeline.split import split_blocks
from plait.plan.hardware import DTYPE_BYTES, HardwareSpec, Link
from plait.plan.model_spec import ModelSpec

__all__ = ["CostModel", "UniformCosts"]

# Element-wise traffic per layer as a multiple of the activation bytes a layer keeps: the forward
# writes each kept tensor once and reads it about once more; the backward reads activations and
# writes and reads gradients of the same size.
_ELEMWISE_FWD = 2.0
_ELEMWISE_BWD = 3.0
# Kernels per layer: forward, backward for inputs, backward for weights.
_KERNELS = {"F": 24, "B": 36, "W": 8}


class CostModel:
    """Costs of one configuration; see the module docstring.

    Args:
        model: the model spec.
        hw: the hardware spec.
        cfg: the parallel configuration.
        seq: sequence length (default the model's).
        flash_attention: fused attention that keeps no ``seq x seq`` matrices and skips the masked
            half of causal attention (modern default); False for the 2021 Megatron-LM kernels.
    """

    def __init__(
        self,
        model: ModelSpec,
        hw: HardwareSpec,
        cfg: ParallelConfig,
        seq: int | None = None,
        flash_attention: bool = True,
    ):
        self.model, self.hw, self.cfg = model, hw, cfg
        self.seq = seq or model.seq_len
        self.flash = flash_attention
        for dt in (cfg.dtype, cfg.compute_dtype):
            if dt not in DTYPE_BYTES:
                raise ValueError(f"dtype {dt!r} is not one of {sorted(DTYPE_BYTES)}")
        self.compute_dtype = cfg.compute_dtype
        hw.flops(self.compute_dtype)  # raises if the hardware has no figure for this dtype
        self.dtype_bytes = DTYPE_BYTES[self.compute_dtype]  # activations, boundaries, tp
        self.master_bytes = DTYPE_BYTES[cfg.dtype]  # weights, gradients (and their reduction)
        self.mesh = MeshShape(dp=cfg.dp, pp=cfg.pp, tp=cfg.tp)
        # Stage s lives where the schedule's generator places it (round-robin, or a V).
        self.stage_rank = stage_to_rank_for(cfg.schedule, cfg.pp, cfg.virtual)
        # Workers sharing CPU cores: the slowest sets a step's pace, and more workers than cores
        # take turns.
        self.slowdown = 1.0
        if hw.shared_cores and cfg.gpus > 1:
            self.slowdown = hw.straggler_factor * max(1.0, cfg.gpus / hw.shared_cores)

    @cached_property
    def layers(self) -> list[int]:
        """Layers per stage, by the partitioner's own rule (:func:`plait.pipeline.split_blocks`)
        for the configuration's ``balance``: the stages the runtime builds."""
        m, balance, costs = self.model, self.cfg.balance, None
        if balance == "params":
            head = m.head_params() + (m.vocab * m.hidden if m.tied_embeddings else 0)
            costs = [m.embedding_params(), *[m.params_per_layer()] * m.layers, head]
        elif balance == "time":
            lt, embed, head = self.layer_times, self._embed_times(), self._head_times()
            unit = [sum(d[k] for k in ("F", "B", "W")) for d in (embed, lt, head)]
            costs = [unit[0], *[unit[1]] * m.layers, unit[2]]
        return split_blocks(m.layers, self.cfg.num_stages, balance, costs)

    # ------------------------------------------------------------------ links
    @cached_property
    def tp_link(self) -> Link:
        return self.hw.group_link(self.mesh.group_ranks("tp", 0))

    @cached_property
    def dp_link(self) -> Link:
        return self.hw.group_link(self.mesh.group_ranks("dp", 0))

    def pp_link(self, src_stage: int, dst_stage: int) -> Link:
        a = self.mesh.rank(pp=self.stage_rank[src_stage])
        b = self.mesh.rank(pp=self.stage_rank[dst_stage])
        return self.hw.link_between(a, b)

    # ------------------------------------------------------------------ per layer
    def _gemm_time(self, tokens: int) -> float:
        m, t, hw, dt = self.model, self.cfg.tp, self.hw, self.compute_dtype
        h, f = m.hidden, m.ffn
        kv = max(m.kv_dim / t, m.head_dim)  # fewer kv heads than ranks: each rank keeps one
        gemms = [
            (2 * tokens * h * h / t, h / t),  # q
            (2 * tokens * h * 2 * kv, min(h, 2 * kv)),  # k, v
            (2 * tokens * h * h / t, h / t),  # out projection
            ((3 if m.gated_mlp else 2) * 2 * tokens * h * f / t, min(h, f / t)),  # MLP
        ]
        return sum(fl / hw.gemm_rate(dim, dt) for fl, dim in gemms)

    def _attention_time(self, tokens: int) -> float:
        flops = 4.0 * tokens * self.seq * self.model.hidden / self.cfg.tp
        if self.flash:
            flops /= 2  # causal: fused kernels skip the masked half
        return flops / self.hw.attn_rate(self.compute_dtype)

    def _elementwise_bytes(self, b: int) -> float:
        m = self.model
        kept = m.activation_bytes_per_layer(
            self.seq, b, self.cfg.tp, self.cfg.sequence_parallel, "none", self.dtype_bytes
        )
        if self.flash:  # no seq x seq tensors in memory
            kept -= self.dtype_bytes / 2 * 5 * m.heads * self.seq**2 * b / self.cfg.tp
        return kept

    def _tp_collectives(self, b: int) -> float:
        """Two all-reduces of the layer's ``(b, s, h)`` output per pass (or, with sequence
        parallelism, two all-gathers and two reduce-scatters: the same bytes on the wire)."""
        t = self.cfg.tp
        if t == 1:
            return 0.0
        nbytes = b * self.seq * self.model.hidden * self.dtype_bytes
        if self.cfg.sequence_parallel:
            return 4 * self.tp_link.all_gather_time(nbytes, t)
        return 2 * self.tp_link.all_reduce_time(nbytes, t)

    def layer_parts(self) -> dict[str, tuple[float, float]]:
        """Unscaled seconds of one layer's compute for one micro-batch, per action (``F``, ``B``,
        ``W``), as ``(split, other)``: the work tensor parallelism divides (matrix multiplies,
        the attention core) and the rest (element-wise kernels, per-kernel overheads)."""
        b = self.cfg.microbatch_size
        tokens = b * self.seq
        gemm = self._gemm_time(tokens)
        attn = self._attention_time(tokens)
        elem = self._elementwise_bytes(b) / self.hw.memory_bandwidth
        ko = self.hw.kernel_overhead_s
        # Backward: the input-gradient matmuls equal the forward's; the attention core's backward
        # costs twice its forward; all of it is input gradient.
        return {
            "F": (gemm + attn, _ELEMWISE_FWD * elem + _KERNELS["F"] * ko),
            "B": (gemm + 2 * attn, _ELEMWISE_BWD * elem + _KERNELS["B"] * ko),
            "W": (gemm, _KERNELS["W"] * ko),
        }

    def _scaled(self, parts: tuple[float, float]) -> float:
        tokens = self.cfg.microbatch_size * self.seq
        return parts[0] * self.hw.compute_scale_at(tokens) + parts[
            1
        ] * self.hw.elementwise_scale_at(tokens)

    @cached_property
    def layer_times(self) -> dict[str, float]:
        """Seconds of one layer for one micro-batch: ``F``, ``B``, ``W`` (recomputation in ``B``)."""
        parts = self.layer_parts()
        comm = self._tp_collectives(self.cfg.microbatch_size)
        f = self._scaled(parts["F"]) + comm
        bwd = self._scaled(parts["B"]) + comm
        w = self._scaled(parts["W"])
        if self.cfg.recompute == "full":
            bwd += f
        elif self.cfg.recompute == "selective":
            attn = self._attention_time(self.cfg.microbatch_size * self.seq)
            elem = self._elementwise_bytes(self.cfg.microbatch_size) / self.hw.memory_bandwidth
            bwd += self._scaled((attn, elem * 0.5))  # the attention core and its softmax again
        s = self.slowdown
        gather, scatter = self.fsdp_times(self.layer_params())
        # FSDP2 gathers the next block while this one computes (its own streams on a GPU); on
        # CPU cores that also compute, or past the compute it hides behind, it adds up.
        fsdp_f, fsdp_b = self._exposed(gather, f), self._exposed(gather + scatter, bwd + w)
        return {
            "F": (f + fsdp_f) * s,
            "B": (bwd + fsdp_b) * s,
            "W": w * s,
            "comm_F": comm * s,
            "comm_B": comm * s,
            "fsdp": (fsdp_f + fsdp_b) * s,
        }

    # ------------------------------------------------------------------ FSDP
    @property
    def gather_bytes(self) -> int:
        """Bytes per parameter FSDP gathers: the compute dtype under mixed precision (FSDP2's
        ``param_dtype``), else the parameters' own."""
        return self.dtype_bytes if self.cfg.precision != "fp32" else self.master_bytes

    def fsdp_times(self, params: float) -> tuple[float, float]:
        """Seconds of FSDP's all-gather of ``params`` (one unit on one tensor rank) and of the
        reduce-scatter of their gradients (in ``dtype``: float32 for mixed precision) over dp;
        zero without FSDP."""
        if not self.cfg.fsdp:
            return 0.0, 0.0
        n, link = self.cfg.dp, self.dp_link
        out = []
        for kind, per_param in (("gather", self.gather_bytes), ("scatter", self.master_bytes)):
            nbytes = params * per_param
            t = link.all_gather_time(nbytes, n)
            if self.hw.shared_cores:
                # gloo (CPU) has no reduce-scatter: FSDP2 all-reduces there; and the copy-in
                # and copy-out pass over the bytes on the cores that compute
                if kind == "scatter":
                    t = link.all_reduce_time(nbytes, n)
                t += 2 * nbytes / self.hw.memory_bandwidth
            out.append(t)
        return out[0], out[1]

    def _exposed(self, comm: float, compute: float) -> float:
        """What of ``comm`` overlapping ``compute`` shows: all of it on shared CPU cores."""
        return comm if self.hw.shared_cores else max(0.0, comm - compute)

    # ------------------------------------------------------------------ per stage
    def head_parts(self) -> dict[str, tuple[float, float]]:
        """Final norm, logits and loss on the last stage (vocabulary split over tensor ranks), as
        :meth:`layer_parts`."""
        m, b, t = self.model, self.cfg.microbatch_size, self.cfg.tp
        tokens = b * self.seq
        gemm = (
            2
            * tokens
            * m.hidden
            * m.vocab
            / t
            / self.hw.gemm_rate(min(m.hidden, m.vocab / t), self.compute_dtype)
        )
        elem = 3 * m.logits_bytes(self.seq, b, t) / self.hw.memory_bandwidth
        return {"F": (gemm, elem), "B": (gemm, elem), "W": (gemm, 0.0)}

    def embed_parts(self) -> dict[str, tuple[float, float]]:
        """The embedding lookup and its gradient, as :meth:`layer_parts` (no communication)."""
        nbytes = self.cfg.microbatch_size * self.seq * self.model.hidden * self.dtype_bytes
        elem = 3 * nbytes / self.hw.memory_bandwidth
        return {k: (0.0, elem) for k in ("F", "B", "W")}

    def _head_times(self) -> dict[str, float]:
        out = {k: self._scaled(v) for k, v in self.head_parts().items()}
        # The vocabulary-parallel loss agrees on each token's maximum logit, then on the sums
        # of exponentials and the target logits: two all-reduces of a few numbers per token.
        nbytes = 2 * self.cfg.microbatch_size * self.seq * self.dtype_bytes
        out["F"] += 2 * self.tp_link.all_reduce_time(nbytes, self.cfg.tp)
        return out

    def _embed_times(self) -> dict[str, float]:
        nbytes = self.cfg.microbatch_size * self.seq * self.model.hidden * self.dtype_bytes
        comm = self.tp_link.all_reduce_time(nbytes, self.cfg.tp)  # vocab-parallel embedding
        out = {k: self._scaled(v) for k, v in self.embed_parts().items()}
        out["F"] += comm
        return out

    @cached_property
    def _stage_times(self) -> list[dict[str, float]]:
        lt = self.layer_times
        out = []
        last = self.cfg.num_stages - 1
        head, embed = self._head_times(), self._embed_times()
        for s, n in enumerate(self.layers):
            d = {k: n * lt[k] for k in ("F", "B", "W")}
            if s == 0:
                for k in d:
                    d[k] += embed[k] * self.slowdown
            if s == last:
                for k in d:
                    d[k] += head[k] * self.slowdown
            # FSDP's root unit (embeddings, final norm, head) is gathered before the stage's
            # first block and reduce-scattered after its backward: nothing to hide behind.
            gather, scatter = self.fsdp_times(self.root_params(s))
            d["F"] += gather * self.slowdown
            d["B"] += scatter * self.slowdown
            d["fsdp"] = n * lt["fsdp"] + (gather + scatter) * self.slowdown
            d["BW"] = d["B"] + d["W"]
            out.append(d)
        return out

    def fsdp_time(self, rank: int) -> float:
        """Seconds per micro-batch that FSDP's collectives add to pipeline rank ``rank``."""
        st = self._stage_times
        return sum(st[s]["fsdp"] for s, r in enumerate(self.stage_rank) if r == rank)

    def compute(self, kind: str, stage: int, microbatch: int = 0) -> float:
        """Seconds of compute action ``kind`` (F, B, W, BW) of ``stage`` for one micro-batch."""
        return self._stage_times[stage][str(kind)]

    def activation_bytes(self) -> float:
        """Bytes one micro-batch keeps per layer on one device (what is held until backward)."""
        return self.model.activation_bytes_per_layer(
            self.seq,
            self.cfg.microbatch_size,
            self.cfg.tp,
            self.cfg.sequence_parallel,
            self.cfg.recompute,
            self.dtype_bytes,
        ) - (
            0
            if not self.flash or self.cfg.recompute != "none"
            else self.dtype_bytes
            / 2
            * 5
            * self.model.heads
            * self.seq**2
            * self.cfg.microbatch_size
            / self.cfg.tp
        )

    def stage_activation_bytes(self, stage: int) -> float:
        return self.layers[stage] * self.activation_bytes()

    def boundary_bytes(self) -> float:
        """One activation (or gradient) crossing a stage boundary, per device. With tensor
        parallelism each rank sends its 1/tp slice and the receivers all-gather it (Megatron's
        scatter/gather), or the tensor is already sequence-sharded."""
        b = self.cfg.microbatch_size
        return b * self.seq * self.model.hidden * self.dtype_bytes / self.cfg.tp

    def transfer(self, src_stage: int, dst_stage: int) -> float:
        """Seconds for one activation or gradient from ``src_stage`` to ``dst_stage``."""
        if self.stage_rank[src_stage] == self.stage_rank[dst_stage]:
            return 0.0
        t = self.pp_link(src_stage, dst_stage).p2p_time(self.boundary_bytes())
        if self.cfg.tp > 1 and not self.cfg.sequence_parallel:
            t += self.tp_link.all_gather_time(self.boundary_bytes() * self.cfg.tp, self.cfg.tp)
        return t

    @property
    def p2p_blocks_compute(self) -> bool:
        return self.hw.p2p_blocks_compute

    # ------------------------------------------------------------------ per device
    def layer_params(self) -> float:
        """Parameters of one block on one tensor-parallel rank (matrices and column-parallel
        biases split, norms and row-parallel biases whole)."""
        m = self.model
        rep = m.replicated_params_per_layer()
        return (m.params_per_layer() - rep) / self.cfg.tp + rep

    def stage_params(self, stage: int) -> float:
        """Parameters of ``stage`` on one tensor-parallel rank."""
        return self.layers[stage] * self.layer_params() + self.root_params(stage)

    def root_params(self, stage: int) -> float:
        """Parameters of ``stage`` outside its blocks (FSDP's root unit) on one tensor-parallel
        rank: the vocabulary split, a position table and the final norm whole."""
        m, t = self.model, self.cfg.tp
        n = 0.0
        if stage == 0:
            n += m.vocab * m.hidden / t + m.pos_embedding * m.hidden
        if stage == self.cfg.num_stages - 1:
            head = m.head_params()
            norm = head - (0 if m.tied_embeddings else m.vocab * m.hidden)
            n += norm + (head - norm) / t
            if m.tied_embeddings and self.cfg.num_stages > 1:
                n += m.vocab * m.hidden / t  # the last stage keeps its own copy of the tied matrix
        return n

    def rank_params(self, rank: int) -> float:
        return sum(self.stage_params(s) for s, r in enumerate(self.stage_rank) if r == rank)

    def dp_allreduce_time(self, rank: int = 0) -> float:
        """Gradient all-reduce over the data-parallel group of pipeline rank ``rank``, after the
        pipeline drains, in ``dtype`` (ZeRO-1's reduce-scatter of gradients and all-gather of
        parameters move the same bytes); zero with FSDP, which reduce-scatters in the
        backward (:meth:`fsdp_times`)."""
        if self.cfg.fsdp:
            return 0.0
        nbytes = self.rank_params(rank) * self.master_bytes
        t = self.dp_link.all_reduce_time(nbytes, self.cfg.dp)
        if self.hw.shared_cores and self.cfg.dp > 1:
            # On CPU the reduction and the bucket's two passes over the gradients (copying them
            # into the bucket, averaging; each reads and writes every byte) run on the cores
            # that compute, so none of it hides.
            t += 2 * 2 * nbytes / self.hw.memory_bandwidth
        return t * (self.slowdown if self.hw.shared_cores else 1.0)

    def optimizer_time(self, rank: int = 0) -> float:
        """Global-norm clipping (a one-number all-reduce over each of the tensor and pipeline
        groups that has more than one rank, and the data-parallel mean of the loss) and the
        optimizer step of pipeline rank ``rank``."""
        norms = sum(
            link.all_reduce_time(8, n)
            for link, n in ((self.tp_link, self.cfg.tp), (self.dp_link, self.cfg.dp))
        )
        if self.cfg.pp > 1:
            norms += self.pp_link(0, self.cfg.num_stages - 1).all_reduce_time(8, self.cfg.pp)
        shard = self.cfg.dp if self.cfg.dp_shard != "none" else 1  # ZeRO-1 and FSDP step 1/dp
        return (self.hw.optimizer_time(self.rank_params(rank) / shard) + norms) * self.slowdown

    def step_flops_per_gpu(self) -> float:
        """Hardware FLOPs one device executes per step (recomputation included)."""
        tokens = self.cfg.global_batch * self.seq
        return self.model.flops_per_token(self.seq, self.cfg.recompute) * tokens / self.cfg.gpus

    def model_flops_per_gpu(self) -> float:
        tokens = self.cfg.global_batch * self.seq
        return self.model.model_flops_per_token(self.seq) * tokens / self.cfg.gpus


class UniformCosts:
    """Every stage costs the same: for tests and ``plait simulate``.

    Example::

        UniformCosts(f=1.0, b=1.0, w=1.0, comm=0.0)  # F = B = W = 1 s, free transfers
    """

    p2p_blocks_compute = False

    def __init__(self, f: float = 1.0, b: float = 1.0, w: float = 1.0, comm: float = 0.0):
        self.times = {"F": f, "B": b, "W": w, "BW": b + w}
        self.comm = comm

    def compute(self, kind: str, stage: int, microbatch: int = 0) -> float:
        return self.times[str(kind)]

    def transfer(self, src_stage: int, dst_stage: int) -> float:
        return self.comm

    def stage_activation_bytes(self, stage: int) -> float:
        return 1.0
