"""Loading: a base model and its tokenizer, in 4-bit, 8-bit or full precision, ready for LoRA.

`load_model` resolves a hub ID or a local folder (the demo model's offline copy included), asks
the settings module for the `BitsAndBytesConfig`, probes whether bitsandbytes can run here and, if
not, says so in one sentence and loads in full precision instead (or raises when asked strictly).

Two measured traps are handled right after loading (see FACTS.md):

- On CPUs with AVX512-BF16 the first no-grad eval-mode forward through a `Linear4bit` repacks its
  weight for an inference kernel; gradients through that layer are silently wrong afterwards.
  Every module with `support_avx512bf16_for_cpu` gets it set to False, so the repacking never runs.
- bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community: No module named
  'kernels'" at import: harmless, so the kit filters exactly that record.

`describe_model` reports what was loaded; `compare_precisions` measures the footprint of one model
stored four ways, for a bar chart.
"""

from __future__ import annotations

import gc
import logging
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal

import torch
import torch.nn as nn

from .demo import DEMO_MODEL_ID, resolve_model
from .errors import ModelLoadError, QuantizationUnavailable
from .files import damaged_weights
from .launch import process_device_map
from .probes import LoadIn, bf16_supported, cuda_available, quantization_available
from .settings import QuantSettings

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Dtype = Literal["auto", "float32", "bfloat16", "float16"]


# ---------------------------------------------------------------------------------------------------------------
# bitsandbytes noise
# ---------------------------------------------------------------------------------------------------------------


class _BitsAndBytesNoise(logging.Filter):
    """Drops bitsandbytes log records that are harmless on CPU, and repeats of a per-call one."""

    _seen_int8_cast = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        # Import-time, CPUs with AVX512-BF16 only: the optional hub kernel package `kernels` is absent;
        # bitsandbytes then uses its own CPU kernel. Installing `kernels` would download from a hub.
        if message.startswith("Failed to load CPU gemm_4bit_forward from kernels-community") and (
            "No module named 'kernels'" in message
        ):
            return False
        # 8-bit on CPU logs this on every matmul of every layer; once is enough to inform.
        if message.startswith("MatMul8bitLt: inputs will be cast"):
            if _BitsAndBytesNoise._seen_int8_cast:
                return False
            _BitsAndBytesNoise._seen_int8_cast = True
        return True


_NOISE_FILTER = _BitsAndBytesNoise()


def quiet_bitsandbytes() -> None:
    """Install the filter on the bitsandbytes loggers (idempotent; runs when this module is imported).

    The loggers are created here if bitsandbytes is not imported yet, so the filter is already in
    place when its import-time message is logged.
    """
    for name in ("bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions"):
        logger = logging.getLogger(name)
        if _NOISE_FILTER not in logger.filters:
            logger.addFilter(_NOISE_FILTER)


quiet_bitsandbytes()


def _resolve_dtype(dtype: Dtype | torch.dtype) -> torch.dtype:
    """'auto' = bfloat16 on a CUDA GPU that supports it, else float32 (CPU bf16 is an explicit choice)."""
    if not isinstance(dtype, str):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if bf16_supported() else torch.float32
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ModelLoadError(
            f"dtype {dtype!r} is not one the kit loads: use 'auto', 'float32', 'bfloat16' or 'float16'."
        )
    return getattr(torch, dtype)


