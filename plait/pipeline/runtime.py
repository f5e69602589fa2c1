"""The pipeline runtime: execute one rank's schedule with torch.distributed point-to-point.

Every pipeline rank builds a :class:`PipelineRuntime` with its own stage modules and the same
:class:`~plait.pipeline.schedule.Schedule`, then calls :meth:`~PipelineRuntime.train_step` (or
:meth:`~PipelineRuntime.forward`) with the same batch. The runtime walks its rank's action list in
order, which the validator has proved free of deadlock:

- F, B, W, BW run the stage module (B and W split the backward, see below);
- SEND_* post an ``isend`` (through shared-memory rings between CPU ranks on one host,
  :mod:`plait.pipeline.shm`; else the process group) and move on; sends are reaped as they complete and waited for at the
  end of the step, so compute never waits for a send;
- RECV_* wait for an ``irecv`` posted earlier, so the sender finds the receive ready and its
  ``isend`` moves the data at once instead of waiting for the receiver (gloo moves data only when
  both sides have posted): on gloo every receive of the step is posted at the rank's first
  receive (where it waits anyway), elsewhere each shortly before the sender is expected to send
  (from a unit-time run of the whole schedule); see ``prefetch``. Receives from one rank are posted in list order, which is the
  order gloo and NCCL match them in.

Each action's start and end (``time.perf_counter``) is recorded: :attr:`PipelineRuntime.timeline`.

No shapes by hand: a stage's input shape is learned from a small header message (dtype and
shape) sent before the first activation of each new *input micro-batch shape* on each boundary.
Both sides know the micro-batch shapes (every rank gets the batch), so both know without asking
when a header comes; steady-state steps send no metadata at all, and sequence length or batch size
may change between steps.

Zero-bubble split of the backward: B computes the gradient of the stage input and of every
parameter except the weights of plain ``nn.Linear`` layers (their biases included), plus the
gradient of each such layer's output; W then forms those weights' gradients (``dy^T x``, the
bulk of the backward's FLOPs) from the saved input and output gradient. During plait's own
training steps such a layer runs through a recording ``forward`` (``F.linear``, as
``nn.Linear.forward``), so what is saved is what the weight met, whatever hooks the layer has;
a Linear whose ``forward`` was already replaced on the instance is left whole to B. Stages with
activation checkpointing do the whole backward in B (W is then empty).

Gradients: the loss of micro-batch ``i`` is ``loss_fn(out_i, targets_i) * size_i / batch``, so the
gradients summed over micro-batches equal those of ``loss_fn`` on the whole batch (a mean), with
uneven splits too, exactly like single-process gradient accumulation.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from plait import comm, heartbeat
from plait.config import TRANSPORTS
from plait.pipeline import shm
from plait.pipeline.payload import decode_header, encode_header, flatten, unflatten
from plait.pipeline.schedule import Action, Kind, Schedule
from plait.pipeline.validate import validate
from plait.pipeline.walk import Walk, matching_send
from plait.trace import Event, Timeline

__all__ = ["PipelineRuntime", "split_batch"]


def split_batch(batch_size: int, num_microbatches: int, uneven: bool = True) -> list[int]:
    """Micro-batch sizes for a batch: equal, or differing by at most one when ``uneven``.

    Raises ValueError (before any communication) when a micro-batch would be empty, or when the
    batch does not divide and ``uneven`` is False.

    Example::

        split_batch(10, 4)  # [3, 3, 2, 2]
    """
    if batch_size < num_microbatches:
        raise ValueError(
            f"a batch of {batch_size} cannot be split into {num_microbatches} micro-batches "
            f"(one would be empty); use at most {batch_size} micro-batches or a larger batch"
        )
    if batch_size % num_microbatches and not uneven:
        valid = [d for d in range(1, batch_size + 1) if batch_size % d == 0]
        raise ValueError(
            f"a batch of {batch_size} does not divide into {num_microbatches} micro-batches and "
            f"uneven splits are off; micro-batch counts that divide it: {valid}"
        )
    base, extra = divmod(batch_size, num_microbatches)
    return [base + (i < extra) for i in range(num_microbatches)]


class _WorldPipe:
    """Stands in for a Mesh when none is given: the whole world is one pipeline."""

    def __init__(self) -> None:
        on = dist.is_available() and dist.is_initialized()
        self.pp_rank = dist.get_rank() if on else 0
        self._size = dist.get_world_size() if on else 1

    def size(self, axis: str) -> int:
        return self._size if axis == "pp" else 1

    def pp_peer(self, stage: int) -> int:
        return stage

    def group(self, axis: str):
        return None


@dataclass
class _Step:
    """Everything one step holds, keyed by (stage, micro-batch)."""

    training: bool
    inputs: list[torch.Tensor]
    targets: list[torch.Tensor] | None
    scales: list[float]
    keys: list[tuple]
    acts_in: dict = field(default_factory=dict)  # input of (s, i): received or handed over
    grads_in: dict = field(default_factory=dict)  # gradient of the output of (s, i)
    saved: dict = field(default_factory=dict)  # (input, output or scaled loss) for backward
    sendable: dict = field(default_factory=dict)  # tensors waiting for their SEND action
    records: dict = field(default_factory=dict)  # Linear (weight, input, output) for B/W
    wgrads: dict = field(default_factory=dict)  # Linear (weight, input, output grad) for W
    outputs: dict = field(default_factory=dict)  # last-stage outputs (inference)
    loss: torch.Tensor | None = None
    losses_left: int = 0  # last-stage forwards still to run before the loss is complete
    loss_buf: torch.Tensor | None = None  # the step's loss, shared with every pp rank
    loss_work: list | None = None  # its broadcast's works, in flight while the backward runs


class PipelineRuntime:
    """Runs this rank's share of a pipeline schedule.

    Args:
        stages: this pipeline rank's stage modules, ``{stage index: module}``; the keys must be
            the stages the schedule places on this rank (``schedule.stages_of(pp_rank)``). Each
            module maps the previous stage's output (stage 0: the token ids) to its own output.
        schedule: the same :class:`Schedule` on every pipeline rank; validated here.
        mesh: a :class:`plait.Mesh`; this rank is ``mesh.pp_rank`` and talks to
            ``mesh.pp_peer(...)``, the ranks with its own dp and tp coordinates. None: the whole
            world is one pipeline.
        loss_fn: ``loss_fn(last_stage_output, targets) -> mean loss of the micro-batch``.
        checkpoint: activation checkpointing: True for every stage here, or the stage indices.
        uneven: allow a batch that does not divide into the micro-batches (sizes then differ by
            one); False refuses it with an error.
        prefetch: when each receive is posted. ``"timed"``: two compute actions before its
            sender is expected to send (from a unit-time run of the schedule); ``"all"``: every
            receive of the step at the rank's first receive, where it waits anyway (one buffer
            per receive for the whole step); an integer k: k compute actions before the receive
            (0: at the receive). None (default)
            is ``"all"`` on gloo, where posting a receive while the same pair moves data waits
            for it (up to milliseconds each; posting them all while the pairs are idle made
            interleaved 1F1B 6% and 1F1B 2-3% faster on the 2-core development machine), and
            ``"timed"`` elsewhere (NCCL posts cheaply, and GPU memory is dearer).
        transport: how messages move between pipeline ranks. ``"auto"`` (default): through
            shared-memory rings (:mod:`plait.pipeline.shm`) where every pipeline rank runs on
            the CPU of one x86-64 Linux host with gloo, else the process group; ``"shm"``:
            shared memory or an error saying why not; ``"process-group"``: always the process
            group. Constructing the runtime is then collective over the pipeline ranks (they
            exchange the rings' names). :attr:`transport` says which one is in use.

    Performance note (CPU): zero-bubble schedules hold W's inputs across other work; with
    glibc's default trimming, freed memory goes back to the OS and is page-faulted back on the
    next micro-batch (measured: about 10% of the backward). Setting ``MALLOC_MMAP_THRESHOLD_``
    and ``MALLOC_TRIM_THRESHOLD_`` high (or using jemalloc/tcmalloc) avoids it.

    Example (on each of 2 workers)::

        stages = partition(model, 2)
        rt = PipelineRuntime({r: stages[r]}, build_schedule("1f1b", 2, 8), Mesh(pp=2),
                             Transformer.loss)
        loss = rt.train_step(x, y)  # same float on both ranks; grads are in the parameters
        rt.timeline.bubble_fraction()
    """

    def __init__(
        self,
        stages: Mapping[int, nn.Module],
        schedule: Schedule,
        mesh=None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        checkpoint: bool | Iterable[int] = False,
        uneven: bool = True,
        prefetch: int | str | None = None,
        transport: str = "auto",
    ):
        self.mesh = mesh if mesh is not None else _WorldPipe()
        if transport not in TRANSPORTS:
            raise ValueError(f"transport={transport!r} is not valid; use one of {TRANSPORTS}")
        if prefetch is None:
            gloo = dist.is_initialized() and dist.get_backend() == "gloo"
            prefetch = "all" if gloo else "timed"
        if not (prefetch in ("all", "timed") or (isinstance(prefetch, int) and prefetch >= 0)):
            raise ValueError(
                f"prefetch={prefetch!r} is not valid; use 'all', 'timed', None (choose by "
                f"backend) or a number of compute actions >= 0"
            )
        self.schedule = schedule
        self.report = validate(schedule)
        p = self.mesh.size("pp")
        if schedule.num_ranks != p:
            raise ValueError(
                f"schedule {schedule.name!r} is for {schedule.num_ranks} pipeline ranks but the "
                f"mesh has pp={p}"
            )
        self.pp_rank = self.mesh.pp_rank
        mine = schedule.stages_of(self.pp_rank)
        if sorted(stages) != mine:
            raise ValueError(
                f"pipeline rank {self.pp_rank} runs stages {mine} of schedule {schedule.name!r} "
                f"but was given stages {sorted(stages)}"
            )
        self.stages = dict(stages)
        self.loss_fn = loss_fn
        self.uneven = uneven
        if checkpoint is True:
            self.checkpointed = set(mine)
        elif checkpoint is False:
            self.checkpointed = set()
        else:
            self.checkpointed = set(checkpoint)
            if not self.checkpointed <= set(mine):
                raise ValueError(
                    f"checkpoint names stages {sorted(self.checkpointed - set(mine))} that are "
                    f"not on pipeline rank {self.pp_rank} (its stages: {mine})"
                )
        self.timeline = Timeline(schedule.num_ranks)
        self._train_plan = _Plan(schedule, self.pp_rank, prefetch, self._peer)
        self._infer_plan = _Plan(schedule.forward_only(), self.pp_rank, prefetch, self._peer)
        # Point-to-point messages go straight to the default process group (what dist.isend and
        # dist.irecv call after their per-call argument checks), or through shared memory
        # between CPU ranks on one host; peers are global ranks.
        self._pg = dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
        self._transport, self.transport = self._connect(transport, p)
        self._p2p = self._transport or self._pg
        self._loss_p2p = self._pg is not None and (
            self._transport is not None or dist.get_backend() == "gloo"
        )
        # Zero-bubble split: plain Linear layers have their weight gradient deferred to W.
        split = any(a.kind is Kind.W for a in schedule.actions[self.pp_rank])
        self._deferred: dict[int, list[nn.Linear]] = {}
        self._others: dict[int, list[nn.Parameter]] = {}
        self._recording: list | None = None
        for s, module in self.stages.items():
            lins = []
            if split and s not in self.checkpointed:
                lins = [m for m in module.modules() if _plain_linear(m)]
            deferred = {id(m.weight) for m in lins}
            self._deferred[s] = lins
            self._others[s] = [
                q for q in module.parameters() if q.requires_grad and id(q) not in deferred
            ]
        lins = {id(m): m for ms in self._deferred.values() for m in ms}  # a module used twice
        self._recorders = [(m, self._recorder(m)) for m in lins.values()]
        # Shapes learned at run time, keyed by (stage, input micro-batch key).
        self._out_meta: dict[tuple, tuple] = {}  # outputs of my stages (for gradient receives)
        self._in_meta: dict[tuple, tuple] = {}  # outputs of a previous stage on another rank
        self._sent_meta: dict[tuple, tuple] = {}  # headers sent, and what they said
        self._pending_sends: deque = deque()
        self._closed = False

    def _connect(self, transport: str, p: int):
        """(shared-memory transport or None, name of the transport in use)."""
        if self._pg is None or p == 1 or transport == "process-group":
            return None, "process-group"
        gloo = dist.get_backend() == "gloo"
        if transport == "auto" and not gloo:
            return None, "process-group"
        blocked = None if gloo else f"the backend is {dist.get_backend()}, not gloo"
        devices = {q.device.type for m in self.stages.values() for q in m.parameters()}
        if blocked is None and devices - {"cpu"}:
            blocked = f"stage parameters are on {sorted(devices - {'cpu'})}, not the CPU"
        found, why = shm.connect(
            shm.pairs_of(self.schedule),
            self.pp_rank,
            self.mesh.pp_peer,
            self.mesh.group("pp"),
            blocked=blocked,
        )
        if found is None and transport == "shm":
            raise RuntimeError(f"transport='shm' is not possible here: {why}")
        return found, "shm" if found is not None else "process-group"

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        schedule: Schedule,
        mesh=None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        balance: str | list[int] = "layers",
        **kwargs,
    ) -> PipelineRuntime:
        """Partition ``model`` into ``schedule.num_stages`` stages and keep this rank's.

        The stages share the model's parameters (same objects, same names); the other ranks'
        stages are simply not used here. ``kwargs`` go to the constructor.

        Example::

            rt = PipelineRuntime.from_model(model, build_schedule("zb-h1", 2, 8), mesh,
                                            Transformer.loss)
            rt.stages  # {mesh.pp_rank: Stage(...)}
        """
        from plait.pipeline.partitioner import partition

        stages = partition(model, schedule.num_stages, balance=balance)
        pp_rank = (mesh if mesh is not None else _WorldPipe()).pp_rank
        mine = {s: stages[s] for s in schedule.stages_of(pp_rank)}
        return cls(mine, schedule, mesh, loss_fn, **kwargs)

    # -- public API ------------------------------------------------------------------------------

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor | None) -> float:
        """One training step over the batch; returns the batch's mean loss on every pp rank.

        Pass the same ``inputs`` on every pipeline rank (stage 0 reads the tokens, the others
        only the shape); ``targets`` are needed on the rank of the last stage. Gradients are
        accumulated into ``.grad`` of the parameters (zero them between steps as usual).
        """
        if self.schedule.is_forward_only:
            raise ValueError(
                f"schedule {self.schedule.name!r} is forward-only; train_step needs a training "
                f"schedule (forward() runs inference with any schedule)"
            )
        if self.loss_fn is None:
            # checked on every rank, so that no rank starts a step the others refuse
            raise ValueError("train_step needs loss_fn(outputs, targets); pass it on every rank")
        inputs_mb, sizes = self._split(inputs)
        last_rank = self.schedule.stage_to_rank[-1]
        targets_mb = None
        if self.pp_rank == last_rank:
            if targets is None or targets.shape[0] != inputs.shape[0]:
                got = None if targets is None else tuple(targets.shape)
                raise ValueError(
                    f"the last stage needs targets with the batch's {inputs.shape[0]} rows, "
                    f"got {got}"
                )
            targets_mb = list(torch.split(targets, sizes))
        step = _Step(
            True,
            inputs_mb,
            targets_mb,
            [n / inputs.shape[0] for n in sizes],
            [(tuple(x.shape), x.dtype) for x in inputs_mb],
            losses_left=len(sizes),
        )
        if self.pp_rank != last_rank:
            # Every pp rank reports the loss. The broadcast is posted now and completes in the
            # background once the last stage has its loss (after its last forward), so it costs
            # no extra round trip at the end of the step.
            step.loss_buf = torch.zeros(1, dtype=torch.float64)
            step.loss_work = self._broadcast_loss(step.loss_buf, last_rank)
        # Linear layers whose weight gradient waits for W record their inputs, during plait's
        # own training steps only (other code may run the same modules)
        for m, forward in self._recorders:
            m.forward = forward
        try:
            self._run(self._train_plan, step)
        finally:
            for m, _ in self._recorders:
                del m.forward
        if step.loss_work is not None:
            heartbeat.beat("wait loss broadcast")
            for work in step.loss_work:
                work.wait()
        heartbeat.beat("after train_step")  # the caller's own work: not a wait
        return float(step.loss_buf.item())

    def _broadcast_loss(self, buf: torch.Tensor, last_rank: int) -> list | None:
        """Start sending the step's loss from the last stage's rank to every pp rank: its works.

        On gloo, point-to-point messages under a tag of their own (gloo matches receives by
        source and tag, so they never meet an activation's): an async collective would run on
        a gloo worker thread, one more thread to wake on both sides. Elsewhere a broadcast.
        """
        p = self.mesh.size("pp")
        if p == 1:
            return None
        src = self.mesh.pp_peer(last_rank)
        if not self._loss_p2p:
            return [dist.broadcast(buf, src=src, group=self.mesh.group("pp"), async_op=True)]
        if self.pp_rank != last_rank:
            return [self._p2p.recv([buf], src, _LOSS_TAG)]
        return [
            self._p2p.send([buf], self.mesh.pp_peer(r), _LOSS_TAG)
            for r in range(p)
            if r != last_rank
        ]

    @torch.no_grad()
    def forward(self, inputs: torch.Tensor) -> torch.Tensor | None:
        """Forward-only (inference) over the batch: the last stage's outputs, None elsewhere.

        Pass the same ``inputs`` on every pipeline rank.
        """
        inputs_mb, sizes = self._split(inputs)
        step = _Step(
            False,
            inputs_mb,
            None,
            [n / inputs.shape[0] for n in sizes],
            [(tuple(x.shape), x.dtype) for x in inputs_mb],
        )
        self._run(self._infer_plan, step)
        if not step.outputs:
            return None
        return torch.cat([step.outputs[i] for i in range(len(inputs_mb))])

    def gather_timeline(self) -> Timeline:
        """Every pipeline rank's timeline of the last step, merged (collective over pp)."""
        p = self.mesh.size("pp")
        if p == 1:
            return self.timeline
        parts: list = [None] * p
        dist.all_gather_object(parts, self.timeline.events, group=self.mesh.group("pp"))
        return Timeline(p, [e for part in parts for e in part])

    def close(self) -> None:
        """Release what the runtime holds between steps (its recording forwards live only in a
        step) and its shared-memory rings; a closed runtime runs no more steps."""
        self._pending_sends = deque()
        if self._transport is not None:
            self._transport.close()
        self._closed = True

    # -- execution -------------------------------------------------------------------------------

    def _split(self, inputs: torch.Tensor) -> tuple[list[torch.Tensor], list[int]]:
        if inputs is None:
            raise ValueError(
                "every pipeline rank must pass the batch's inputs (the stages after the first "
                "use their shape to learn activation shapes without asking)"
            )
        sizes = split_batch(inputs.shape[0], self.schedule.num_microbatches, self.uneven)
        return list(torch.split(inputs, sizes)), sizes

    def _peer(self, stage: int) -> int:
        return self.mesh.pp_peer(self.schedule.stage_to_rank[stage])

    def _run(self, plan: _Plan, step: _Step) -> None:
        if self._closed:
            raise RuntimeError("this PipelineRuntime was closed; build a new one to run steps")
        events: list[Event] = []
        posted: dict[int, tuple] = {}
        queues = {src: deque(idx) for src, idx in plan.recvs_by_source.items()}
        # the first action index at which a receive is due to be posted (none left: past the end)
        post_next = min(
            (plan.post_at[q[0]] for q in queues.values() if q), default=len(plan.actions)
        )
        handlers = {
            Kind.F: self._forward,
            Kind.BW: self._backward,
            Kind.B: self._backward_input,
            Kind.W: self._backward_weight,
            Kind.SEND_ACT: self._send,
            Kind.SEND_GRAD: self._send,
        }
        recv_kinds = (Kind.RECV_ACT, Kind.RECV_GRAD)
        pending = self._pending_sends
        rank, labels, beat, clock = self.pp_rank, plan.labels, heartbeat.beat, time.perf_counter
        try:
            for i, a in enumerate(plan.actions):
                beat(labels[i])
                if i >= post_next:
                    post_next = self._post_receives(plan, i, queues, posted, step)
                t0 = clock()
                kind = a.kind
                if kind in recv_kinds:
                    self._receive(plan, i, a, queues, posted, step)
                else:
                    handlers[kind](a, step)
                t1 = clock()
                events.append(Event(rank, labels[i], kind.value, t0, t1, a.stage, a.microbatch))
                # drop completed sends (and their buffers) oldest first: they finish in order,
                # so this is usually one check per action
                while pending and pending[0][1].is_completed():
                    pending.popleft()
            for _, work in pending:
                work.wait()
        finally:
            self._pending_sends = deque()
            self._recording = None
        self.timeline = Timeline(self.schedule.num_ranks, events)

    # compute

    def _recorder(self, m: nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
        """``m``'s forward during training steps: ``nn.Linear.forward``, recording the input and
        the output of the product (a forward hook would see an output later hooks replaced, and
        costs the module call's slow path)."""
        linear = nn.functional.linear

        def forward(x: torch.Tensor) -> torch.Tensor:
            w = m.weight
            y = linear(x, w, m.bias)
            if self._recording is not None:
                self._recording.append((w, x, y))
            return y

        return forward

    def _forward(self, a: Action, step: _Step) -> None:
        s, i = a.stage, a.microbatch
        S = self.schedule.num_stages
        if s == 0:
            xs, spec, wants = [step.inputs[i]], "T", [False]
        else:
            xs, spec, wants = step.acts_in.pop((s, i))
        module = self.stages[s]
        if not step.training:
            y = module(unflatten(xs, spec))
            grad_inputs: list[torch.Tensor] = []
        else:
            # inputs whose gradient goes back to the previous stage
            xs = [x.detach().requires_grad_(True) if w else x for x, w in zip(xs, wants)]
            grad_inputs = [x for x, w in zip(xs, wants) if w]
            record = bool(self._deferred[s])
            if record:
                self._recording = []
            if s in self.checkpointed:
                y = _checkpoint(
                    lambda *t: module(unflatten(list(t), spec)), *xs, use_reentrant=False
                )
            else:
                y = module(unflatten(xs, spec))
            if record:
                step.records[(s, i)] = self._recording
                self._recording = None
        if s == S - 1:
            if step.training:
                loss = self.loss_fn(y, step.targets[i]) * step.scales[i]
                step.saved[(s, i)] = (grad_inputs, [loss])
                step.loss = loss.detach() if step.loss is None else step.loss + loss.detach()
                step.losses_left -= 1
                if step.losses_left == 0:
                    step.loss_buf = step.loss.to(torch.float64).reshape(1).clone()
                    step.loss_work = self._broadcast_loss(
                        step.loss_buf, self.schedule.stage_to_rank[-1]
                    )
            else:
                step.outputs[i] = y
            return
        ys, yspec = flatten(y)
        grads_back = [step.training and t.requires_grad for t in ys]
        if step.training:
            step.saved[(s, i)] = (grad_inputs, [t for t, g in zip(ys, grads_back) if g])
        self._out_meta[(s, step.keys[i])] = [
            (tuple(t.shape), t.dtype) for t, g in zip(ys, grads_back) if g
        ]
        if self.schedule.stage_to_rank[s + 1] == self.pp_rank:
            step.acts_in[(s + 1, i)] = (ys, yspec, grads_back)  # the next F detaches them
        else:
            step.sendable[(Kind.SEND_ACT, s, i)] = ([t.detach() for t in ys], yspec, grads_back)

    def _grad_of_output(self, s: int, i: int, step: _Step) -> list[torch.Tensor] | None:
        return None if s == self.schedule.num_stages - 1 else step.grads_in.pop((s, i))

    def _pass_input_grad(self, s: int, i: int, xs: list, gxs: list, step: _Step) -> None:
        if s == 0:
            return
        # an input the output did not depend on gets a zero gradient
        gxs = [torch.zeros_like(x) if g is None else g for x, g in zip(xs, gxs)]
        if self.schedule.stage_to_rank[s - 1] == self.pp_rank:
            step.grads_in[(s - 1, i)] = gxs
        else:
            step.sendable[(Kind.SEND_GRAD, s, i)] = (gxs, None, None)

    def _backward(self, a: Action, step: _Step) -> None:
        s, i = a.stage, a.microbatch
        xs, roots = step.saved.pop((s, i))
        g = self._grad_of_output(s, i, step)
        if roots:
            torch.autograd.backward(roots, g)
        step.records.pop((s, i), None)
        self._pass_input_grad(s, i, xs, [x.grad for x in xs], step)

    def _backward_input(self, a: Action, step: _Step) -> None:
        s, i = a.stage, a.microbatch
        xs, roots = step.saved.pop((s, i))
        g = self._grad_of_output(s, i, step)
        records = step.records.pop((s, i), None)
        if not records or not roots:  # nothing to defer (checkpointed, no plain Linear)
            if roots:
                torch.autograd.backward(roots, g)
            self._pass_input_grad(s, i, xs, [x.grad for x in xs], step)
            return
        others = self._others[s]
        wrt = xs + others + [out for _, _, out in records]
        grads = torch.autograd.grad(roots, wrt, grad_outputs=g, allow_unused=True)
        k = len(xs)
        have, more = [], []
        for q, gq in zip(others, grads[k : k + len(others)]):
            if gq is None:
                continue
            if q.grad is None:
                q.grad = gq
            else:
                have.append(q.grad)
                more.append(gq)
        if have:
            torch._foreach_add_(have, more)  # one call, not one per parameter
        dys = grads[k + len(others) :]
        step.wgrads[(s, i)] = [(w, inp, dy) for (w, inp, _), dy in zip(records, dys)]
        self._pass_input_grad(s, i, xs, list(grads[:k]), step)

    @torch.no_grad()
    def _backward_weight(self, a: Action, step: _Step) -> None:
        # the weight itself was recorded, not its module (a module attribute is a slow lookup)
        for w, inp, dy in step.wgrads.pop((a.stage, a.microbatch), ()):
            if dy is None:
                continue
            dy2 = dy.reshape(-1, dy.shape[-1])
            x2 = inp.reshape(-1, inp.shape[-1])
            g = w.grad
            if dy2.dtype != w.dtype:
                # mixed precision (autocast): the product in the layer's compute dtype, as
                # autograd forms it, accumulated into the float32 master's gradient
                _accumulate(w, dy2.t().mm(x2.to(dy2.dtype)).to(w.dtype))
            # accumulate in place: no temporary the size of the weight
            elif g is None:
                w.grad = dy2.t().mm(x2)
            else:
                g.addmm_(dy2.t(), x2)

    # communication

    def _send(self, a: Action, step: _Step) -> None:
        s, i = a.stage, a.microbatch
        tensors, spec, grads_back = step.sendable.pop((a.kind, s, i))
        tensors = [t.contiguous() for t in tensors]
        if a.kind is Kind.SEND_ACT:
            dst = self._peer(s + 1)
            key = (s, step.keys[i], step.training)  # inference sends no gradient flags
            meta = (spec, [(tuple(t.shape), t.dtype, g) for t, g in zip(tensors, grads_back)])
            if key not in self._sent_meta:
                header = encode_header(*meta)
                size = torch.tensor([header.numel()], dtype=torch.int64)
                self._pending_sends.append((size, self._p2p.send([size], dst, 0)))
                self._pending_sends.append((header, self._p2p.send([header], dst, 0)))
                self._sent_meta[key] = meta
            elif self._sent_meta[key] != meta:
                raise RuntimeError(
                    f"stage {s} produced {meta} for micro-batch input {step.keys[i]}, where an "
                    f"earlier step produced {self._sent_meta[key]} for the same input shape; the "
                    f"pipeline learns activation shapes per input shape and needs them to be a "
                    f"function of it"
                )
        else:
            dst = self._peer(s - 1)
        phase = "forward" if a.kind is Kind.SEND_ACT else "backward"
        for t in tensors:
            comm.record("send", t.numel() * t.element_size(), axis="pp", phase=phase)
            self._pending_sends.append((t, self._p2p.send([t], dst, 0)))

    def _recv_meta(self, a: Action, step: _Step) -> list | None:
        """``[(shape, dtype), ...]`` of what ``a`` receives, if known without a header."""
        i = a.microbatch
        if a.kind is Kind.RECV_ACT:
            known = self._in_meta.get((a.stage - 1, step.keys[i], step.training))
            return None if known is None else [(sh, dt) for sh, dt, _ in known[1]]
        return self._out_meta.get((a.stage, step.keys[i]))

    def _post(self, metas: list, src: int) -> list:
        bufs = [torch.empty(shape, dtype=dtype) for shape, dtype in metas]
        return [(b, self._p2p.recv([b], src, 0)) for b in bufs]

    def _post_receives(self, plan, i: int, queues, posted, step: _Step) -> int:
        """Post the receives due by action ``i``; returns the next action index one is due."""
        due = len(plan.actions)
        for src, q in queues.items():
            while q and plan.post_at[q[0]] <= i:
                j = q[0]
                metas = self._recv_meta(plan.actions[j], step)
                if metas is None:
                    break  # a header comes first: post at the receive itself, in order
                posted[j] = self._post(metas, src)
                q.popleft()
            if q:
                # a receive waiting for its header is posted by _receive: look again next action
                due = min(due, max(plan.post_at[q[0]], i + 1))
        return due

    def _receive(self, plan, i: int, a: Action, queues, posted, step: _Step) -> None:
        if i not in posted:
            src = plan.source[i]
            q = queues[src]
            assert q and q[0] == i, "receives are posted in list order"
            metas = self._recv_meta(a, step)
            if metas is None:  # first time this input shape crosses: learn it
                size = torch.empty(1, dtype=torch.int64)
                self._p2p.recv([size], src, 0).wait()
                header = torch.empty(int(size.item()), dtype=torch.uint8)
                self._p2p.recv([header], src, 0).wait()
                learnt = decode_header(header)
                self._in_meta[(a.stage - 1, step.keys[a.microbatch], step.training)] = learnt
                metas = [(sh, dt) for sh, dt, _ in learnt[1]]
            posted[i] = self._post(metas, src)
            q.popleft()
        bufs = []
        for buf, work in posted.pop(i):
            work.wait()
            bufs.append(buf)
        if a.kind is Kind.RECV_ACT:
            spec, metas = self._in_meta[(a.stage - 1, step.keys[a.microbatch], step.training)]
            step.acts_in[(a.stage, a.microbatch)] = (bufs, spec, [g for _, _, g in metas])
        else:
            step.grads_in[(a.stage, a.microbatch)] = bufs


class _Plan:
    """Precomputed per action list: each receive's source rank and when to post it."""

    def __init__(
        self, schedule: Schedule, rank: int, prefetch: int | str, peer: Callable[[int], int]
    ):
        self.actions = actions = schedule.actions[rank]
        self.labels = [str(a) for a in actions]  # for the timeline and the watchdog
        self.source: dict[int, int] = {}  # receive index -> global rank it comes from
        self.post_at: dict[int, int] = {}  # receive index -> action index to post it before
        self.recvs_by_source: dict[int, list[int]] = {}
        starts, sent = _unit_times(schedule) if prefetch == "timed" else ({}, {})
        computes: list[int] = []
        first_recv = next(
            (j for j, a in enumerate(actions) if a.kind in (Kind.RECV_ACT, Kind.RECV_GRAD)), None
        )
        for j, a in enumerate(actions):
            if a.is_compute:
                computes.append(j)
                continue
            if a.kind not in (Kind.RECV_ACT, Kind.RECV_GRAD):
                continue
            if prefetch == "all":
                # at the rank's first receive, where it waits anyway: not before a compute that
                # a peer is waiting for
                self.post_at[j] = first_recv
            elif prefetch == "timed":
                # a little before my first compute that starts once the sender has sent, at the
                # latest at the receive itself
                t = sent[matching_send(a)]
                k = next((n for n, c in enumerate(computes) if starts[(rank, c)] >= t), None)
                if k is None:
                    self.post_at[j] = j
                else:
                    self.post_at[j] = computes[max(0, k - _EARLIER)]
            elif prefetch <= 0:
                self.post_at[j] = j
            else:
                self.post_at[j] = computes[-prefetch] if len(computes) >= prefetch else 0
            src_stage = a.stage - 1 if a.kind is Kind.RECV_ACT else a.stage + 1
            self.source[j] = peer(src_stage)
            self.recvs_by_source.setdefault(self.source[j], []).append(j)


# The tag of the loss messages on gloo (activations and gradients use tag 0).
_LOSS_TAG = 1

# Post a receive this many compute actions before its sender is expected to send: real timing
# drifts from unit time, and a receive posted a little early costs a buffer, one posted late costs
# a round trip (measured on tiny models: 2 beats 0 by about 10% for interleaved 1F1B).
_EARLIER = 2

_UNIT = {Kind.F: 1.0, Kind.B: 1.0, Kind.W: 1.0, Kind.BW: 2.0}


def _unit_times(schedule: Schedule) -> tuple[dict, dict]:
    """Start time of every compute action ``(rank, index)`` and send time of every send.

    A walk of the schedule (:class:`plait.pipeline.walk.Walk`) with F = B = W = 1, BW = 2 and
    free messages: each rank runs its list in order; a receive waits for its send.
    """
    clock = [0.0] * schedule.num_ranks
    starts: dict[tuple[int, int], float] = {}
    sent: dict[Action, float] = {}
    at: dict[tuple[int, int], float] = {}  # the same, by (rank, index)
    for r, i, a, needs in Walk(schedule):
        if a.kind in (Kind.RECV_ACT, Kind.RECV_GRAD):
            clock[r] = max(clock[r], at[needs[0]])  # its send
        elif a.kind in (Kind.SEND_ACT, Kind.SEND_GRAD):
            sent[a] = at[(r, i)] = clock[r]
        else:
            starts[(r, i)] = clock[r]
            clock[r] += _UNIT[a.kind]
    return starts, sent


def _plain_linear(m: nn.Module) -> bool:
    """An ``nn.Linear`` itself (no subclass) whose trainable weight's gradient W may form: its
    ``forward`` is ``F.linear`` (not replaced on the instance, as adapters and offloading do)."""
    return (
        type(m) is nn.Linear  # noqa: E721 - exact type
        and m.weight.requires_grad
        and "forward" not in m.__dict__
    )


def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    if param.grad is None:
        param.grad = grad
    else:
        param.grad.add_(grad)
