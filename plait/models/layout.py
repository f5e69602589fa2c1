"""Where a model is cut into pipeline stages, found by its structure rather than its class name.

A *layout* shows the partitioner every model in one shape: some ``pre`` modules (embeddings),
a list of ``blocks`` (the layers), some ``post`` modules (final norm, output head), and how a run
of consecutive blocks executes as a stage. Every stage holds the model's *own* module objects
under the model's *own* dotted names (``model.layers.3.self_attn.q_proj.weight``), so checkpoints,
Hugging Face state dicts and tensor-parallel plans written for the whole model apply to a stage.

Layouts, tried in this order by :func:`find_layout`:

    reference   plait's Transformer: ``embed -> blocks -> head``
    decoder     a Hugging Face causal LM: a base model holding an ``nn.ModuleList`` of decoder
                layers (``model.layers``, ``transformer.h``, ...), embeddings before it, a final
                norm after it, and an ``lm_head``. The stage runs the base model's *own* forward
                with its layers swapped for recorders, so embeddings (with their scaling or
                learned positions), the attention mask, position ids and rotary embeddings are
                computed by the model's code, exactly as in one process; each stage then runs
                its layers with what the recorders captured, and the last applies the final
                norm through the same forward and then ``lm_head``.
    sequential  an ``nn.Sequential``: every child is a block; a stage passes on whatever its last
                child returns (a tensor, or a tuple or dict of tensors)

Anything else is refused with a message naming what was looked for; pass
``layout=SequentialLayout(...)``-style objects (any object with ``pre``, ``blocks``, ``post`` and
``stage``) to :func:`plait.pipeline.partition` for a model of another shape.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "Layout",
    "Stage",
    "ReferenceLayout",
    "DecoderLayout",
    "SequentialLayout",
    "find_layout",
    "tied_parameter_names",
]


class Layout:
    """What the partitioner needs of a model (see the module docstring).

    Attributes:
        kind: ``reference``, ``decoder`` or ``sequential``.
        pre, post: ``[(dotted name, module)]`` run before the first block / after the last.
        blocks: ``[(dotted name, module)]``, the units stages are cut between.
    """

    kind = "custom"
    pre: list[tuple[str, nn.Module]]
    blocks: list[tuple[str, nn.Module]]
    post: list[tuple[str, nn.Module]]

    def stage(self, index: int, num_stages: int, block_ids: Sequence[int]) -> nn.Module:
        """The stage ``index`` of ``num_stages`` holding blocks ``block_ids`` (pre modules on
        the first stage, post modules on the last)."""
        raise NotImplementedError


def _register(root: nn.Module, dotted: str, module: nn.Module) -> None:
    """Add ``module`` under ``root`` at ``dotted`` (``a.b.3``), making plain containers."""
    *path, leaf = dotted.split(".")
    node = root
    for part in path:
        if part not in node._modules:
            node.add_module(part, nn.Module())
        node = node._modules[part]
    node.add_module(leaf, module)


def _lookup(root: nn.Module, dotted: str) -> nn.Module:
    node = root
    for part in dotted.split("."):
        node = node._modules[part]
    return node


class _Holder(nn.Module):
    """A stage that holds the model's modules under their original names."""

    def __init__(self, index: int, num_stages: int, named: list[tuple[str, nn.Module]]):
        super().__init__()
        self.index, self.num_stages = index, num_stages
        self._names = [n for n, _ in named]
        for name, module in named:
            _register(self, name, module)

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    def extra_repr(self) -> str:
        return f"stage {self.index} of {self.num_stages}"


# --- plait's reference transformer -------------------------------------------------------------


class Stage(nn.Module):
    """Stage ``index`` of ``num_stages`` of the reference model: optional ``embed``, a run of
    ``blocks`` (an ``nn.ModuleDict`` keyed by the block's index in the model, so names match),
    optional ``head``. ``forward(x)`` applies them in order."""

    def __init__(
        self,
        index: int,
        num_stages: int,
        embed: nn.Module | None,
        blocks: dict[int, nn.Module],
        head: nn.Module | None,
    ):
        super().__init__()
        self.index = index
        self.num_stages = num_stages
        if embed is not None:
            self.embed = embed
        self.blocks = nn.ModuleDict({str(i): b for i, b in sorted(blocks.items())})
        if head is not None:
            self.head = head

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    @property
    def block_indices(self) -> list[int]:
        return [int(k) for k in self.blocks]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "embed"):
            x = self.embed(x)
        for block in self.blocks.values():
            x = block(x)
        if hasattr(self, "head"):
            x = self.head(x)
        return x

    def extra_repr(self) -> str:
        return f"stage {self.index} of {self.num_stages}, blocks {self.block_indices}"


