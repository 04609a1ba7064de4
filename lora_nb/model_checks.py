"""Model checks: can the kit train this model on this data, asked before the long work starts.

Each check answers in one kit error naming the model, the limit and the fix, instead of a wrong
result or a crash halfway through training:

- an encoder (BERT, RoBERTa...) loaded with `AutoModelForCausalLM` looks like a causal LM but
  attends to later tokens, so "predict the next token" is answered by looking at it. Tested the
  way it matters: change the last token of an input and see whether earlier predictions move;
- learned position embeddings (GPT-2, OPT, BERT) have a fixed number of rows: a longer example
  is an IndexError mid-training. Rotary models (Llama...) run past their trained length, worse;
- a chat template that refuses an example (Gemma's and Mistral's refuse a system turn) raises a
  template error from deep inside tokenizing; the kit names the data file and line.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .data import read_records
from .errors import DataError, ModelLoadError, SettingsError

_POSITION_NAMES = ("wpe", "position_embeddings", "embed_positions", "pos_emb")


def model_name(model) -> str:
    """How messages name a model: its folder or hub ID and its architecture.

    Args:
        model: A transformers model (or a peft model around one).

    Returns:
        E.g. `'HuggingFaceTB/SmolLM2-135M-Instruct' (llama)`.
    """
    config = getattr(model, "config", None)
    where = str(getattr(config, "_name_or_path", "") or "this model")
    return f"{where!r} ({getattr(config, 'model_type', type(model).__name__)})"


def check_causal(model) -> None:
    """Refuse a model whose predictions look at later tokens (an encoder loaded as a causal LM).

    Two forwards of 4-token inputs that differ only in the last token: in a causal LM the logits
    of the first three positions are the same for both (a random-init BERT moves them by 0.5%).

    Args:
        model: The model to train.

    Raises:
        ModelLoadError: earlier positions changed.
    """
    config = model.config
    vocab = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config, "vocab_size", 2) or 2
    ids = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 5]]) % vocab
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():  # one input per call: the same kernels see the same prefix, so a causal model
            first, second = (model(input_ids=row[None].to(device)).logits.float() for row in ids)  # gives equal logits
    finally:
        model.train(was_training)
    moved = (first[0, :3] - second[0, :3]).abs().max().item()
    if moved > 1e-4 * max(1e-2, first.abs().max().item()):
        raise ModelLoadError(
            f"{model_name(model)} is not a causal (decoder-only) language model: its predictions for earlier tokens "
            f"change when a later token changes (bidirectional attention, as in BERT), so it would learn to copy the "
            "next token instead of predicting it. Use a decoder-only model (Llama, Qwen, Mistral, SmolLM2, GPT-2...)."
        )


def position_limit(model) -> tuple[int, bool] | None:
    """The longest input the model takes, and whether exceeding it crashes.

    Args:
        model: A transformers model.

    Returns:
        `(limit, learned)`: `learned` is True for a table of learned position embeddings (an
        IndexError past its rows), False for a trained length from the config (rotary models run
        past it, with worse results). None when the model states no limit.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in _POSITION_NAMES:
            return module.num_embeddings - int(getattr(module, "offset", 0)), True  # OPT keeps 2 extra rows
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value, False
    return None


def check_positions(model, max_seq_length: int, longest: int) -> None:
    """Refuse sequences longer than learned position embeddings hold; warn past a rotary model's length.

    Args:
        model: The base model.
        max_seq_length: The setting (`train.max_seq_length`).
        longest: The longest tokenized example, in tokens.

    Raises:
        SettingsError: the model has learned positions and `max_seq_length` exceeds them.
    """
    found = position_limit(model)
    if found is None:
        return
    limit, learned = found
    if learned and max_seq_length > limit:
        raise SettingsError(
            f"train.max_seq_length is {max_seq_length}, but {model_name(model)} has position embeddings for "
            f"{limit} tokens only (a longer example would crash training with an IndexError): set "
            f"train.max_seq_length to {limit} or less."
        )
    if not learned and longest > limit:
        warnings.warn(
            f"The longest example has {longest} tokens, more than the {limit} {model_name(model)} was trained on "
            f"(max_position_embeddings): it runs, but quality beyond {limit} tokens is poor. Set "
            f"train.max_seq_length to {limit} or less to cut such examples.",
            UserWarning,
            stacklevel=3,
        )


def template_refusal(err: Exception, messages_list: list, tokenizer, source: Any) -> DataError:
    """The kit's error for a chat template that refused an example: the data file and line, and the fix.

    Args:
        err: The template's error (jinja2 `TemplateError`, from the template's `raise_exception`).
        messages_list: The examples' message lists, to find the first one the template refuses.
        tokenizer: The tokenizer whose template refused.
        source: Where the examples came from (a path names the file and line).
    """
    index = _first_refused(messages_list, tokenizer)
    where = _where(source, index)
    roles = [m.get("role") for m in messages_list[index]] if index is not None else []
    fix = ("This model's chat template has no system turn: put the system text at the start of the first user "
           "message, or drop it." if "system" in roles or "system" in str(err).lower() else
           "Change the example to the turns this model's template accepts (see tokenizer.chat_template).")
    return DataError(f"{where}: the chat template of {tokenizer.name_or_path!r} refuses this example ({err}). {fix}")


def _first_refused(messages_list: list, tokenizer) -> int | None:
    for i, messages in enumerate(messages_list):
        try:
            tokenizer.apply_chat_template(list(messages), tokenize=False)
        except Exception:  # noqa: BLE001 - any refusal of the template marks the example
            return i
    return None


def _where(source: Any, index: int | None) -> str:
    if index is None:
        return "an example"
    if isinstance(source, (str, Path)) and Path(source).expanduser().is_file():
        path = Path(source).expanduser()
        try:
            number = read_records(path)[index][0]
        except (DataError, IndexError):
            return f"{path}, example {index + 1}"
        label = ":" if path.suffix.lower() in (".jsonl", ".csv") else ", record "
        return f"{path}{label}{number}"
    return f"example {index + 1} (row {index})"
