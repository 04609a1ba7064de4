"""Presets: named starting points, each saying where its values come from.

The sources are public pages that users of the kit meet (the kit does not ship copies of them):
axolotl's documentation ("Llama3 - Lora Configuration", docs.axolotl.ai), the nested ``lora:``
settings section of a fine-tuning toolkit's documentation whose keys are ``peft.LoraConfig``
arguments, a widely copied Llama-2 QLoRA walkthrough (``BitsAndBytesConfig`` + ``LoraConfig(r=8,
lora_alpha=32)`` + ``Trainer``), and Unsloth's "LoRA Parameters Encyclopedia" (docs.unsloth.ai).

``get_preset(name)`` returns a fresh copy, so changing it does not change the preset.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from .errors import SettingsError, quote
from .settings import KitSettings, LoraSettings, QuantSettings, TrainSettings

_LORA_SECTION_NAMES = ["q_proj", "v_proj", "k_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]  # its order


@dataclass(frozen=True)
class Preset:
    """A named set of settings.

    Attributes:
        description: One line: what it is and where it comes from.
        settings: The settings (use :func:`get_preset` for a copy you may change).
    """

    description: str
    settings: KitSettings


PRESETS: dict[str, Preset] = {
    "axolotl-llama3": Preset(
        "axolotl's default Llama 3 LoRA (axolotl docs, 'Llama3 - Lora Configuration'): r 32, alpha 16, "
        "dropout 0.05, all linear layers (lora_target_linear: true).",
        KitSettings(lora=LoraSettings(r=32, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear"),
                    quant=QuantSettings(load_in="none")),
    ),
    "lora-section": Preset(
        "A nested 'lora:' settings section whose keys are peft LoraConfig arguments (a fine-tuning toolkit's "
        "documented example): r 32, alpha 16, dropout 0.1, q/k/v/o and the three MLP projections.",
        KitSettings(lora=LoraSettings(r=32, lora_alpha=16, lora_dropout=0.1, target_modules=list(_LORA_SECTION_NAMES)),
                    quant=QuantSettings(load_in="none")),
    ),
    "qlora-walkthrough": Preset(
        "The classic Llama-2 QLoRA walkthrough (a widely copied tutorial: 4-bit BitsAndBytesConfig, "
        "LoraConfig, Trainer): 4-bit base, r 8, alpha 32, dropout 0.05, q_proj and v_proj, lr 2e-4. "
        "Its alpha/r = 4 is above the kit's usual 1-2, so the kit warns. The walkthrough gives no reason; "
        "r 8, alpha 32 on the q and v projections is the example in peft's own documentation (LoraModel), "
        "which tutorials copy. A scale of 4 acts like a 4x larger step for the adapter: a push for a small "
        "adapter (rank 8, two layers per block) that the kit leaves to you.",
        KitSettings(lora=LoraSettings(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]),
                    quant=QuantSettings(load_in="4bit", bnb_4bit_compute_dtype="float16"),
                    train=TrainSettings(learning_rate=2e-4, per_device_train_batch_size=2,
                                        gradient_accumulation_steps=4)),
    ),
    "encyclopedia-all-linear": Preset(
        "Unsloth's 'LoRA Parameters Encyclopedia' advice (docs.unsloth.ai): r 16, alpha 16 (1x r), all "
        "linear layers, dropout 0, lr 2e-4, weight decay 0.01, 5% warmup, 1 epoch.",
        KitSettings(lora=LoraSettings(r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"),
                    quant=QuantSettings(load_in="none"),
                    train=TrainSettings(learning_rate=2e-4, weight_decay=0.01, warmup_ratio=0.05,
                                        num_train_epochs=1.0, lr_scheduler_type="linear")),
    ),
    "demo-cpu": Preset(
        "The recipe measured on the demo model on CPU: r 16, alpha 32, dropout 0, all linear, AdamW lr 1e-3, "
        "10% warmup then linear decay, clip 1.0, batch 8, 12 steps (one pass over the demo data), no quantization, "
        "gradient checkpointing (the same losses; keeps the demo within 2 GB), seed 42.",
        KitSettings(lora=LoraSettings(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"),
                    quant=QuantSettings(load_in="none"),
                    train=TrainSettings(learning_rate=1e-3, optim="adamw_torch", warmup_ratio=0.1,
                                        lr_scheduler_type="linear", max_grad_norm=1.0,
                                        per_device_train_batch_size=8, max_steps=12, seed=42, logging_steps=1,
                                        gradient_checkpointing=True)),
    ),
}


def get_preset(name: str) -> KitSettings:
    """A fresh copy of a preset's settings.

    Args:
        name: One of :data:`PRESETS`.

    Returns:
        The settings, safe to change.

    Raises:
        SettingsError: When no preset has that name (the message lists the names).
    """
    if not isinstance(name, str) or name not in PRESETS:
        raise SettingsError(f"no preset named {quote(name)}: choose one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name].settings)
