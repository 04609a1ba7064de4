"""Data: load examples from a file, a `datasets` object or the hub, tokenize them for training.

Every example becomes a chat, `{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`,
whatever its source format (chat messages, or instruction/response pairs under the usual column
names). Tokenizing renders the chat with the tokenizer's chat template, the same text the model sees
when it answers, and masks the prompt:

    <|im_start|>system ... <|im_start|>user\nQuestion<|im_end|>\n<|im_start|>assistant\n | Answer<|im_end|>
    labels: -100 -100 ...                   -100 -100 ...                        -100 | Answer<|im_end|>

so that the loss is the answer's (and its end-of-turn token, which teaches the model to stop).
Batches are padded to their own longest example; grouping examples of similar length
(`group_by_length`) keeps the padding, which costs compute, small.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import datasets
import torch

from .errors import DataError, quote
from .probes import hub_reachable

IGNORE_INDEX = -100  # label value the loss skips (PyTorch's cross-entropy default)
ROLES = ("system", "user", "assistant")

# Column names understood for instruction/response pairs, in order of preference.
PROMPT_COLUMNS = ("instruction", "prompt", "question", "query")
CONTEXT_COLUMNS = ("input", "context")
RESPONSE_COLUMNS = ("output", "response", "answer", "completion")
CHAT_COLUMNS = ("messages", "conversations")
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}

PLAIN_PROMPT = "### Instruction:\n{prompt}\n\n### Response:\n"  # format for tokenizers without a chat template


# --------------------------------------------------------------------------------------- loading
def load_examples(source: Any, split: str | None = None):
    """Load training or evaluation examples as a `datasets.Dataset` with one `messages` column.

    Args:
        source: a path to a `.jsonl`, `.json` or `.csv` file; a `datasets.Dataset` or
            `DatasetDict`; or a Hugging Face hub data set ID (needs the network).
            Each record holds either `messages` (a list of `{"role", "content"}`, the last one the
            assistant's answer) or an instruction/response pair: `instruction`/`prompt`/
            `question`/`query`, optionally `input`/`context`, and `output`/`response`/`answer`/
            `completion`.
        split: which split of a `DatasetDict` or hub data set to use (default: `train`, or the only
            one there is).

    Returns:
        A `datasets.Dataset` with a `messages` column, one chat per example.

    Raises:
        DataError: the source cannot be found or read, is empty, or a record is malformed; the
            message names the file and line (or row) and the field.
    """
    if isinstance(source, datasets.DatasetDict):
        return _from_records(_pick_split(source, split, "the DatasetDict"), "the DatasetDict")
    if isinstance(source, datasets.Dataset):
        return _from_records(source, "the Dataset")
    if isinstance(source, str) and not source.strip():
        raise DataError(
            "The data path is empty (an unset shell variable?). Give a .jsonl/.json/.csv file, or leave the "
            "argument out to use the demo data."
        )
    if isinstance(source, str) and ("\0" in source or len(source) > 4096):
        raise DataError(f"{quote(source)} is not a usable path or hub ID (it holds a NUL character or is longer "
                        "than 4096 characters). Give a .jsonl/.json/.csv file.")
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if _is_file(path):
            return _from_records(read_records(path), str(path), file_rows=True)
        if _is_file(path, folder=True):
            raise DataError(f"{path} is a folder; pass a .jsonl, .json or .csv file inside it.")
        if path.suffix.lower() in (".jsonl", ".json", ".csv") or str(source).startswith((".", "/", "~")):
            raise DataError(f"Data file {path} does not exist. Check the path (relative paths start at {Path.cwd()}).")
        return _from_records(_load_hub(str(source), split), f"hub data set {source!r}")
    raise DataError(
        f"Cannot load examples from a {type(source).__name__}. Pass a .jsonl/.json/.csv path, a "
        "datasets.Dataset or DatasetDict, or a hub data set ID."
    )


def _is_file(path: Path, folder: bool = False) -> bool:
    """Whether ``path`` is a file (or, with ``folder``, exists at all); False where the OS cannot tell."""
    try:
        return path.exists() if folder else path.is_file()
    except OSError:  # e.g. a file name longer than the file system allows
        return False


def _pick_split(dd, split: str | None, where: str):
    names = list(dd.keys())
    if split is None:
        split = "train" if "train" in names else (names[0] if len(names) == 1 else None)
    if split not in names:
        raise DataError(f"{where} has the splits {quote(names)}; pass split= one of them.")
    return dd[split]


def _load_hub(repo_id: str, split: str | None):
    if not hub_reachable():
        raise DataError(
            f"{repo_id!r} is not a local file, so it would be a hub data set, but the Hugging Face hub "
            "cannot be reached. Use a local .jsonl/.json/.csv file (the demo data: "
            "lora_nb.demo_task.demo_data_paths()), or connect to the internet."
        )
    try:
        loaded = datasets.load_dataset(repo_id)
    except Exception as err:  # noqa: BLE001 - datasets raises many types; say it in the kit's words
        raise DataError(f"Could not load hub data set {repo_id!r}: {err}. Check the ID on huggingface.co/datasets.") from err
    return _pick_split(loaded, split, f"Hub data set {repo_id!r}")


def read_records(path: Path) -> list[tuple[int, Any]]:
    """The records of a JSONL, JSON or CSV file, each with where it stands in the file.

    Args:
        path: The file.

    Returns:
        `(line or row number, record)` pairs, in file order.

    Raises:
        DataError: an unknown file type, or a file that cannot be read or parsed.
    """
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv"):
        raise DataError(f"{path}: unknown file type {suffix!r}; the kit reads .jsonl, .json and .csv files.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 text (byte {raw[err.start]:#04x} at offset {err.start}). Save the "
            "file as UTF-8 (in most editors: 'Save with encoding' -> UTF-8)."
        ) from None
    if not text.strip():
        raise DataError(f"{path} is empty; it needs at least one example.")
    if suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue  # blank lines (often a trailing one) carry nothing
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno}). Each line of a "
                    ".jsonl file must be one complete JSON object."
                ) from None
            except RecursionError:
                raise DataError(f"{path}:{number}: nested too deeply to read. An example is an object holding "
                                "text fields or a `messages` list.") from None
        return records
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno}). A .json data "
                            "file holds one list of example objects; fix the line named.") from None
        except RecursionError:
            raise DataError(f"{path}: nested too deeply to read. A .json data file holds one list of example "
                            "objects, each with text fields or a `messages` list.") from None
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))  # {"train": [...]} or {"data": [...]}
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json data file must hold a list of example objects, not a {type(data).__name__}. "
                            "Put the examples in [ ... ], or use a .jsonl file with one object per line.")
        if not data:
            raise DataError(f"{path} holds an empty list; it needs at least one example.")
        return [(i, record) for i, record in enumerate(data)]
    return _read_csv(path, text)


def _read_csv(path: Path, text: str) -> list[tuple[int, Any]]:
    """Rows of a CSV file by line number; a row with more fields than the header is refused, not cut."""
    reader = csv.DictReader(io.StringIO(text))
    rows = []
    try:
        for row in reader:
            if None in row:  # DictReader puts the fields beyond the header under the key None
                raise DataError(
                    f"{path}:{reader.line_num}: {len(row) - 1 + len(row[None])} fields, but the header has "
                    f"{len(reader.fieldnames)} ({', '.join(map(str, reader.fieldnames))}). Quote fields that hold "
                    'commas ("like, this"), or add the missing column names to the header.'
                )
            rows.append((reader.line_num, row))
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: not valid CSV ({err}). Quote fields that hold commas, quotes "
                        "or line breaks, or save the file as .jsonl.") from None
    if not rows:
        raise DataError(f"{path} has a header line but no rows; it needs at least one example.")
    return rows


def _from_records(records: Iterable, where: str, file_rows: bool = False):
    """Normalise records to chats; `where` and the record numbers make the error messages."""
    if file_rows:
        numbered = list(records)
        suffix = Path(where).suffix.lower()
        label = "line" if suffix in (".jsonl", ".csv") else "record"
    else:
        numbered = list(enumerate(records))
        label = "row"
    if not numbered:
        raise DataError(f"{where} is empty; it needs at least one example.")
    chats = []
    for number, record in numbered:
        at = f"{where}:{number}" if label == "line" else f"{where}, {label} {number}"
        chats.append(_to_chat(record, at))
    return datasets.Dataset.from_dict({"messages": chats})


def _to_chat(record: Any, at: str) -> list[dict[str, str]]:
    if not isinstance(record, dict):
        raise DataError(f"{at}: an example must be a JSON object with `messages` or an instruction/response pair, "
                        f"got {type(record).__name__} {quote(record, 60)}.")
    chat_column = next((c for c in CHAT_COLUMNS if record.get(c) is not None), None)
    if chat_column:
        return _check_messages(record[chat_column], at, chat_column)
    prompt_column = next((c for c in PROMPT_COLUMNS if _text(record.get(c))), None)
    response_column = next((c for c in RESPONSE_COLUMNS if c in record), None)
    context_column = next((c for c in CONTEXT_COLUMNS if _text(record.get(c))), None)
    if prompt_column is None and context_column == "input":
        prompt_column, context_column = "input", None  # input/output pairs
    if prompt_column is None or response_column is None:
        missing = []
        if prompt_column is None:
            missing.append("a prompt field (" + "/".join(PROMPT_COLUMNS) + ")")
        if response_column is None:
            missing.append("a response field (" + "/".join(RESPONSE_COLUMNS) + ")")
        raise DataError(
            f"{at}: missing {' and '.join(missing)}; found the fields {quote(sorted(map(str, record)), 200)}. Each example "
            "needs `messages` or an instruction/response pair."
        )
    response = record[response_column]
    if not _text(response):
        raise DataError(f"{at}: field `{response_column}` is empty or not text; every example needs an answer to learn.")
    prompt = record[prompt_column].strip()
    if context_column:
        prompt += "\n\n" + record[context_column].strip()
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _check_messages(messages: Any, at: str, column: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{at}: `{column}` must be a non-empty list of {{\"role\", \"content\"}} objects, got "
                        f"{quote(messages, 60)}.")
    chat = []
    for k, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{at}: `{column}[{k}]` must be an object with `role` and `content`.")
        role = message.get("role", message.get("from"))
        content = message.get("content", message.get("value"))
        role = _SHAREGPT_ROLES.get(role, role) if isinstance(role, str) else role
        if role not in ROLES:
            raise DataError(f"{at}: `{column}[{k}].role` is {quote(role, 60)}; allowed roles are {', '.join(ROLES)}.")
        if not isinstance(content, str):
            raise DataError(f"{at}: `{column}[{k}].content` is missing or not text; give each message a `content` text.")
        chat.append({"role": role, "content": content})
    if chat[-1]["role"] != "assistant" or not chat[-1]["content"].strip():
        raise DataError(
            f"{at}: the last message must be the assistant's non-empty answer (it is what the model "
            f"learns); it is a {chat[-1]['role']!r} message."
        )
    if not any(m["role"] == "user" for m in chat):
        raise DataError(f"{at}: `{column}` holds no user message; add the question the answer replies to.")
    return chat


# ------------------------------------------------------------------------------------ tokenizing
def render_prompt(messages: Sequence[dict], tokenizer) -> str:
    """The text the model reads before answering: the chat up to the last answer, as prompt.

    Uses the tokenizer's chat template (with the generation prompt) when it has one, else the
    plain `### Instruction / ### Response` format.

    Args:
        messages: The chat before the answer (`[{"role": ..., "content": ...}]`), all of it rendered.
        tokenizer: The model's tokenizer.

    Returns:
        The prompt text, ending where the answer starts.
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    turns = [m["content"] for m in messages]
    return PLAIN_PROMPT.format(prompt="\n\n".join(turns))


def _prompt_and_answer_ids(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of the answer ending with the end-of-turn token."""
    prompt_messages, answer = messages[:-1], messages[-1]["content"]
    eos = tokenizer.eos_token
    if getattr(tokenizer, "chat_template", None):
        prompt_text = render_prompt(prompt_messages, tokenizer)
        full_text = tokenizer.apply_chat_template(messages, tokenize=False)
        if full_text.startswith(prompt_text):
            answer_text = full_text[len(prompt_text):]
        else:  # a template that renders earlier turns differently once an answer follows
            answer_text = answer + (eos or "")
        if eos and eos in answer_text:
            answer_text = answer_text[: answer_text.rindex(eos) + len(eos)]  # drop what follows end-of-turn
            answer_ids = tokenizer(answer_text, add_special_tokens=False)["input_ids"]
        else:
            answer_ids = tokenizer(answer_text.rstrip(), add_special_tokens=False)["input_ids"]
            answer_ids += [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]  # template holds specials
    else:
        prompt_ids = tokenizer(render_prompt(prompt_messages, tokenizer))["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        answer_ids += [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return prompt_ids, answer_ids


def tokenize_examples(dataset, tokenizer, max_length: int, train_on_responses_only: bool = True):
    """Tokenize chats for causal-LM training, with the prompt masked out of the loss.

    Args:
        dataset: a `datasets.Dataset` with a `messages` column (as `load_examples` returns), or
            anything `load_examples` accepts.
        tokenizer: the model's tokenizer; its chat template is used when it has one.
        max_length: longest sequence kept, in tokens; longer examples are cut at the end.
        train_on_responses_only: True masks the prompt (labels -100) so only the answer and its
            end-of-turn token are learned; False learns every token.

    Returns:
        A `datasets.Dataset` with `input_ids`, `attention_mask`, `labels`, `length` (tokens, used
        by `group_by_length`) and `truncated` (bool) columns.

    Raises:
        DataError: `max_length` is not positive, or every example lost its whole answer to truncation.
    """
    if not isinstance(max_length, int) or max_length < 2:
        raise DataError(f"max_length is {max_length!r}; it must be an integer of at least 2 tokens (typical: 512-2048).")
    if not (isinstance(dataset, datasets.Dataset) and "messages" in dataset.column_names):
        dataset = load_examples(dataset)
    columns: dict[str, list] = {k: [] for k in ("input_ids", "attention_mask", "labels", "length", "truncated")}
    n_truncated = n_dropped = longest = 0
    for messages in dataset["messages"]:
        prompt_ids, answer_ids = _prompt_and_answer_ids(messages, tokenizer)
        ids = prompt_ids + answer_ids
        if train_on_responses_only:
            labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
        else:
            labels = list(ids)
        longest = max(longest, len(ids))
        truncated = len(ids) > max_length
        if truncated:
            n_truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
            if all(label == IGNORE_INDEX for label in labels):
                n_dropped += 1  # nothing left to learn from this example
                continue
        columns["input_ids"].append(ids)
        columns["attention_mask"].append([1] * len(ids))
        columns["labels"].append(labels)
        columns["length"].append(len(ids))
        columns["truncated"].append(truncated)
    if n_truncated:
        dropped = f"; {n_dropped} of them lost their whole answer and were left out" if n_dropped else ""
        warnings.warn(
            f"{n_truncated} of {len(dataset)} examples were longer than max_length={max_length} tokens "
            f"(longest: {longest}) and were cut at the end{dropped}. Raise max_seq_length if memory "
            "allows, or shorten those examples.",
            stacklevel=2,
        )
    if not columns["input_ids"]:
        raise DataError(
            f"Every example lost its whole answer to truncation at max_length={max_length}; the prompts "
            f"alone are longer. Raise max_seq_length (longest example: {longest} tokens)."
        )
    return datasets.Dataset.from_dict(columns)


# ------------------------------------------------------------------------------------- batching
class PadCollator:
    """Pad a batch to its longest example: pad ids, attention mask 0, labels -100.

    The pad token often equals the end-of-turn token (SmolLM2: `<|im_end|>`), so padding is told
    apart by the attention mask and the -100 labels, never by the token id.
    """

    def __init__(self, tokenizer_or_pad_id, pad_to_multiple_of: int | None = None):
        if isinstance(tokenizer_or_pad_id, int):
            pad_id = tokenizer_or_pad_id
        else:
            pad_id = tokenizer_or_pad_id.pad_token_id
            if pad_id is None:
                pad_id = tokenizer_or_pad_id.eos_token_id
        if pad_id is None:
            raise DataError("The tokenizer has neither a pad token nor an end-of-sequence token to pad with; set tokenizer.pad_token.")
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict:
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            ids = list(f["input_ids"])
            pad = width - len(ids)
            labels = list(f["labels"]) if "labels" in f else list(ids)
            batch["input_ids"].append(ids + [self.pad_id] * pad)
            batch["attention_mask"].append([1] * len(ids) + [0] * pad)
            batch["labels"].append(labels + [IGNORE_INDEX] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


def padding_efficiency(lengths: Sequence[int], batch_size: int, order: Sequence[int] | None = None) -> float:
    """Share of the padded batch positions that hold real tokens, batching `order` (default: as given).

    1.0 means no padding; 0.5 means half of the compute goes to padding.

    Args:
        lengths: Token count of each example.
        batch_size: Examples per batch.
        order: The order the examples are batched in (indices into `lengths`).

    Returns:
        Real tokens divided by padded positions, from 0 to 1.
    """
    order = list(range(len(lengths))) if order is None else list(order)
    real = padded = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start : start + batch_size]]
        real += sum(batch)
        padded += max(batch) * len(batch)
    return real / padded if padded else 1.0


class LengthStats(dict):
    """The dict `length_stats` returns: exact values, shown with 3 decimals (0.913, not 0.9132608695652173)."""

    def __repr__(self) -> str:
        return "{" + ", ".join(f"{k!r}: {round(v, 3) if isinstance(v, float) else v!r}" for k, v in self.items()) + "}"

    __str__ = __repr__

    def _repr_pretty_(self, printer, cycle) -> None:  # IPython's display of a cell's last value
        printer.text(repr(self))


def length_stats(tokenized, batch_size: int = 8) -> dict[str, float]:
    """Token-length summary of a tokenized data set, and what padding would cost.

    Args:
        tokenized: a data set from `tokenize_examples`.
        batch_size: the batch size whose padding is estimated.

    Returns:
        `min`, `median`, `max`, `mean` (tokens), `n`, `truncated` (count), `padding_efficiency`
        (batches in data set order) and `padding_efficiency_grouped` (batches of sorted lengths,
        the best that length grouping can reach). Printed, floats show 3 decimals; the values
        stay exact.
    """
    lengths = list(tokenized["length"]) if "length" in tokenized.column_names else [len(x) for x in tokenized["input_ids"]]
    if not lengths:
        raise DataError("The tokenized data set is empty; there is nothing to summarise.")
    truncated = sum(tokenized["truncated"]) if "truncated" in tokenized.column_names else 0
    by_length = sorted(range(len(lengths)), key=lengths.__getitem__)
    return LengthStats({
        "n": len(lengths),
        "min": min(lengths),
        "median": statistics.median(lengths),
        "max": max(lengths),
        "mean": statistics.fmean(lengths),
        "truncated": truncated,
        "padding_efficiency": padding_efficiency(lengths, batch_size),
        "padding_efficiency_grouped": padding_efficiency(lengths, batch_size, by_length),
    })


MASK_OPEN, MASK_CLOSE = "[MASKED>", "<MASKED]"


def show_example(tokenized, tokenizer, i: int = 0) -> str:
    """Decode example `i` with the tokens left out of the loss between `[MASKED>` and `<MASKED]`.

    What lies outside the markers is what the model learns to write.

    Args:
        tokenized: `tokenize_examples` output.
        tokenizer: The tokenizer that made it.
        i: Which example.

    Returns:
        The decoded text with the markers.
    """
    if not 0 <= i < len(tokenized):
        raise IndexError(f"Example {i} does not exist; the data set has {len(tokenized)} examples (0-{len(tokenized) - 1}).")
    ids, labels = tokenized[i]["input_ids"], tokenized[i]["labels"]
    parts, run, run_masked = [], [], None
    for token, label in zip(ids, labels):
        masked = label == IGNORE_INDEX
        if run and masked != run_masked:
            parts.append((run_masked, run))
            run = []
        run.append(token)
        run_masked = masked
    if run:
        parts.append((run_masked, run))
    text = ""
    for masked, tokens in parts:
        piece = tokenizer.decode(tokens)
        text += f"{MASK_OPEN}{piece}{MASK_CLOSE}" if masked else piece
    return text