def _quant_settings(quant: QuantSettings | str | None) -> QuantSettings:
    if quant is None:
        return QuantSettings(load_in="none")
    if isinstance(quant, str):
        if quant not in ("4bit", "8bit", "none"):
            raise ModelLoadError(f"quant {quant!r} is not allowed: use '4bit', '8bit', 'none' or a QuantSettings.")
        return QuantSettings(load_in=quant)
    return quant


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """What `load_model` returns; unpacks as `model, tokenizer = load_model(...)`.

    Attributes:
        model: The causal LM (quantized layers are `bitsandbytes.nn.Linear4bit` / `Linear8bitLt`).
        tokenizer: Its tokenizer, with a pad token and right padding (the training side).
        load_in: How the base weights were actually stored: "4bit", "8bit" or "none".
        requested: What was asked for.
        source: The path or hub ID that was loaded.
        note: Why `load_in` differs from `requested` (one sentence), else "".
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    load_in: LoadIn
    requested: LoadIn
    source: str
    note: str = ""

    def __iter__(self) -> Iterator[Any]:
        yield self.model
        yield self.tokenizer

    def report(self) -> ModelReport:
        """`describe_model` of the loaded model."""
        return describe_model(self.model)


def load_model(
    name_or_path: str = DEMO_MODEL_ID,
    quant: QuantSettings | LoadIn | None = "4bit",
    *,
    dtype: Dtype | torch.dtype = "auto",
    strict: bool = False,
    prepare_for_training: bool = True,
    gradient_checkpointing: bool = False,
    padding_side: Literal["right", "left"] = "right",
) -> LoadedModel:
    """Load a causal LM and its tokenizer, quantized where bitsandbytes can run here.

    Args:
        name_or_path: Hub ID or local folder; the demo model's ID resolves to its offline copy.
        quant: A `QuantSettings`, or just "4bit" / "8bit" / "none" (NF4 with double quantization
            and bfloat16 compute for "4bit"). None means "none".
        dtype: Precision of the unquantized weights (all of them with "none"). "auto" is bfloat16 on
            a GPU that supports it, else float32. With quantization, the non-quantized modules
            (embeddings, norms, output head) end up in float32 when `prepare_for_training` is on.
        strict: When the requested quantization cannot run here, raise `QuantizationUnavailable`
            instead of warning and loading in full precision.
        prepare_for_training: For a quantized model, run peft's `prepare_model_for_kbit_training`
            (freezes the base, casts norms and embeddings to float32).
        gradient_checkpointing: Turn on gradient checkpointing (non-reentrant, as transformers 5 wants).
        padding_side: Tokenizer padding side: "right" for training, "left" for batched generation
            (`evaluate.generate` switches to left on its own).

    Returns:
        A `LoadedModel` (unpacks to `model, tokenizer`).

    Raises:
        ModelLoadError: The model or tokenizer cannot be found or loaded.
        QuantizationUnavailable: `strict` and bitsandbytes cannot run the quantization here.
    """
    # The auto classes load transformers' modeling code on first use (seconds): not on `import lora_nb`.
    from transformers import AutoModelForCausalLM

    settings = _quant_settings(quant)
    requested: LoadIn = settings.load_in
    source = resolve_model(name_or_path)
    load_in, note = requested, ""
    if requested != "none":
        ok, reason = quantization_available(requested)
        if not ok:
            note = f"{requested} loading is not available here: {reason}."
            if strict:
                raise QuantizationUnavailable(
                    f"{note} Set quant to 'none' (full precision), or install/repair bitsandbytes for this device."
                )
            load_in = "none"
            note = f"{note[:-1]}, so the model is loaded in full precision instead (more memory, same results)."
            warnings.warn(note, UserWarning, stacklevel=2)

    _check_weight_files(source)
    torch_dtype = _resolve_dtype(dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if load_in != "none":
        kwargs["quantization_config"] = settings.to_bnb()
        kwargs["dtype"] = torch.float32 if torch_dtype == torch.float16 and not cuda_available() else torch_dtype
    if cuda_available():
        kwargs["device_map"] = process_device_map()  # accelerate places the weights; never a hard-coded device
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"Could not load a causal language model from {source!r} ({type(err).__name__}: {err}). "
            "Check that it is a causal LM folder or hub ID with weights and a config.json."
        ) from err
    if load_in == "4bit":
        disable_cpu_weight_repacking(model)
    if load_in != "none" and prepare_for_training:
        from peft import prepare_model_for_kbit_training  # peft is imported only where a model is wrapped

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    tokenizer = load_tokenizer(source, padding_side=padding_side)
    return LoadedModel(model, tokenizer, load_in, requested, source, note)


def _check_weight_files(source: str) -> None:
    """Refuse a local model folder whose weight files are cut short (an interrupted copy or download).

    Raises:
        ModelLoadError: naming the file and how much of it is there.
    """
    folder = Path(source).expanduser()
    if not folder.is_dir():
        return
    for file in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        problem = damaged_weights(file)
        if problem:
            raise ModelLoadError(
                f"The model file {file} {problem}, so {folder} cannot be loaded. Copy or download the model "
                "again (an interrupted copy leaves files like this)."
            )


def load_tokenizer(name_or_path: str, padding_side: Literal["right", "left"] = "right") -> PreTrainedTokenizerBase:
    """Load a tokenizer with a pad token (the EOS token when it has none) and the given padding side.

    Args:
        name_or_path: Hub ID or local folder (already resolved, or resolvable by `resolve_model`).
        padding_side: "right" for training, "left" for batched generation.

    Returns:
        The tokenizer.

    Raises:
        ModelLoadError: No tokenizer can be loaded, or it has neither a pad nor an EOS token.
    """
    from transformers import AutoTokenizer  # like AutoModelForCausalLM in load_model: loaded on first use

    source = resolve_model(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"Could not load a tokenizer from {source!r} ({err}); the folder needs tokenizer files.") from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(
                f"The tokenizer of {source!r} has neither a pad nor an EOS token, so batches cannot be padded. "
                "Add one with tokenizer.add_special_tokens({'pad_token': ...}) and resize the embeddings."
            )
        tokenizer.pad_token = tokenizer.eos_token  # padded positions are masked by attention_mask anyway
    tokenizer.padding_side = padding_side
    return tokenizer


def disable_cpu_weight_repacking(model: torch.nn.Module) -> int:
    """Switch off bitsandbytes' CPU inference repacking of 4-bit weights (the AVX512-BF16 trap).

    On a CPU with AVX512-BF16, the first no-grad eval-mode forward of a `Linear4bit` repacks its
    weight in place for a faster inference kernel; the backward pass still reads it in the old
    layout, so LoRA gradients are silently wrong from then on (measured: up to 287% off).

    Args:
        model: A model, quantized or not (a model without 4-bit layers is left as it is).

    Returns:
        How many modules had the switch.
    """
    count = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


# ---------------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ModelReport:
    """What a loaded model holds.

    Attributes:
        parameters: Number of parameters (a 4-bit weight counts as its packed storage, as torch sees it).
        trainable: Number of parameters with `requires_grad`.
        footprint_bytes: `model.get_memory_footprint()`: parameters and buffers in memory.
        layers: Count of linear layers by kind: "Linear4bit", "Linear8bitLt", "Linear" (LoRA's own
            A/B matrices are left out).
        dtypes: Number of parameters per dtype name.
        device: Device of the first parameter (e.g. "cpu", "cuda:0").
        quantization: "4bit (nf4, double quant, compute bfloat16)", "8bit" or "none".
    """

    parameters: int
    trainable: int
    footprint_bytes: int
    layers: dict[str, int] = field(default_factory=dict)
    dtypes: dict[str, int] = field(default_factory=dict)
    device: str = "cpu"
    quantization: str = "none"

    @property
    def footprint_mb(self) -> float:
        """Footprint in MB (10^6 bytes)."""
        return self.footprint_bytes / 1e6

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, JSON-ready."""
        return {
            "parameters": self.parameters, "trainable": self.trainable, "footprint_bytes": self.footprint_bytes,
            "layers": dict(self.layers), "dtypes": dict(self.dtypes), "device": self.device,
            "quantization": self.quantization,
        }

    def __str__(self) -> str:
        layers = ", ".join(f"{n} {k}" for k, n in self.layers.items()) or "none"
        dtypes = ", ".join(f"{k} {n:,}" for k, n in self.dtypes.items())
        return "\n".join([
            f"quantization : {self.quantization}",
            f"device       : {self.device}",
            f"parameters   : {self.parameters:,} ({self.trainable:,} trainable)",
            f"memory       : {self.footprint_mb:,.1f} MB",
            f"linear layers: {layers}",
            f"dtypes       : {dtypes}",
        ])


