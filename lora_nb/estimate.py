"""Estimate: trainable parameters and training memory of a LoRA run, before building it.

:func:`count_trainable` reads module shapes and peft's own target matching, and gives the same
numbers as ``get_peft_model(...).get_nb_trainable_parameters()`` without wrapping the model.

:func:`estimate_memory` adds up, part by part, what one training step holds at its peak: the
weights, the adapter with its gradients and optimizer states, what autograd keeps for the backward
pass (read from peft's ``lora.Linear.forward`` and DoRA's ``DoraLinearLayer.forward``), the loss through
the output head, and the short-lived buffers around the peak. :func:`estimate_for_lengths` gives it for the
data's own lengths beside the worst case. Checked against real training steps by
``benchmarks/memory.py`` (``benchmarks/results/memory_grid.md``).

What a LoRA layer keeps for the backward pass (the frozen ``W`` keeps nothing of its own)::

    x ──► W x ───────────────────────────────(+)──► y        kept: x (for A's gradient),
    └─► x.float() ─► dropout ─► A ─► B ─► * scale           A x (for B's gradient),
                     (mask)                                 the mask; DoRA also W x and B A x
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn
import transformers
from peft.tuners.tuners_utils import check_target_module_exists

from .errors import SettingsError, quote
from .loss import chunk_rows, vocab_block
from .probes import cuda_available
from .settings import ALL_LINEAR, KitSettings, LoraSettings
from .targets import TargetLayer, Targets, find_targets

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
    wrapped = adapted_parameters(model, lora)
    if not adapted and not wrapped:  # peft refuses to build such an adapter (NoMatchingPeftModuleError): say so
        targets = find_targets(model, include_output_head=True)
        layers = "" if lora.layers_to_transform is None else f" in blocks {quote(lora.layers_to_transform)}"
        raise SettingsError(
            f"target_modules {quote(lora.target_modules)} match no layer of this model{layers}: its adaptable "
            f"layers are {quote(targets.names, 400)} in blocks 0 to {targets.n_layers - 1}; choose among them, "
            "or use 'all-linear'")
    shapes = [(lay.path, lay.in_features, lay.out_features, 1) for lay in adapted] + wrapped
    adapter = [_adapter_params(lora, *shape) for shape in shapes]  # (trainable, all) per adapted weight
    saved = sum(_numel(m) for m in _modules_to_save(model, lora.modules_to_save or []))
    tokens = _trainable_tokens(model, lora.trainable_token_indices)
    total = sum(_logical_numel(p) for p in model.parameters()) + sum(a for _, a in adapter) + saved + tokens
    return sum(t for t, _ in adapter) + saved + tokens + _bias_params(model, lora.bias, adapted), total


def trainable_by_rank(model: nn.Module, ranks: Sequence[int],
                      target_sets: dict[str, str | list[str]] | None = None) -> dict[str, list[int]]:
    """Exact trainable-parameter counts (:func:`count_trainable`) for each rank and target set.

    Args:
        model: The base model.
        ranks: LoRA ranks to count.
        target_sets: Label -> ``target_modules``; default q+v, attention and all-linear of this model.

    Returns:
        Label -> one count per rank.
    """
    target_sets = target_sets if target_sets is not None else default_target_sets(model)
    return {label: [count_trainable(model, LoraSettings(r=r, target_modules=copy.deepcopy(t)))[0] for r in ranks]
            for label, t in target_sets.items()}


def default_target_sets(model: nn.Module) -> dict[str, str | list[str]]:
    """q+v (when the model has them separately), all attention layers, and all-linear."""
    targets = find_targets(model)
    sets: dict[str, str | list[str]] = {}
    if q_and_v(targets):
        sets["q + v"] = q_and_v(targets)
    sets["attention"] = list(targets.attention)
    sets["all-linear"] = ALL_LINEAR
    return sets


def q_and_v(targets: Targets) -> list[str]:
    """The query and value projections by their usual names (empty for fused ones such as c_attn)."""
    pairs = (("q_proj", "v_proj"), ("query", "value"), ("q", "v"), ("wq", "wv"))
    return next((list(p) for p in pairs if all(n in targets.attention for n in p)), [])


def adapted_layers(model: nn.Module, lora: LoraSettings) -> list[TargetLayer]:
    """The layers peft will wrap, found with peft's own matching rule on the config the settings build.

    Raises:
        SettingsError: When the settings cannot be converted for this model.
    """
    config = lora.to_peft(model)
    return [lay for lay in find_targets(model, include_output_head=True).layers
            if check_target_module_exists(config, lay.path)]


def adapted_parameters(model: nn.Module, lora: LoraSettings) -> list[tuple[str, int, int, int]]:
    """The parameters ``target_parameters`` adapts (peft's rule: the path, or a suffix after a dot), each as
    ``(path, in_features, out_features, experts)``; a 3-D expert weight is ``(experts, in, out)`` in peft."""
    found = []
    for path, param in model.named_parameters():
        if any(path == t or path.endswith("." + t) for t in lora.target_parameters or []):
            experts, n_in, n_out = param.shape if param.dim() == 3 else (1, param.shape[1], param.shape[0])
            found.append((path, n_in, n_out, experts))  # the path is peft's key for rank_pattern
    return found


def _adapter_params(lora: LoraSettings, path: str, n_in: int, n_out: int, experts: int) -> tuple[int, int]:
    """Trainable and all values of one adapted weight: A (r x in) and B (out x r) per expert, plus DoRA's
    magnitude and lora_bias's bias (out each). The rank is rank_pattern's for this path (peft's
    ``get_pattern_key``), else r. MiCA freezes B."""
    r = lora.rank_for(path) * experts
    a, b = r * n_in, r * n_out
    extra = (n_out if lora.use_dora else 0) + (n_out if lora.lora_bias else 0)
    return a + extra + (0 if lora.init_lora_weights == "mica" else b), a + b + extra


def _trainable_tokens(model: nn.Module, indices: list[int] | dict[str, list[int]] | None) -> int:
    """Embedding rows peft trains for ``trainable_token_indices`` (one row of hidden size per index; a layer
    tied to another shares its rows)."""
    if indices is None:
        return 0
    if isinstance(indices, list):
        return len(indices) * model.get_input_embeddings().weight.shape[1]
    weights = {}
    for path, module in model.named_modules():
        name = next((k for k in indices if path == k or path.endswith("." + k)), None)
        if name is not None and isinstance(getattr(module, "weight", None), torch.Tensor):
            weights.setdefault(id(module.weight), len(indices[name]) * module.weight.shape[1])
    return sum(weights.values())


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


# ---------------------------------------------------------------------------------------------------------------
# Training memory
# ---------------------------------------------------------------------------------------------------------------

# Where a layer's input comes from, so that adapted layers reading the same tensor keep it once (fp32, no dropout).
# "attn_out" is the attention output, which the attention itself already keeps; other names keep their own input.
_SHARED_INPUT = {
    "q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "qkv_proj": "attn_in", "c_attn": "attn_in",
    "query_key_value": "attn_in", "Wqkv": "attn_in", "query": "attn_in", "key": "attn_in", "value": "attn_in",
    "gate_proj": "mlp_in", "up_proj": "mlp_in", "gate_up_proj": "mlp_in", "c_fc": "mlp_in", "fc1": "mlp_in",
    "dense_h_to_4h": "mlp_in", "w1": "mlp_in", "w3": "mlp_in",
    "o_proj": "attn_out", "out_proj": "attn_out", "dense": "attn_out",
}
_GATED = ("gate_proj", "gate_up_proj", "w1", "w3")
CPU_DROPOUT_MASK_BYTES = 4  # CPU dropout keeps its mask in the input's dtype; CUDA's fused kernel keeps 1 byte
CUDA_DROPOUT_MASK_BYTES = 1
CUDA_CONTEXT_BYTES = 600 * 2**20  # CUDA context + cuBLAS workspace of torch 2.x: 0.3-0.8 GiB, not in allocated
CUDA_RESERVE_FACTOR = 1.10  # reserved / allocated of the caching allocator (fragmentation headroom)
BACKWARD_BLOCKS = 1.0  # gradients of one block's activations exist while that block runs backward
RUNTIME_BYTES = 64 * 2**20  # Trainer, data loader, kernel workspaces (cuBLAS on a GPU): measured 20-70 MiB on CPU


@dataclass
class MemoryEstimate:
    """Estimated peak training memory, by part. An estimate from formulas, checked against measurement.

    ``total_bytes`` is the peak of live tensors: what ``torch.cuda.max_memory_allocated`` reports on a
    GPU (on CPU: the peak RSS above the libraries' own). A GPU needs more than that: the caching
    allocator reserves more than it hands out (``reserved_bytes``) and the CUDA context lives outside
    the allocator (``cuda_context_bytes``); ``device_bytes`` adds both.

    Attributes:
        parts: Part name -> bytes. Static: weights, adapter, gradients, optimizer, runtime (Trainer, data
            loader, kernel workspaces). Kept for the backward
            pass (per block x blocks): norms, attention, mlp, adapter inputs, adapter outputs, dropout masks,
            dora, checkpoints (block inputs with gradient checkpointing). Transient at the peak: backward
            (one block's gradients, plus its recomputed activations with checkpointing), loss through the head, autocast
            weight copies, dequantization (4-bit), dora norm.
        batch_size: Examples per step the estimate is for.
        seq_len: Tokens per example (the padded length of the batch).
        gradient_checkpointing: Whether activations are recomputed.
        trainable: Trainable parameters.
        device: ``cuda`` or ``cpu``: the device the estimate is for.
        notes: What the estimate assumes or leaves out.
    """

    parts: dict[str, int]
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    trainable: int
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        """Peak live memory: the sum of all parts (``max_memory_allocated`` on a GPU)."""
        return sum(self.parts.values())

    @property
    def reserved_bytes(self) -> int:
        """What the CUDA caching allocator holds at the peak (allocated plus its headroom)."""
        return round(self.total_bytes * CUDA_RESERVE_FACTOR) if self.device == "cuda" else self.total_bytes

    @property
    def cuda_context_bytes(self) -> int:
        """Memory the CUDA context takes outside the allocator (0 on CPU)."""
        return CUDA_CONTEXT_BYTES if self.device == "cuda" else 0

    @property
    def device_bytes(self) -> int:
        """What the device must have free: reserved memory plus the CUDA context."""
        return self.reserved_bytes + self.cuda_context_bytes

    def __str__(self) -> str:
        ckpt = "on" if self.gradient_checkpointing else "off"
        lines = [f"Estimated training memory (batch {self.batch_size} x {self.seq_len} tokens, "
                 f"gradient checkpointing {ckpt}, {self.trainable:,} trainable parameters, {self.device}):"]
        lines += [f"  {name:<24}{_readable(size):>12}" for name, size in self.parts.items() if size]
        lines.append(f"  {'total (peak allocated)':<24}{_readable(self.total_bytes):>12}")
        if self.device == "cuda":
            lines.append(f"  {'+ allocator, CUDA context':<24}{_readable(self.device_bytes - self.total_bytes):>12}"
                         f"  -> {_readable(self.device_bytes)} on the GPU")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _readable(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    raise AssertionError("unreachable")


def estimate_memory(model_or_config: nn.Module | transformers.PretrainedConfig, settings: KitSettings,
                    batch_size: int | None = None, seq_len: int | None = None,
                    device: str | None = None) -> MemoryEstimate:
    """Estimates the peak memory of one training step, part by part, from the model's shapes.

    What each part counts (``b`` examples of ``s`` tokens, ``L`` blocks, hidden size ``h``, MLP size
    ``i``, ``a`` heads, query width ``q = a * head_dim``, key/value width ``k``, vocabulary ``V``, ``e``
    bytes per activation (2 in bf16/fp16, 4 in fp32), adapters always float32 as peft keeps them):

    - weights: the base in its storage (fp32, bf16 on a CUDA GPU in bf16, or 4-bit NF4 at 0.5 byte plus
      block scales with the other modules in fp32, as ``prepare_model_for_kbit_training`` leaves them);
      adapter ``4 T``, gradients ``4 T``, optimizer states ``k T`` (8 AdamW, 2 8-bit AdamW);
    - kept by autograd per block and token (peft's ``lora.Linear.forward`` and transformers' Llama code):
      norms ``2 (4 h + 4)`` (RMSNorm upcasts its input to fp32 and keeps it), attention ``e (2 q + 2 k) +
      4 a`` with sdpa/flash (q, k, v, output, log-sum-exp) or ``4 q e + 4 a s`` (+ ``a s e``) with eager
      (keys/values repeated per head, the s x s probabilities), MLP ``3 i e`` (gate, its activation, up;
      ``2 i e`` for gated-SiLU MLPs, whose activation the kit's lean form recomputes);
      adapter inputs: ``lora_A`` keeps its input (in fp32: once per distinct tensor; under bf16/fp16
      autocast peft upcasts it and autocast casts it back per layer, so each adapted layer keeps its own
      half-precision copy), ``4 r`` for ``lora_A``'s output; dropout > 0: each layer's dropped input and
      its mask (4 bytes on CPU, 1 on CUDA); DoRA: the base and LoRA results it scales (``2 out e``);
    - gradient checkpointing: only block inputs per block (``4 h`` where the embeddings are fp32, as in a
      quantized model or under autocast, else ``h e``), plus one block recomputed at a time;
    - transient at the peak: one block's activation gradients in the backward pass; the loss through
      the head (``_loss_bytes``: the kit's chunked loss holds one chunk of scores, not the whole logits);
      with fp32 weights under bf16/fp16 autocast, the half-precision copies of every linear weight that
      autograd keeps; in 4-bit, the largest dequantized weight; with DoRA, the weight-norm work of the
      widest layer (an ``in x in`` identity and ``out x in`` copies in fp32).

    On a GPU the estimate is ``max_memory_allocated``; see :attr:`MemoryEstimate.device_bytes` for what
    the card needs on top (allocator headroom, CUDA context).

    Args:
        model_or_config: The base model, or its config (a parameter-free copy is built on the meta device).
        settings: The run's settings (LoRA, quantization, optimizer, precision, checkpointing).
        batch_size: Examples per step; default ``settings.train.per_device_train_batch_size``.
        seq_len: Tokens per example (a batch is padded to its longest); default ``settings.train.max_seq_length``.
        device: ``cuda`` or ``cpu``; default: this machine's.

    Returns:
        The estimate by part.
    """
    model = _as_model(model_or_config)
    train = settings.train
    device = device or ("cuda" if cuda_available() else "cpu")
    b = batch_size or train.per_device_train_batch_size
    s = seq_len or train.max_seq_length
    trainable, targets, adapted = _shapes(model, settings.lora)
    precision = train.resolved_precision()
    e = 2 if precision in ("bf16", "fp16") else 4
    weight_bytes = 2 if precision == "bf16" and device == "cuda" else 4  # what load_model(dtype="auto") gives
    autocast = e == 2 and (weight_bytes == 4 or settings.quant.load_in != "none")
    d = _dims(model.config)
    d["gated"] = any(lay.name in _GATED for lay in targets.layers)  # gate * act(up): three MLP tensors kept, not two
    # ... two under the kit's lean gated-SiLU MLP (`lean_layers`: silu(gate) is recomputed in the backward pass)
    d["lean mlp"] = (any(lay.name == "gate_proj" for lay in targets.layers)
                     and getattr(model.config, "hidden_act", None) in ("silu", "swish"))
    block = _block_bytes(d, adapted, settings, e, device, _attention(model.config), s)
    tokens = b * s
    n_blocks = max(d["layers"], 1)
    kept = {name: round(tokens * per_token) for name, per_token in block.items()}
    block_total = sum(kept.values()) / n_blocks
    parts = {
        "weights": _weight_bytes(model, targets, settings.quant, weight_bytes),
        "adapter": ADAPTER_BYTES * trainable,
        "gradients": ADAPTER_BYTES * trainable,
        "optimizer": OPTIMIZER_STATE_BYTES[train.optim] * trainable,
        "runtime": RUNTIME_BYTES,
    }
    if train.gradient_checkpointing:
        residual = 4 if weight_bytes == 4 or settings.quant.load_in != "none" else e  # fp32 embeddings: fp32 stream
        parts["checkpoints"] = round(tokens * n_blocks * d["hidden"] * residual)
        parts["backward"] = round(block_total * (1 + BACKWARD_BLOCKS))  # one block recomputed + its gradients
    else:
        parts |= kept
        parts["backward"] = round(block_total * BACKWARD_BLOCKS)
    head_bytes = 4 if settings.quant.load_in != "none" else weight_bytes  # quantized: the head stays fp32
    parts["loss through the head"] = _loss_bytes(model.config, d, tokens, e, head_bytes, device)
    parts["autocast weight copies"] = _autocast_copies(targets, settings.quant.load_in) if autocast else 0
    parts["dequantization"] = _dequantization_bytes(targets, settings.quant)
    parts["dora norm"] = max((lay.in_features ** 2 + 3 * lay.in_features * lay.out_features) * 4
                             for lay in adapted) if settings.lora.use_dora and adapted else 0
    notes = ["an estimate from formulas, checked against measured peaks on CPU (benchmarks/results/memory_grid.md); "
             "on an H200, 0.96-1.03x the kit's peak allocated memory, 0.89x with gradient checkpointing "
             "(benchmarks/results/gpu/)",
             f"attention: {_attention(model.config)}; precision {precision}, base weights "
             f"{ {'4bit': '4-bit NF4', '8bit': '8-bit'}.get(settings.quant.load_in, 'bf16' if weight_bytes == 2 else 'fp32') }"]
    if device == "cuda":
        notes.append(f"a GPU also needs allocator headroom (x{CUDA_RESERVE_FACTOR:.2f}) and the CUDA context "
                     f"(about {CUDA_CONTEXT_BYTES / 2**30:.1f} GiB): {_readable(CUDA_RESERVE_FACTOR * sum(parts.values()) + CUDA_CONTEXT_BYTES)} in all")
    return MemoryEstimate(parts=parts, batch_size=b, seq_len=s, gradient_checkpointing=train.gradient_checkpointing,
                          trainable=trainable, device=device, notes=notes)


def estimate_for_lengths(model_or_config: nn.Module | transformers.PretrainedConfig, settings: KitSettings,
                         lengths: list[int], device: str | None = None) -> dict[str, MemoryEstimate]:
    """Estimates for the data's own lengths beside the worst case ``max_seq_length``.

    A batch is padded to its longest example, and the kit groups examples of similar length, so the
    peak comes from the batch holding the longest example; a typical batch is about the median length.

    Args:
        model_or_config: The base model or its config.
        settings: The run's settings.
        lengths: Tokens per training example (before truncation).
        device: ``cuda`` or ``cpu``; default: this machine's.

    Returns:
        ``{"longest batch": ..., "typical batch": ..., "worst case": ...}``; without lengths only the worst case.
    """
    cap = settings.train.max_seq_length
    found = {}
    if lengths:
        ordered = sorted(min(n, cap) for n in lengths)
        found["longest batch"] = estimate_memory(model_or_config, settings, seq_len=max(ordered[-1], 1), device=device)
        found["typical batch"] = estimate_memory(model_or_config, settings, seq_len=max(ordered[len(ordered) // 2], 1),
                                                 device=device)
    found["worst case"] = estimate_memory(model_or_config, settings, seq_len=cap, device=device)
    return found


def _loss_bytes(config: Any, d: dict[str, Any], tokens: int, e: int, head_bytes: int, device: str) -> int:
    """The loss through the output head, at the end of the forward pass.

    The kit's chunked loss (`loss.head_cross_entropy`) holds the labelled rows and their gradient
    (``8 h`` per token, and their half-precision copy under bf16/fp16), one chunk's scores
    (`chunk_rows` rows by the whole vocabulary on a GPU, `CPU_CHUNK_ROWS` by a cache-sized block on a CPU: float32,
    and under bf16/fp16 also the half-precision product and copy) and, under bf16/fp16 with a
    float32 head, the head weight in half precision (``2 V h``). Heads it refuses (soft-capped or scaled logits,
    `batching.check_head_loss`) build the whole logits: ``V (12 + 2 [bf16])`` per token (the
    log-softmax output, its gradient and the logits' gradient, in fp32).
    """
    vocab, hidden = d["vocab"], d["hidden"]
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return tokens * vocab * (12 + (2 if e == 2 else 0))
    chunk = min(tokens, chunk_rows(vocab, device=torch.device(device)))
    block = min(vocab, vocab_block(chunk, vocab, torch.device(device)))
    scores = chunk * block * (8 if e == 2 else 4)  # fp32 scores; in half precision also the product and a copy
    head_copy = vocab * hidden * 2 if e == 2 and head_bytes == 4 else 0
    return tokens * hidden * (8 + (2 if e == 2 else 0)) + 2 * chunk * hidden * 4 + scores + head_copy


_SHAPES: dict[tuple[int, str], tuple[weakref.ref, tuple[int, Any, list[TargetLayer]]]] = {}


def _shapes(model: nn.Module, lora: LoraSettings) -> tuple[int, Any, list[TargetLayer]]:
    """Trainable count, adaptable layers and adapted layers; cached per model object and LoRA settings,
    so that a planner asking for many batch sizes reads the model's layers once."""
    key = (id(model), repr(lora))
    cached = _SHAPES.get(key)
    if cached is not None and cached[0]() is model:
        return cached[1]
    found = (count_trainable(model, lora)[0], find_targets(model, include_output_head=True), adapted_layers(model, lora))
    _SHAPES[key] = (weakref.ref(model), found)
    return found


def _as_model(model_or_config: Any) -> nn.Module:
    if isinstance(model_or_config, nn.Module):
        return model_or_config
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(model_or_config)


def _attention(config: Any) -> str:
    """The attention kernel transformers will use: sdpa unless the config asks for another."""
    return getattr(config, "_attn_implementation", None) or "sdpa"


def _weight_bytes(model: nn.Module, targets: Any, quant: Any, dense_bytes: int) -> float:
    total = sum(_logical_numel(p) for p in model.parameters())
    if quant.load_in == "none":
        return total * dense_bytes
    quantizable = sum(lay.in_features * lay.out_features for lay in targets.layers if lay.path != targets.output_head)
    per_weight = 1.0
    if quant.load_in == "4bit":
        scale = (1 + 4 / DOUBLE_QUANT_BLOCK) if quant.bnb_4bit_use_double_quant else 4
        per_weight = 0.5 + scale / NF4_BLOCK
    return round(quantizable * per_weight + (total - quantizable) * 4)  # the rest: fp32 after kbit preparation


def _autocast_copies(targets: Any, load_in: str) -> int:
    """Half-precision copies autocast makes of fp32 linear weights, kept by autograd for the backward pass."""
    dense = [lay for lay in targets.layers if load_in == "none" or lay.path == targets.output_head]
    return sum(lay.in_features * lay.out_features for lay in dense) * 2


def _dequantization_bytes(targets: Any, quant: Any) -> int:
    """4-bit: the widest layer's weight unpacked to the compute dtype, twice (forward and backward overlap)."""
    if quant.load_in != "4bit":
        return 0
    compute = 4 if quant.bnb_4bit_compute_dtype == "float32" else 2
    return 2 * compute * max((lay.in_features * lay.out_features for lay in targets.layers
                              if lay.path != targets.output_head), default=0)


def _dims(config: Any) -> dict[str, int]:
    """Reads sizes under the names different architectures use (GPT-2: n_embd, n_layer, n_head, n_inner)."""
    def first(*names: str) -> Any:
        return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)

    hidden = first("hidden_size", "n_embd")
    heads = first("num_attention_heads", "n_head")
    head_dim = first("head_dim") or hidden // heads
    kv_heads = first("num_key_value_heads") or heads
    return {"hidden": hidden, "layers": first("num_hidden_layers", "n_layer"), "heads": heads,
            "q": heads * head_dim, "kv": kv_heads * head_dim,
            "mlp": first("intermediate_size", "n_inner") or 4 * hidden, "vocab": first("vocab_size")}


def _block_bytes(d: dict, adapted: list[TargetLayer], settings: KitSettings, e: int, device: str,
                 attention: str, s: int) -> dict[str, float]:
    """Bytes per token that autograd keeps for the backward pass, summed over all blocks, by part."""
    lora = settings.lora
    n = max(d["layers"], 1)
    attn = e * (2 * d["q"] + 2 * d["kv"]) + 4 * d["heads"]
    if attention == "eager":
        attn = 4 * d["q"] * e + d["heads"] * s * (4 + (e if e < 4 else 0))
    mlp = (3 if d["gated"] and not d["lean mlp"] else 2) * d["mlp"] * e
    parts = {"norms": n * 2 * (4 * d["hidden"] + 4), "attention": n * attn, "mlp": n * mlp,
             "adapter inputs": 0.0, "adapter outputs": 0.0, "dropout masks": 0.0, "dora": 0.0}
    shared: set[tuple[Any, str]] = set()
    for lay in adapted:
        parts["adapter outputs"] += 4 * lora.r
        if lora.lora_dropout > 0:  # lora_A keeps the dropped input (in the compute dtype), dropout its mask
            parts["adapter inputs"] += e * lay.in_features
            parts["dropout masks"] += lay.in_features * (CPU_DROPOUT_MASK_BYTES if device == "cpu"
                                                         else CUDA_DROPOUT_MASK_BYTES)
        elif e == 2:  # bf16/fp16 autocast: each lora_A casts its (fp32-upcast) input and keeps its own copy
            parts["adapter inputs"] += 2 * lay.in_features
        else:  # fp32: layers reading the same tensor keep it once
            source = _SHARED_INPUT.get(lay.name, lay.path)
            key = (lay.layer_index, source)
            if source != "attn_out" and key not in shared:
                shared.add(key)
                parts["adapter inputs"] += 4 * lay.in_features
        if lora.use_dora:  # (m / norm - 1) * base_result + (m / norm) * lora_result keeps both results
            parts["dora"] += 2 * lay.out_features * e
    return parts
