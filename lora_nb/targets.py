"""Targets: which layers of a model LoRA can adapt, by the short names peft's ``target_modules`` uses.

peft adapts ``nn.Linear``, transformers' ``Conv1D`` (GPT-2, weights stored in x out) and their
bitsandbytes 4-bit/8-bit versions. :func:`find_targets` lists them grouped as attention / MLP /
other, without the output head (as peft's 'all-linear' does), with their shapes, the number of
transformer blocks and the name of the list that holds them (``layers_pattern``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import torch.nn as nn
from transformers.pytorch_utils import Conv1D

Group = Literal["attention", "mlp", "other"]
_LAYER_INDEX = re.compile(r"(?:^|.*?\.)(?P<list>[^.]+)\.(?P<idx>\d+)\.")
_ATTENTION_WORDS = ("attn", "attention")
_MLP_WORDS = ("mlp", "feed_forward", "ffn")
# Names of MLP linears that some architectures put directly in the block, with no "mlp" parent
# (OPT, BioGPT, XGLM: decoder.layers.N.fc1 / fc2).
_MLP_NAMES = ("fc1", "fc2", "fc_in", "fc_out", "c_fc", "w1", "w2", "w3", "gate_proj", "up_proj", "down_proj",
              "dense_h_to_4h", "dense_4h_to_h")


@dataclass(frozen=True)
class TargetLayer:
    """One adaptable layer of the model.

    Attributes:
        path: Full module path, e.g. ``model.layers.0.self_attn.q_proj``.
        name: Short name used in ``target_modules``, e.g. ``q_proj``.
        kind: ``linear``, ``conv1d``, ``linear4bit`` or ``linear8bit``.
        in_features: Input size.
        out_features: Output size.
        has_bias: Whether the layer has a bias vector.
        group: ``attention``, ``mlp`` or ``other``, from the module path.
        layer_index: Index of the transformer block holding it, or None outside the blocks.
    """

    path: str
    name: str
    kind: str
    in_features: int
    out_features: int
    has_bias: bool
    group: Group
    layer_index: int | None


@dataclass(frozen=True)
class Targets:
    """What :func:`find_targets` found.

    Attributes:
        attention: Short names of attention layers (e.g. ``q_proj``, ``c_attn``).
        mlp: Short names of MLP layers. A name may be in both lists (GPT-2's ``c_proj``).
        other: Short names found outside attention and MLP blocks.
        n_layers: Number of transformer blocks.
        layers_pattern: Name of the module list holding the blocks (``layers``, ``h``), or None.
        fan_in_fan_out: True when the layers are Conv1D (weights stored in x out).
        output_head: Path of the output head, left out of the names, or None.
        layers: Every adaptable layer with its shape.
    """

    attention: list[str]
    mlp: list[str]
    other: list[str]
    n_layers: int
    layers_pattern: str | None
    fan_in_fan_out: bool
    output_head: str | None
    layers: list[TargetLayer] = field(repr=False)

    @property
    def names(self) -> list[str]:
        """Every adaptable short name, attention first, each once."""
        return list(dict.fromkeys(self.attention + self.mlp + self.other))

    @property
    def shapes(self) -> dict[str, list[tuple[int, int]]]:
        """Short name -> distinct ``(in_features, out_features)`` shapes it has in the model."""
        shapes: dict[str, list[tuple[int, int]]] = {}
        for layer in self.layers:
            shape = (layer.in_features, layer.out_features)
            if shape not in shapes.setdefault(layer.name, []):
                shapes[layer.name].append(shape)
        return shapes


def find_targets(model: nn.Module, include_output_head: bool = False) -> Targets:
    """Finds the layers of a base model (before ``get_peft_model``) that LoRA can adapt.

    Args:
        model: A transformers causal LM (or any module; then no output head is known).
        include_output_head: Also list the output head (``lm_head``), which 'all-linear' leaves out.

    Returns:
        The adaptable layers, grouped, with the block count and ``layers_pattern``.
    """
    head = _output_head_path(model)
    layers = [layer for path, module in model.named_modules()
              if (layer := _target_layer(path, module)) is not None and (include_output_head or path != head)]
    patterns = [m["list"] for layer in layers if (m := _LAYER_INDEX.match(layer.path))]
    indexed = [layer.layer_index for layer in layers if layer.layer_index is not None]
    config_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    by_group = {g: list(dict.fromkeys(lay.name for lay in layers if lay.group == g)) for g in ("attention", "mlp", "other")}
    return Targets(
        attention=by_group["attention"], mlp=by_group["mlp"], other=by_group["other"],
        n_layers=config_layers if isinstance(config_layers, int) else (max(indexed) + 1 if indexed else 0),
        layers_pattern=max(set(patterns), key=patterns.count) if patterns else None,
        fan_in_fan_out=any(layer.kind == "conv1d" for layer in layers),
        output_head=head, layers=layers,
    )


def _target_layer(path: str, module: nn.Module) -> TargetLayer | None:
    if isinstance(module, Conv1D):
        kind, n_in, n_out = "conv1d", module.nx, module.nf
    elif isinstance(module, nn.Linear):
        kind, n_in, n_out = _linear_kind(module), module.in_features, module.out_features
    else:
        return None
    match = _LAYER_INDEX.match(path)
    return TargetLayer(
        path=path, name=path.rsplit(".", 1)[-1], kind=kind, in_features=n_in, out_features=n_out,
        has_bias=getattr(module, "bias", None) is not None, group=_group(path),
        layer_index=int(match["idx"]) if match else None,
    )


def _linear_kind(module: nn.Linear) -> str:
    """bitsandbytes' layers subclass nn.Linear; tell them apart by class name (no bitsandbytes import)."""
    return {"Linear4bit": "linear4bit", "Linear8bitLt": "linear8bit"}.get(type(module).__name__, "linear")


def _group(path: str) -> Group:
    """attention / mlp from the parent modules' names, else from the layer's own name inside a block."""
    *parents, name = path.split(".")
    if any(w in part for part in parents for w in _ATTENTION_WORDS):
        return "attention"
    if any(w in part for part in parents for w in _MLP_WORDS):
        return "mlp"
    if name in _MLP_NAMES and _LAYER_INDEX.match(path):
        return "mlp"
    return "other"


def _output_head_path(model: nn.Module) -> str | None:
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return next((path for path, module in model.named_modules() if module is head), None) if head is not None else None
