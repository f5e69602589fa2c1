"""What crosses a stage boundary: a tensor, or a tuple, list or dict of tensors, as a flat list.

A stage's output may be several tensors (hidden states with an attention mask or position ids,
or whatever an ``nn.Sequential`` child returns). :func:`flatten` turns it into a list of tensors
and a *spec* (its structure, hashable); :func:`unflatten` rebuilds it. The first time a boundary
sees an input shape, the sender describes the message once in a small header
(:func:`encode_header`): the spec and each tensor's shape, dtype and whether a gradient comes
back for it; afterwards both sides know the message without asking.

Example::

    tensors, spec = flatten({"hidden": h, "mask": m})
    unflatten(tensors, spec)   # {'hidden': h, 'mask': m}
"""

from __future__ import annotations

import json

import torch

__all__ = ["flatten", "unflatten", "encode_header", "decode_header", "TensorMeta"]

# shape, dtype, and whether the receiver sends a gradient back for it
TensorMeta = tuple[tuple[int, ...], torch.dtype, bool]

_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.uint8,
    torch.bool,
    torch.int16,
    torch.int8,
]


def flatten(value) -> tuple[list[torch.Tensor], tuple]:
    """``(tensors, spec)`` of a tensor or a nested tuple / list / dict (str keys) of tensors."""
    out: list[torch.Tensor] = []

    def walk(v):
        if isinstance(v, torch.Tensor):
            out.append(v)
            return "T"
        if isinstance(v, (tuple, list)):
            return ("tuple" if isinstance(v, tuple) else "list", tuple(walk(x) for x in v))
        if isinstance(v, dict) and all(isinstance(k, str) for k in v):
            return ("dict", tuple((k, walk(x)) for k, x in v.items()))
        raise TypeError(
            f"a pipeline stage may pass a tensor, or a tuple, list or dict (str keys) of "
            f"tensors, to the next stage; got {type(v).__name__}"
        )

    spec = walk(value)
    return out, spec


def unflatten(tensors: list[torch.Tensor], spec: tuple | str):
    """The value :func:`flatten` was given, from its tensors and spec."""
    it = iter(tensors)

    def build(s):
        if s == "T":
            return next(it)
        kind, items = s
        if kind == "dict":
            return {k: build(x) for k, x in items}
        built = [build(x) for x in items]
        return tuple(built) if kind == "tuple" else built

    return build(spec)


def encode_header(spec, metas: list[TensorMeta]) -> torch.Tensor:
    """The header describing a message: uint8 bytes of a small JSON document."""
    for _, dtype, _ in metas:
        if dtype not in _DTYPES:
            raise ValueError(f"activation dtype {dtype} is not one of {_DTYPES}")
    doc = {
        "spec": spec,
        "tensors": [[list(shape), _DTYPES.index(dtype), bool(g)] for shape, dtype, g in metas],
    }
    return torch.tensor(list(json.dumps(doc).encode()), dtype=torch.uint8)


def decode_header(buf: torch.Tensor) -> tuple[tuple | str, list[TensorMeta]]:
    doc = json.loads(bytes(buf.tolist()).decode())

    def spec_of(s):
        if s == "T":
            return "T"
        kind, items = s
        if kind == "dict":
            return (kind, tuple((k, spec_of(x)) for k, x in items))
        return (kind, tuple(spec_of(x) for x in items))

    metas = [(tuple(shape), _DTYPES[code], grad) for shape, code, grad in doc["tensors"]]
    return spec_of(doc["spec"]), metas
