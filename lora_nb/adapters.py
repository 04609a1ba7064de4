"""Adapters: save, find, load and merge them; on a live model, find one already there, take it off,
and undo inits that rewrite the base.

Saving writes the adapter folder atomically (`save_adapter`); `find_adapter` accepts a run folder
or an adapter folder; `load_adapter` puts a saved adapter on a base model and checks it first (files
cut short, a base with other weights); `merge_adapter` merges into a full-precision copy of the
base: `merge_and_unload()` on a 4-bit base re-quantizes the merged weights, and the logits move
(measured on the demo model: up to 8.9, only 60% of next-token choices kept), so the base is
reloaded in full precision and the merged model is saved as a standalone folder that loads with
plain `AutoModelForCausalLM.from_pretrained`.

Two notebook habits leave a model that is no longer the plain base model:

- `get_peft_model` changes the model in place: its linear layers become LoRA layers. Re-running a
  training cell on the same `model` variable then wraps an already wrapped model.
- A model that already carries an adapter (a `PeftModel`, or one from `load_adapter`) would train
  that adapter while settings.yaml records other settings.

`base_model` answers both: it takes every adapter layer off and returns the base model, so each run
starts from the base with exactly the adapter its settings describe.

Some inits change the base weights themselves (peft's `pissa`, `pissa_niter_N`, `olora`, `corda`,
`lora_ga`, `loftq`): the adapter starts at the top singular directions of W and the base keeps the
residual, W = W_res + s B0 A0. Switching the adapter off then gives W_res, not the base model (on the
demo: held-out loss 15.9 instead of 0.55). The kit follows peft's documented way:

    initial adapter B0 A0 saved right after get_peft_model       (run_dir/initial_adapter/)
    trained adapter B A converted to a plain LoRA of rank 2r:    dW = B A - B0 A0 = [B | -B0] [A ; A0]
    base weights put back: W = W_res + s B0 A0

so the saved adapter applies to the original base model (merge, reload, share), and "before" with
the adapter off is the base model again.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import transpose
from safetensors.torch import load_file

from .demo import resolve_model
from .errors import ModelLoadError, RunFolderError, SettingsError
from .files import damaged_weights, write_folder_atomic
from .loading import load_model
from .model_checks import model_name
from .run_folder import (ADAPTER_CONFIG_FILE, ADAPTER_DIR, ADAPTER_WEIGHTS_FILE, INITIAL_ADAPTER_DIR, RUN_FILE,
                         RunFolder, weights_digest)

MERGE_RECORD = "lora-nb-merged.json"  # the kit's record in a merged model folder that it wrote the folder
# Inits of the installed peft that write into the base weights (peft/tuners/lora/layer.py: each
# `*_init` that assigns `get_base_layer().weight`). The first four peft can convert back to a
# plain LoRA (`path_initial_model_for_weight_conversion`); LoftQ it cannot.
CONVERTIBLE_INITS = ("pissa", "olora", "corda", "lora_ga")
_UNCONVERTIBLE_INITS = ("loftq",)


def rewrites_base_weights(init: Any) -> bool:
    """Whether a peft `init_lora_weights` value changes the base model's weights when the adapter is made.

    Args:
        init: The value (`True`, `"gaussian"`, `"pissa_niter_4"`, ...).
    """
    name = str(init).lower()
    return name.startswith("pissa") or name in CONVERTIBLE_INITS + _UNCONVERTIBLE_INITS


def has_adapter(model) -> bool:
    """Whether the model is a `PeftModel` or holds adapter layers injected by peft.

    Args:
        model: A transformers model or a `PeftModel`.
    """
    return isinstance(model, PeftModel) or any(isinstance(m, BaseTunerLayer) for m in model.modules())


def adapter_init(model) -> Any:
    """The `init_lora_weights` of the model's active adapter (None when it has none or peft does not say).

    Args:
        model: A `PeftModel`, or a model peft wrapped in place.
    """
    configs = getattr(model, "peft_config", None) or {}
    names = getattr(model, "active_adapters", None) or list(configs)
    for name in names if isinstance(names, list) else [names]:
        if name in configs:
            return getattr(configs[name], "init_lora_weights", None)
    return None


def base_model(model):
    """The model without any adapter: every LoRA layer replaced by the layer it wraps.

    A `PeftModel` is unwrapped; a plain model whose layers an earlier `get_peft_model` replaced in
    place (a re-run notebook cell) gets its own layers back. The weights are the base weights: the
    kit's `train` leaves no rewritten base behind (see `restore_base_weights`).

    Args:
        model: A `PeftModel`, a model with adapter layers, or a plain model (returned as it is).

    Returns:
        The base model (the same object for a plain model or one wrapped in place).

    Raises:
        SettingsError: the adapter came from an init that rewrote the base weights and was not
            undone by the kit, so the base model cannot be recovered from this object.
    """
    if not has_adapter(model):
        return model
    init = adapter_init(model)
    if rewrites_base_weights(init) and not getattr(model, "_lora_nb_base_restored", False):
        raise SettingsError(
            f"This model carries an adapter made with init_lora_weights {init!r}, which rewrote the base weights, "
            "so its base model cannot be recovered from it. Load the base model again (load_model) and pass that "
            "to train()."
        )
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    tuner_names = {key for key, m in inner.named_modules() if isinstance(m, BaseTunerLayer)}
    for key, target in list(inner.named_modules()):
        if not key or any(key.startswith(t + ".") for t in tuner_names):
            continue  # modules inside an adapter layer (lora_A, base_layer...) go with it
        parent_key, _, child = key.rpartition(".")
        parent = inner.get_submodule(parent_key) if parent_key else inner
        if hasattr(target, "unload_and_optionally_merge_module"):  # modules_to_save copies
            setattr(parent, child, target.unload_and_optionally_merge_module(merge=False, safe_merge=False,
                                                                              adapter_names=None))
        elif isinstance(target, BaseTunerLayer):
            setattr(parent, child, target.get_base_layer())
    if hasattr(inner, "peft_config"):
        del inner.peft_config  # peft reads it as "already wrapped" otherwise
    return inner


def check_init_supported(init: Any, model, use_dora: bool) -> None:
    """Refuse weight-rewriting inits where the kit cannot undo them faithfully.

    Args:
        init: The adapter's `init_lora_weights`.
        model: The base model the adapter goes on.
        use_dora: Whether the adapter is a DoRA one.

    Raises:
        SettingsError: on a 4-bit/8-bit base (the residual is re-quantized, so W cannot be put back
            exactly; PiSSA refuses it anyway), or with DoRA (peft's conversion drops the magnitude).
    """
    if not rewrites_base_weights(init) or str(init).lower() in _UNCONVERTIBLE_INITS:
        return
    quantized = getattr(getattr(model, "config", None), "quantization_config", None) is not None
    if quantized:
        raise SettingsError(
            f"lora.init_lora_weights {init!r} rewrites the base weights, which cannot be done faithfully on a "
            "quantized (4-bit/8-bit) base: set quant.load_in to 'none', or use init_lora_weights 'default'."
        )
    if use_dora:
        raise SettingsError(
            f"lora.init_lora_weights {init!r} with use_dora cannot be saved as an adapter of the original base "
            "model (peft's conversion drops DoRA's magnitude vectors): turn off use_dora or use init 'default'."
        )


def save_initial_adapter(peft_model, run_dir: Path) -> Path | None:
    """Save the adapter as made, before training, when its init rewrote the base (peft's documented first step).

    Args:
        peft_model: The `PeftModel` right after `get_peft_model`.
        run_dir: The run folder.

    Returns:
        The folder (`run_dir/initial_adapter`), or None when the init leaves the base alone.
    """
    init = adapter_init(peft_model)
    if not rewrites_base_weights(init) or str(init).lower() in _UNCONVERTIBLE_INITS:
        return None
    target = Path(run_dir) / INITIAL_ADAPTER_DIR
    config = peft_model.peft_config["default"]
    config.init_lora_weights = True  # so that loading it never runs the SVD/QR again on the residual
    try:
        save_adapter(peft_model, target)
    finally:
        config.init_lora_weights = init
    return target


def restore_base_weights(peft_model, initial_dir: Path) -> None:
    """Put W = W_res + s B0 A0 back into every adapted layer, from the saved initial adapter.

    Afterwards the base weights are the original ones and the live adapter is no longer the
    trained one: load the converted adapter (see `train`) or take it off with `base_model`.

    Args:
        peft_model: The trained `PeftModel` whose base holds W_res.
        initial_dir: The folder `save_initial_adapter` wrote.
    """
    initial = load_file(str(Path(initial_dir) / ADAPTER_WEIGHTS_FILE))
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
                continue
            key = name.removeprefix("base_model.model.")
            a0 = initial[f"base_model.model.{key}.lora_A.weight"].float()
            b0 = initial[f"base_model.model.{key}.lora_B.weight"].float()
            base = module.get_base_layer()
            delta = transpose(module.scaling["default"] * (b0 @ a0), module.fan_in_fan_out)
            base.weight.data = (base.weight.data.float() + delta.to(base.weight.device)).to(base.weight.dtype)
    peft_model._lora_nb_base_restored = True


def load_converted(base, adapter_dir: Path, trainable: bool = False):
    """The base model with the converted (plain LoRA) adapter put on, as `load_adapter` would.

    Args:
        base: The base model with its weights restored.
        adapter_dir: The converted adapter's folder.
        trainable: Keep the adapter weights trainable.

    Returns:
        The `PeftModel`.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)


def check_pristine_base(model) -> None:
    """Refuse "before" numbers from a model whose base weights an init rewrote and nobody put back.

    Args:
        model: The model about to answer with its adapter off.

    Raises:
        ModelLoadError: the adapter off would give the residual W_res, not the base model.
    """
    init = adapter_init(model)
    if rewrites_base_weights(init) and not getattr(model, "_lora_nb_base_restored", False):
        fix = ("peft cannot convert LoftQ back, so load the base model separately and compare the two "
               "(evaluate.compare_generations(base, tuned, ...))." if str(init).lower() in _UNCONVERTIBLE_INITS else
               "Train with lora_nb.train.train (it puts the base back), or load the base model fresh and put the "
               "saved adapter on it with adapters.load_adapter.")
        raise ModelLoadError(
            f"This model's adapter was made with init_lora_weights {init!r}, which rewrote the base weights: with "
            f"the adapter off it is not the base model, so 'before' numbers would be wrong. {fix}"
        )


# ---------------------------------------------------------------------------------------------------------------
# Saved adapters: save, find, load, merge
# ---------------------------------------------------------------------------------------------------------------


def save_adapter(model, target: str | Path, convert_from: Path | None = None) -> Path:
    """Save only the adapter weights and config (19.6 MB for the demo recipe: 4.9M fp32 parameters), atomically.

    The folder is written next to `target`, then swapped in.

    Args:
        model: A `PeftModel`.
        target: The adapter folder (replaced when it exists).
        convert_from: The initial adapter of an init that rewrote the base weights (PiSSA,
            OLoRA...): the adapter is saved converted to a plain LoRA of the original base model
            (peft's `path_initial_model_for_weight_conversion`).

    Returns:
        The folder.

    Raises:
        RunFolderError: the model has no adapter, or the adapter cannot be written (disk full,
            read-only folder); an adapter already in `target` is left as it was and no staging
            folder stays behind.
    """
    if not hasattr(model, "peft_config"):
        raise RunFolderError("save_adapter needs a model with a LoRA adapter (a PeftModel); this one has none.")

    def write(staging: Path) -> None:
        if convert_from is None:
            model.save_pretrained(staging)
        else:
            model.save_pretrained(staging, path_initial_model_for_weight_conversion=str(convert_from))

    return write_folder_atomic(Path(target).expanduser(), write)


def find_adapter(run_or_adapter_dir: str | Path) -> Path:
    """The adapter folder of a run folder (its `adapter/`), or the folder itself when it is one.

    Args:
        run_or_adapter_dir: A run folder or an adapter folder.

    Returns:
        The folder that holds `adapter_config.json`.

    Raises:
        RunFolderError: Neither holds `adapter_config.json`.
    """
    path = Path(run_or_adapter_dir).expanduser()
    for candidate in (path, path / ADAPTER_DIR):
        if (candidate / ADAPTER_CONFIG_FILE).exists():
            return candidate
    raise RunFolderError(
        f"No adapter in {path}: neither it nor {path / ADAPTER_DIR} holds {ADAPTER_CONFIG_FILE}. Pass a run folder "
        "after training finished, or the folder save_adapter wrote."
    )


def load_adapter(base_model, adapter_dir: str | Path, trainable: bool = False):
    """Put a saved adapter on a base model (`PeftModel.from_pretrained`).

    Args:
        base_model: The base model it was trained on (same architecture; the precision may differ).
        adapter_dir: An adapter folder or a run folder holding `adapter/`.
        trainable: Keep the adapter weights trainable (to continue training).

    Returns:
        The `PeftModel`.

    Raises:
        ModelLoadError: a file of the adapter is cut short or emptied, or the adapter does not fit
            the base model (another architecture or size): the message names the base it was trained on.
    """
    folder = find_adapter(adapter_dir)
    for file in sorted(folder.iterdir()):
        problem = damaged_weights(file)
        if problem:
            raise ModelLoadError(
                f"The adapter file {file} {problem}, so the adapter cannot be loaded. Copy it again from where it "
                "was saved, or train the run again."
            )
    _warn_other_weights(base_model, folder)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return PeftModel.from_pretrained(base_model, str(folder), is_trainable=trainable)
    except (ValueError, RuntimeError, KeyError) as err:  # peft's and torch's own refusals
        trained_on = _adapter_base(folder)
        raise ModelLoadError(
            f"The adapter in {folder} (trained on {trained_on!r}) does not fit {model_name(base_model)}: "
            f"{str(err).splitlines()[0][:300]} Load the base model it was trained on "
            "(adapters.base_model_of(run_dir) names it) and put the adapter on that."
        ) from None


def _adapter_base(folder: Path) -> str:
    try:
        config = json.loads((folder / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "an unknown model"
    return str(config.get("base_model_name_or_path") or "an unknown model") if isinstance(config, dict) else "an unknown model"


def _warn_other_weights(base_model, adapter_folder: Path) -> None:
    """Warn when the run that saved the adapter recorded other base weights than `base_model` has."""
    run = adapter_folder.parent
    if not (run / RUN_FILE).exists():
        return
    try:
        saved = (RunFolder(run).read_run().get("model") or {}).get("weights")
    except RunFolderError:
        return
    if saved and saved != weights_digest(base_model):
        warnings.warn(
            f"The adapter in {adapter_folder} was trained on a model with other weights than this one (same names "
            f"and shapes, different values: {run / RUN_FILE} records another weights digest). Its answers will not "
            "be the trained ones: load the run's base model (adapters.base_model_of) to get them.",
            UserWarning,
            stacklevel=3,
        )


def base_model_of(run_or_adapter_dir: str | Path) -> str:
    """Which base model an adapter belongs to: the run's `model_name_or_path`, else the adapter config's.

    Args:
        run_or_adapter_dir: A run folder or an adapter folder.

    Returns:
        The base model's hub ID or folder.

    Raises:
        RunFolderError: the folder holds no adapter.
        ModelLoadError: neither the run nor the adapter config names the base model.
    """
    path = Path(run_or_adapter_dir).expanduser()
    if (path / RUN_FILE).exists():
        name = RunFolder(path).read_run().get("model_name_or_path")
        if name:
            return str(name)
    config = json.loads((find_adapter(path) / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
    name = config.get("base_model_name_or_path")
    if not name:
        raise ModelLoadError(f"The adapter in {path} does not say which base model it belongs to; pass base=.")
    return name


def merge_adapter(run_or_adapter_dir: str | Path, out_dir: str | Path, base: str | None = None,
                  dtype: str = "float32") -> Path:
    """Merge an adapter into a full-precision copy of its base and save a standalone model.

    The base is reloaded unquantized even when training used 4-bit: merging into 4-bit weights
    re-quantizes them and changes the model's answers.

    Args:
        run_or_adapter_dir: A run folder or an adapter folder.
        out_dir: Where to save the merged model and its tokenizer.
        base: Base model ID or folder (default: the one recorded with the run or adapter).
        dtype: "float32" or "bfloat16" (half the size on disk).

    Returns:
        `out_dir`, loadable with `AutoModelForCausalLM.from_pretrained(out_dir)`; it also holds
        `lora-nb-merged.json`, the kit's record that it wrote the folder (a later merge may replace it).

    Raises:
        RunFolderError: `out_dir` is a file, the base model's or the adapter's folder, or a folder
            with files the kit did not write; nothing is overwritten then.
    """
    adapter = find_adapter(run_or_adapter_dir)
    base = base or base_model_of(run_or_adapter_dir)
    out = Path(out_dir).expanduser()
    _check_merge_target(out, Path(resolve_model(base)).expanduser(), adapter)
    model, tokenizer = load_model(base, "none", dtype=dtype)
    merged = load_adapter(model, adapter).merge_and_unload()

    def write(staging: Path) -> None:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        record = {"base": str(base), "adapter": str(adapter), "dtype": dtype, "merged": time.strftime("%Y-%m-%d %H:%M:%S")}
        (staging / MERGE_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    return write_folder_atomic(out, write)


def _check_merge_target(out: Path, base: Path, adapter: Path) -> None:
    """Refuse a merge target that would overwrite what the kit did not write.

    Raises:
        RunFolderError: `out` is a file, the base model's folder (or inside or around it), the
            adapter's folder, or a non-empty folder without the kit's merge record.
    """
    resolved = out.resolve()
    for folder, what in ((base.resolve(), "the base model's folder"), (adapter.resolve(), "the adapter's folder")):
        if folder.exists() and (resolved == folder or folder in resolved.parents or resolved in folder.parents):
            raise RunFolderError(
                f"Cannot merge into {out}: it is {what} ({folder}) or holds it, and merging there would overwrite "
                "its files. Pass a new folder, e.g. runs/merged-<name>."
            )
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"Cannot merge into {out}: it is a file, not a folder. Pass a new folder name.")
    if out.is_dir() and any(out.iterdir()) and not (out / MERGE_RECORD).exists():
        names = sorted(p.name for p in out.iterdir())
        raise RunFolderError(
            f"Cannot merge into {out}: it already holds {names[:5]}{' ...' if len(names) > 5 else ''}, which this kit "
            f"did not write (a merged model of the kit holds {MERGE_RECORD}). Nothing was overwritten: pass a new or "
            "empty folder."
        )
