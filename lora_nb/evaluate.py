"""Evaluate: held-out loss, greedy generations before and after, the task metric; save, reload, merge.

Before/after comparisons use ONE model: a `PeftModel` answers "before" with its adapter switched
off (`disable_adapter()`), so no second copy of the base is loaded.

Merging: `merge_and_unload()` on a 4-bit base re-quantizes the merged weights, and the logits move
(measured on the demo model: up to 8.9, only 60% of next-token choices kept). `merge_adapter`
therefore reloads the base in full precision, loads the adapter, merges, and saves a standalone
model folder that loads with plain `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import html
import json
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple, Sequence

from .errors import ModelLoadError, RunFolderError

if TYPE_CHECKING:
    import torch

Prompt = str | list[dict]


# ---------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------


class Table(list):
    """A list of row dicts that shows as an HTML table in a notebook and as Markdown in a file."""

    def columns(self) -> list[str]:
        """Column names, in first-seen order."""
        names: dict[str, None] = {}
        for row in self:
            names.update(dict.fromkeys(row))
        return list(names)

    def _repr_html_(self) -> str:
        head = "".join(f"<th style='text-align:left'>{html.escape(c)}</th>" for c in self.columns())
        body = "".join(
            "<tr>" + "".join(
                f"<td style='text-align:left;white-space:pre-wrap'>{html.escape(_cell(row.get(c)))}</td>"
                for c in self.columns()) + "</tr>"
            for row in self
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def to_markdown(self) -> str:
        """A GitHub-flavoured Markdown table (newlines and pipes escaped)."""
        cols = self.columns()
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for row in self:
            cells = [_cell(row.get(c)).replace("|", "\\|").replace("\n", "<br>") for c in cols]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):  # a chat: show the last user turn
        users = [m["content"] for m in value if m.get("role") == "user"]
        return users[-1] if users else str(value)
    return str(value)


# ---------------------------------------------------------------------------------------------------------------
# Data helpers
# ---------------------------------------------------------------------------------------------------------------


def prompts_and_references(data: Any, limit: int | None = None) -> tuple[list[list[dict]], list[str]]:
    """Split chat examples into prompts (the chat before the last answer) and reference answers.

    Args:
        data: Anything `data.load_examples` accepts (a .jsonl path, a `datasets.Dataset`, ...).
        limit: Keep only the first `limit` examples.

    Returns:
        `(prompts, references)`: prompts as message lists, references as the answer texts.
    """
    from .data import load_examples

    examples = load_examples(data)
    chats = examples["messages"][: limit if limit is not None else None]
    return [list(chat[:-1]) for chat in chats], [chat[-1]["content"] for chat in chats]


@contextmanager
def _eval_mode(model) -> Iterator[None]:
    """Eval mode and no gradients for the block; the earlier mode is restored afterwards."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _adapter_off(model, off: bool):
    """`model.disable_adapter()` when asked and the model has an adapter, else a no-op context."""
    return model.disable_adapter() if off and hasattr(model, "disable_adapter") else nullcontext()


# ---------------------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------------------


class HeldoutLoss(NamedTuple):
    """Mean cross-entropy per answer token, and its exponential (perplexity)."""

    loss: float
    perplexity: float


def heldout_loss(model, tokenizer, data: Any, batch_size: int = 8, max_length: int = 512,
                 adapter: bool = True) -> HeldoutLoss:
    """Loss of the model on held-out examples, counting answer tokens only (the prompt is masked).

    The mean is over tokens, not over batches, so padding and batch size do not change it.

    Args:
        model: A causal LM or a `PeftModel`.
        tokenizer: Its tokenizer.
        data: Examples (anything `data.load_examples` accepts) or `data.tokenize_examples` output.
        batch_size: Examples per forward pass.
        max_length: Longest example in tokens (longer ones are cut).
        adapter: False evaluates a `PeftModel` with its adapter switched off (the base model).

    Returns:
        `HeldoutLoss(loss, perplexity)`; unpacks as `loss, perplexity = heldout_loss(...)`.
    """
    import datasets
    import torch.nn.functional as F

    from .data import IGNORE_INDEX, PadCollator, tokenize_examples

    if not (isinstance(data, datasets.Dataset) and "labels" in data.column_names):
        data = tokenize_examples(data, tokenizer, max_length)
    collate = PadCollator(tokenizer)
    device = _device(model)
    total, count = 0.0, 0
    with _eval_mode(model), _adapter_off(model, not adapter):
        for start in range(0, len(data), batch_size):
            rows = [data[i] for i in range(start, min(start + batch_size, len(data)))]
            batch = {k: v.to(device) for k, v in collate(rows).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            total += F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                     ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((labels != IGNORE_INDEX).sum())
    loss = total / max(count, 1)
    return HeldoutLoss(loss, math.exp(min(loss, 50.0)))


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------


def generate(model, tokenizer, prompts: Prompt | Sequence[Prompt], max_new_tokens: int = 40, batch_size: int = 8,
             adapter: bool = True) -> list[str]:
    """Greedy answers to chat prompts, batched with left padding.

    Args:
        model: A causal LM or a `PeftModel`.
        tokenizer: Its tokenizer (its padding side is restored afterwards).
        prompts: One prompt or a list; each a user message text or a message list
            (`[{"role": "user", "content": ...}]`); a trailing assistant message is dropped.
        max_new_tokens: Longest answer in tokens.
        batch_size: Prompts per `generate` call.
        adapter: False answers with a `PeftModel`'s adapter switched off (the base model).

    Returns:
        The answers (new text only, special tokens removed, stripped), one per prompt.
    """
    from .data import render_prompt

    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict)):
        prompts = [prompts]
    chats = [_as_chat(p) for p in prompts]
    texts = [render_prompt(chat, tokenizer) for chat in chats]
    device = _device(model)
    answers: list[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # batched generation continues from the last real token
    try:
        with _eval_mode(model), _adapter_off(model, not adapter):
            for start in range(0, len(texts), batch_size):
                batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                                  add_special_tokens=False).to(device)
                out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                     temperature=None, top_p=None, top_k=None)
                new = out[:, batch["input_ids"].shape[1]:]
                answers += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
    return answers