class ReferenceLayout(Layout):
    kind = "reference"

    def __init__(self, model: nn.Module):
        self.pre = [("embed", model.embed)]
        self.blocks = [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]
        self.post = [("head", model.head)]

    def stage(self, index: int, num_stages: int, block_ids: Sequence[int]) -> nn.Module:
        return Stage(
            index,
            num_stages,
            self.pre[0][1] if index == 0 else None,
            {i: self.blocks[i][1] for i in block_ids},
            self.post[0][1] if index == num_stages - 1 else None,
        )


# --- nn.Sequential ---------------------------------------------------------------------------------


class SequentialStage(_Holder):
    """A run of an ``nn.Sequential``'s children; passes on what the last one returns."""

    def forward(self, x):
        for name in self._names:
            x = _lookup(self, name)(x)
        return x

    @property
    def block_indices(self) -> list[int]:
        return [int(n) for n in self._names]


class SequentialLayout(Layout):
    kind = "sequential"

    def __init__(self, model: nn.Sequential):
        self.pre, self.post = [], []
        self.blocks = list(model.named_children())

    def stage(self, index: int, num_stages: int, block_ids: Sequence[int]) -> nn.Module:
        return SequentialStage(index, num_stages, [self.blocks[i] for i in block_ids])


# --- Hugging Face decoders ---------------------------------------------------------------------


class _Recorder(nn.Module):
    """Stands in for decoder layer ``i`` during the base model's forward: records the arguments
    the model gives the layer and returns the hidden state unchanged (or the stage's own hidden
    state at the last layer)."""

    def __init__(self, i: int, layer: nn.Module, log: dict):
        super().__init__()
        self.i, self.log = i, log
        # plain attributes the base model may read from its layers (attention_type, layer_idx)
        for k, v in vars(layer).items():
            if not k.startswith("_") and not isinstance(v, (nn.Module, torch.Tensor)):
                self.__dict__.setdefault(k, v)

    def forward(self, hidden, *args, **kwargs):
        log = self.log
        log["calls"][self.i] = (args, kwargs)
        if self.i == 0:
            log["first_input"] = hidden  # the embeddings, as the model computed them
        if self.i == log["n"] - 1 and log.get("replace") is not None:
            return log["replace"]
        return hidden


class _NoEmbedding(nn.Module):
    """Stands in for an embedding this stage does not hold: adds nothing (learned positions are
    added to the zeros a context pass runs on, whose result no layer sees)."""

    def forward(self, *args, **kwargs):
        return torch.zeros(())


