"""Estimate: trainable parameters and training memory of a LoRA run, before building it.

:func:`count_trainable` reads module shapes and peft's own target matching, and gives the same
numbers as ``get_peft_model(...).get_nb_trainable_parameters()`` without wrapping the model.
:func:`estimate_memory` adds up weights, adapter, gradients, optimizer states, activations and
logits: an estimate from formulas, not a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from lora_nb.errors import SettingsError, quote
from lora_nb.targets import TargetLayer, find_targets

if TYPE_CHECKING:
    import transformers

    from lora_nb.settings import KitSettings, LoraSettings

# Optimizer state bytes per trainable parameter. AdamW: 2 fp32 moments. bitsandbytes 8-bit: 2 x 1 byte.
# Adafactor keeps factored second moments (rows + columns per matrix), counted as 0 here. SGD without
# momentum keeps nothing.
OPTIMIZER_STATE_BYTES = {
    "adamw_torch": 8, "adamw_torch_fused": 8, "paged_adamw_32bit": 8,
    "adamw_8bit": 2, "adamw_bnb_8bit": 2, "paged_adamw_8bit": 2,
    "adafactor": 0, "sgd": 0,
}
ADAPTER_BYTES = 4  # peft keeps adapter weights in float32 (autocast_adapter_dtype), so do their gradients
NF4_BLOCK = 64  # weights per 4-bit quantization block (one absmax scale each)
DOUBLE_QUANT_BLOCK = 256  # scales per second-level block when the scales themselves are quantized


def count_trainable(model: nn.Module, lora: LoraSettings) -> tuple[int, int]:
    """Counts trainable and total parameters the LoRA model will have, without building it.

    Uses the same matching as peft (``check_target_module_exists``) on the ``LoraConfig`` that
    :meth:`LoraSettings.to_peft` builds, then adds per adapted layer ``r * (in + out)`` (A and B),
    ``out`` more with DoRA (magnitude vector), the biases that ``bias`` unfreezes, and one trainable
    copy of every ``modules_to_save`` module. 4-bit weights count as unpacked values, as in peft.

    Args:
        model: The base model (before ``get_peft_model``).
        lora: The LoRA settings.

    Returns:
        ``(trainable, total)``, equal to peft's ``get_nb_trainable_parameters()``.

    Raises:
        SettingsError: When the settings cannot be converted for this model, or their targets match no layer.
    """
    adapted = adapted_layers(model, lora)
    if not adapted:  # peft refuses to build such an adapter (NoMatchingPeftModuleError): say so, and what exists
        targets = find_targets(model, include_output_head=True)
        layers = "" if lora.layers_to_transform is None else f" in blocks {quote(lora.layers_to_transform)}"
        raise SettingsError(
            f"target_modules {quote(lora.target_modules)} match no layer of this model{layers}: its adaptable "
            f"layers are {quote(targets.names, 400)} in blocks 0 to {targets.n_layers - 1}; choose among them, "
            "or use 'all-linear'")
    adapter = sum(_adapter_params(lay, lora.r, lora.use_dora) for lay in adapted)
    saved = sum(_numel(m) for m in _modules_to_save(model, lora.modules_to_save or []))
    total = sum(_logical_numel(p) for p in model.parameters()) + adapter + saved
    return adapter + saved + _bias_params(model, lora.bias, adapted), total


def adapted_layers(model: nn.Module, lora: LoraSettings) -> list[TargetLayer]:
    """The layers peft will wrap, found with peft's own matching rule on the config the settings build.

    Raises:
        SettingsError: When the settings cannot be converted for this model.
    """
    from peft.tuners.tuners_utils import check_target_module_exists

    config = lora.to_peft(model)
    return [lay for lay in find_targets(model, include_output_head=True).layers
            if check_target_module_exists(config, lay.path)]


def _adapter_params(layer: TargetLayer, r: int, use_dora: bool) -> int:
    return r * (layer.in_features + layer.out_features) + (layer.out_features if use_dora else 0)


def _bias_params(model: nn.Module, bias: str, adapted: list[TargetLayer]) -> int:
    if bias == "all":
        return sum(p.numel() for n, p in model.named_parameters() if n == "bias" or n.endswith(".bias"))
    if bias == "lora_only":
        return sum(lay.out_features for lay in adapted if lay.has_bias)
    return 0


def _modules_to_save(model: nn.Module, names: list[str]) -> list[nn.Module]:
    """Modules peft wraps for full training: paths ending with a given name (plain suffix, as peft does)."""
    found: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules(remove_duplicate=False):
        inside = any(path.startswith(prefix + ".") for prefix, _ in found)
        if path and not inside and any(path.endswith(n) for n in names):
            found.append((path, module))
    return [module for _, module in found]


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _logical_numel(param: torch.Tensor) -> int:
    """Values a parameter stands for: bitsandbytes packs two 4-bit values per byte (peft's count rule)."""
    if type(param).__name__ == "Params4bit":
        return param.numel() * 2 * param.element_size()
    return param.numel()


@dataclass
class MemoryEstimate:
    """Estimated training memory, by part.

    Attributes:
        parts: Part name -> bytes (weights, adapter, gradients, optimizer, activations, logits).
        batch_size: Examples per step the estimate is for.
        seq_len: Tokens per example.
        gradient_checkpointing: Whether activations are recomputed.
        trainable: Trainable parameters.
        notes: What the estimate leaves out.
    """

    parts: dict[str, int]
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    trainable: int
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        """Sum of all parts."""
        return sum(self.parts.values())

    def __str__(self) -> str:
        ckpt = "on" if self.gradient_checkpointing else "off"
        lines = [f"Estimated training memory (batch {self.batch_size} x {self.seq_len} tokens, "
                 f"gradient checkpointing {ckpt}, {self.trainable:,} trainable parameters):"]
        lines += [f"  {name:<12}{_readable(size):>12}" for name, size in self.parts.items()]
        lines.append(f"  {'total':<12}{_readable(self.total_bytes):>12}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _readable(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    raise AssertionError("unreachable")


def estimate_memory(model_or_config: nn.Module | transformers.PretrainedConfig, settings: KitSettings,
                    batch_size: int | None = None, seq_len: int | None = None) -> MemoryEstimate:
    """Estimates the memory one training step needs. An estimate from formulas, not a measurement.

    With ``P`` base parameters (``P_q`` of them in quantizable linear layers, the output head excluded),
    ``T`` trainable parameters, ``b`` batch size, ``s`` tokens, ``L`` blocks, hidden size ``h``,
    MLP size ``i``, ``a`` attention heads, vocabulary ``V`` and ``e`` bytes per activation value
    (2 in bf16/fp16, 4 in fp32):

    - weights: ``P_q * 0.5`` bytes plus block scales (4 bytes per 64 weights, about 1.06 with double
      quantization) in 4-bit; ``P_q * 1`` in 8-bit; the other ``P - P_q`` (and all of them without
      quantization) at 2 bytes in bf16/fp16, 4 in fp32;
    - adapter: ``4 T`` (adapters stay float32); gradients: ``4 T``;
    - optimizer: ``k T`` with k = 8 for AdamW, 2 for 8-bit AdamW, 0 for SGD/Adafactor;
    - activations per block and token, in values: ``10 h + 3 i + 2 a s`` (projections, norms and
      residuals, the MLP, and the attention scores and probabilities of eager/math attention; flash
      kernels avoid the ``2 a s`` term) plus, for each adapted layer, ``r`` (and its input when
      lora_dropout > 0); times ``b s L e``. With gradient checkpointing only the block inputs are
      kept (``b s L h e``) plus one block's activations during its recomputation;
    - logits: ``2 * 4 b s V`` (float32 logits and their gradient).

    Args:
        model_or_config: The base model, or its config (a parameter-free copy is built on the meta device).
        settings: The run's settings (LoRA, quantization, optimizer, precision, checkpointing).
        batch_size: Examples per step; default ``settings.train.per_device_train_batch_size``.
        seq_len: Tokens per example; default ``settings.train.max_seq_length``.

    Returns:
        The estimate by part.
    """
    model = _as_model(model_or_config)
    train = settings.train
    b = batch_size or train.per_device_train_batch_size
    s = seq_len or train.max_seq_length
    trainable, _ = count_trainable(model, settings.lora)
    targets = find_targets(model)
    act_bytes = 2 if train.resolved_precision() in ("bf16", "fp16") else 4
    parts = {
        "weights": _weight_bytes(model, targets.layers, settings.quant, act_bytes),
        "adapter": ADAPTER_BYTES * trainable,
        "gradients": ADAPTER_BYTES * trainable,
        "optimizer": OPTIMIZER_STATE_BYTES[train.optim] * trainable,
        "activations": _activation_bytes(model.config, settings, adapted_layers(model, settings.lora), b, s,
                                         act_bytes),
        "logits": 2 * 4 * b * s * _dims(model.config)["vocab"],
    }
    notes = ["an estimate from formulas: real use also depends on kernels, allocator fragmentation "
             "and the CUDA context (about 0.3-1 GiB more on a GPU)"]
    return MemoryEstimate(parts=parts, batch_size=b, seq_len=s, gradient_checkpointing=train.gradient_checkpointing,
                          trainable=trainable, notes=notes)


def _as_model(model_or_config: Any) -> nn.Module:
    if isinstance(model_or_config, nn.Module):
        return model_or_config
    import transformers

    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(model_or_config)


def _weight_bytes(model: nn.Module, layers: list[TargetLayer], quant: Any, dense_bytes: int) -> float:
    total = sum(_logical_numel(p) for p in model.parameters())
    quantizable = sum(lay.in_features * lay.out_features for lay in layers)
    if quant.load_in == "none":
        return total * dense_bytes
    per_weight = 1.0
    if quant.load_in == "4bit":
        scale = (1 + 4 / DOUBLE_QUANT_BLOCK) if quant.bnb_4bit_use_double_quant else 4
        per_weight = 0.5 + scale / NF4_BLOCK
    return round(quantizable * per_weight + (total - quantizable) * dense_bytes)


def _dims(config: Any) -> dict[str, int]:
    """Reads sizes under the names different architectures use (GPT-2: n_embd, n_layer, n_head, n_inner)."""
    def first(*names: str) -> Any:
        return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)

    hidden = first("hidden_size", "n_embd")
    return {"hidden": hidden, "layers": first("num_hidden_layers", "n_layer"),
            "heads": first("num_attention_heads", "n_head"),
            "mlp": first("intermediate_size", "n_inner") or 4 * hidden, "vocab": first("vocab_size")}


def _activation_bytes(config: Any, settings: KitSettings, adapted: list[TargetLayer], b: int, s: int,
                      act_bytes: int) -> int:
    d = _dims(config)
    lora = settings.lora
    per_layer_lora = sum(lora.r + (lay.in_features if lora.lora_dropout > 0 else 0) for lay in adapted) / max(d["layers"], 1)
    per_token = 10 * d["hidden"] + 3 * d["mlp"] + 2 * d["heads"] * s + per_layer_lora
    block = b * s * per_token * act_bytes
    if settings.train.gradient_checkpointing:
        return round(b * s * d["layers"] * d["hidden"] * act_bytes + block)
    return round(block * d["layers"])

