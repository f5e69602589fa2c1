"""Mixed precision for training: low-precision compute over float32 master weights.

``precision`` (:class:`plait.config.ParallelConfig`) is ``fp32``, ``bf16-mixed`` or
``fp16-mixed``. The mixed ones need the model in float32 (``dtype`` fp32) and then

- run each step's forward *and* backward inside ``torch.autocast(device, low dtype)``: linear
  layers, attention and the tensor-parallel layers' products compute in bf16 / fp16, softmax and
  cross-entropy in float32 (autocast's policy; the models upcast half logits for the loss);
- keep the parameters float32: they are the master weights AdamW steps, and its moments are
  float32 too. Each micro-batch's gradient comes back through autocast's cast into the float32
  ``.grad``, so gradients are accumulated over micro-batches, averaged over the data-parallel
  replicas, summed for tied embeddings and clipped in float32 (as Megatron's main grads).

Why the backward is inside the autocast region: autograd runs a backward with the thread-local
state of the call that started it, so custom autograd functions (the tensor-parallel layers,
whose backwards multiply a half gradient by a saved float32 weight) compute in the low dtype as
their forwards did. The pipeline runtime needs nothing but that: it runs on the calling thread,
and its deferred weight-gradient step (W) casts the product to the weight's dtype.

fp16 also scales the loss (:class:`LossScaler`, dynamic as PyTorch's ``GradScaler``): gradients
are unscaled after the data-parallel average; a step whose loss or gradient norm is not finite
is skipped (no optimizer step) and the scale halved; after ``window`` good steps in a row it is
doubled. The scale and its count of good steps are saved in checkpoints, so a resume is exact.

Example::

    prec = Precision("fp16-mixed")
    with prec.autocast("cpu"):
        loss = (model(x).float().pow(2).mean() * prec.scaler.scale)
        loss.backward()
    prec.scaler.unscale_(model.parameters())
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["Precision", "LossScaler", "scale_loss", "LOW_DTYPES"]

LOW_DTYPES = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}


class LossScaler:
    """Dynamic loss scaling for fp16: multiply the loss by :attr:`scale` before backward, divide
    the gradients by it after; halve it on an overflow (the step is skipped), double it after
    ``window`` finite steps in a row. ``min_scale``: the floor; an overflow there cannot be
    helped by scaling (:attr:`at_floor`).

    Example::

        scaler = LossScaler(scale=2.0**16, window=1000)
        skipped = scaler.update(finite=False)   # True; scaler.scale == 2.0**15
    """

    def __init__(self, scale: float = 2.0**16, window: int = 1000, min_scale: float = 1.0):
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"loss scale must be a positive finite number, got {scale!r}")
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"loss scale window must be an integer >= 1, got {window!r}")
        self.scale = float(scale)
        self.window = window
        self.min_scale = float(min_scale)
        self.good_steps = 0  # finite steps since the scale last changed

    @property
    def at_floor(self) -> bool:
        return self.scale <= self.min_scale

    @torch.no_grad()
    def unscale_(self, params: Iterable[nn.Parameter]) -> None:
        """Divide every gradient by the scale in place (a power of two: exact)."""
        inv = 1.0 / self.scale
        for p in params:
            if p.grad is not None:
                p.grad.mul_(inv)

    def update(self, finite: bool) -> bool:
        """Account for one step; returns whether it is to be skipped (not finite)."""
        if finite:
            self.good_steps += 1
            if self.good_steps >= self.window:
                self.scale *= 2.0
                self.good_steps = 0
            return False
        self.scale = max(self.min_scale, self.scale / 2.0)
        self.good_steps = 0
        return True

    def state_dict(self) -> dict:
        return {"loss_scale": self.scale, "loss_scale_good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["loss_scale"])
        self.good_steps = int(state["loss_scale_good_steps"])


class Precision:
    """How a run computes (see the module docstring): ``fp32``, ``bf16-mixed`` or
    ``fp16-mixed``; ``loss_scale`` and ``window`` configure fp16's :class:`LossScaler`."""

    def __init__(self, name: str = "fp32", loss_scale: float = 2.0**16, window: int = 1000):
        if name not in ("fp32", *LOW_DTYPES):
            raise ValueError(f"precision {name!r} is not one of {['fp32', *LOW_DTYPES]}")
        self.name = name
        self.dtype = LOW_DTYPES.get(name)  # the compute dtype; None: the model's own
        self.scaler = LossScaler(loss_scale, window) if name == "fp16-mixed" else None

    @property
    def mixed(self) -> bool:
        return self.dtype is not None

    def autocast(self, device_type: str = "cpu"):
        """The context a step's forward and backward run in (nothing for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.dtype)

    def check_masters(self, params: Iterable[nn.Parameter]) -> None:
        """Mixed precision steps float32 masters: refuse anything else (one line)."""
        if not self.mixed:
            return
        bad = sorted({str(p.dtype) for p in params if p.dtype != torch.float32})
        if bad:
            raise ValueError(
                f"precision {self.name!r} keeps float32 master weights, but the model has "
                f"{', '.join(bad)} parameters; build it in float32 (dtype fp32)"
            )


def scale_loss(local, scale: Callable[[], float]) -> None:
    """Make ``local`` (a :class:`plait.train.parts.LocalModel`) back-propagate its loss times
    ``scale()``; the loss it reports is then scaled too (divide by the same scale)."""
    owner = getattr(local, "runtime", local)  # a pipeline's loss is its runtime's
    inner = getattr(owner, "loss_fn", None)
    if inner is None:
        raise TypeError(f"{type(local).__name__} has no loss function to scale")
    owner.loss_fn = lambda out, y: inner(out, y) * scale()