class DecoderStage(_Holder):
    """Stage of a Hugging Face causal LM; see the module docstring.

    Input: token ids on the first stage, the hidden state elsewhere. Output: the hidden state, or
    the logits on the last stage.
    """

    def __init__(self, index, num_stages, layout: DecoderLayout, block_ids: Sequence[int]):
        first, last = index == 0, index == num_stages - 1
        named = (layout.pre if first else []) + [layout.blocks[i] for i in block_ids]
        named += layout.post if last else []
        super().__init__(index, num_stages, named)
        self._block_ids = list(block_ids)
        self._base_name, self._layers_attr = layout.base_name, layout.layers_attr
        self._log: dict = {"n": len(layout.blocks), "calls": {}}
        # The base model's own forward, with its layers swapped for recorders; unregistered
        # (its modules are the stage's, synchronised before each call).
        base = layout.base
        skeleton = object.__new__(type(base))
        skeleton.__dict__.update(base.__dict__)
        skeleton._modules = dict(base._modules)
        skeleton._modules[self._layers_attr] = nn.ModuleList(
            _Recorder(i, layer, self._log) for i, (_, layer) in enumerate(layout.blocks)
        )
        self._own = {n.rsplit(".", 1)[-1]: n for n in self._names if n.count(".") == 1}
        if not first:
            for attr in layout.pre_names:
                skeleton._modules[attr] = _NoEmbedding()
        self.__dict__["_skeleton"] = skeleton
        self._head_name = layout.head_name if last else None

    @property
    def block_indices(self) -> list[int]:
        return list(self._block_ids)

    def _base_pass(self, ids=None, embeds=None, replace=None):
        sk = self._skeleton
        for attr, dotted in self._own.items():  # modules swapped since (tensor parallelism)
            if dotted.startswith(self._base_name + ".") and attr in sk._modules:
                sk._modules[attr] = _lookup(self, dotted)
        log = self._log
        log["calls"], log["replace"], log["first_input"] = {}, replace, None
        try:
            out = sk(input_ids=ids, inputs_embeds=embeds, use_cache=False)
        finally:
            log["replace"] = None
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_first:
            self._base_pass(ids=x)  # embeddings by the model's own code
            hidden = self._log["first_input"]
        else:
            hidden = x
            self._base_pass(embeds=torch.zeros_like(hidden))  # masks, positions, rotary
        calls = dict(self._log["calls"])
        layers = _lookup(self, f"{self._base_name}.{self._layers_attr}")
        for i in self._block_ids:
            args, kwargs = calls[i]
            out = layers._modules[str(i)](hidden, *args, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        if not self.is_last:
            return hidden
        # the model's own final norm (and whatever else follows its layers)
        hidden = self._base_pass(embeds=torch.zeros_like(hidden), replace=hidden)
        return _lookup(self, self._head_name)(hidden)


class DecoderLayout(Layout):
    """A Hugging Face causal LM (see the module docstring); raises ValueError if ``model`` is
    not one."""

    kind = "decoder"

    def __init__(self, model: nn.Module):
        head_name, head = _find_head(model)
        base_name, base, layers_attr = _find_base(model)
        if head is None or base is None:
            raise ValueError(
                "looked for an output head (`lm_head`, or a Linear to the vocabulary as the "
                "model's output embeddings) and a base model holding an nn.ModuleList of decoder "
                "layers"
            )
        cfg = getattr(model, "config", None)
        if cfg is not None and getattr(cfg, "final_logit_softcapping", None):
            raise ValueError(
                "final_logit_softcapping is applied by the causal LM's forward after lm_head; "
                "the decoder layout does not reproduce it"
            )
        self.model, self.base, self.base_name, self.layers_attr = (
            model,
            base,
            base_name,
            layers_attr,
        )
        self.head_name = head_name
        children = list(base.named_children())
        at = [n for n, _ in children].index(layers_attr)
        with_params = [(n, m) for n, m in children if any(True for _ in m.parameters())]
        # parameters before the layers belong to the first stage (embeddings), after them to the
        # last (final norm); parameter-free modules (rotary embeddings, dropout) stay on every
        # stage through the base model's forward
        self.pre_names = {n: f"{base_name}.{n}" for n, m in with_params if _index(children, n) < at}
        post_names = [f"{base_name}.{n}" for n, m in with_params if _index(children, n) > at]
        self.pre = [(f"{base_name}.{n}", m) for n, m in with_params if _index(children, n) < at]
        self.blocks = [
            (f"{base_name}.{layers_attr}.{i}", layer)
            for i, layer in enumerate(getattr(base, layers_attr))
        ]
        self.post = [(n, _lookup(model, n)) for n in post_names] + [(head_name, head)]

    def stage(self, index: int, num_stages: int, block_ids: Sequence[int]) -> nn.Module:
        return DecoderStage(index, num_stages, self, block_ids)


def _index(children: list[tuple[str, nn.Module]], name: str) -> int:
    return [n for n, _ in children].index(name)


def _find_head(model: nn.Module) -> tuple[str, nn.Module | None]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return "", None
    for name, m in model.named_modules():
        if m is head:
            return name, head
    return "", None


def _find_base(model: nn.Module) -> tuple[str, nn.Module | None, str]:
    """The child holding the longest nn.ModuleList of layers, and that list's attribute."""
    best = ("", None, "", 0)
    for base_name, base in model.named_children():
        for attr, child in base.named_children():
            if isinstance(child, nn.ModuleList) and len(child) > best[3]:
                best = (base_name, base, attr, len(child))
    return best[0], best[1], best[2]


def find_layout(model: nn.Module) -> Layout:
    """The layout of ``model``, or ValueError saying what was looked for.

    Example::

        find_layout(LlamaForCausalLM(config)).kind   # 'decoder'
    """
    if all(hasattr(model, n) for n in ("embed", "blocks", "head")) and isinstance(
        model.blocks, (nn.ModuleList, nn.Sequential)
    ):
        return ReferenceLayout(model)
    if isinstance(model, nn.Sequential):
        return SequentialLayout(model)
    try:
        return DecoderLayout(model)
    except ValueError as exc:
        raise ValueError(
            f"cannot cut {type(model).__name__} into pipeline stages: the partitioner looked for "
            f"plait's embed -> blocks -> head, an nn.Sequential, or a Hugging Face causal LM "
            f"({exc}); pass layout= to plait.pipeline.partition for another shape"
        ) from None


def tied_parameter_names(model: nn.Module) -> list[list[str]]:
    """Groups of parameter names that are one tensor (tied input and output embeddings)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]
