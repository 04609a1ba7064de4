"""Formats: read and write settings in the forms users meet, and write them as Python code.

Forms, one :class:`Format` entry each in :data:`FORMATS` (reader, writer, title, default file name,
detector); adding a form is adding one entry, which the configurator's export tabs pick up:

- ``kit``: the kit's own YAML, every :class:`~lora_nb.settings.KitSettings` field, each key preceded by a
  ``# help (type: ..., default: ...)`` comment generated from the field metadata;
- ``axolotl``: axolotl's flat keys (``adapter: lora``, ``lora_r``, ``lora_target_linear``, ``micro_batch_size``...);
  a field's axolotl name is in its metadata (:data:`AXOLOTL_KEYS` is read from it); the keys whose meaning is
  more than a rename are read by hand;
- ``lora``: a nested ``lora:`` section whose keys are ``peft.LoraConfig`` arguments (the fields marked ``peft``);
- ``peft``: peft's ``adapter_config.json``;
- ``python``: code that builds the same ``LoraConfig`` (written only).

:func:`load_settings` detects the form. Keys the kit does not know are returned in
``LoadResult.unknown_keys`` (never dropped silently, never an error); empty values mean "default".
:func:`save_settings` writes atomically and returns what the chosen form could not carry.
"""

from __future__ import annotations

import dataclasses
import json
import os
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import peft
from peft.tuners.lora.config import CordaConfig, EvaConfig
import yaml

from .errors import ConfigFileError, SettingsError, quote
from .files import write_text_atomic
from .settings import ALL_LINEAR, SECTIONS, KitSettings, LoraSettings, QuantSettings, field_specs, value_problems

Form = str  # the name of a FORMATS entry: "kit", "axolotl", "lora", "peft", "python"


def _axolotl_keys() -> dict[str, tuple[str, str]]:
    """axolotl key -> (kit section or "" for top level, kit field), from the fields' ``axolotl`` metadata."""
    owners = {"": KitSettings, **SECTIONS}
    return {spec.axolotl: (section, spec.name) for section, cls in owners.items() for spec in field_specs(cls)
            if spec.axolotl}


# axolotl keys that are plain renames of kit fields (read from the field metadata).
AXOLOTL_KEYS: dict[str, tuple[str, str]] = _axolotl_keys()
# axolotl keys read by hand: what they mean needs more than a rename.
AXOLOTL_SPECIAL = ("adapter", "lora_target_linear", "lora_target_modules", "load_in_4bit", "load_in_8bit",
                   "train_on_inputs", "bf16", "fp16", "peft_layers_pattern", "peft", "peft_init_lora_weights",
                   "batch_size", "lora_dropout")
# peft bookkeeping keys of adapter_config.json that are not training settings.
PEFT_BOOKKEEPING = ("peft_type", "peft_version", "auto_mapping", "inference_mode", "base_model_name_or_path")
# Bounds on what is read: settings files are a few KB. YAML aliases (*a) repeat what an anchor (&a) names, so a
# small file can stand for billions of values ("billion laughs"); the reader counts values with aliases expanded.
MAX_SETTINGS_CHARS = 200_000
MAX_SETTINGS_VALUES = 100_000
_DATA_INIT_CONFIGS = {"eva_config": EvaConfig, "corda_config": CordaConfig}  # peft's defaults are the kit's
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when present: about 5x faster


@dataclass
class LoadResult:
    """What :func:`load_settings` read.

    Attributes:
        settings: The settings (checked for types and ranges, not against a model).
        unknown_keys: Keys of the file the kit does not use, with their values (``lora.x`` for nested ones).
        form: The detected form: ``kit``, ``axolotl``, ``lora`` or ``peft``.
    """

    settings: KitSettings
    unknown_keys: dict[str, Any]
    form: Form


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------


def load_settings(source: str | os.PathLike) -> LoadResult:
    """Reads settings from a file or from YAML/JSON text, detecting the form.

    Args:
        source: A path (``Path``, or a one-line string naming a file or ending in .yaml/.yml/.json),
            or the text itself.

    Returns:
        The settings, the keys kept aside, and the form.

    Raises:
        ConfigFileError: When the file is missing, is not YAML/JSON, is not a mapping or its form is unknown.
        SettingsError: When values have the wrong type or range (the message names the key and value).
    """
    text = _read(source)
    data = _parse(text)
    if isinstance(source, str) and not isinstance(data, (dict, list)) and "\n" not in source.strip():
        raise ConfigFileError(
            f"{quote(source)} is neither a settings file that exists nor settings text (YAML/JSON key: value "
            f"lines): check the path (a relative one starts at {os.getcwd()}), or pass the text itself")
    return settings_from_mapping(data)