def _as_chat(prompt: Prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    chat = list(prompt)
    if chat and chat[-1].get("role") == "assistant":
        chat = chat[:-1]
    return chat


def max_logit_difference(model_a, model_b, tokenizer, texts: Sequence[str]) -> float:
    """Largest absolute difference between two models' logits on the same texts (0.0 = identical).

    Used to check that a reloaded adapter or a merged model computes what the trained one did.
    """

    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        batch = tokenizer(list(texts), return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    mask = batch["attention_mask"].bool()
    with _eval_mode(model_a), _eval_mode(model_b):
        a = model_a(**batch.to(_device(model_a))).logits.float().cpu()
        b = model_b(**batch.to(_device(model_b))).logits.float().cpu()
    worst = (a - b).abs()[mask].max().item()
    return worst


def compare_generations(base, tuned, tokenizer, prompts: Sequence[Prompt], references: Sequence[str] | None = None,
                        max_new_tokens: int = 40) -> Table:
    """Answers of the base and the tuned model side by side.

    Args:
        base: The base model; None (or the tuned model itself) means the tuned `PeftModel` with
            its adapter switched off, so no second copy is needed.
        tuned: The model with the adapter.
        tokenizer: The tokenizer.
        prompts: Prompts as `generate` takes them.
        references: Expected answers, shown in their own column when given.
        max_new_tokens: Longest answer in tokens.

    Returns:
        A `Table` of rows `{"prompt", "reference", "before", "after"}` (HTML in a notebook).
    """
    if base is None or base is tuned:
        before = generate(tuned, tokenizer, prompts, max_new_tokens, adapter=False)
    else:
        before = generate(base, tokenizer, prompts, max_new_tokens)
    after = generate(tuned, tokenizer, prompts, max_new_tokens)
    table = Table()
    for i, prompt in enumerate(prompts):
        row = {"prompt": _cell(_as_chat(prompt))}
        if references is not None:
            row["reference"] = references[i]
        row |= {"before": before[i], "after": after[i]}
        table.append(row)
    return table


# ---------------------------------------------------------------------------------------------------------------
# Before/after report
# ---------------------------------------------------------------------------------------------------------------

METRICS_FILE = "metrics.json"
GENERATIONS_FILE = "generations.md"


@dataclass
class EvalReport:
    """Before/after numbers of a run.

    Attributes:
        metrics: `{"before": {...}, "after": {...}, "n_examples": N, "seconds": s}`: each side holds
            `heldout_loss`, `perplexity` and the task metric's keys (e.g. `exact_match`).
        generations: The side-by-side answers.
    """

    metrics: dict[str, Any]
    generations: Table = field(default_factory=Table)

    def summary(self) -> Table:
        """One row per metric: before, after, change."""
        before, after = self.metrics["before"], self.metrics["after"]
        rows = Table()
        for key in before:
            if isinstance(before[key], (int, float)) and key != "n":
                rows.append({"metric": key, "before": before[key], "after": after[key],
                             "change": after[key] - before[key]})
        return rows

    def _repr_html_(self) -> str:
        return self.summary()._repr_html_()


def evaluate_run(model, tokenizer, heldout: Any, run_dir: str | Path | None = None, limit: int | None = None,
                 max_new_tokens: int = 40, score: Callable[[Sequence[str], Sequence[str]], dict] | None = None,
                 max_length: int = 512) -> EvalReport:
    """Held-out loss, perplexity, generations and the task metric, before and after the adapter.

    Args:
        model: A `PeftModel` (before = its adapter switched off).
        tokenizer: The tokenizer.
        heldout: Held-out examples (anything `data.load_examples` accepts).
        run_dir: When given, `metrics.json` and `generations.md` are written there.
        limit: Use only the first `limit` examples (faster; the loss uses the same subset).
        max_new_tokens: Longest generated answer.
        score: `score(predictions, references) -> dict` of task metrics; default: the demo task's
            `score_predictions` (exact JSON match, valid JSON, keys correct).
        max_length: Longest example in tokens for the loss.

    Returns:
        An `EvalReport`.
    """
    from .data import load_examples
    from .demo_task import score_predictions

    score = score or score_predictions
    started = time.perf_counter()
    examples = load_examples(heldout)
    if limit is not None:
        examples = examples.select(range(min(limit, len(examples))))
    prompts, references = prompts_and_references(examples)
    metrics: dict[str, Any] = {}
    for side, adapter in (("before", False), ("after", True)):
        loss = heldout_loss(model, tokenizer, examples, max_length=max_length, adapter=adapter)
        answers = generate(model, tokenizer, prompts, max_new_tokens, adapter=adapter)
        metrics[side] = {"heldout_loss": loss.loss, "perplexity": loss.perplexity, **score(answers, references)}
        metrics[f"_{side}_answers"] = answers
    before, after = metrics.pop("_before_answers"), metrics.pop("_after_answers")
    table = Table({"prompt": _cell(p), "reference": r, "before": b, "after": a}
                  for p, r, b, a in zip(prompts, references, before, after))
    metrics["n_examples"] = len(prompts)
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    report = EvalReport(metrics, table)
    if run_dir is not None:
        write_report(report, run_dir)
    return report


def write_report(report: EvalReport, run_dir: str | Path) -> None:
    """Write `metrics.json` and `generations.md` into the run folder."""
    from .files import write_text_atomic

    run_dir = Path(run_dir)
    write_text_atomic(run_dir / METRICS_FILE, json.dumps(report.metrics, indent=2) + "\n")
    text = "# Generations before and after training\n\n" + report.generations.to_markdown()
    write_text_atomic(run_dir / GENERATIONS_FILE, text)


# ---------------------------------------------------------------------------------------------------------------
# Adapters: save, load, merge
# ---------------------------------------------------------------------------------------------------------------


def save_adapter(model, adapter_dir: str | Path) -> Path:
    """Save only the adapter weights and config (19.6 MB for the demo recipe: 4.9M fp32 parameters), atomically.

    Args:
        model: A `PeftModel`.
        adapter_dir: Target folder (replaced when it exists).

    Returns:
        The folder.
    """
    from .train import save_adapter as _save

    if not hasattr(model, "peft_config"):
        raise RunFolderError("save_adapter needs a model with a LoRA adapter (a PeftModel); this one has none.")
    return _save(model, Path(adapter_dir).expanduser())


def find_adapter(run_or_adapter_dir: str | Path) -> Path:
    """The adapter folder of a run folder (its `adapter/`), or the folder itself when it is one.

    Raises:
        RunFolderError: Neither holds `adapter_config.json`.
    """
    path = Path(run_or_adapter_dir).expanduser()
    for candidate in (path, path / "adapter"):
        if (candidate / "adapter_config.json").exists():
            return candidate
    raise RunFolderError(
        f"No adapter in {path}: neither it nor {path / 'adapter'} holds adapter_config.json. Pass a run folder "
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
    """
    import warnings

    from peft import PeftModel

    folder = find_adapter(adapter_dir)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return PeftModel.from_pretrained(base_model, str(folder), is_trainable=trainable)


def base_model_of(run_or_adapter_dir: str | Path) -> str:
    """Which base model an adapter belongs to: the run's `model_name_or_path`, else the adapter config's."""
    path = Path(run_or_adapter_dir).expanduser()
    run_file = path / "run.json"
    if run_file.exists():
        name = json.loads(run_file.read_text(encoding="utf-8")).get("model_name_or_path")
        if name:
            return name
    config = json.loads((find_adapter(path) / "adapter_config.json").read_text(encoding="utf-8"))
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
        `out_dir`, loadable with `AutoModelForCausalLM.from_pretrained(out_dir)`.
    """
    from .loading import load_model

    adapter = find_adapter(run_or_adapter_dir)
    base = base or base_model_of(run_or_adapter_dir)
    model, tokenizer = load_model(base, "none", dtype=dtype)
    merged = load_adapter(model, adapter).merge_and_unload()
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
