"""From a training checkpoint back to a model: fill one by name, or write a Hugging Face directory.

A checkpoint (:mod:`plait.train.checkpoint`) holds every parameter in its full, unsharded shape
under the model's own names (``model.<name>``), whatever mesh it was saved at, and records in
``plait.json`` which model it is. So one process can

* rebuild the model and fill it (:func:`model_from_checkpoint`, :func:`load_params`) -- what
  ``plait infer --checkpoint`` does before sharding it as usual;
* write it as a ``save_pretrained`` directory (:func:`export_hf`, ``plait export``) that
  ``transformers.AutoModelForCausalLM.from_pretrained`` reloads, with the source directory's
  tokenizer files and generation config beside it -- for ``hf:`` models only, since a preset or
  a function's model has no Hugging Face class to save as.

Example::

    export_hf("ck", "exported")                  # the newest complete checkpoint in ck/
    model = AutoModelForCausalLM.from_pretrained("exported")
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from plait.models.source import ATTN_IMPLEMENTATION, ModelSource, resolve_model
from plait.train.checkpoint import (
    checkpoint_meta,
    checkpoint_tensors,
    find_checkpoint,
    load_checkpoint,
)

__all__ = [
    "export_hf",
    "load_params",
    "check_params",
    "checkpoint_source",
    "model_from_checkpoint",
    "DTYPES",
]

DTYPES = {
    "fp32": torch.float32,
    "fp64": torch.float64,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}

# Files of a Hugging Face directory that describe its tokenizer (copied beside an export).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)
GENERATION_FILE = "generation_config.json"


def _model_tensors(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The checkpoint's parameters, ``name -> (shape, dtype)``, without the ``model.`` prefix."""
    return {
        k[len("model.") :]: v
        for k, v in checkpoint_tensors(path).items()
        if k.startswith("model.") and v
    }


def check_params(model: nn.Module, checkpoint: str | os.PathLike, what: str = "the model") -> None:
    """Raise ValueError (one line) naming the first parameter of ``model`` that the checkpoint
    lacks or holds in another shape, or the first checkpoint tensor ``model`` has no place for.
    ``model`` may live on the meta device (only names and shapes are read)."""
    path = Path(checkpoint)
    saved = _model_tensors(path)
    mine = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    for name, shape in mine.items():
        if name not in saved:
            raise ValueError(
                f"checkpoint {path} does not match {what}: its parameter {name!r} "
                f"{list(shape)} is not in the checkpoint ({len(saved)} parameters there, "
                f"{len(mine)} in the model)"
            )
        if tuple(saved[name][0]) != shape:
            raise ValueError(
                f"checkpoint {path} does not match {what}: parameter {name!r} is "
                f"{list(saved[name][0])} in the checkpoint but {list(shape)} in the model"
            )
    extra = [n for n in saved if n not in mine]
    if extra:
        raise ValueError(
            f"checkpoint {path} does not match {what}: the checkpoint's parameter {extra[0]!r} "
            f"{list(saved[extra[0]][0])} is not in the model"
            + (f" ({len(extra)} such tensors)" if len(extra) > 1 else "")
        )


@torch.no_grad()
def load_params(model: nn.Module, checkpoint: str | os.PathLike, what: str = "the model") -> None:
    """Fill every parameter of ``model`` (whole, unsharded, by its own names) from a complete
    checkpoint, in this one process; tied parameters are read once. The checkpoint's tensors
    are cast to each parameter's dtype. Refused (ValueError) when names or shapes differ."""
    path = Path(checkpoint)
    check_params(model, path, what)
    saved = _model_tensors(path)
    primary: dict[int, tuple[str, nn.Parameter]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        primary.setdefault(id(p), (name, p))
    state = {
        f"model.{name}": torch.empty(saved[name][0], dtype=saved[name][1])
        for name, _ in primary.values()
    }
    load_checkpoint(path, state)
    for name, p in primary.values():
        p.copy_(state[f"model.{name}"])


def _recorded_layers(path: Path, source: ModelSource) -> int | None:
    """A checkpoint that does not record its model: the number of blocks its tensors hold, from the
    model's layout (``model.layers.<i>.``), when that differs from the source's default."""
    if source.kind == "function":
        return None
    from plait.models.layout import find_layout

    try:
        if source.kind == "hf":
            from transformers import AutoModelForCausalLM

            with torch.device("meta"):
                probe = AutoModelForCausalLM.from_config(source.hf_config())
        else:
            probe = source.build(0)
        blocks = find_layout(probe).blocks
    except (TypeError, ValueError):
        return None
    if not blocks:
        return None
    prefix = blocks[0][0].rsplit(".", 1)[0] + "."
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for n in _model_tensors(path) if (m := pattern.match(n))}
    if not found or len(found) == len(blocks):
        return None
    return max(found) + 1