def load_settings_text(text: str, where: str = "the settings") -> LoadResult:
    """Reads settings from YAML/JSON text only: never opens a file, whatever the text says (for uploads).

    Args:
        text: The text of a settings file.
        where: How messages name it (e.g. ``upload 'my.yaml'``).

    Raises:
        ConfigFileError, SettingsError: As :func:`load_settings`.
    """
    if not isinstance(text, str):
        raise ConfigFileError(f"{where} must be text, got {type(text).__name__}: pass the file's content as a str")
    return settings_from_mapping(_parse(text, where))


def settings_from_mapping(data: Any) -> LoadResult:
    """Builds settings from an already parsed mapping in any form (see :func:`detect_form`).

    Raises:
        ConfigFileError: When ``data`` is not a mapping or its form is unknown.
        SettingsError: When values have the wrong type or range.
    """
    form = detect_form(data)
    settings, unknown = FORMATS[form].read(data)
    settings.check(check_environment=False)
    return LoadResult(settings=settings, unknown_keys=unknown, form=form)


def detect_form(data: Any) -> Form:
    """Tells which form a parsed mapping is in.

    ``peft`` has ``peft_type``; ``kit`` has a ``quant`` or ``train`` section or ``model_name_or_path``;
    ``lora`` has a ``lora:`` mapping; ``axolotl`` has ``adapter`` or ``lora_*`` keys.

    Raises:
        ConfigFileError: When ``data`` is not a mapping or matches no form.
    """
    if not isinstance(data, dict):
        raise ConfigFileError(f"settings must be a mapping of keys to values (key: value lines), got "
                              f"{type(data).__name__}: {quote(data)}; write one setting per line, e.g. 'lora_r: 16'")
    keys = {k for k in data if isinstance(k, str)}
    for fmt in sorted((f for f in FORMATS.values() if f.read is not None), key=lambda f: f.detect_rank):
        if fmt.detect(keys, data):
            return fmt.name
    raise ConfigFileError(f"cannot tell the settings form from the keys {quote(sorted(map(str, data)))}: expected the "
                          "kit's sections (lora/quant/train), an axolotl file (adapter, lora_r, ...), a 'lora:' "
                          "section, or a peft adapter_config.json (peft_type)")


def _is_peft(keys: set[str], data: dict) -> bool:
    return "peft_type" in keys


def _is_kit(keys: set[str], data: dict) -> bool:
    return bool(keys & {"quant", "train", "model_name_or_path"})


def _is_lora(keys: set[str], data: dict) -> bool:
    return isinstance(data.get("lora"), dict)


def _is_axolotl(keys: set[str], data: dict) -> bool:
    return bool(keys & ({"adapter"} | set(AXOLOTL_SPECIAL) | {k for k in AXOLOTL_KEYS if k.startswith(("lora_", "peft_"))}))


def _read(source: str | os.PathLike) -> str:
    if isinstance(source, (str, os.PathLike)) and not str(source).strip() or (
            isinstance(source, os.PathLike) and str(source) == "."):  # Path("") is "."
        raise ConfigFileError("the settings path is empty (an unset shell variable?): give a .yaml/.yml/.json "
                              "file, or leave the option out to use a preset")
    if isinstance(source, os.PathLike) or _looks_like_path(source):
        path = Path(source)
        try:
            if path.is_dir():
                raise ConfigFileError(f"settings file {quote(str(source))} is a folder: give the .yaml/.yml/.json "
                                      "file inside it")
            size = path.stat().st_size
            if size > MAX_SETTINGS_CHARS:
                raise ConfigFileError(f"settings file {quote(str(source))} holds {size:,} bytes, more than a settings "
                                      f"file's {MAX_SETTINGS_CHARS:,}: check that it is the settings file")
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise ConfigFileError(f"settings file {quote(str(source))} is not UTF-8 text (byte at offset "
                                  f"{err.start}): save it as UTF-8 and try again") from err
        except OSError as err:
            raise ConfigFileError(f"cannot read settings file {quote(str(source))}: {err.strerror or err}; check "
                                  f"the path (a relative one starts at {os.getcwd()})") from err
        return text
    if not isinstance(source, str):
        raise ConfigFileError(f"expected a path or YAML/JSON text, got {type(source).__name__}: pass a file path "
                              "or the text of the settings")
    return source