def describe_model(model: torch.nn.Module) -> ModelReport:
    """Count parameters, memory, linear layer kinds and dtypes of a model (plain or with LoRA).

    Args:
        model: A transformers model, or a peft model around one.

    Returns:
        A `ModelReport` (prints as a short aligned table).
    """
    layers: Counter[str] = Counter()
    for name, module in model.named_modules():
        if "lora_" in name:  # LoRA's A/B live in ModuleDicts named lora_A / lora_B
            continue
        kind = type(module).__name__
        if kind in ("Linear4bit", "Linear8bitLt") and type(module).__module__.startswith("bitsandbytes"):
            layers[kind] += 1
        elif type(module) is nn.Linear:
            layers["Linear"] += 1
    dtypes: Counter[str] = Counter()
    total = trainable = 0
    for param in model.parameters():
        n = param.numel()
        total += n
        trainable += n if param.requires_grad else 0
        dtypes[str(param.dtype).removeprefix("torch.")] += n
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    footprint = base.get_memory_footprint() if hasattr(base, "get_memory_footprint") else _bytes(model)
    device = str(next(model.parameters()).device)
    return ModelReport(total, trainable, int(footprint), dict(layers), dict(dtypes), device, _quantization(base))


def _bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _quantization(model: torch.nn.Module) -> str:
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        return "none"
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    if get("load_in_4bit"):
        dq = ", double quant" if get("bnb_4bit_use_double_quant") else ""
        compute = str(get("bnb_4bit_compute_dtype", "float32")).removeprefix("torch.")
        return f"4bit ({get('bnb_4bit_quant_type', 'fp4')}{dq}, compute {compute})"
    if get("load_in_8bit"):
        return "8bit"
    return str(get("quant_method", "quantized"))


