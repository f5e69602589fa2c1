"""One way to name a model, for every command: a preset, a Hugging Face directory, or a function.

``resolve_model(name)`` accepts

* a preset -- ``tiny``, ``small``: plait's reference :class:`plait.models.Transformer`;
* ``hf:PATH`` -- a local directory holding a Hugging Face ``config.json`` (and maybe weights and
  a tokenizer); nothing is ever downloaded (``local_files_only=True`` everywhere);
* ``PACKAGE.MODULE:FUNCTION`` -- an importable function returning an ``nn.Module`` (a language
  model fed token ids) or a :class:`UserModel` (any model, with its own loss and batches).

and returns a :class:`ModelSource`, which builds the model, computes its loss, gives its
tokenizer and describes it to the planner. Names and paths are parsed and checked here without
importing torch or transformers; those load only inside the methods that build things.

Hugging Face models are built with ``attn_implementation="eager"``: the plain
matmul-softmax-matmul path. It is the same computation on every machine and in every shard,
whereas ``"sdpa"`` picks among fused kernels by device, dtype, shape and whether gradients are
needed, so a whole model and its pieces could take different kernels. (On CPU both gave
bit-identical results across thread counts, batch splits and head splits when measured; eager
is chosen because its results do not depend on a kernel choice at all.)

Example::

    src = resolve_model("hf:./my-llama")
    model = src.build(seed=0)
    loss = src.loss(model(x), y)
    ids = src.tokenizer().encode("hello")
    spec = src.spec()                      # for plait.plan
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plait.models.config import PRESETS, ModelConfig, get_config

__all__ = ["ModelSource", "UserModel", "resolve_model", "ATTN_IMPLEMENTATION"]

ATTN_IMPLEMENTATION = "eager"

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
_FUNCTION_RE = re.compile(
    r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"
)


def _valid() -> str:
    return (
        f"give a preset ({', '.join(sorted(PRESETS))}), hf:DIR (a Hugging Face model directory "
        "with config.json) or PACKAGE.MODULE:FUNCTION (a function returning an nn.Module or a "
        "plait.models.UserModel)"
    )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


@dataclass
class UserModel:
    """A model plait does not know, with what training it needs.

    Attributes:
        module: the model (an ``nn.Module``).
        loss: ``loss(output, targets) -> scalar``; default mean next-token cross-entropy on logits.
        batch: ``batch(step, batch_size, seed) -> (inputs, targets)``, deterministic, for models
            that are not language models (an MLP, a CNN on synthetic data). ``None``: the model is
            a language model fed token ids by a dataset.
        vocab_size, max_seq_len: a language model's vocabulary and longest sequence, if known.

    Example::

        def build():
            net = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 1))
            return UserModel(net, loss=F.mse_loss, batch=my_batches)
    """

    module: Any
    loss: Callable | None = None
    batch: Callable[[int, int, int], tuple] | None = None
    vocab_size: int | None = None
    max_seq_len: int | None = None

    def __post_init__(self) -> None:
        from torch import nn

        if not isinstance(self.module, nn.Module):
            raise ValueError(
                f"UserModel.module must be a torch.nn.Module, got {type(self.module).__name__}"
            )
        for name in ("loss", "batch"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise ValueError(f"UserModel.{name} must be callable or None, got {value!r}")

    @property
    def is_language_model(self) -> bool:
        return self.batch is None


def next_token_loss(output: Any, targets: Any):
    """Mean next-token cross-entropy: logits ``(..., V)`` (a tensor, a tuple whose first item is
    the logits, or an object with ``.logits`` such as a Hugging Face ``CausalLMOutput``) against
    target ids ``(...)`` already shifted by one."""
    import torch
    import torch.nn.functional as F

    logits = getattr(output, "logits", output)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"expected logits (a tensor or .logits), got {type(output).__name__}")
    flat = logits.reshape(-1, logits.shape[-1])
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    return F.cross_entropy(flat, targets.reshape(-1))


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255."""

    vocab_size = 256
    name = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return 256


class HFTokenizer:
    """A Hugging Face tokenizer seen through ``encode``/``decode`` (no special tokens added);
    the tokenizer itself is ``.hf``."""

    def __init__(self, tok: Any, name: str):
        self.hf = tok
        self.name = name
        self.vocab_size = len(tok)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids])

    def __len__(self) -> int:
        return self.vocab_size