def _looks_like_path(source: Any) -> bool:
    if not isinstance(source, str) or "\n" in source or "\0" in source or len(source) > 4096:
        return False
    try:
        return source.endswith((".yaml", ".yml", ".json")) or os.path.isfile(source)
    except (OSError, ValueError):
        return False


def _parse(text: str, where: str = "the settings") -> Any:
    """YAML/JSON text to Python values, refusing text too long and aliases that expand too far."""
    if len(text) > MAX_SETTINGS_CHARS:
        raise ConfigFileError(f"{where} hold {len(text):,} characters, more than a settings file's "
                              f"{MAX_SETTINGS_CHARS:,}: check that this is the settings file")
    loader = _LOADER(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_SETTINGS_VALUES:
            raise ConfigFileError(
                f"{where} expand to more than {MAX_SETTINGS_VALUES:,} values through YAML aliases (*name repeats "
                "what &name marks), or refer to themselves: a settings file needs a few dozen; write the values "
                "out instead of aliasing them")
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        raise ConfigFileError(f"{where} are not valid YAML/JSON: {_short(str(err), 300)}; fix the line it names") from err
    except RecursionError as err:
        raise ConfigFileError(f"{where} are nested too deeply to be read: a settings file has at most a few "
                              "levels (section: key: value)") from err
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many values ``node`` stands for with every alias expanded (each shared node counted once per use)."""
    if id(node) in sizes:
        return sizes[id(node)]
    sizes[id(node)] = MAX_SETTINGS_VALUES + 1  # a node met again while counting refers to itself
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    else:
        children = []
    total = 1
    for child in children:
        total += _expanded_size(child, sizes)
        if total > MAX_SETTINGS_VALUES:
            break
    sizes[id(node)] = total
    return total


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_kit(data: dict) -> tuple[KitSettings, dict[str, Any]]:
    unknown = {str(k): v for k, v in data.items() if k not in ("model_name_or_path", *SECTIONS)}
    known: dict[str, Any] = {k: v for k, v in data.items() if k not in unknown and v is not None}
    for name, cls in SECTIONS.items():
        section = known.get(name)
        if isinstance(section, dict):
            fields = {s.name for s in field_specs(cls)}
            unknown |= {f"{name}.{k}": v for k, v in section.items() if k not in fields}
            known[name] = {k: v for k, v in section.items() if k in fields and v is not None}
    return KitSettings.from_dict(known), unknown


def _read_axolotl(data: dict) -> tuple[KitSettings, dict[str, Any]]:
    values: dict[str, dict[str, Any]] = {"": {}, "lora": {}, "quant": {}, "train": {}}
    unknown: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in data.items():
        if key in AXOLOTL_KEYS and value is not None:
            section, name = AXOLOTL_KEYS[key]
            value = _coerce_number(value, SECTIONS.get(section, KitSettings), name)
            problems += value_problems(SECTIONS.get(section, KitSettings), name, value, label=key)
            values[section][name] = value
        elif key not in AXOLOTL_KEYS and key not in AXOLOTL_SPECIAL:
            unknown[str(key)] = value
    problems += _read_axolotl_special(data, values)
    problems += _read_axolotl_peft(data, values, unknown)
    if problems:
        raise SettingsError(problems)
    return KitSettings.from_dict({**values.pop(""), **values}), unknown


_AXOLOTL_CHOICES: dict[str, tuple[Any, ...]] = {
    "adapter": ("lora", "qlora", None), "bf16": ("auto", True, False, None), "lora_target_linear": (True, False, None),
    "load_in_4bit": (True, False, None), "load_in_8bit": (True, False, None), "train_on_inputs": (True, False, None),
    "fp16": (True, False, None),
}


def _read_axolotl_special(data: dict, values: dict[str, dict[str, Any]]) -> list[str]:
    """The axolotl keys whose meaning is more than a rename, read as axolotl reads them.

    What axolotl does (its ``utils/schemas/peft.py`` and ``validation.py``, ``load_lora``): the adapted
    layers are the union of every linear layer (``lora_target_linear: true``) and ``lora_target_modules``;
    ``adapter: qlora`` needs ``load_in_4bit: true`` and refuses ``load_in_8bit``; 4/8-bit loading needs an
    adapter; ``lora_dropout`` is 0 when not given; ``batch_size`` and ``gradient_accumulation_steps`` exclude
    each other; ``peft_layers_pattern`` needs ``peft_layers_to_transform``.
    """
    problems = [f"{key} must be one of {', '.join(map(repr, allowed))}, got {quote(data.get(key))}"
                for key, allowed in _AXOLOTL_CHOICES.items()
                if not any(data.get(key) is a or (isinstance(a, str) and data.get(key) == a) for a in allowed)]
    targets = data.get("lora_target_modules")
    if isinstance(targets, str) and data.get("lora_target_linear") is not True:
        problems.append(f"lora_target_modules {quote(targets)} is one text, which peft reads as a regular expression "
                        "over whole module paths; the kit takes names: write a list such as [q_proj, v_proj]")
    elif targets is not None and not isinstance(targets, str) and not (
            isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        problems.append(f"lora_target_modules must be a list of module names, got {quote(targets)}")
    if problems:
        return problems
    problems += _axolotl_adapter(data, values)
    problems += _axolotl_targets(data, values)
    problems += _axolotl_batch(data, values)
    if data.get("train_on_inputs") is not None:
        values["train"]["train_on_responses_only"] = not data["train_on_inputs"]
    bf16, fp16 = data.get("bf16"), data.get("fp16")
    if bf16 in (True, "auto") and fp16 is True:
        problems.append(f"bf16 {_as_yaml(bf16)} and fp16 true are both set: training runs in one precision; keep "
                        "one of them (bf16 on GPUs that support it, else fp16) and set the other to false")
    elif bf16 == "auto":
        values["train"]["precision"] = "auto"
    elif bf16 is True:
        values["train"]["precision"] = "bf16"
    elif fp16 is True:
        values["train"]["precision"] = "fp16"
    elif bf16 is False or fp16 is False:
        values["train"]["precision"] = "fp32"
    return problems


def _as_yaml(value: Any) -> str:
    """A value as it reads in a YAML file: true / false / not set / the value."""
    return {True: "true", False: "false", None: "not set"}.get(value, quote(value)) if isinstance(
        value, (bool, type(None))) else quote(value)


def _axolotl_adapter(data: dict, values: dict[str, dict[str, Any]]) -> list[str]:
    adapter, four, eight = data.get("adapter"), data.get("load_in_4bit"), data.get("load_in_8bit")
    problems = []
    if adapter is None:
        problems.append("adapter is not set: axolotl then trains every weight of the model (full fine-tuning, and "
                        "it refuses load_in_4bit/load_in_8bit), which this kit does not do; set adapter: lora, or "
                        "adapter: qlora with load_in_4bit: true")
    if four and eight:
        problems.append("load_in_4bit and load_in_8bit are both true: choose one (4-bit for QLoRA)")
    elif adapter == "qlora" and eight:
        problems.append("adapter qlora with load_in_8bit true: QLoRA loads the base model in 4 bits (axolotl refuses "
                        "this too); set load_in_4bit: true and load_in_8bit: false, or use adapter: lora")
    elif adapter == "qlora" and not four:
        problems.append("adapter qlora needs load_in_4bit: true (axolotl refuses qlora without it); add it, or "
                        "use adapter: lora for a full-precision base")
    values["quant"]["load_in"] = "4bit" if four else "8bit" if eight else "none"
    if adapter is not None and data.get("lora_dropout") is None:
        values["lora"]["lora_dropout"] = 0.0  # axolotl's default, not the kit's
    elif data.get("lora_dropout") is not None:
        dropout = _coerce_number(data["lora_dropout"], LoraSettings, "lora_dropout")
        problems += value_problems(LoraSettings, "lora_dropout", dropout, label="lora_dropout")
        values["lora"]["lora_dropout"] = dropout
    return problems


def _axolotl_targets(data: dict, values: dict[str, dict[str, Any]]) -> list[str]:
    linear, names = data.get("lora_target_linear"), data.get("lora_target_modules")
    names = [names] if isinstance(names, str) else names  # with lora_target_linear, axolotl takes a text as one name
    if linear and names:
        values["lora"]["target_modules"] = [ALL_LINEAR, *[n for n in names if n != ALL_LINEAR]]  # axolotl's union
    elif linear:
        values["lora"]["target_modules"] = ALL_LINEAR
    elif names:
        values["lora"]["target_modules"] = list(names)
    elif linear is False or names == []:
        return [f"no layers to adapt: lora_target_linear is {_as_yaml(linear)} and lora_target_modules is "
                f"{_as_yaml(names)}; "
                "set lora_target_linear: true for every linear layer, or list the layers in lora_target_modules "
                "(e.g. [q_proj, v_proj])"]
    elif data.get("adapter") is not None:
        warnings.warn("neither lora_target_linear nor lora_target_modules is set (axolotl would adapt no layer): the "
                      "kit adapts every linear layer ('all-linear'); set one of them to choose", UserWarning, stacklevel=5)
    return []


def _axolotl_batch(data: dict, values: dict[str, dict[str, Any]]) -> list[str]:
    """axolotl's ``batch_size`` is the effective batch: micro_batch_size x gradient_accumulation_steps."""
    total = data.get("batch_size")
    if total is None:
        return []
    if data.get("gradient_accumulation_steps") is not None:
        return ["batch_size and gradient_accumulation_steps are both set (axolotl refuses this too): keep "
                "gradient_accumulation_steps, or keep batch_size = micro_batch_size x gradient_accumulation_steps"]
    micro = values["train"].get("per_device_train_batch_size")
    if not (isinstance(total, int) and not isinstance(total, bool) and isinstance(micro, int) and total > 0
            and total % micro == 0):
        return [f"batch_size {quote(total)} must be a positive multiple of micro_batch_size {quote(micro)} (it is "
                "micro_batch_size x gradient_accumulation_steps); set both, or gradient_accumulation_steps instead"]
    values["train"]["gradient_accumulation_steps"] = total // micro
    return []


def _read_axolotl_peft(data: dict, values: dict[str, dict[str, Any]], unknown: dict[str, Any]) -> list[str]:
    """axolotl's ``peft_layers_pattern`` is a list (the kit takes one name); ``peft.loftq_config`` means LoftQ;
    ``peft_init_lora_weights`` is peft's ``init_lora_weights``."""
    problems = []
    pattern = data.get("peft_layers_pattern")
    if isinstance(pattern, list) and len(pattern) == 1:
        pattern = pattern[0]
    if pattern is not None and not isinstance(pattern, str):
        problems.append(f"peft_layers_pattern must be one module-list name (or a list of one), got {quote(pattern)}")
    elif pattern is not None and data.get("peft_layers_to_transform") is None:
        problems.append("peft_layers_pattern needs peft_layers_to_transform (axolotl and peft refuse it alone): "
                        "list the blocks to adapt, or remove peft_layers_pattern")
    elif pattern is not None:
        values["lora"]["layers_pattern"] = pattern
    init = data.get("peft_init_lora_weights")
    choices = next(s.choices for s in field_specs(LoraSettings) if s.name == "init_lora_weights")
    if init is True:
        values["lora"]["init_lora_weights"] = "default"
    elif isinstance(init, str) and init in choices:
        values["lora"]["init_lora_weights"] = init
    elif init is not None:
        problems.append(f"peft_init_lora_weights {quote(init)} is not one the kit runs: use true (the default start, "
                        f"B = 0) or one of {', '.join(c for c in choices if c != 'default')}")
    peft_section = data.get("peft")
    if peft_section is None:
        return problems
    if not isinstance(peft_section, dict):
        return problems + [f"peft must be a mapping (e.g. loftq_config: {{loftq_bits: 4}}), got {quote(peft_section)}"]
    unknown |= {f"peft.{k}": v for k, v in peft_section.items() if k != "loftq_config"}
    loftq = peft_section.get("loftq_config")
    if isinstance(loftq, dict):
        values["lora"] |= {"init_lora_weights": "loftq", "loftq_bits": loftq.get("loftq_bits", 4)}
    elif loftq is not None:
        problems.append(f"peft.loftq_config must be a mapping like {{loftq_bits: 4}}, got {quote(loftq)}")
    return problems


def _coerce_number(value: Any, cls: type, name: str) -> Any:
    """pyyaml reads '2e-4' as text (YAML 1.1): read it as a number for number fields."""
    spec = next(s for s in field_specs(cls) if s.name == name)
    if spec.type is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _read_lora(data: dict) -> tuple[KitSettings, dict[str, Any]]:
    unknown = {str(k): v for k, v in data.items() if k != "lora"}
    lora, more = _lora_from_peft_kwargs(data["lora"], "lora.")
    return _kit_around(lora), unknown | more


def _read_peft(data: dict) -> tuple[KitSettings, dict[str, Any]]:
    if data.get("peft_type") != "LORA":
        raise ConfigFileError(f"peft_type must be 'LORA' for a LoRA adapter config, got {quote(data.get('peft_type'))}: "
                              "the kit trains LoRA adapters only; give a LoRA adapter_config.json")
    kwargs = {k: v for k, v in data.items() if k not in PEFT_BOOKKEEPING}
    lora, unknown = _lora_from_peft_kwargs(kwargs, "")
    model = data.get("base_model_name_or_path")
    return _kit_around(lora, **({"model_name_or_path": model} if model is not None else {})), unknown


def _kit_around(lora: LoraSettings, **top: Any) -> KitSettings:
    """Kit defaults around LoRA-only settings; LoftQ quantizes the model itself, so no quantized loading then."""
    quant = QuantSettings(load_in="none") if lora.init_lora_weights == "loftq" else QuantSettings()
    return KitSettings(**top, lora=lora, quant=quant)


def _lora_from_peft_kwargs(kwargs: Any, prefix: str) -> tuple[LoraSettings, dict[str, Any]]:
    """LoRA settings from ``peft.LoraConfig`` keyword arguments; other non-default arguments are returned aside."""
    if not isinstance(kwargs, dict):
        raise ConfigFileError(f"{prefix or 'the adapter config'} must be a mapping of LoraConfig arguments (r: 8, ...), "
                              f"got {type(kwargs).__name__}: {quote(kwargs)}")
    own = {s.name for s in field_specs(LoraSettings) if s.peft}
    peft_defaults = {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
                     for f in dataclasses.fields(peft.LoraConfig)}
    values: dict[str, Any] = {}
    unknown: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key == "loftq_config":
            if isinstance(value, dict) and "loftq_bits" in value:
                values["loftq_bits"] = value["loftq_bits"]
        elif key in ("eva_config", "corda_config") and kwargs.get("init_lora_weights") == key.removesuffix("_config"):
            unknown |= {} if _is_default(value, dataclasses.asdict(_DATA_INIT_CONFIGS[key]())) else {
                f"{prefix}{key}": value}  # peft's default settings of the method are the kit's
        elif key == "init_lora_weights":
            values[key] = "default" if value is True else value
        elif key in ("target_modules", "exclude_modules") and isinstance(value, list) and prefix == "":
            values[key] = sorted(value, key=str)  # peft stores a set: its order means nothing
        elif key in own:
            if value is not None:
                values[key] = value
        elif not (key in peft_defaults and _is_default(value, peft_defaults[key])):
            unknown[f"{prefix}{key}"] = value
    return dataclasses.replace(LoraSettings(), **{k: _coerce_number(v, LoraSettings, k) for k, v in values.items()}), unknown


def _is_default(value: Any, default: Any) -> bool:
    return value == default or (value in ({}, []) and default is None)


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


def save_settings(settings: KitSettings, path: str | os.PathLike, form: Form = "kit", model: Any = None) -> list[str]:
    """Writes settings to a file atomically (a temporary file, then ``os.replace``).

    Args:
        settings: The settings to write.
        path: Destination file.
        form: A :data:`FORMATS` name: ``kit`` (full, commented), ``axolotl``, ``lora``, ``peft``
            (adapter_config.json) or ``python``.
        model: The base model, to write 'all-linear' as its layer names where the form needs names.

    Returns:
        The settings the form cannot carry (``lora.bias='all'`` ...): reading the file back gives
        their defaults instead. Empty for the kit form and for forms that are written only (python).

    Raises:
        SettingsError: When the settings are invalid or the form is unknown.
        ConfigFileError: When the file cannot be written.
    """
    write_text_atomic(Path(path), dump_settings(settings, form, model), error=ConfigFileError)
    return lost_in_form(settings, form) if FORMATS[form].read is not None else []


def dump_settings(settings: KitSettings, form: Form = "kit", model: Any = None) -> str:
    """The text :func:`save_settings` writes.

    Raises:
        SettingsError: When the settings are invalid or the form is unknown.
    """
    if not isinstance(form, str) or form not in FORMATS:
        raise SettingsError(f"form must be one of {', '.join(FORMATS)}, got {quote(form)}: choose one of them")
    settings.check(check_environment=False)
    return FORMATS[form].write(settings, model)


def lost_in_form(settings: KitSettings, form: Form) -> list[str]:
    """Settings that differ from what reading ``dump_settings(settings, form)`` back gives."""
    back = flat_settings(settings_from_mapping(_parse(dump_settings(settings, form))).settings.to_dict())
    return [f"{key}={value!r}" for key, value in flat_settings(settings.to_dict()).items() if back[key] != value]


def flat_settings(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flattens nested settings to ``section.field`` keys, in a form where equal meaning is equal value:
    target lists sorted (peft keeps a set), one layer index as a list of one."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key in SECTIONS and not prefix:  # a section; dict-valued fields stay whole
            flat |= flat_settings(value, f"{prefix}{key}.")
        elif key in ("target_modules", "exclude_modules") and isinstance(value, list):
            flat[f"{prefix}{key}"] = sorted(value)
        elif key == "layers_to_transform" and isinstance(value, int):
            flat[f"{prefix}{key}"] = [value]
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _write_kit(settings: KitSettings, model: Any = None) -> str:
    lines = ["# lora-nb settings. Each key follows its help: what it does (type, default).", ""]
    lines += _commented_fields(settings, "")
    for name in SECTIONS:
        lines += ["", f"{name}:"] + _commented_fields(getattr(settings, name), "  ")
    return "\n".join(lines) + "\n"


def _commented_fields(obj: Any, indent: str) -> list[str]:
    lines = []
    for spec in field_specs(obj):
        if spec.name in SECTIONS:
            continue
        comment = f"{spec.help} (type: {spec.type_name}, default: {spec.default!r})"
        lines += textwrap.wrap(comment, width=100, initial_indent=f"{indent}# ", subsequent_indent=f"{indent}# ",
                               break_on_hyphens=False)
        lines.append(indent + _yaml_line(spec.name, getattr(obj, spec.name)))
    return lines


def _yaml_line(key: str, value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6)
    return f"{key}: {text.removesuffix(chr(10)).removesuffix('...').strip()}"


def _write_axolotl(settings: KitSettings, model: Any = None) -> str:
    lora, train = settings.lora, settings.train
    data: dict[str, Any] = {
        "base_model": settings.model_name_or_path,
        "adapter": "qlora" if settings.quant.load_in == "4bit" else "lora",
        "load_in_4bit": settings.quant.load_in == "4bit",
        "load_in_8bit": settings.quant.load_in == "8bit",
    }
    extra = [] if lora.target_modules == ALL_LINEAR else [t for t in lora.target_modules if t != ALL_LINEAR]
    if lora.target_modules == ALL_LINEAR or ALL_LINEAR in lora.target_modules:
        data["lora_target_linear"] = True  # axolotl adapts the union of all linear layers and the listed ones
    if extra:
        data["lora_target_modules"] = extra
    data["lora_dropout"] = lora.lora_dropout
    for key, (section, name) in AXOLOTL_KEYS.items():
        if section == "lora":
            data[key] = getattr(lora, name)
        elif section == "train":
            data[key] = getattr(train, name)
    if lora.layers_pattern is not None:
        data["peft_layers_pattern"] = [lora.layers_pattern]
    if isinstance(lora.layers_to_transform, int):
        data["peft_layers_to_transform"] = [lora.layers_to_transform]  # axolotl takes a list
    if lora.init_lora_weights == "loftq":
        data["peft"] = {"loftq_config": {"loftq_bits": lora.loftq_bits}}
    elif lora.init_lora_weights != "default":
        data["peft_init_lora_weights"] = lora.init_lora_weights
    data["train_on_inputs"] = not train.train_on_responses_only
    data |= {"auto": {"bf16": "auto"}, "bf16": {"bf16": True}, "fp16": {"fp16": True},
             "fp32": {"bf16": False, "fp16": False}}[train.precision]
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


def _write_lora(settings: KitSettings, model: Any = None) -> str:
    kwargs = _plain_peft_kwargs(settings.lora, model)
    return yaml.safe_dump({"lora": kwargs}, sort_keys=False, default_flow_style=False)


def _plain_peft_kwargs(lora: LoraSettings, model: Any = None) -> dict[str, Any]:
    """peft keyword arguments as plain YAML values (the method configs as mappings)."""
    return {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in lora.peft_kwargs(model).items()}


def _write_peft(settings: KitSettings, model: Any = None) -> str:
    data = settings.to_peft(model).to_dict()
    data["base_model_name_or_path"] = settings.model_name_or_path
    data = {k: sorted(v, key=str) if isinstance(v, set) else v for k, v in data.items()}
    return json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"


def to_python(settings: KitSettings | LoraSettings, model: Any = None) -> str:
    """Python code that builds the same ``peft.LoraConfig`` as ``settings.to_peft(model)``.

    With kit settings that load the base in 4 or 8 bits, the code also builds the same
    ``BitsAndBytesConfig`` as ``settings.to_bnb()``, loads the model with it, prepares it for k-bit
    training (as :func:`lora_nb.loading.load_model` does) and wraps it with the adapter.

    Args:
        settings: Kit or LoRA settings.
        model: The base model, to write 'all-linear' as its explicit layer names.

    Returns:
        A snippet defining ``lora_config`` (and ``bnb_config`` and ``model`` when quantized).
    """
    lora = settings.lora if isinstance(settings, KitSettings) else settings
    kwargs = _plain_peft_kwargs(lora, model)  # method configs (loftq_config ...) as mappings, which peft takes
    names = "LoraConfig"
    args = "".join(f"    {key}={value!r},\n" for key, value in kwargs.items())
    bnb = settings.quant.bnb_kwargs() if isinstance(settings, KitSettings) else None
    if bnb is None:
        return f"from peft import {names}\n\nlora_config = LoraConfig(\n{args})\n"
    bnb_args = "".join(f"    {key}=torch.{value},\n" if key == "bnb_4bit_compute_dtype" else f"    {key}={value!r},\n"
                       for key, value in bnb.items())
    return (
        f"import torch\nfrom peft import {names}, get_peft_model, prepare_model_for_kbit_training\n"
        "from transformers import AutoModelForCausalLM, BitsAndBytesConfig\n\n"
        f"bnb_config = BitsAndBytesConfig(\n{bnb_args})\n\nlora_config = LoraConfig(\n{args})\n\n\n"
        f"def load_for_training(model_name_or_path={settings.model_name_or_path!r}):\n"
        f"    \"\"\"The base model in {settings.quant.load_in}, prepared for k-bit training, with the LoRA adapter.\"\"\"\n"
        "    model = AutoModelForCausalLM.from_pretrained(\n"
        "        model_name_or_path,\n"
        "        quantization_config=bnb_config,\n"
        "        device_map='auto' if torch.cuda.is_available() else None,\n"
        "    )\n"
        "    model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={'use_reentrant': False})\n"
        "    return get_peft_model(model, lora_config)\n"
    )



# ---------------------------------------------------------------------------------------------------------------
# The registry: one entry per form. Adding a form is adding one entry here; readers, writers, the
# configurator's export tabs and its save buttons all iterate it.
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Format:
    """One form settings are written in (and, unless ``read`` is None, read from).

    Attributes:
        name: Short name, as passed to :func:`dump_settings` (``kit``, ``axolotl`` ...).
        title: How the configurator's tabs and buttons name it.
        file_name: Default file name in the run folder.
        write: ``(settings, model) -> text``; ``model`` (may be None) expands 'all-linear' where needed.
        read: ``mapping -> (settings, unknown keys)``, or None for a form that is written only.
        detect: ``(string keys, mapping) -> bool``: whether a parsed file is in this form.
        detect_rank: Order in which :func:`detect_form` asks the forms (lower first; most specific first).
    """

    name: str
    title: str
    file_name: str
    write: Callable[[KitSettings, Any], str]
    read: Callable[[dict], tuple[KitSettings, dict[str, Any]]] | None = None
    detect: Callable[[set[str], dict], bool] | None = None
    detect_rank: int = 0


def _write_python(settings: KitSettings, model: Any = None) -> str:
    return to_python(settings, model)


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("kit", "kit YAML", "configured.yaml", _write_kit, _read_kit, _is_kit, 1),
    Format("axolotl", "axolotl YAML", "configured-axolotl.yaml", _write_axolotl, _read_axolotl, _is_axolotl, 3),
    Format("lora", "lora: YAML", "configured-lora.yaml", _write_lora, _read_lora, _is_lora, 2),
    Format("peft", "peft JSON", "adapter_config.json", _write_peft, _read_peft, _is_peft, 0),
    Format("python", "Python", "configured_lora.py", _write_python),
)}
# The forms settings are read from (and round-trip through).
FORMS: tuple[Form, ...] = tuple(name for name, f in FORMATS.items() if f.read is not None)
