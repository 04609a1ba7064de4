"""Export: the merged model as a GGUF file for llama.cpp and Ollama, with an Ollama Modelfile.

    run_dir/adapter ──merge──> export/merged/  (safetensors, full precision)
                                   │
                                   ├──> export/model-f16.gguf    llama.cpp / Ollama, 2 bytes a weight
                                   ├──> export/model-q8_0.gguf   8.5 bits a weight, answers as F16 does
                                   └──> export/Modelfile         FROM + TEMPLATE + SYSTEM + PARAMETER stop

A GGUF file is one file holding the tensors under llama.cpp's names (`blk.0.attn_q.weight`, from
gguf's `TensorNameMap`) and the metadata llama.cpp needs to run them: the architecture's sizes, the
tokenizer (vocabulary, merges, token types, the bos/eos/eot/pad ids) and the chat template. The
`gguf` package writes it (`GGUFWriter`) and quantizes (`gguf.quants`); nothing here calls llama.cpp.

Two things go wrong silently in hand-made exports, and are handled here:

- Rotary embeddings: HF Llama rotates dimension pairs (i, i + d/2) of each head, llama.cpp pairs
  (2i, 2i + 1). The rows of q_proj and k_proj are permuted on the way out (as llama.cpp's own
  converter does; transformers' GGUF reader permutes them back).
- Stop tokens: a chat model ends its answer with an end-of-turn token (`<|im_end|>` in ChatML). If
  the GGUF's `tokenizer.ggml.eot_token_id` and the Modelfile's `PARAMETER stop` lose it, the
  runtime never stops and the model writes the user's next turn itself. It is found by rendering
  the chat template, not guessed from the token's name.

`check_round_trip` loads a GGUF back with transformers and measures it against the merged model.
Supported: the Llama architecture (Llama 2/3 shapes, SmolLM, TinyLlama...) with a byte-level BPE
tokenizer; other architectures and tokenizers are refused with an `ExportError` that says so.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import gguf
import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .adapters import base_model_of, find_adapter, merge_adapter
from .errors import ExportError
from .files import write_text_atomic
from .loading import resolve_model

GgufType = Literal["f32", "f16", "q8_0"]
GGUF_TYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
# transformers model_type -> llama.cpp architecture. Other Llama-shaped types (mistral, qwen2, ...)
# need their own keys and checks in llama.cpp; they are refused rather than written wrongly.
SUPPORTED_ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA}
SUPPORTED_ROPE_TYPES = ("default",)
MODELFILE = "Modelfile"
MERGED_DIR = "merged"
EXPORT_DIR = "export"

# The pre-tokenizer names llama.cpp knows (`tokenizer.ggml.pre`), told apart by the steps of the
# tokenizer's pre-tokenizer: the regex that splits text before the BPE merges run.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_MARKER = "lora-nb-end-of-turn-probe"


# ---------------------------------------------------------------------------------------------------------------
# Writing a GGUF file
# ---------------------------------------------------------------------------------------------------------------


def export_gguf(model_dir: str | Path, out_file: str | Path, gguf_type: GgufType = "f16",
                name: str | None = None) -> Path:
    """Write a Hugging Face model folder (a merged model) as one GGUF file.

    Args:
        model_dir: A folder `save_pretrained` wrote: config.json, safetensors weights, tokenizer.
        out_file: The GGUF file to write (replaced atomically when it exists).
        gguf_type: "f16" (2D weights in float16), "q8_0" (2D weights in 8-bit blocks of 32, rows
            whose length is not a multiple of 32 in float16) or "f32". Norm weights stay float32.
        name: The model name stored in `general.name` (default: the folder's name).

    Returns:
        `out_file`.

    Raises:
        ExportError: unknown `gguf_type`, an architecture, rope scaling or tokenizer the kit cannot
            export, a weight with no llama.cpp name, no safetensors weights, or the file cannot be written.
    """
    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"GGUF type {gguf_type!r} is not one the kit writes; choose one of {sorted(GGUF_TYPES)}.")
    model_dir = Path(model_dir).expanduser()
    config = AutoConfig.from_pretrained(model_dir)
    arch = _architecture(config)
    tokenizer = _load_tokenizer(model_dir)
    qtype, file_type = GGUF_TYPES[gguf_type]
    out = Path(out_file).expanduser()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
        os.close(fd)
    except OSError as err:
        raise ExportError(f"Cannot write {out} ({err.strerror or err}); choose a folder you can write to.") from err
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch], use_temp_file=True)
    try:
        writer.add_name(name or model_dir.name)
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_hyperparameters(writer, config)
        _add_tokenizer(writer, tokenizer, config)
        for gguf_name, data in _gguf_tensors(model_dir, config, arch):
            _add_tensor(writer, gguf_name, data, qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except OSError as err:
        raise ExportError(f"Cannot write {out} ({err.strerror or err}); check the free disk space "
                          "and that the folder is writable.") from err
    finally:
        writer.close()
        Path(tmp).unlink(missing_ok=True)
    return out


def _architecture(config) -> gguf.MODEL_ARCH:
    """llama.cpp's architecture for a config, or an ExportError naming what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ExportError(
            f"The model's architecture is {model_type!r}; the kit exports GGUF for {sorted(SUPPORTED_ARCHITECTURES)} "
            "only. For other architectures run llama.cpp's convert_hf_to_gguf.py on the merged folder."
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ExportError(
            f"The model uses rope scaling {rope_type!r}; the kit exports rope types {list(SUPPORTED_ROPE_TYPES)} only "
            "(llama.cpp stores other scalings as extra tensors). Run llama.cpp's convert_hf_to_gguf.py on the "
            "merged folder instead."
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ExportError(f"The model's activation is {config.hidden_act!r}; llama.cpp's llama architecture "
                          "computes 'silu' only, so the export would answer differently. Not exported.")
    return SUPPORTED_ARCHITECTURES[model_type]


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _add_hyperparameters(writer: gguf.GGUFWriter, config) -> None:
    """The `llama.*` keys, as llama.cpp's converter writes them."""
    rope = getattr(config, "rope_parameters", None) or {}
    head_dim = _head_dim(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [model_dir / n for n in names]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    raise ExportError(f"{model_dir} holds no safetensors weights (model.safetensors or its index). Save the "
                      "merged model with save_pretrained (safetensors is its default) and export that folder.")


def _gguf_tensors(model_dir: Path, config, arch: gguf.MODEL_ARCH):
    """Yield `(gguf_name, float32 array)` for every weight, renamed and (q, k) permuted for llama.cpp."""
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for file in _weight_files(model_dir):
        with safe_open(file, framework="pt") as weights:
            for hf_name in weights.keys():
                if tied and hf_name == "lm_head.weight":
                    continue  # llama.cpp reuses token_embd when output.weight is absent
                gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise ExportError(
                        f"The weight {hf_name!r} of {model_dir} has no name in llama.cpp's Llama layout, so the "
                        "GGUF would miss it. Export a plain Llama model (merged, without extra modules)."
                    )
                data = weights.get_tensor(hf_name).float().numpy()
                if re.search(r"\.q_proj\.(weight|bias)$", hf_name):
                    data = _permute_rotary(data, heads)
                elif re.search(r"\.k_proj\.(weight|bias)$", hf_name):
                    data = _permute_rotary(data, kv_heads)
                yield gguf_name, data


def _permute_rotary(weights: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder each head's rows from HF's rotary layout (i, i + d/2) to llama.cpp's (2i, 2i + 1)."""
    return (weights.reshape(n_heads, 2, weights.shape[0] // n_heads // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def _add_tensor(writer: gguf.GGUFWriter, name: str, data: np.ndarray,
                qtype: gguf.GGMLQuantizationType) -> None:
    """Store one tensor: 1D ones (norms, biases) in F32, matrices in `qtype`."""
    if data.ndim <= 1 or qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, data.astype(np.float32))
        return
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if qtype == gguf.GGMLQuantizationType.F16 or data.shape[-1] % block:
        writer.add_tensor(name, data.astype(np.float16))  # llama.cpp's fallback for rows Q8_0 cannot cut
        return
    writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and chat template
# ---------------------------------------------------------------------------------------------------------------


def _load_tokenizer(model_dir: Path):
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise ExportError(f"{model_dir} holds no tokenizer transformers can load ({err}); a GGUF file carries the "
                          "tokenizer, so save it next to the model (tokenizer.save_pretrained).") from err


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for how this byte-level BPE tokenizer splits text.

    Raises:
        ExportError: the tokenizer is not byte-level BPE, or splits text in a way the kit does not map.
    """
    spec = _tokenizer_json(tokenizer)
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    byte_level = kinds and kinds[-1] == "ByteLevel" and not steps[-1].get("add_prefix_space", False)
    if model.get("type") == "BPE" and byte_level and spec.get("normalizer") is None:
        regex = steps[-1].get("use_regex", True)
        if kinds == ["ByteLevel"] and regex:
            return "gpt2"
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and regex:
            return "smollm"
        if kinds == ["Split", "ByteLevel"] and (steps[0].get("pattern") or {}).get("Regex") == _LLAMA3_SPLIT and not regex:
            return "llama-bpe"
    raise ExportError(
        f"The tokenizer is {model.get('type')!r} with pre-tokenizer steps {kinds} and normalizer "
        f"{(spec.get('normalizer') or {}).get('type')}; the kit exports byte-level BPE tokenizers that split text "
        "like GPT-2, SmolLM or Llama 3. For others (sentencepiece, e.g. Llama 2) run llama.cpp's "
        "convert_hf_to_gguf.py on the merged folder."
    )


def _tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"The tokenizer ({type(tokenizer).__name__}) has no fast (tokenizers) backend to read "
                          "the vocabulary and merges from; save the model with a tokenizer.json.")
    return json.loads(backend.to_str())


def end_of_turn_token(tokenizer) -> str | None:
    """The special token that closes an assistant turn in the tokenizer's chat template.

    Found by rendering a chat whose answer is a marker and reading what follows it (`<|im_end|>` in
    ChatML, `<|eot_id|>` in Llama 3); the EOS token when there is no template or nothing special follows.
    """
    if getattr(tokenizer, "chat_template", None):
        chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _MARKER}]
        try:
            text = tokenizer.apply_chat_template(chat, tokenize=False)
        except Exception:  # noqa: BLE001 - a template may refuse this chat; the EOS token is the answer then
            text = ""
        after = text.split(_MARKER, 1)[1].lstrip() if _MARKER in text else ""
        for token in sorted(_special_tokens(tokenizer), key=len, reverse=True):
            if after.startswith(token):
                return token
    return tokenizer.eos_token


def _special_tokens(tokenizer) -> set[str]:
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return {t.content for t in added.values() if getattr(t, "special", False)} | set(tokenizer.all_special_tokens)


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer, config) -> None:
    """Vocabulary, merges, token types, special ids and chat template, under llama.cpp's keys."""
    spec = _tokenizer_json(tokenizer)
    pre = pre_tokenizer_name(tokenizer)
    vocab = tokenizer.get_vocab()
    size = config.vocab_size  # rows of the embedding; llama.cpp wants one token per row
    if max(vocab.values()) >= size:
        raise ExportError(
            f"The tokenizer has token ids up to {max(vocab.values())} but the model's embedding has {size} rows, "
            "so llama.cpp would refuse the file. Call model.resize_token_embeddings(len(tokenizer)) before "
            "training or merging."
        )
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    for token, index in vocab.items():
        tokens[index] = token
        if index in added:
            types[index] = gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED
        else:
            types[index] = gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    eot = end_of_turn_token(tokenizer)
    if eot is not None:
        writer.add_eot_token_id(tokenizer.convert_tokens_to_ids(eot))
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(probe) and tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)


# ---------------------------------------------------------------------------------------------------------------
# Ollama Modelfile
# ---------------------------------------------------------------------------------------------------------------

# Ollama's Go template for ChatML (`<|im_start|>role\ncontent<|im_end|>\n` per message, then the
# assistant's header): the form Ollama's own ChatML models use.
OLLAMA_CHATML_TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
    "{{ .Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n"
)


def _chatml(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def chatml_default_system(tokenizer) -> str | None:
    """Whether the tokenizer's chat template is ChatML, and its default system prompt.

    Returns:
        None when the template is not ChatML (or there is none); else the system prompt the template
        inserts when a chat brings none ("" when it inserts nothing).
    """
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return None
    user = [{"role": "user", "content": "Hello there"}]
    turns = [{"role": "system", "content": "Be brief."}, *user, {"role": "assistant", "content": "Hi."},
             {"role": "user", "content": "And now?"}]
    try:
        alone = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template that cannot render these chats is not ChatML
        return None
    if full != _chatml(turns):
        return None
    if alone == _chatml(user):
        return ""
    found = re.fullmatch(r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n", alone[: -len(_chatml(user))] or "x", re.S)
    return found.group(1) if found and alone.endswith(_chatml(user)) else None


def modelfile_text(tokenizer, gguf_file: str | Path) -> str:
    """An Ollama Modelfile for a GGUF file: the chat template, the default system prompt and the stop tokens.

    ChatML templates become Ollama's Go template; for any other template the TEMPLATE line is left
    out (with a warning) so Ollama picks a template from the GGUF's `tokenizer.chat_template`.
    """
    lines = [f"# Ollama Modelfile written by lora-nb. Run: ollama create NAME -f {MODELFILE} && ollama run NAME",
             f"FROM ./{Path(gguf_file).name}"]
    system = chatml_default_system(tokenizer)
    stops = [end_of_turn_token(tokenizer), tokenizer.eos_token]
    if system is None:
        warnings.warn(
            "The chat template is not ChatML, so the Modelfile has no TEMPLATE line: Ollama then chooses a template "
            "from the GGUF's tokenizer.chat_template. Check it with `ollama show NAME --template`.",
            stacklevel=2,
        )
    else:
        lines.append(f'TEMPLATE """{OLLAMA_CHATML_TEMPLATE}"""')
        if system:
            lines.append(f'SYSTEM """{system}"""')
        stops.append("<|im_start|>")  # a new turn starting also ends the answer
    for stop in dict.fromkeys(s for s in stops if s):
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    return "\n".join(lines) + "\n"


def write_modelfile(model_dir: str | Path, gguf_file: str | Path, out_file: str | Path | None = None) -> Path:
    """Write `modelfile_text` for `gguf_file` next to it (or to `out_file`).

    Args:
        model_dir: The exported model folder (its tokenizer holds the chat template and special tokens).
        gguf_file: The GGUF file the Modelfile points to (by a relative `FROM ./name`).
        out_file: Where to write (default: `Modelfile` in the GGUF file's folder).

    Returns:
        The Modelfile's path.
    """
    out = Path(out_file) if out_file else Path(gguf_file).with_name(MODELFILE)
    write_text_atomic(out, modelfile_text(_load_tokenizer(Path(model_dir)), gguf_file), error=ExportError)
    return out


# ---------------------------------------------------------------------------------------------------------------
# A run folder, start to end
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ExportResult:
    """What `export_run` wrote.

    Attributes:
        out_dir: The export folder.
        merged_dir: The merged model (safetensors) the GGUF files were written from.
        gguf_files: GGUF file per type, e.g. `{"f16": .../model-f16.gguf, "q8_0": ...}`.
        modelfile: The Ollama Modelfile (it points to the last type exported).
    """

    out_dir: Path
    merged_dir: Path
    gguf_files: dict[str, Path] = field(default_factory=dict)
    modelfile: Path | None = None

    def ollama_commands(self, name: str = "my-lora") -> list[str]:
        """The shell commands that run the export in Ollama and in llama.cpp."""
        gguf_file = next(reversed(self.gguf_files.values()))
        return [f"cd {self.out_dir}", f"ollama create {name} -f {MODELFILE}", f"ollama run {name}",
                f"llama-cli -m {gguf_file} -cnv"]


def export_run(run_dir: str | Path, out_dir: str | Path | None = None,
               gguf_types: Sequence[GgufType] = ("f16", "q8_0"), base: str | None = None) -> ExportResult:
    """Merge a run's adapter into its base model and export it as GGUF files plus an Ollama Modelfile.

    Args:
        run_dir: A run folder (or an adapter folder).
        out_dir: Where to write (default: `<run_dir>/export`).
        gguf_types: The GGUF types to write, e.g. ("f16", "q8_0").
        base: Base model ID or folder (default: the one recorded with the run).

    Returns:
        An `ExportResult`.

    Raises:
        ExportError: see `export_gguf`; nothing is merged when the architecture is unsupported.
        RunFolderError: the folder holds no adapter.
    """
    bad = [t for t in gguf_types if t not in GGUF_TYPES]
    if bad or not gguf_types:
        raise ExportError(f"GGUF types {bad or list(gguf_types)} are not ones the kit writes; choose from {sorted(GGUF_TYPES)}.")
    run_dir = Path(run_dir).expanduser()
    find_adapter(run_dir)
    base = base or base_model_of(run_dir)
    _architecture(AutoConfig.from_pretrained(resolve_model(base)))  # refuse before the (slow) merge
    out = Path(out_dir).expanduser() if out_dir else run_dir / EXPORT_DIR
    merged = merge_adapter(run_dir, out / MERGED_DIR, base=base, dtype="float32")
    result = ExportResult(out, merged)
    for gguf_type in gguf_types:
        result.gguf_files[gguf_type] = export_gguf(merged, out / f"model-{gguf_type}.gguf", gguf_type,
                                                   name=f"{run_dir.name} (lora-nb)")
    result.modelfile = write_modelfile(merged, result.gguf_files[gguf_types[-1]])
    return result


# ---------------------------------------------------------------------------------------------------------------
# Round trip: load the GGUF back and compare
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RoundTrip:
    """The GGUF model measured against the model it was exported from.

    Attributes:
        gguf_file: The GGUF file.
        max_logit_difference: Largest |logit difference| over every position of every sequence.
        token_agreement: Share of the merged model's greedy answer tokens that the GGUF model also
            predicts (teacher-forced on the same sequences, so one miss does not shift the rest).
        answer_tokens: How many answer tokens were compared.
        chat_template_same: The GGUF's chat template equals the model's.
        end_of_turn: The model's end-of-turn token.
        end_of_turn_same: The GGUF names the same end-of-turn token (`tokenizer.ggml.eot_token_id`)
            and its tokenizer spells that id the same way.
        prompts_tokenized_same: Share of the chat-formatted prompts the GGUF's tokenizer (as
            transformers rebuilds it) cuts into the same tokens.
    """

    gguf_file: Path
    max_logit_difference: float
    token_agreement: float
    answer_tokens: int
    chat_template_same: bool
    end_of_turn: str | None
    end_of_turn_same: bool
    prompts_tokenized_same: float

    def to_dict(self) -> dict[str, Any]:
        """The measurements as plain values (for JSON or a table)."""
        return {"gguf_file": str(self.gguf_file), "max_logit_difference": self.max_logit_difference,
                "token_agreement": self.token_agreement, "answer_tokens": self.answer_tokens,
                "chat_template_same": self.chat_template_same, "end_of_turn": self.end_of_turn,
                "end_of_turn_same": self.end_of_turn_same, "prompts_tokenized_same": self.prompts_tokenized_same}


def check_round_trip(model_dir: str | Path, gguf_file: str | Path, prompts: Sequence[str | Sequence[dict]],
                     max_new_tokens: int = 24) -> RoundTrip:
    """Load a GGUF file back with transformers and compare it with the model folder it came from.

    Args:
        model_dir: The exported (merged) model folder.
        gguf_file: A GGUF file `export_gguf` wrote from it.
        prompts: User messages (or whole chats) formatted with the model's chat template.
        max_new_tokens: Length of the merged model's greedy answer to each prompt.

    Returns:
        A `RoundTrip`.
    """
    return check_round_trips(model_dir, [gguf_file], prompts, max_new_tokens)[0]


def check_round_trips(model_dir: str | Path, gguf_files: Sequence[str | Path],
                      prompts: Sequence[str | Sequence[dict]], max_new_tokens: int = 24) -> list[RoundTrip]:
    """`check_round_trip` for several GGUF files of one model: its answers are generated once.

    Returns:
        One `RoundTrip` per file, in order.
    """
    tokenizer = _load_tokenizer(Path(model_dir))
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    chats = [[{"role": "user", "content": p}] if isinstance(p, str) else list(p) for p in prompts]
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    answers = []  # (prompt length, prompt + greedy answer, the reference's logits over it)
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            answer = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                        do_sample=False, pad_token_id=tokenizer.pad_token_id)
            answers.append((ids.shape[1], answer, reference(answer).logits[0]))
    del reference
    with _each_gguf_parsed_once():
        return [_compare(tokenizer, texts, answers, Path(f).expanduser()) for f in gguf_files]


@contextlib.contextmanager
def _each_gguf_parsed_once() -> Iterator[None]:
    """Within the block, each GGUF file's metadata is parsed once and each tensor-name map built once.

    transformers' GGUF loading parses a file anew for the config, the weights and the tokenizer
    (`gguf.GGUFReader` reads the 49k-entry vocabulary and merges in Python: seconds each), and builds
    `gguf.get_tensor_name_map` once per module (794 times for the demo model). On 2 CPU cores that was
    80% of a round-trip check (155 of 176 s for two files). Both are looked up on the `gguf` module
    when called, so they are replaced there, with the same results, and restored on exit.
    """
    readers: dict[tuple[str, str], gguf.GGUFReader] = {}
    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map

    def reader(path, mode: str = "r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = real_reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(real_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_map


def _compare(tokenizer, texts: list[str], answers: list, gguf_file: Path) -> RoundTrip:
    """One GGUF file against the reference's answers and logits."""
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32).eval()
    loaded_tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    worst, agree, total = 0.0, 0, 0
    with torch.no_grad():
        for n, answer, expected in answers:
            logits = loaded(answer).logits[0]
            worst = max(worst, (expected - logits).abs().max().item())
            agree += (logits[n - 1:-1].argmax(-1) == answer[0, n:]).sum().item()  # logits at i predict token i + 1
            total += answer.shape[1] - n
    same = sum(loaded_tokenizer(t, add_special_tokens=False)["input_ids"]
               == tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts)
    eot = end_of_turn_token(tokenizer)
    eot_id = gguf_eot_id(gguf_file)
    return RoundTrip(
        gguf_file=gguf_file,
        max_logit_difference=worst,
        token_agreement=agree / total if total else 1.0,
        answer_tokens=total,
        chat_template_same=loaded_tokenizer.chat_template == tokenizer.chat_template,
        end_of_turn=eot,
        end_of_turn_same=eot is not None and eot_id == tokenizer.convert_tokens_to_ids(eot)
        and loaded_tokenizer.convert_ids_to_tokens(eot_id) == eot,
        prompts_tokenized_same=same / len(texts) if texts else 1.0,
    )


def gguf_eot_id(gguf_file: str | Path) -> int | None:
    """The end-of-turn token id a GGUF file names (`tokenizer.ggml.eot_token_id`), or None."""
    field_ = gguf.GGUFReader(gguf_file).fields.get(gguf.Keys.Tokenizer.EOT_ID)
    return None if field_ is None else int(field_.contents())