@dataclass(frozen=True)
class ModelSource:
    """A named model: how to build it, its loss, its tokenizer and its shape for the planner.

    Attributes:
        name: the name as given (``small``, ``hf:./dir``, ``pkg.mod:fn``).
        kind: ``"preset"``, ``"hf"`` or ``"function"``.
        path: the Hugging Face directory (absolute), for ``hf``.
        target: ``"pkg.mod:fn"``, for ``function``.
        overrides: preset fields (``ModelConfig``) or Hugging Face config attributes replaced.

    Build with :meth:`build`; see :func:`resolve_model`.
    """

    name: str
    kind: str
    path: str | None = None
    target: str | None = None
    overrides: tuple[tuple[str, Any], ...] = ()
    _probe: Any = field(default=None, compare=False, repr=False)

    def __reduce__(self):
        # Sent to worker processes without the function's cached result (a module, maybe closures).
        return (ModelSource, (self.name, self.kind, self.path, self.target, self.overrides))

    # ---------------------------------------------------------------- building
    def build(self, seed: int = 0, n_layers: int | None = None):
        """The full model in float32, identical for the same ``seed`` in every process.

        ``hf``: the saved weights when the directory has them (``seed`` then only matters for
        layers the checkpoint lacks), else a fresh model initialised under
        ``torch.manual_seed(seed)`` (the global RNG is restored afterwards). ``n_layers``
        overrides the layer count of presets and Hugging Face configs.
        """
        import torch

        if n_layers is not None and (not isinstance(n_layers, int) or n_layers < 1):
            raise ValueError(f"{self.name}: n_layers must be a positive integer, got {n_layers!r}")
        if self.kind == "preset":
            from plait.models.transformer import Transformer

            return Transformer(self._preset_config(n_layers), seed=seed)
        if self.kind == "hf":
            from transformers import AutoModelForCausalLM
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # one bar per worker and load is noise here

            config = self.hf_config(n_layers)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                if self.has_weights:
                    model = AutoModelForCausalLM.from_pretrained(
                        self.path,
                        config=config,
                        local_files_only=True,
                        attn_implementation=ATTN_IMPLEMENTATION,
                        dtype=torch.float32,
                    )
                else:
                    model = AutoModelForCausalLM.from_config(
                        config, attn_implementation=ATTN_IMPLEMENTATION, dtype=torch.float32
                    )
            # from_pretrained returns eval mode, from_config train mode: give the same either way
            return model.float().train()
        if n_layers is not None:
            raise ValueError(
                f"{self.name}: n_layers applies to presets and hf: models, not to a function's "
                "model (build the depth you want in the function)"
            )
        return self._call(seed).module.float()

    def _preset_config(self, n_layers: int | None = None) -> ModelConfig:
        over = dict(self.overrides)
        if n_layers is not None:
            over["n_layers"] = n_layers
        return get_config(self.name, **over)

    def _call(self, seed: int) -> UserModel:
        """Call the function under ``torch.manual_seed(seed)`` (passing ``seed=`` if it takes
        one) and check what it returns."""
        import torch
        from torch import nn

        fn = _load_function(self.name, self.target)
        try:
            takes_seed = "seed" in inspect.signature(fn).parameters
        except (TypeError, ValueError):
            takes_seed = False
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                out = fn(seed=seed) if takes_seed else fn()
            except Exception as e:
                raise ValueError(f"{self.name}: calling it raised {_one_line(e)}") from e
        if isinstance(out, UserModel):
            return out
        if isinstance(out, nn.Module):
            return UserModel(out)
        raise ValueError(
            f"{self.name}: returned {type(out).__name__}; it must return a torch.nn.Module or a "
            "plait.models.UserModel"
        )

    def _user(self) -> UserModel:
        """The function's result once (seed 0), for its loss, batches and sizes."""
        if self._probe is None:
            object.__setattr__(self, "_probe", self._call(0))
        return self._probe

    # ---------------------------------------------------------------- training
    def loss(self, output, targets):
        """Mean next-token cross-entropy on logits (a tensor or a ``CausalLMOutput``), or the
        :class:`UserModel`'s own loss."""
        if self.kind == "function":
            fn = self._user().loss
            if fn is not None:
                return fn(output, targets)
        return next_token_loss(output, targets)

    def batch(self, step: int, batch_size: int, seed: int = 0):
        """A :class:`UserModel`'s own batch ``step`` (models that are not language models)."""
        if self.is_language_model:
            raise ValueError(
                f"{self.name}: a language model takes its batches from a dataset "
                "(plait.data.dataset_for), not from a batch function"
            )
        return self._user().batch(step, batch_size, seed)

    @property
    def is_language_model(self) -> bool:
        return self.kind != "function" or self._user().is_language_model

    @property
    def has_weights(self) -> bool:
        """Whether building loads saved weights (a Hugging Face directory that has them)."""
        return self.kind == "hf" and any((Path(self.path) / f).is_file() for f in _WEIGHT_FILES)

    @property
    def vocab_size(self) -> int | None:
        if self.kind == "preset":
            return self._preset_config().vocab_size
        if self.kind == "hf":
            return self._hf_value(("vocab_size",))
        user = self._user()
        if user.vocab_size is not None or not user.is_language_model:
            return user.vocab_size
        return _module_vocab(user.module)

    @property
    def max_seq_len(self) -> int | None:
        if self.kind == "preset":
            return self._preset_config().max_seq_len
        if self.kind == "hf":
            return self._hf_value(("max_position_embeddings", "n_positions"))
        user = self._user()
        if user.max_seq_len is not None:
            return user.max_seq_len
        cfg = getattr(user.module, "config", None)
        for attr in ("max_position_embeddings", "n_positions", "max_seq_len"):
            if isinstance(getattr(cfg, attr, None), int):
                return getattr(cfg, attr)
        return None

    @property
    def n_layers(self) -> int | None:
        """Layer count of a preset or a Hugging Face config (``None`` for a function)."""
        if self.kind == "preset":
            return self._preset_config().n_layers
        if self.kind == "hf":
            return self._hf_value(("num_hidden_layers", "n_layer"))
        return None

    # ---------------------------------------------------------------- Hugging Face
    def _raw_config(self) -> dict:
        return json.loads((Path(self.path) / "config.json").read_text())

    def _hf_value(self, keys: tuple[str, ...]):
        over = dict(self.overrides)
        raw = self._raw_config()
        for k in keys:
            if k in over:
                return over[k]
        for k in keys:
            if isinstance(raw.get(k), int):
                return raw[k]
        cfg = self.hf_config()  # a default the file left out
        for k in keys:
            if isinstance(getattr(cfg, k, None), int):
                return getattr(cfg, k)
        return None

    def hf_config(self, n_layers: int | None = None):
        """The ``transformers`` config of an ``hf:`` model (with any overrides applied)."""
        if self.kind != "hf":
            raise ValueError(f"{self.name}: only hf: models have a Hugging Face config")
        from transformers import AutoConfig

        over = dict(self.overrides)
        if n_layers is not None:
            over["num_hidden_layers"] = n_layers
        try:
            config = AutoConfig.from_pretrained(self.path, local_files_only=True)
        except Exception as e:
            raise ValueError(f"{self.name}: its config.json is not readable: {_one_line(e)}") from e
        for k, v in over.items():
            setattr(config, k, v)  # attribute_map turns num_hidden_layers into n_layer, etc.
        n = getattr(config, "num_hidden_layers", None)
        types = getattr(config, "layer_types", None)
        if isinstance(n, int) and isinstance(types, list) and len(types) != n:
            config.layer_types = (types * n)[:n] if types else types
        return config

    # ---------------------------------------------------------------- tokenizer
    def tokenizer(self):
        """The tokenizer saved beside an ``hf:`` model, else UTF-8 bytes (ids 0..255).

        Refused when the model's vocabulary cannot hold the tokenizer's ids.
        """
        if not self.is_language_model:
            raise ValueError(f"{self.name}: not a language model, so it has no tokenizer")
        vocab = self.vocab_size
        if self.kind == "hf" and any((Path(self.path) / f).is_file() for f in _TOKENIZER_FILES):
            from transformers import AutoTokenizer

            try:
                tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            except Exception as e:
                raise ValueError(f"{self.name}: its tokenizer does not load: {_one_line(e)}") from e
            wrapped = HFTokenizer(tok, self.name)
            if vocab is not None and wrapped.vocab_size > vocab:
                raise ValueError(
                    f"{self.name}: its tokenizer has {wrapped.vocab_size} tokens but the model's "
                    f"vocab_size is {vocab}"
                )
            return wrapped
        if vocab is not None and vocab < 256:
            raise ValueError(
                f"{self.name}: vocab_size={vocab} is smaller than the 256 ids of the byte-level "
                "tokenizer; give the model a vocabulary of at least 256 or save a tokenizer "
                "beside it"
            )
        return ByteTokenizer()

    # ---------------------------------------------------------------- planner
    def spec(self, n_layers: int | None = None):
        """The model's shape for :mod:`plait.plan` (:class:`plait.plan.ModelSpec`)."""
        from plait.plan.model_spec import from_hf_config, from_model_config

        if self.kind == "preset":
            return from_model_config(self._preset_config(n_layers), self.name)
        if self.kind == "hf":
            return from_hf_config(self.hf_config(n_layers), name=self.name)
        module = self._user().module
        cfg = getattr(module, "config", None)
        if isinstance(cfg, ModelConfig):
            return from_model_config(cfg, self.name)
        if cfg is not None and hasattr(cfg, "model_type") and hasattr(cfg, "to_dict"):
            return from_hf_config(cfg, name=self.name)
        raise ValueError(
            f"{self.name}: the planner needs a transformer's shape; this model has no "
            "Hugging Face or plait config (give --layers --hidden --heads --vocab instead)"
        )


