"""Settings: the one definition of every knob of a LoRA/QLoRA run, its checks, and its conversions.

Each setting is a dataclass field whose ``metadata`` holds the help text, the allowed range, the
recommended range, a group name and its external names (``peft``: a ``peft.LoraConfig`` argument of the
same name; ``axolotl``: the axolotl key); choices are ``Literal`` types. Widgets, YAML comments, docs,
validation, :meth:`LoraSettings.peft_kwargs` and the forms of :mod:`lora_nb.formats` all read
:func:`field_specs`, so nothing repeats a default, a range or a name: a new knob is one field.

This module is also the only place that builds the library objects: ``peft.LoraConfig``
(:meth:`LoraSettings.to_peft`), ``transformers.BitsAndBytesConfig`` (:meth:`QuantSettings.to_bnb`)
and ``transformers.TrainingArguments`` (:meth:`TrainSettings.to_training_args`).

How LoRA adapts a layer (what ``r``, ``lora_alpha`` and ``lora_dropout`` act on)::

    x ──► W (frozen, out x in) ─────────────────────┐
    │                                               (+) ──► y = W x + (alpha / r) * B A x
    └─► dropout ─► A (r x in) ─► B (out x r) ─► * scale
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Union

import peft
import peft.optimizers
from peft.tuners.lora.config import CordaConfig, EvaConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
import torch
import transformers

from .errors import SettingsError, quote
from .probes import bf16_supported, cuda_available, has_package
from .targets import Targets, find_targets

ALL_LINEAR = "all-linear"

InitLoraWeights = Literal["default", "gaussian", "orthogonal", "pissa", "olora", "mica", "loftq", "eva", "corda"]
DATA_INITS = ("eva", "corda")  # init_lora_weights that need a pass over training data before training
LrScheduler = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt"
]
Optimizer = Literal[
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_8bit",
    "adamw_bnb_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
    "adafactor",
    "sgd",
]
BNB_OPTIMIZERS = ("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit")


def _meta(help: str, group: str, min: float | None = None, max: float | None = None,
          recommended: tuple[float, float] | None = None, *, peft: bool = False,
          axolotl: str | None = None) -> dict[str, Any]:
    """Builds the metadata dict every settings field carries.

    Args:
        help: What the setting does, in the kit's words.
        group: Section heading for widgets and docs.
        min: Smallest allowed number (for a list or mapping: of each of its numbers).
        max: Largest allowed number.
        recommended: ``(low, high)`` range that usually works.
        peft: True when the field is a ``peft.LoraConfig`` argument of the same name; then
            :meth:`LoraSettings.peft_kwargs`, the ``lora:`` form and the peft JSON form carry it.
        axolotl: The axolotl key that holds the same value under another name (a plain rename), or None.
    """
    return {"help": help, "group": group, "min": min, "max": max, "recommended": recommended, "peft": peft,
            "axolotl": axolotl}


# ---------------------------------------------------------------------------------------------------------------
# Field specs: the public view of the metadata
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldSpec:
    """One setting as a UI or a document sees it.

    Attributes:
        name: Field name, as in the dataclass and the kit's YAML.
        type: The annotation (e.g. ``int``, ``Literal["none", "all"]``, ``int | list[int] | None``).
        default: Default value.
        help: Help text in the kit's words.
        min: Smallest allowed number (inclusive), or None.
        max: Largest allowed number (inclusive), or None.
        recommended: ``(low, high)`` range that usually works, or None.
        choices: Allowed values when the type is a ``Literal``, else None.
        group: Group name, for laying fields out in sections.
        optional: True when None is an allowed value.
        peft: True when the field is a ``peft.LoraConfig`` argument of the same name.
        axolotl: The axolotl key for the same value, or None when axolotl has none (or reads it otherwise).
    """

    name: str
    type: Any
    default: Any
    help: str
    min: float | None
    max: float | None
    recommended: tuple[float, float] | None
    choices: tuple[Any, ...] | None
    group: str
    optional: bool
    peft: bool = False
    axolotl: str | None = None

    @property
    def type_name(self) -> str:
        """Short readable type, e.g. ``int``, ``'none' | 'all'``, ``int | list[int] | None``."""
        return _type_name(self.type)


def field_specs(cls: type) -> list[FieldSpec]:
    """Lists the fields of a settings class with their spec, in declaration order.

    Args:
        cls: ``LoraSettings``, ``QuantSettings`` or ``TrainSettings`` (the class or an instance).

    Returns:
        One :class:`FieldSpec` per field.
    """
    specs = _specs(cls if isinstance(cls, type) else type(cls))
    return [dataclasses.replace(s, default=copy.deepcopy(s.default)) for s in specs]  # defaults stay unchanged


@functools.cache
def _specs(cls: type) -> tuple[FieldSpec, ...]:
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        md = f.metadata
        specs.append(FieldSpec(
            name=f.name, type=tp, default=default, help=md["help"], min=md["min"], max=md["max"],
            recommended=md["recommended"], choices=_choices(tp), group=md["group"],
            optional=_matches(None, tp), peft=md["peft"], axolotl=md["axolotl"],
        ))
    return tuple(specs)


def value_problems(cls: type, name: str, value: Any, label: str | None = None) -> list[str]:
    """Checks one value against a field's type and range.

    Args:
        cls: The settings class that owns the field.
        name: Field name.
        value: Candidate value.
        label: Name to use in the message (e.g. ``lora.r`` or a file key); defaults to ``name``.

    Returns:
        Problem sentences; empty when the value is allowed.
    """
    spec = next(s for s in _specs(cls) if s.name == name)
    label = label or name
    if not _matches(value, spec.type):
        return [f"{label} must be {_describe(spec)}, got {quote(value)}{_hint(spec)}"]
    for number in _numbers(value):
        if (spec.min is not None and number < spec.min) or (spec.max is not None and number > spec.max):
            return [f"{label} must be {_describe(spec)}, got {quote(value)}{_hint(spec)}"]
    return []


def _numbers(value: Any) -> Iterator[float]:
    """The numbers a value holds: itself, or those inside its lists and mapping values."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        for item in value:
            yield from _numbers(item)
    elif _is_number(value):
        yield value