def checkpoint_source(
    checkpoint: str | os.PathLike, model: str | None = None, command: str = "plait infer"
) -> tuple[Path, ModelSource, int | None, dict | None]:
    """``(checkpoint dir, model source, n_layers to build, plait.json or None)`` for a checkpoint
    path (a ``step-N`` directory or a ``--checkpoint-dir`` root: its newest complete one).

    ``model`` (a name for :func:`plait.models.resolve_model`) overrides the model the checkpoint
    records; checkpoints that do not record one need it. Errors are one line.
    """
    path = find_checkpoint(checkpoint)
    meta = checkpoint_meta(path)
    recorded = meta is not None and bool(meta.get("model"))
    if model is None:
        if not recorded:
            raise ValueError(
                f"checkpoint {path} does not record its model (saved by save_checkpoint "
                f"without it); give --model naming the model it was trained from "
                f"({command} --model hf:DIR ...)"
            )
        try:
            source = resolve_model(meta["model"])
        except ValueError as e:
            raise ValueError(
                f"checkpoint {path} records model {meta['model']!r}, which does not resolve "
                f"here ({e}); give --model to name it"
            ) from None
    else:
        source = resolve_model(model)
    if recorded and source.kind != "function":
        n_layers = meta.get("n_layers")
    else:
        n_layers = _recorded_layers(path, source) if not recorded else None
    return path, source, n_layers, meta


def model_from_checkpoint(
    checkpoint: str | os.PathLike, model: str | None = None, seed: int = 0
) -> tuple[nn.Module, ModelSource, Path]:
    """The whole model (float32, train mode as :meth:`ModelSource.build` gives it) filled from a
    checkpoint: ``(module, source, checkpoint dir)``.

    Example::

        model, source, ck = model_from_checkpoint("ck")
        loss = source.loss(model(x), y)
    """
    path, source, n_layers, _ = checkpoint_source(checkpoint, model)
    if source.kind == "hf":
        module = _hf_from_config(source, n_layers, seed)
    else:
        module = source.build(seed, n_layers)
    load_params(module, path, what=f"model {source.name!r}")
    return module, source, path


def _hf_from_config(source: ModelSource, n_layers: int | None, seed: int = 0) -> nn.Module:
    """A fresh Hugging Face model from the source's config (weights come from the checkpoint)."""
    from transformers import AutoModelForCausalLM

    config = source.hf_config(n_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=ATTN_IMPLEMENTATION, dtype=torch.float32
        )
    return model.float().train()


def export_hf(
    checkpoint: str | os.PathLike, out: str | os.PathLike, model: str | None = None
) -> Path:
    """Write checkpoint ``checkpoint`` as a Hugging Face ``save_pretrained`` directory ``out``.

    ``checkpoint`` is a ``step-N`` directory or a ``--checkpoint-dir`` root (its newest complete
    checkpoint), saved at any mesh. The model is the one the checkpoint records (``plait.json``)
    unless ``model`` names it (checkpoints older than ``plait.json`` need it); it must be an
    ``hf:`` model. The weights are written as safetensors in the dtype training kept them in,
    with the source directory's tokenizer files and generation config copied beside them.
    Returns ``out``.

    Raises:
        FileNotFoundError: no complete checkpoint there.
        ValueError: no model recorded or given, a preset or function model, or tensors that do
            not match the model (names the first that differs). Every message is one line.

    Example::

        export_hf("ck/step-00000050", "exported")
        AutoModelForCausalLM.from_pretrained("exported")
    """
    path, source, n_layers, meta = checkpoint_source(checkpoint, model, "plait export")
    if source.kind != "hf":
        what = (
            "a preset (plait's reference Transformer)"
            if source.kind == "preset"
            else ("a function's model")
        )
        raise ValueError(
            f"export to the Hugging Face format needs an hf: model; {source.name!r} is {what}, "
            "which has no Hugging Face class to save as (its checkpoint loads with plait infer "
            "--checkpoint or plait train --resume)"
        )
    dest = Path(out).expanduser()
    if dest.exists() and not dest.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a directory")
    resolved = dest.resolve()
    if (
        resolved == Path(source.path)
        or resolved == path.resolve().parent
        or resolved == path.resolve()
    ):
        raise ValueError(
            f"--out {str(out)!r} is the model's source or checkpoint directory; export elsewhere"
        )
    saved = _model_tensors(path)
    dtype = DTYPES.get((meta or {}).get("dtype"))
    if dtype is None:
        dtype = next(iter(saved.values()))[1] if saved else torch.float32
    hf = _hf_from_config(source, n_layers)
    load_params(hf, path, what=f"model {source.name!r}")
    hf = hf.to(dtype).eval()
    dest.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards" for one tiny file is noise
    try:
        hf.save_pretrained(dest)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    src = Path(source.path)
    for name in (*TOKENIZER_FILES, GENERATION_FILE):
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)
    return dest