def _module_vocab(module) -> int | None:
    cfg = getattr(module, "config", None)
    for attr in ("vocab_size",):
        if isinstance(getattr(cfg, attr, None), int):
            return getattr(cfg, attr)
    from torch import nn

    for m in module.modules():
        if isinstance(m, nn.Embedding):
            return m.num_embeddings
    return None


def _config_fields() -> str:
    from dataclasses import fields

    return ", ".join(f.name for f in fields(ModelConfig))


def _load_function(name: str, target: str):
    module_name, _, attr = target.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:
        raise ValueError(
            f"{name}: module {module_name!r} cannot be imported ({_one_line(e)})"
        ) from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{name}: module {module_name!r} has no function {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{name}: {attr!r} in {module_name!r} is not a function")
    return obj


def resolve_model(name: str, **overrides) -> ModelSource:
    """Parse and check a model name (see the module docstring); no torch is imported except by
    the user's own module for ``PACKAGE.MODULE:FUNCTION``, which is imported and called once to
    check it returns a model.

    ``overrides`` replace preset fields (``get_config(name, **overrides)``) or Hugging Face
    config attributes; functions take none.

    Example::

        resolve_model("small").build(seed=0)
        resolve_model("hf:/models/llama", num_hidden_layers=4)
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model {name!r} is not a name; {_valid()}")
    name = name.strip()
    over = tuple(sorted(overrides.items()))
    if name.startswith("hf:"):
        raw = name[3:]
        if not raw:
            raise ValueError(f"{name}: no directory given after hf:")
        p = Path(raw).expanduser()
        if not p.exists():
            raise ValueError(f"{name}: no such directory")
        if not p.is_dir():
            raise ValueError(f"{name}: not a directory (hf: takes a Hugging Face model directory)")
        cfg = p / "config.json"
        if not cfg.is_file():
            raise ValueError(
                f"{name}: the directory has no config.json (hf: takes a Hugging Face model "
                "directory, e.g. one written by save_pretrained)"
            )
        try:
            data = json.loads(cfg.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{name}: its config.json is not readable: {_one_line(e)}") from e
        if not isinstance(data, dict):
            raise ValueError(f"{name}: its config.json is not a JSON object")
        if importlib.util.find_spec("transformers") is None:
            raise ValueError(
                f"{name}: Hugging Face models need transformers, which is not installed; "
                "pip install 'plait[hf]'"
            )
        return ModelSource(name, "hf", path=str(p.resolve()), overrides=over)
    if name in PRESETS:
        try:
            get_config(name, **overrides)
        except TypeError as e:
            raise ValueError(f"{name}: {_one_line(e)} (preset fields: {_config_fields()})") from e
        return ModelSource(name, "preset", overrides=over)
    if ":" in name:
        if not _FUNCTION_RE.match(name):
            raise ValueError(f"{name}: not PACKAGE.MODULE:FUNCTION; {_valid()}")
        if overrides:
            raise ValueError(f"{name}: a function's model takes no overrides {sorted(overrides)}")
        _load_function(name, name)
        src = ModelSource(name, "function", target=name)
        src._user()  # call it once: it must return a model
        return src
    raise ValueError(f"unknown model {name!r}; {_valid()}")