def _choices(tp: Any) -> tuple[Any, ...] | None:
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _matches(value: Any, tp: Any) -> bool:
    """True when ``value`` fits the annotation ``tp`` (bool is not an int here, NaN is not a number)."""
    origin = typing.get_origin(tp)
    if tp is type(None):
        return value is None
    if origin is Literal:
        return any(type(value) is type(a) and value == a for a in typing.get_args(tp))
    if _is_union(tp):
        return any(_matches(value, arg) for arg in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(tp)
        return isinstance(value, dict) and all(_matches(k, key) and _matches(v, item) for k, v in value.items())
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return _is_number(value) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    if dataclasses.is_dataclass(tp):
        return isinstance(value, tp)
    raise TypeError(f"unsupported settings annotation {tp!r}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "None"
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if origin is dict:
        return f"dict[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return tp.__name__


_PLAIN = {bool: "true or false", int: "an integer", float: "a number", str: "a text", type(None): "null"}


def _plain(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        args = typing.get_args(tp)
        return repr(args[0]) if len(args) == 1 else "one of " + ", ".join(repr(a) for a in args)
    if _is_union(tp):
        return " or ".join(_plain(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_plain(typing.get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        key, item = (_plain(a).removeprefix("a ").removeprefix("an ") for a in typing.get_args(tp))
        return f"a mapping of {key}s to {item}s"
    return _PLAIN.get(tp) or f"a {tp.__name__}"


def _describe(spec: FieldSpec) -> str:
    lo, hi = spec.min, spec.max
    bound = "" if lo is None and hi is None else (
        f" >= {lo:g}" if hi is None else f" <= {hi:g}" if lo is None else f" between {lo:g} and {hi:g}")
    return _plain(spec.type) + (bound if spec.type in (int, float) or not bound else f", with values{bound}")


def _hint(spec: FieldSpec) -> str:
    if spec.recommended:
        return f" (usual range {spec.recommended[0]:g} to {spec.recommended[1]:g}; default {spec.default!r})"
    return f" (default {spec.default!r})"


def _field_problems(obj: Any, prefix: str = "") -> list[str]:
    return [p for s in field_specs(obj) for p in value_problems(type(obj), s.name, getattr(obj, s.name), prefix + s.name)]


# ---------------------------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class LoraSettings:
    """What the adapter looks like: rank, scale, which layers it wraps, how it starts."""

    r: int = field(default=16, metadata=_meta(
        "LoRA rank: the inner size of the two small matrices A (r x in) and B (out x r) added beside each "
        "adapted weight. More rank = more trainable parameters and capacity; 8-64 covers most tasks.",
        "size", min=1, max=1024, recommended=(8, 64), peft=True, axolotl="lora_r"))
    lora_alpha: int = field(default=32, metadata=_meta(
        "Scale numerator: the update B A x is multiplied by lora_alpha / r (lora_alpha / sqrt(r) with "
        "use_rslora). Usually 1-2 x r; changing r without alpha changes the effective step size.",
        "size", min=1, max=4096, peft=True, axolotl="lora_alpha"))
    lora_dropout: float = field(default=0.05, metadata=_meta(
        "Dropout applied to the input of the LoRA branch only (the frozen path sees no dropout). "
        "0 for short runs; 0.05-0.1 against overfitting on small data sets.",
        "regularization", min=0.0, max=1.0, recommended=(0.0, 0.1), peft=True))
    target_modules: Union[Literal["all-linear"], list[str]] = field(default=ALL_LINEAR, metadata=_meta(
        "Layers to adapt, by short name (e.g. q_proj, v_proj, c_attn), or 'all-linear' for every linear "
        "layer except the output head. peft silently skips misspelled names when another name matches; "
        "the kit checks the names against the model.",
        "targets", peft=True))
    exclude_modules: Union[list[str], None] = field(default=None, metadata=_meta(
        "Layers NOT to adapt although target_modules matches them, by short name or path suffix (e.g. "
        "['down_proj'] with 'all-linear', or ['layers.0.self_attn.q_proj']). null = exclude nothing.",
        "targets", peft=True))
    target_parameters: Union[list[str], None] = field(default=None, metadata=_meta(
        "Parameters to adapt directly, by path suffix (e.g. 'mlp.experts.gate_up_proj' for the fused 3-D "
        "expert weights of mixture-of-experts models, which are parameters, not linear layers). Each gets "
        "r x (in + out) per expert. Needs lora_dropout 0 (peft's parameter wrapper has no dropout). null = none.",
        "targets", peft=True, axolotl="lora_target_parameters"))
    bias: Literal["none", "all", "lora_only"] = field(default="none", metadata=_meta(
        "Which bias vectors train too: 'none'; 'all' = every bias in the model; 'lora_only' = biases of "
        "the adapted layers. With biases trained, turning the adapter off no longer gives the base model.",
        "advanced", peft=True))
    lora_bias: bool = field(default=False, metadata=_meta(
        "Give the LoRA B matrix its own bias (out values per adapted layer), e.g. to hold the bias difference "
        "of an extracted adapter. Only with init_lora_weights 'default' and without DoRA (peft's rule).",
        "advanced", peft=True))
    fan_in_fan_out: bool = field(default=False, metadata=_meta(
        "States how the target layers store their weight: True for (in, out) as GPT-2's Conv1D does, "
        "False for nn.Linear's (out, in). A fact about the model, not a tuning knob; peft corrects a "
        "wrong value with a warning.",
        "targets", peft=True, axolotl="lora_fan_in_fan_out"))
    modules_to_save: Union[list[str], None] = field(default=None, metadata=_meta(
        "Modules trained in full and saved with the adapter (e.g. embed_tokens and lm_head after adding "
        "tokens to the tokenizer). Each costs a full trainable copy of the module.",
        "targets", peft=True, axolotl="lora_modules_to_save"))
    trainable_token_indices: Union[list[int], dict[str, list[int]], None] = field(default=None, metadata=_meta(
        "Train only these rows of the token embedding (e.g. the ids of newly added tokens): a list of token "
        "ids for the input embedding, or {layer name: ids}. Costs ids x hidden size values instead of a full "
        "copy of the embedding (modules_to_save). null = none.",
        "targets", min=0, peft=True, axolotl="peft_trainable_token_indices"))
    ensure_weight_tying: bool = field(default=False, metadata=_meta(
        "For models whose output head shares the input embedding's weight: keep the two tied when one of "
        "them is in modules_to_save or trainable_token_indices (one trained copy instead of two diverging ones).",
        "targets", peft=True, axolotl="peft_ensure_weight_tying"))
    layers_to_transform: Union[int, list[int], None] = field(default=None, metadata=_meta(
        "Transformer block indices (0-based) to adapt, as one integer or a list; null = every block.",
        "targets", min=0, peft=True, axolotl="peft_layers_to_transform"))
    layers_pattern: Union[str, None] = field(default=None, metadata=_meta(
        "Name of the module list holding the blocks ('layers' in Llama, 'h' in GPT-2), used only with "
        "layers_to_transform. It names the list; it is not a pattern of whole module paths. null = the "
        "first numbered path segment.",
        "targets", peft=True))
    rank_pattern: dict[str, int] = field(default_factory=dict, metadata=_meta(
        "Per-layer ranks that replace r: {name or path suffix or regex: rank}, e.g. {'down_proj': 32} or "
        "{'layers.0.self_attn.q_proj': 4}. Layers not matched keep r. Empty = r everywhere.",
        "size", min=1, max=1024, peft=True))
    alpha_pattern: dict[str, int] = field(default_factory=dict, metadata=_meta(
        "Per-layer lora_alpha values, matched like rank_pattern; the scale of a matched layer is its alpha "
        "over its rank. Empty = lora_alpha everywhere.",
        "size", min=1, max=4096, peft=True))
    use_rslora: bool = field(default=False, metadata=_meta(
        "Rank-stabilized LoRA: scale by lora_alpha / sqrt(r) instead of lora_alpha / r, so that large "
        "ranks are not scaled down so much.",
        "size", peft=True, axolotl="peft_use_rslora"))
    use_dora: bool = field(default=False, metadata=_meta(
        "DoRA: splits each adapted weight into direction (LoRA) and a trainable magnitude vector "
        "(out_features values per layer). Often better at low rank; slower steps.",
        "advanced", peft=True, axolotl="peft_use_dora"))
    init_lora_weights: InitLoraWeights = field(default="default", metadata=_meta(
        "How the adapter starts. 'default': A random, B zero, so training starts from the base model; "
        "'gaussian': A normal instead of Kaiming-uniform; 'orthogonal': A and B from one random orthogonal "
        "matrix (even r only; no extra cost); 'pissa' / 'olora': from an SVD / QR of each weight, which "
        "REWRITES the base weights to the residual (an SVD per layer at start; save the adapter with the "
        "conversion to use it on the original base); 'mica': B from the smallest singular vectors (an SVD "
        "per layer; B stays frozen, so fewer weights train); 'loftq': quantization-aware start, needs a "
        "FULL-PRECISION base (quant.load_in 'none'), a CUDA GPU and scipy; 'eva' / 'corda': data-driven, "
        "need a PASS OVER TRAINING DATA before training (peft's initialize_lora_eva_weights / "
        "preprocess_corda), which the kit's training does not run yet: files with them are read and written, "
        "not trained.",
        "advanced", peft=True))
    loftq_bits: Literal[2, 4, 8] = field(default=4, metadata=_meta(
        "Bits LoftQ quantizes the backbone to; used only when init_lora_weights is 'loftq'.",
        "advanced"))
    task_type: Literal["CAUSAL_LM"] = field(default="CAUSAL_LM", metadata=_meta(
        "peft task type; the kit fine-tunes causal (decoder-only) language models.",
        "advanced", peft=True))

    def problems(self, model: torch.nn.Module | None = None) -> list[str]:
        """Lists every problem of these settings (empty when all is well).

        Args:
            model: When given, target names, layer indices and fan_in_fan_out are checked against it.

        Returns:
            One sentence per problem, naming the field, the value and what is allowed.
        """
        found = _field_problems(self)
        if found:
            return found
        found += self._quiet_problems()
        if model is not None:
            found += self._model_problems(model)
        if not found and (model is not None or not self._needs_model()):
            try:
                self.to_peft(model)
            except SettingsError as err:
                found += err.problems
        return found

    def check(self, model: torch.nn.Module | None = None) -> None:
        """Raises one :class:`SettingsError` listing every problem, if there is any; warns about settings
        that will have no effect (:meth:`ignored`)."""
        _raise_if(self.problems(model))
        _warn(self.ignored())

    def ignored(self) -> list[str]:
        """Settings that are allowed but will have no effect as set, each with what to do."""
        if _field_problems(self) or self.init_lora_weights == "loftq" or self.loftq_bits == 4:
            return []
        return [f"loftq_bits {self.loftq_bits} has no effect: it is used only with init_lora_weights 'loftq' "
                f"(got {self.init_lora_weights!r}); remove it or choose 'loftq'"]

    def _quiet_problems(self) -> list[str]:
        """Values peft accepts but that train something other than asked, with no word from peft."""
        found = []
        targets = self.target_modules
        if targets == []:
            found.append("target_modules is an empty list: name at least one layer, or use 'all-linear'")
        blank = [t for t in (targets if isinstance(targets, list) else []) + (self.modules_to_save or [])
                 if not t.strip()]
        if blank:
            found.append("target_modules and modules_to_save hold an empty name: peft would match no layer with "
                         "it; remove it or write the layer's name (e.g. q_proj)")
        both = sorted(set(targets if isinstance(targets, list) else []) & set(self.modules_to_save or []))
        if both:
            found.append(f"{both} in both target_modules and modules_to_save: peft would train a full copy of "
                         "each and silently drop its LoRA adapter; keep each name in one list only "
                         "(target_modules for LoRA, modules_to_save for a full trainable copy)")
        if self.lora_dropout >= 1:
            found.append(f"lora_dropout {self.lora_dropout:g} drops every input of the LoRA branch, so the adapter "
                         "never learns: use a value below 1 (usual 0 to 0.1)")
        if self.layers_to_transform == []:
            found.append("layers_to_transform is an empty list: peft would then adapt every block; list the blocks "
                         "to adapt (e.g. [0, 1]) or use null for every block")
        if self.layers_pattern is not None and not self.layers_pattern.strip():
            found.append("layers_pattern is an empty text: use null (found from the model) or the name of the "
                         "module list holding the blocks ('layers' in Llama, 'h' in GPT-2)")
        for name in ("exclude_modules", "target_parameters", "rank_pattern", "alpha_pattern"):
            if any(not str(key).strip() for key in getattr(self, name) or []):
                found.append(f"{name} holds an empty name, which peft matches to nothing or to everything: remove "
                             "it or write the layer's name (e.g. down_proj)")
        if self.target_parameters and self.lora_dropout != 0:
            found.append(f"target_parameters {quote(self.target_parameters)} needs lora_dropout 0 (peft's parameter "
                         f"wrapper applies no dropout), got {self.lora_dropout:g}: set lora_dropout to 0")
        if self.target_parameters and self.fan_in_fan_out:
            found.append(f"target_parameters {quote(self.target_parameters)} cannot be used with fan_in_fan_out True "
                         "(peft's parameter wrapper takes (out, in) weights only, not GPT-2's Conv1D): remove "
                         "target_parameters, or adapt those layers through target_modules")
        odd = sorted({r for r in [self.r, *self.rank_pattern.values()] if r % 2})
        if self.init_lora_weights == "orthogonal" and odd:
            found.append(f"init_lora_weights 'orthogonal' needs even ranks, got {odd} (r and rank_pattern): use an "
                         "even rank, or another init_lora_weights")
        return found

    def advice(self) -> list[str]:
        """Lists settings that are allowed but unusual, with the reason (not errors)."""
        if _field_problems(self):
            return []
        tips = []
        if not self.use_rslora and not 1 <= self.scale() <= 2:
            tips.append(f"{self.scale_text()}: the usual ratio is 1 to 2 (lora_alpha = r to 2 x r); "
                        "a smaller scale learns slowly, a larger one can be unstable")
        if self.lora_dropout > 0.2:
            tips.append(f"lora_dropout {self.lora_dropout:g} is high (usual 0 to 0.1): the adapter may learn slowly")
        if self.r > 128:
            tips.append(f"r {self.r} is large: memory grows with r and gains above 64-128 are rare")
        if self.modules_to_save:
            tips.append(f"modules_to_save {quote(self.modules_to_save)} trains full copies of these modules: "
                        "only needed when new tokens were added")
        return tips + self.ignored()

    def rank_for(self, path: str) -> int:
        """The rank peft gives the layer at module path ``path``: rank_pattern's (peft's ``get_pattern_key``), else r."""
        return self.rank_pattern.get(get_pattern_key(list(self.rank_pattern), path), self.r)

    def scale(self) -> float:
        """The factor the update B A x is multiplied by: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def scale_text(self) -> str:
        """The scale as a formula and its value, e.g. ``lora_alpha / r = 2``."""
        return f"lora_alpha / {'sqrt(r)' if self.use_rslora else 'r'} = {self.scale():.3g}"

    def to_peft(self, model: torch.nn.Module | None = None) -> peft.LoraConfig:
        """Builds the ``peft.LoraConfig``.

        'all-linear' is expanded to explicit short names when a model is given, and must be when
        ``layers_to_transform`` is set (peft refuses 'all-linear' with layer indices).

        Args:
            model: The base model, to expand 'all-linear' into its layer names.

        Returns:
            The peft configuration.

        Raises:
            SettingsError: When peft refuses the settings, or 'all-linear' must be expanded without a model.
        """
        try:
            return peft.LoraConfig(**self.peft_kwargs(model))
        except (ValueError, TypeError, ImportError) as err:
            raise SettingsError(f"peft refused the LoRA settings: {err}; change the setting it names") from err

    def peft_kwargs(self, model: torch.nn.Module | None = None) -> dict[str, Any]:
        """The keyword arguments :meth:`to_peft` passes to ``peft.LoraConfig`` (also used to write code).

        Raises:
            SettingsError: When 'all-linear' must be expanded and no model is given.
        """
        kwargs = {s.name: copy.deepcopy(getattr(self, s.name)) for s in _specs(LoraSettings) if s.peft}
        kwargs["target_modules"] = self._explicit_targets(model)
        kwargs["init_lora_weights"] = True if self.init_lora_weights == "default" else self.init_lora_weights
        if self.init_lora_weights == "loftq":
            kwargs["loftq_config"] = peft.LoftQConfig(loftq_bits=self.loftq_bits)
        elif self.init_lora_weights == "eva":
            kwargs["eva_config"] = EvaConfig()  # peft's default, stated so that peft does not warn
        elif self.init_lora_weights == "corda":
            kwargs["corda_config"] = CordaConfig()
        return kwargs

    def _needs_model(self) -> bool:
        union = isinstance(self.target_modules, list) and ALL_LINEAR in self.target_modules
        return union or (self.target_modules == ALL_LINEAR and self.layers_to_transform is not None)

    def _explicit_targets(self, model: torch.nn.Module | None) -> str | list[str]:
        """The target names for peft. A list holding 'all-linear' means every linear layer plus the other
        names (axolotl's lora_target_linear with lora_target_modules), which needs the model to expand."""
        if isinstance(self.target_modules, list) and ALL_LINEAR not in self.target_modules:
            return list(self.target_modules)
        if model is not None:
            extra = [t for t in self.target_modules if t != ALL_LINEAR] if isinstance(self.target_modules, list) else []
            return list(dict.fromkeys(find_targets(model).names + extra))
        if self._needs_model():
            raise SettingsError(
                f"target_modules {quote(self.target_modules)} with layers_to_transform {quote(self.layers_to_transform)} "
                "needs the model to expand 'all-linear' into layer names (peft takes 'all-linear' only alone and "
                "without layer indices): pass the model, e.g. to_peft(model)")
        return ALL_LINEAR

    def _model_problems(self, model: torch.nn.Module) -> list[str]:
        targets = find_targets(model, include_output_head=True)  # the head is a valid explicit target
        found = []
        if isinstance(self.target_modules, list):
            unknown = [n for n in self.target_modules if n not in targets.names and n != ALL_LINEAR]
            if unknown:
                found.append(f"target_modules {unknown} not found in the model (peft would skip them silently); "
                             f"its adaptable layers are {targets.names}: correct the names, or use 'all-linear'")
        layers = [self.layers_to_transform] if isinstance(self.layers_to_transform, int) else self.layers_to_transform
        outside = [i for i in layers or [] if i >= targets.n_layers]
        if outside:
            found.append(f"layers_to_transform {quote(outside)} outside the model's blocks 0 to {targets.n_layers - 1}")
        if self.layers_pattern and not _pattern_matches(self.layers_pattern, [lay.path for lay in targets.layers]):
            found.append(f"layers_pattern {quote(self.layers_pattern)} matches no numbered module list of this model "
                         f"(peft looks for '<pattern>.<index>.' in module paths): its blocks are in "
                         f"{targets.layers_pattern!r}; set layers_pattern to that, or to null")
        if self.fan_in_fan_out != targets.fan_in_fan_out:
            kind = "Conv1D (weights stored in x out)" if targets.fan_in_fan_out else "nn.Linear (weights out x in)"
            found.append(f"fan_in_fan_out must be {targets.fan_in_fan_out} for this model, whose layers are "
                         f"{kind}; got {self.fan_in_fan_out}: set it to {targets.fan_in_fan_out}")
        paths = [path for path, _ in model.named_modules() if path]
        params = [path for path, _ in model.named_parameters()]
        wrapped = [p for p in params if any(p == t or p.endswith("." + t) for t in self.target_parameters or [])]
        layer_paths = [lay.path for lay in targets.layers] + wrapped
        for name in ("rank_pattern", "alpha_pattern", "exclude_modules"):
            unmatched = [k for k in getattr(self, name) or [] if not any(_key_matches(k, p) for p in layer_paths)]
            if unmatched:
                found.append(f"{name} keys {quote(unmatched)} match no adaptable layer of this model (peft would "
                             f"ignore them silently): use layer names such as {quote(targets.names[:3])} or path "
                             f"suffixes such as {quote(layer_paths[0])}")
        if self.init_lora_weights in ("pissa", "olora", "mica"):
            found += self._rank_size_problems(model, targets)
        unmatched = [t for t in self.target_parameters or [] if not any(p == t or p.endswith("." + t) for p in params)]
        if unmatched:
            found.append(f"target_parameters {quote(unmatched)} match no parameter of this model: name a parameter "
                         "by its path suffix, e.g. 'mlp.experts.gate_up_proj' in a mixture-of-experts model")
        missing = [m for m in self.modules_to_save or [] if not any(p.endswith(m) for p in paths)]  # peft's rule
        if missing:
            found.append(f"modules_to_save {quote(missing)} not found in the model: remove them, or use names "
                         f"of its modules (e.g. {quote([targets.output_head or 'lm_head'])})")
        if self.target_modules == ALL_LINEAR or ALL_LINEAR in self.target_modules:
            both = sorted(set(self.modules_to_save or []) & set(find_targets(model).names))
            if both:
                found.append(f"{both} in modules_to_save are also adapted by 'all-linear': peft would train a full "
                             "copy of each and silently drop its LoRA adapter; list the other layers in "
                             "target_modules instead of 'all-linear', or remove them from modules_to_save")
        return found

    def _rank_size_problems(self, model: torch.nn.Module, targets: Targets) -> list[str]:
        """PiSSA, OLoRA and MiCA take r singular (or QR) vectors of each adapted weight, so r must not exceed its
        smaller side (peft refuses it for MiCA and silently uses fewer for PiSSA)."""
        try:
            config = self.to_peft(model)
        except SettingsError:
            return []  # reported by problems() itself
        small = [f"{lay.path} ({lay.out_features} x {lay.in_features})" for lay in targets.layers
                 if check_target_module_exists(config, lay.path)
                 and self.rank_for(lay.path) > min(lay.in_features, lay.out_features)]
        if not small:
            return []
        return [f"init_lora_weights {self.init_lora_weights!r} needs a rank of at most the smaller side of each "
                "adapted weight (it starts from that many of the weight's own vectors); too "
                f"small for r {self.r}: {quote(small, 300)}: lower r, give those layers a smaller rank in "
                "rank_pattern, or use another init_lora_weights"]


def _pattern_matches(pattern: str, paths: list[str]) -> bool:
    """peft's rule: the pattern, then a dot and the block index, somewhere in the module path."""
    try:
        regex = re.compile(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.")
    except re.error:
        return False
    return any(regex.match(path) for path in paths)


def _key_matches(key: str, path: str) -> bool:
    """peft's rule for rank_pattern / alpha_pattern keys (``get_pattern_key``): the key, as a regex, ends the path
    at a dot; exclude_modules names match the same way."""
    try:
        return re.match(rf"(.*\.)?({key})$", path) is not None
    except re.error:
        return False


def _raise_if(problems: list[str]) -> None:
    if problems:
        raise SettingsError(problems)


def _warn(notes: list[str]) -> None:
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------------------------------
# Quantization
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class QuantSettings:
    """How the frozen base weights are stored while training (QLoRA = 4-bit base + LoRA)."""

    load_in: Literal["4bit", "8bit", "none"] = field(default="4bit", metadata=_meta(
        "Storage of the frozen base weights: '4bit' (QLoRA, about 0.5 byte per weight), '8bit' (about 1 "
        "byte) or 'none' (the training precision). Needs bitsandbytes; saves memory on large models, "
        "costs speed (on CPU about 1.2-1.4x slower steps).",
        "quantization"))
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = field(default="nf4", metadata=_meta(
        "4-bit number format: 'nf4' (NormalFloat, fits normally distributed weights, the QLoRA choice) or 'fp4'.",
        "quantization"))
    bnb_4bit_use_double_quant: bool = field(default=True, metadata=_meta(
        "Also quantize the per-block scale factors: saves about 0.4 bit per weight.",
        "quantization"))
    bnb_4bit_compute_dtype: Literal["bfloat16", "float16", "float32"] = field(default="bfloat16", metadata=_meta(
        "Precision the 4-bit weights are unpacked to for each matrix product.",
        "quantization"))

    def problems(self) -> list[str]:
        """Lists every problem of these settings (types and choices)."""
        return _field_problems(self)

    def check(self) -> None:
        """Raises one :class:`SettingsError` listing every problem, if there is any; warns about settings
        that will have no effect (:meth:`ignored`)."""
        _raise_if(self.problems())
        _warn(self.ignored())

    def ignored(self) -> list[str]:
        """Settings that are allowed but will have no effect as set, each with what to do."""
        if _field_problems(self) or self.load_in == "4bit":
            return []
        changed = [s.name for s in field_specs(self)
                   if s.name.startswith("bnb_4bit_") and getattr(self, s.name) != s.default]
        if not changed:
            return []
        return [f"{', '.join(changed)} have no effect with load_in {self.load_in!r}: they apply to 4-bit loading "
                "only; set load_in to '4bit' or leave them at their defaults"]

    def to_bnb(self) -> transformers.BitsAndBytesConfig | None:
        """Builds the ``transformers.BitsAndBytesConfig``, or None for ``load_in='none'``.

        Raises:
            SettingsError: When transformers refuses the settings.
        """
        kwargs = self.bnb_kwargs()
        if kwargs is None:
            return None
        if "bnb_4bit_compute_dtype" in kwargs:
            kwargs["bnb_4bit_compute_dtype"] = getattr(torch, kwargs["bnb_4bit_compute_dtype"])
        try:
            return transformers.BitsAndBytesConfig(**kwargs)
        except (ValueError, TypeError) as err:
            raise SettingsError(f"transformers refused the quantization settings: {err}; change the setting it "
                                "names, or set load_in to 'none'") from err

    def bnb_kwargs(self) -> dict[str, Any] | None:
        """The ``BitsAndBytesConfig`` keyword arguments :meth:`to_bnb` uses (the compute dtype by its torch
        name), or None for ``load_in='none'``; also used to write code."""
        if self.load_in == "none":
            return None
        if self.load_in == "8bit":
            return {"load_in_8bit": True}
        return {"load_in_4bit": True, "bnb_4bit_quant_type": self.bnb_4bit_quant_type,
                "bnb_4bit_use_double_quant": self.bnb_4bit_use_double_quant,
                "bnb_4bit_compute_dtype": self.bnb_4bit_compute_dtype}


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TrainSettings:
    """How the adapter is trained: optimizer, schedule, batches, precision, logging."""

    learning_rate: float = field(default=2e-4, metadata=_meta(
        "Peak learning rate of the adapter weights. LoRA tolerates more than full fine-tuning: 5e-5 to 2e-4 "
        "for billion-parameter models, up to 1e-3 for short runs on small ones.",
        "optimizer", min=1e-7, max=1.0, recommended=(5e-5, 1e-3), axolotl="learning_rate"))
    num_train_epochs: float = field(default=1.0, metadata=_meta(
        "Passes over the training data (fractions allowed); ignored when max_steps > 0. More than 3 "
        "usually overfits.",
        "schedule", min=0.01, max=100.0, recommended=(1, 3), axolotl="num_epochs"))
    max_steps: int = field(default=-1, metadata=_meta(
        "Optimizer steps to run; -1 = use num_train_epochs instead.",
        "schedule", min=-1, axolotl="max_steps"))
    per_device_train_batch_size: int = field(default=4, metadata=_meta(
        "Examples per forward/backward pass. Memory for activations grows with it.",
        "batch", min=1, max=1024, axolotl="micro_batch_size"))
    gradient_accumulation_steps: int = field(default=1, metadata=_meta(
        "Passes whose gradients are summed before one optimizer step: effective batch = batch size x this, "
        "without the memory of a larger batch.",
        "batch", min=1, max=1024, axolotl="gradient_accumulation_steps"))
    warmup_steps: int = field(default=0, metadata=_meta(
        "Steps over which the learning rate rises linearly from 0 to its peak. Use this or warmup_ratio.",
        "schedule", min=0, axolotl="warmup_steps"))
    warmup_ratio: float = field(default=0.0, metadata=_meta(
        "Warmup as a fraction of all steps (0.05-0.1 is usual). Use this or warmup_steps.",
        "schedule", min=0.0, max=0.99, recommended=(0.0, 0.1), axolotl="warmup_ratio"))
    lr_scheduler_type: LrScheduler = field(default="linear", metadata=_meta(
        "How the learning rate moves after warmup: 'linear' decay to 0, 'cosine', 'constant', ...",
        "schedule", axolotl="lr_scheduler"))
    weight_decay: float = field(default=0.0, metadata=_meta(
        "Decoupled weight decay of the adapter weights (AdamW): pulls them towards 0; 0.01 is a usual start.",
        "optimizer", min=0.0, max=1.0, recommended=(0.0, 0.1), axolotl="weight_decay"))
    max_grad_norm: float = field(default=1.0, metadata=_meta(
        "Gradient clipping: the gradient is rescaled when its norm exceeds this; 0 = no clipping.",
        "optimizer", min=0.0, max=100.0, axolotl="max_grad_norm"))
    max_seq_length: int = field(default=512, metadata=_meta(
        "Longest example in tokens; longer ones are cut. Activation memory grows with it.",
        "data", min=8, max=131072, axolotl="sequence_len"))
    seed: int = field(default=42, metadata=_meta(
        "Seed of every random choice (adapter init, dropout, data order), for repeatable runs.",
        "reproducibility", min=0, max=2**32 - 1, axolotl="seed"))
    gradient_checkpointing: bool = field(default=False, metadata=_meta(
        "Recompute activations in the backward pass instead of storing them: much less activation "
        "memory, about 20-30% slower steps.",
        "memory", axolotl="gradient_checkpointing"))
    optim: Optimizer = field(default="adamw_torch", metadata=_meta(
        "Optimizer. AdamW keeps 2 fp32 states per trainable weight (8 bytes); the 8-bit variants "
        "(bitsandbytes) 2 bytes; 'paged_' ones move states to CPU RAM under GPU memory pressure; "
        "'sgd' keeps none here.",
        "optimizer", axolotl="optimizer"))
    loraplus_lr_ratio: Union[float, None] = field(default=None, metadata=_meta(
        "LoRA+: the B matrices learn this many times faster than the A matrices (learning_rate is A's), "
        "through peft's create_loraplus_optimizer with the optimizer chosen in optim. The LoRA+ paper "
        "suggests 16 (axolotl's docs: 2^4), often with a learning rate about half the usual. null = plain "
        "LoRA, one learning rate.",
        "optimizer", min=1.0, max=1024.0, recommended=(2, 32), axolotl="loraplus_lr_ratio"))
    loraplus_lr_embedding: float = field(default=1e-6, metadata=_meta(
        "LoRA+: learning rate of LoRA adapters on embedding layers (peft's default 1e-6); used only with "
        "loraplus_lr_ratio.",
        "optimizer", min=1e-8, max=1e-2, axolotl="loraplus_lr_embedding"))
    precision: Literal["auto", "fp32", "bf16", "fp16"] = field(default="auto", metadata=_meta(
        "Compute precision of training: 'auto' = bf16 on a CUDA GPU that supports it, else fp32; "
        "'fp16' needs a CUDA GPU.",
        "memory"))
    logging_steps: int = field(default=10, metadata=_meta(
        "Record the training loss every this many steps.",
        "logging", min=1, axolotl="logging_steps"))
    eval_steps: Union[int, None] = field(default=None, metadata=_meta(
        "Evaluate on the held-out split every this many steps; null = no evaluation during training.",
        "logging", min=1, axolotl="eval_steps"))
    save_steps: Union[int, None] = field(default=50, metadata=_meta(
        "Save a resumable checkpoint (adapter, optimizer, scheduler, RNG) every this many steps, so a "
        "crashed or disconnected run loses at most this many steps; null = no checkpoints during training "
        "(Ctrl+C still saves one).",
        "logging", min=1, axolotl="save_steps"))
    save_total_limit: Union[int, None] = field(default=2, metadata=_meta(
        "Keep at most this many checkpoints (older ones are deleted); null = keep all.",
        "logging", min=1, axolotl="save_total_limit"))
    train_on_responses_only: bool = field(default=True, metadata=_meta(
        "Compute the loss on the answer tokens only (the prompt is masked), so the model learns to answer "
        "rather than to repeat prompts.",
        "data"))
    group_by_length: bool = field(default=True, metadata=_meta(
        "Batch examples of similar length together: less padding, faster steps (measured 1.58x real "
        "tokens/s on chats of 20-400 tokens on CPU; benchmarks/results/report.md). Used when batches are "
        "padded, i.e. padding_free is off or the model cannot take packed rows.",
        "data", axolotl="group_by_length"))
    padding_free: bool = field(default=True, metadata=_meta(
        "Put each batch's examples one after another in a single row, with no padding, each example still "
        "attending only to itself (position_ids restart per example): no compute goes to padding. Checked on "
        "the model before training; a model that cannot take packed rows falls back to padded batches with "
        "a warning. Loss and gradients are those of the same examples padded (tests/test_batching.py).",
        "data"))

    def problems(self) -> list[str]:
        """Lists every problem of these settings."""
        found = _field_problems(self)
        if not found and self.warmup_steps > 0 and self.warmup_ratio > 0:
            found.append(f"warmup_steps {self.warmup_steps} and warmup_ratio {self.warmup_ratio:g} are both set: "
                         "set one of them to 0")
        if not found and self.max_steps == 0:
            found.append("max_steps must be -1 (train num_train_epochs passes) or at least 1, got 0 "
                         "(transformers would still run a step); set the number of optimizer steps to run")
        return found

    def check(self) -> None:
        """Raises one :class:`SettingsError` listing every problem, if there is any; warns about settings
        that will have no effect (:meth:`ignored`)."""
        _raise_if(self.problems())
        _warn(self.ignored())

    def ignored(self) -> list[str]:
        """Settings that are allowed but will have no effect (or another effect) as set, each with what to do."""
        if self.problems():
            return []
        notes = []
        steps = self.max_steps
        epochs_default = next(s.default for s in field_specs(TrainSettings) if s.name == "num_train_epochs")
        if steps > 0 and self.num_train_epochs != epochs_default:
            notes.append(f"num_train_epochs {self.num_train_epochs:g} has no effect: max_steps {steps} decides the "
                         "length of the run; set max_steps to -1 to train by epochs")
        warmup = self.warmup_steps > 0 or self.warmup_ratio > 0
        if warmup and self.lr_scheduler_type == "constant":
            notes.append("lr_scheduler_type 'constant' ignores warmup_steps and warmup_ratio (transformers builds "
                         "it without warmup): use 'constant_with_warmup', or set the warmup to 0")
        if steps > 0 and self.warmup_steps >= steps:
            notes.append(f"warmup_steps {self.warmup_steps} >= max_steps {steps}: the learning rate never reaches "
                         f"its peak {self.learning_rate:g}; use fewer warmup steps")
        embedding_default = next(s.default for s in field_specs(TrainSettings) if s.name == "loraplus_lr_embedding")
        if self.loraplus_lr_ratio is None and self.loraplus_lr_embedding != embedding_default:
            notes.append(f"loraplus_lr_embedding {self.loraplus_lr_embedding:g} has no effect: it is used only with "
                         "loraplus_lr_ratio (null); set loraplus_lr_ratio, or leave it at its default")
        if steps > 0 and self.logging_steps > steps:
            notes.append(f"logging_steps {self.logging_steps} > max_steps {steps}: no training loss is recorded "
                         "during the run; set logging_steps to at most max_steps")
        if steps > 0 and self.eval_steps is not None and self.eval_steps > steps:
            notes.append(f"eval_steps {self.eval_steps} > max_steps {steps}: no evaluation runs during training; "
                         "set eval_steps to at most max_steps, or to null")
        return notes

    def advice(self) -> list[str]:
        """Lists settings that are allowed but unusual, with the reason (not errors)."""
        if _field_problems(self):
            return []
        tips = []
        lo, hi = field_specs(TrainSettings)[0].recommended
        if not lo <= self.learning_rate <= hi:
            tips.append(f"learning_rate {self.learning_rate:g} is outside the usual {lo:g} to {hi:g}")
        if self.max_steps < 0 and self.num_train_epochs > 3:
            tips.append(f"num_train_epochs {self.num_train_epochs:g} > 3 often overfits a small data set")
        if self.warmup_ratio > 0.2:
            tips.append(f"warmup_ratio {self.warmup_ratio:g} spends a large share of the run warming up")
        return tips + self.ignored()

    def to_training_args(self, output_dir: str, with_eval: bool = True,
                         **overrides: Any) -> transformers.TrainingArguments:
        """Builds the ``transformers.TrainingArguments``.

        CPU-only machines get ``use_cpu=True``; precision 'auto' becomes bf16 on a CUDA GPU that
        supports it, else fp32. Columns are kept (the kit's collator needs them), nothing is
        reported to external services, and ``warmup_ratio`` is passed as transformers 5 expects it
        (a float below 1 in ``warmup_steps``).

        Args:
            output_dir: Folder for checkpoints.
            with_eval: Whether the run has held-out data (without it nothing is evaluated).
            **overrides: TrainingArguments keywords that replace the derived ones.

        Returns:
            The training arguments.

        Raises:
            SettingsError: When transformers refuses the arguments.
        """
        precision = self.resolved_precision()
        kwargs: dict[str, Any] = {
            "output_dir": str(output_dir), "learning_rate": self.learning_rate,
            "num_train_epochs": self.num_train_epochs, "max_steps": self.max_steps,
            "per_device_train_batch_size": self.per_device_train_batch_size,
            "per_device_eval_batch_size": self.per_device_train_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "warmup_steps": self.warmup_ratio if self.warmup_ratio > 0 else self.warmup_steps,
            "lr_scheduler_type": self.lr_scheduler_type, "weight_decay": self.weight_decay,
            "max_grad_norm": self.max_grad_norm, "seed": self.seed, "data_seed": self.seed,
            "optim": self.optim, "bf16": precision == "bf16", "fp16": precision == "fp16",
            "use_cpu": not cuda_available(), "logging_steps": self.logging_steps,
            "remove_unused_columns": False, "report_to": "none",
            "train_sampling_strategy": "group_by_length" if self.group_by_length else "random",
            "save_strategy": "no" if self.save_steps is None else "steps",
            "eval_strategy": "no" if self.eval_steps is None or not with_eval else "steps",
            "save_total_limit": self.save_total_limit,
        }
        if self.save_steps is not None:
            kwargs["save_steps"] = self.save_steps
        if self.eval_steps is not None:
            kwargs["eval_steps"] = self.eval_steps
        if self.gradient_checkpointing:
            kwargs |= _checkpointing_arguments()
        kwargs |= overrides
        try:
            return transformers.TrainingArguments(**kwargs)
        except (ValueError, TypeError, ImportError) as err:
            raise SettingsError(f"transformers refused the training settings: {err}; change the setting it names") from err

    def make_optimizer(self, model: torch.nn.Module,
                       args: transformers.TrainingArguments) -> torch.optim.Optimizer | None:
        """The LoRA+ optimizer for a peft model, or None (the Trainer then builds its usual one).

        Pass the result to the Trainer as ``optimizers=(settings.train.make_optimizer(model, args), None)``.

        Args:
            model: The peft model (after ``get_peft_model``).
            args: The training arguments (:meth:`to_training_args`): their optimizer class and settings are used.

        Returns:
            peft's ``create_loraplus_optimizer`` result when ``loraplus_lr_ratio`` is set, else None.
        """
        if self.loraplus_lr_ratio is None:
            return None
        optimizer_cls, kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(args, model)
        kwargs = {k: v for k, v in kwargs.items() if k != "lr"} | {"loraplus_weight_decay": self.weight_decay,
                                                                   "loraplus_lr_embedding": self.loraplus_lr_embedding}
        return peft.optimizers.create_loraplus_optimizer(model, optimizer_cls, lr=self.learning_rate,
                                                         loraplus_lr_ratio=self.loraplus_lr_ratio, **kwargs)

    def resolved_precision(self) -> Literal["fp32", "bf16", "fp16"]:
        """The precision training will use: 'auto' resolved for this machine."""
        if self.precision != "auto":
            return self.precision
        return "bf16" if bf16_supported() else "fp32"


# ---------------------------------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------------------------------

SECTIONS = {"lora": LoraSettings, "quant": QuantSettings, "train": TrainSettings}


def _checkpointing_arguments() -> dict[str, Any]:
    """TrainingArguments keywords for non-reentrant gradient checkpointing, in the installed version's names.

    transformers renamed ``gradient_checkpointing`` to ``activation_checkpointing`` during 5.x (5.17 has
    only the old name; 5.24 keeps it as a deprecated alias until v6). The kit supports 5.0 and later,
    so it asks which name the installed version has.
    """
    names = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {name: True, f"{name}_kwargs": {"use_reentrant": False}}


@dataclass
class KitSettings:
    """Every setting of a fine-tuning run: the base model and the lora / quant / train sections."""

    model_name_or_path: str = field(default="HuggingFaceTB/SmolLM2-135M-Instruct", metadata=_meta(
        "Base model: a Hugging Face hub id or a local folder.",
        "model", axolotl="base_model"))
    lora: LoraSettings = field(default_factory=LoraSettings, metadata=_meta("The adapter.", "sections"))
    quant: QuantSettings = field(default_factory=QuantSettings, metadata=_meta("Base weight storage.", "sections"))
    train: TrainSettings = field(default_factory=TrainSettings, metadata=_meta("The training run.", "sections"))

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-ready) of every setting."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> KitSettings:
        """Builds settings from a nested dict; missing keys keep their default.

        Numbers written as text (pyyaml reads ``2e-4`` as a string) are read as numbers for
        number fields. Values are not range-checked here: call :meth:`check`.

        Args:
            data: ``{"model_name_or_path": ..., "lora": {...}, "quant": {...}, "train": {...}}``.

        Returns:
            The settings.

        Raises:
            SettingsError: On unknown keys, or a section that is not a mapping.
        """
        if not isinstance(data, dict):
            raise SettingsError(f"settings must be a mapping of sections (model_name_or_path, lora, quant, train), got "
                                f"{type(data).__name__}: {quote(data)}; pass a dict such as {{'lora': {{'r': 8}}}}")
        allowed = ["model_name_or_path", *SECTIONS]
        unknown = [k for k in data if k not in allowed]
        if unknown:
            raise SettingsError(f"unknown settings keys {quote(unknown)}: allowed keys are {allowed}; check their spelling")
        sections = {name: section_from_dict(sec_cls, data.get(name) or {}, name)
                    for name, sec_cls in SECTIONS.items()}
        return cls(**({"model_name_or_path": data["model_name_or_path"]} if "model_name_or_path" in data else {}),
                   **sections)

    def problems(self, model: torch.nn.Module | None = None, check_environment: bool = True) -> list[str]:
        """Lists every problem of the run's settings (empty when all is well).

        Args:
            model: When given, the LoRA targets are checked against it.
            check_environment: Also check that this machine can run them (GPU, bitsandbytes, scipy).

        Returns:
            One sentence per problem; section fields are named ``lora.r``, ``train.seed``, ...
        """
        found = value_problems(KitSettings, "model_name_or_path", self.model_name_or_path)
        if not found and not self.model_name_or_path.strip():
            found.append("model_name_or_path is empty (an unset shell variable?): give a hub ID such as "
                         "'HuggingFaceTB/SmolLM2-135M-Instruct' or a model folder")
        for name in SECTIONS:
            section = getattr(self, name)
            if not isinstance(section, SECTIONS[name]):
                found += value_problems(KitSettings, name, section)
                continue
            found += [f"{name}.{p}" for p in (section.problems(model) if name == "lora" else section.problems())]
        if not found:
            found += self._cross_problems()
            if check_environment:
                found += self._environment_problems()
        return found

    def check(self, model: torch.nn.Module | None = None, check_environment: bool = True) -> None:
        """Raises one :class:`SettingsError` listing every problem, if there is any; warns about settings
        that will have no effect (:meth:`ignored`)."""
        _raise_if(self.problems(model, check_environment))
        _warn(self.ignored())

    def ignored(self) -> list[str]:
        """Settings that are allowed but will have no effect as set (``section.`` prefixed), with what to do."""
        return [f"{name}.{note}" for name in SECTIONS for note in getattr(self, name).ignored()]

    def advice(self) -> list[str]:
        """Lists settings that are allowed but unusual, with the reason (not errors)."""
        tips = [f"lora.{t}" for t in self.lora.advice()] + [f"train.{t}" for t in self.train.advice()]
        tips += [f"quant.{t}" for t in self.quant.ignored()]
        if self.quant.load_in != "none" and not cuda_available():
            tips.append(f"quant.load_in {self.quant.load_in!r} without a CUDA GPU: bitsandbytes runs on CPU, but "
                        "steps are slower and small models save no memory")
        return tips

    def override(self, overrides: dict[str, Any]) -> None:
        """Sets fields by ``section.field`` name (``{"lora.r": 8, "train.learning_rate": 5e-4}``), in place.

        Values are not range-checked here: call :meth:`check`.

        Raises:
            SettingsError: On a name that is no field of the settings.
        """
        for key, value in overrides.items():
            section, _, name = str(key).rpartition(".")
            owner = getattr(self, section) if section in SECTIONS else self if not section else None
            if owner is None or name not in {s.name for s in field_specs(owner)} or name in SECTIONS:
                raise SettingsError(f"cannot override {quote(key)}: name a field as section.field, e.g. 'lora.r', "
                                    f"'train.learning_rate' (sections: {', '.join(SECTIONS)})")
            setattr(owner, name, value)

    def to_peft(self, model: torch.nn.Module | None = None) -> peft.LoraConfig:
        """Same as :meth:`LoraSettings.to_peft` for the ``lora`` section."""
        return self.lora.to_peft(model)

    def to_bnb(self) -> transformers.BitsAndBytesConfig | None:
        """Same as :meth:`QuantSettings.to_bnb` for the ``quant`` section."""
        return self.quant.to_bnb()

    def to_training_args(self, output_dir: str, with_eval: bool = True,
                         **overrides: Any) -> transformers.TrainingArguments:
        """Same as :meth:`TrainSettings.to_training_args` for the ``train`` section."""
        return self.train.to_training_args(output_dir, with_eval, **overrides)

    def _cross_problems(self) -> list[str]:
        if self.lora.init_lora_weights == "loftq" and self.quant.load_in != "none":
            return [f"lora.init_lora_weights 'loftq' quantizes the base model itself: set quant.load_in to 'none' "
                    f"(got {self.quant.load_in!r})"]
        return []

    def _environment_problems(self) -> list[str]:
        found = []
        if self.quant.load_in != "none" and not has_package("bitsandbytes"):
            found.append(f"quant.load_in {self.quant.load_in!r} needs the bitsandbytes package: install it, "
                         "or set quant.load_in to 'none'")
        if self.train.optim in BNB_OPTIMIZERS and not has_package("bitsandbytes"):
            found.append(f"train.optim {self.train.optim!r} needs the bitsandbytes package: install it, "
                         "or use 'adamw_torch'")
        if self.lora.init_lora_weights in DATA_INITS:
            found.append(f"lora.init_lora_weights {self.lora.init_lora_weights!r} needs a pass over the training data "
                         "before training, which the kit's training does not run yet: use 'default', or 'pissa' for "
                         "a start from the weights themselves")
        if self.lora.init_lora_weights == "loftq":
            if not cuda_available():
                found.append("lora.init_lora_weights 'loftq' needs a CUDA GPU (peft computes LoftQ on cuda): "
                             "use 'default' or 'pissa' here")
            if not has_package("scipy"):
                found.append("lora.init_lora_weights 'loftq' needs the scipy package: install it")
        if self.train.precision == "fp16" and not cuda_available():
            found.append("train.precision 'fp16' needs a CUDA GPU: use 'auto', 'bf16' or 'fp32' on CPU")
        if self.train.precision == "bf16" and cuda_available() and not bf16_supported():
            found.append("train.precision 'bf16' is not supported by this GPU: use 'fp16' or 'auto'")
        return found


def section_from_dict(cls: type, data: Any, label: str) -> Any:
    """Builds one settings section from a dict, reading numeric text as numbers for number fields.

    Args:
        cls: ``LoraSettings``, ``QuantSettings`` or ``TrainSettings``.
        data: Field name to value.
        label: Section name for messages.

    Returns:
        An instance of ``cls`` (not yet checked).

    Raises:
        SettingsError: When ``data`` is not a mapping or has unknown keys.
    """
    if not isinstance(data, dict):
        raise SettingsError(f"{label} must be a mapping of settings (key: value lines under '{label}:'), got "
                            f"{type(data).__name__}: {quote(data)}")
    specs = {s.name: s for s in field_specs(cls)}
    unknown = [k for k in data if k not in specs]
    if unknown:
        raise SettingsError(f"unknown {label} keys {quote(unknown)}: allowed keys are {list(specs)}; check their spelling")
    return cls(**{k: _coerce(v, specs[k].type) for k, v in data.items()})


def _coerce(value: Any, tp: Any) -> Any:
    """Reads text like '2e-4' as a float for a float field (pyyaml follows YAML 1.1 here)."""
    if tp is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


# ---------------------------------------------------------------------------------------------------------------
# Generation (evaluation): not part of a run's settings file, but checked the same way at every front door
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class GenerationSettings:
    """How the evaluation generates answers: checked before any model is loaded or trained."""

    max_new_tokens: int = field(default=40, metadata=_meta(
        "Longest generated answer, in tokens.",
        "generation", min=1, max=8192))
    limit: Union[int, None] = field(default=None, metadata=_meta(
        "Evaluate on the first this many held-out examples only; null = all of them.",
        "generation", min=1))

    def problems(self) -> list[str]:
        """Lists every problem of these settings."""
        return _field_problems(self)

    def check(self) -> None:
        """Raises one :class:`SettingsError` listing every problem, if there is any."""
        _raise_if(self.problems())