# ---------------------------------------------------------------------------------------------------------------
# Precision comparison
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Footprint:
    """Memory of one model stored one way.

    Attributes:
        label: "fp32", "bf16", "8bit" or "4bit".
        bytes: `get_memory_footprint()` in bytes, or None when it could not be loaded.
        available: Whether this way could be loaded here.
        reason: Why not, in one sentence ("" when available).
    """

    label: str
    bytes: int | None
    available: bool = True
    reason: str = ""

    @property
    def mb(self) -> float | None:
        """Footprint in MB (10^6 bytes), or None."""
        return None if self.bytes is None else self.bytes / 1e6


PRECISIONS: dict[str, tuple[LoadIn, str]] = {
    "fp32": ("none", "float32"),
    "bf16": ("none", "bfloat16"),
    "8bit": ("8bit", "float32"),
    "4bit": ("4bit", "float32"),
}


def compare_precisions(
    name_or_path: str = DEMO_MODEL_ID, precisions: tuple[str, ...] = ("fp32", "bf16", "8bit", "4bit")
) -> list[Footprint]:
    """Load the same model once per storage precision and measure each footprint.

    Models are loaded one at a time and freed before the next, so peak memory is about one fp32 copy.

    Args:
        name_or_path: Hub ID or local folder.
        precisions: Any of "fp32", "bf16", "8bit", "4bit".

    Returns:
        One `Footprint` per precision, in the order asked; unavailable ones carry the reason.
    """
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise ModelLoadError(f"precisions {unknown} are not known: use any of {list(PRECISIONS)}.")
    results = []
    for label in precisions:
        load_in, dtype = PRECISIONS[label]
        ok, reason = quantization_available(load_in)
        if not ok:
            results.append(Footprint(label, None, False, f"{label} cannot load here: {reason}."))
            continue
        try:
            loaded = load_model(name_or_path, load_in, dtype=dtype, strict=True, prepare_for_training=False)
        except QuantizationUnavailable as err:
            results.append(Footprint(label, None, False, str(err)))
            continue
        results.append(Footprint(label, int(loaded.model.get_memory_footprint())))
        del loaded
        gc.collect()
    return results
