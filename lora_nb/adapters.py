"""Adapters on a live model: find one already there, take it off, and undo inits that rewrite the base.

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

import warnings
from pathlib import Path
from typing import Any

from .errors import ModelLoadError, SettingsError

INITIAL_ADAPTER_DIR = "initial_adapter"
# Inits of the installed peft that write into the base weights (peft/tuners/lora/layer.py: each
# `*_init` that assigns `get_base_layer().weight`). The first four peft can convert back to a
# plain LoRA (`path_initial_model_for_weight_conversion`); LoftQ it cannot.
CONVERTIBLE_INITS = ("pissa", "olora", "corda", "lora_ga")
_UNCONVERTIBLE_INITS = ("loftq",)


def rewrites_base_weights(init: Any) -> bool:
    """Whether a peft `init_lora_weights` value changes the base model's weights when the adapter is made."""
    name = str(init).lower()
    return name.startswith("pissa") or name in CONVERTIBLE_INITS + _UNCONVERTIBLE_INITS


def has_adapter(model) -> bool:
    """Whether the model is a `PeftModel` or holds adapter layers injected by peft."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(model, PeftModel) or any(isinstance(m, BaseTunerLayer) for m in model.modules())


def adapter_init(model) -> Any:
    """The `init_lora_weights` of the model's active adapter (None when it has none or peft does not say)."""
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

    Raises:
        SettingsError: the adapter came from an init that rewrote the base weights and was not
            undone by the kit, so the base model cannot be recovered from this object.
    """
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

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

    Returns:
        The folder (`run_dir/initial_adapter`), or None when the init leaves the base alone.
    """
    init = adapter_init(peft_model)
    if not rewrites_base_weights(init) or str(init).lower() in _UNCONVERTIBLE_INITS:
        return None
    from .train import save_adapter

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
    """
    import torch
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import transpose
    from safetensors.torch import load_file

    initial = load_file(str(Path(initial_dir) / "adapter_model.safetensors"))
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
    """The base model with the converted (plain LoRA) adapter put on, as `load_adapter` would."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)


def check_pristine_base(model) -> None:
    """Refuse "before" numbers from a model whose base weights an init rewrote and nobody put back.

    Raises:
        ModelLoadError: the adapter off would give the residual W_res, not the base model.
    """
    init = adapter_init(model)
    if rewrites_base_weights(init) and not getattr(model, "_lora_nb_base_restored", False):
        fix = ("peft cannot convert LoftQ back, so load the base model separately and compare the two "
               "(evaluate.compare_generations(base, tuned, ...))." if str(init).lower() in _UNCONVERTIBLE_INITS else
               "Train with lora_nb.train.train (it puts the base back), or load the base model fresh and put the "
               "saved adapter on it with evaluate.load_adapter.")
        raise ModelLoadError(
            f"This model's adapter was made with init_lora_weights {init!r}, which rewrote the base weights: with "
            f"the adapter off it is not the base model, so 'before' numbers would be wrong. {fix}"
        )
