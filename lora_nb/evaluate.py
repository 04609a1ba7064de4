"""Evaluate: held-out loss, greedy generations before and after, the task metric.

Before/after comparisons use ONE model: a `PeftModel` answers "before" with its adapter switched
off (`disable_adapter()`), so no second copy of the base is loaded. Saving, reloading and merging
an adapter live in `adapters.py`.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import datasets
import torch
import torch.nn.functional as F
from jinja2 import TemplateError
from tqdm.auto import tqdm

from .adapters import check_pristine_base
from .arguments import check_generation
from .data import IGNORE_INDEX, PadCollator, load_examples, render_prompt, tokenize_examples
from .demo_task import score_predictions
from .files import write_text_atomic
from .model_checks import template_refusal
from .run_folder import GENERATIONS_FILE, METRICS_FILE, RunFolder
from .table import Table, cell_text

Prompt = str | list[dict]


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
    examples = load_examples(data)
    chats = examples["messages"][: limit if limit is not None else None]
    return [list(chat[:-1]) for chat in chats], [chat[-1]["content"] for chat in chats]


@contextmanager
def _eval_mode(model) -> Iterator[None]:
    """Eval mode and no gradients for the block; the earlier mode is restored afterwards."""
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
    """`model.disable_adapter()` when asked and the model has an adapter, else a no-op context.

    Raises:
        ModelLoadError: the adapter's init rewrote the base weights and they were not put back, so
            the model with its adapter off is not the base model.
    """
    if not (off and hasattr(model, "disable_adapter")):
        return nullcontext()
    check_pristine_base(model)
    return model.disable_adapter()


# ---------------------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------------------


class HeldoutLoss(NamedTuple):
    """Mean cross-entropy per answer token, and its exponential (perplexity)."""

    loss: float
    perplexity: float


def heldout_loss(model, tokenizer, data: Any, batch_size: int = 8, max_length: int = 512,
                 adapter: bool = True, progress: Callable[[int], Any] | None = None) -> HeldoutLoss:
    """Loss of the model on held-out examples, counting answer tokens only (the prompt is masked).

    The mean is over tokens, not over batches, so padding and batch size do not change it.

    Args:
        model: A causal LM or a `PeftModel`.
        tokenizer: Its tokenizer.
        data: Examples (anything `data.load_examples` accepts) or `data.tokenize_examples` output.
        batch_size: Examples per forward pass.
        max_length: Longest example in tokens (longer ones are cut).
        adapter: False evaluates a `PeftModel` with its adapter switched off (the base model).
        progress: Called with the number of examples after each batch (e.g. a progress bar's `update`).

    Returns:
        `HeldoutLoss(loss, perplexity)`; unpacks as `loss, perplexity = heldout_loss(...)`.
    """
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
            if progress is not None:
                progress(len(rows))
    loss = total / max(count, 1)
    return HeldoutLoss(loss, math.exp(min(loss, 50.0)))


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------


def generate(model, tokenizer, prompts: Prompt | Sequence[Prompt], max_new_tokens: int = 40, batch_size: int = 8,
             adapter: bool = True, progress: Callable[[int], Any] | None = None) -> list[str]:
    """Greedy answers to chat prompts, batched with left padding.

    Args:
        model: A causal LM or a `PeftModel`.
        tokenizer: Its tokenizer (its padding side is restored afterwards).
        prompts: One prompt or a list; each a user message text or a message list
            (`[{"role": "user", "content": ...}]`); a trailing assistant message is dropped.
        max_new_tokens: Longest answer in tokens.
        batch_size: Prompts per `generate` call.
        adapter: False answers with a `PeftModel`'s adapter switched off (the base model).
        progress: Called with the number of prompts after each batch (e.g. a progress bar's `update`).

    Returns:
        The answers (new text only, special tokens removed, stripped), one per prompt.
    """
    check_generation(max_new_tokens)
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
                if progress is not None:
                    progress(len(new))
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

    Args:
        model_a: A causal LM or a `PeftModel`.
        model_b: Another one with the same tokenizer.
        tokenizer: The tokenizer (its padding side is restored afterwards).
        texts: Plain texts, padded on the right; padding positions are not compared.

    Returns:
        The largest absolute logit difference over all real positions and the vocabulary.
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
    check_generation(max_new_tokens)  # before the first of two generation passes
    if base is None or base is tuned:
        before = generate(tuned, tokenizer, prompts, max_new_tokens, adapter=False)
    else:
        before = generate(base, tokenizer, prompts, max_new_tokens)
    after = generate(tuned, tokenizer, prompts, max_new_tokens)
    table = Table()
    for i, prompt in enumerate(prompts):
        row = {"prompt": cell_text(_as_chat(prompt))}
        if references is not None:
            row["reference"] = references[i]
        row |= {"before": before[i], "after": after[i]}
        table.append(row)
    return table


# ---------------------------------------------------------------------------------------------------------------
# Before/after report
# ---------------------------------------------------------------------------------------------------------------

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
    check_generation(max_new_tokens, limit)  # before the slow loss and generation passes
    score = score or score_predictions
    started = time.perf_counter()
    examples = load_examples(heldout)
    if limit is not None:
        examples = examples.select(range(min(limit, len(examples))))
    prompts, references = prompts_and_references(examples)
    metrics: dict[str, Any] = {}
    # Generation takes most of the time (tens of seconds on CPU): a bar over loss and answers, both sides.
    bar = tqdm(total=4 * len(prompts), desc="evaluating before/after", unit="example")
    for side, adapter in (("before", False), ("after", True)):
        try:
            loss = heldout_loss(model, tokenizer, examples, max_length=max_length, adapter=adapter, progress=bar.update)
            answers = generate(model, tokenizer, prompts, max_new_tokens, adapter=adapter, progress=bar.update)
        except TemplateError as err:  # e.g. a template without a system turn: name the file and line
            bar.close()
            raise template_refusal(err, examples["messages"], tokenizer, heldout) from None
        metrics[side] = {"heldout_loss": loss.loss, "perplexity": loss.perplexity, **score(answers, references)}
        metrics[f"_{side}_answers"] = answers
    bar.close()
    before, after = metrics.pop("_before_answers"), metrics.pop("_after_answers")
    table = Table({"prompt": cell_text(p), "reference": r, "before": b, "after": a}
                  for p, r, b, a in zip(prompts, references, before, after))
    metrics["n_examples"] = len(prompts)
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    report = EvalReport(metrics, table)
    if run_dir is not None:
        write_report(report, run_dir)
    return report


def write_report(report: EvalReport, run_dir: str | Path) -> None:
    """Write `metrics.json` and `generations.md` into the run folder.

    Args:
        report: What `evaluate_run` measured.
        run_dir: The run folder.

    Raises:
        RunFolderError: a file of those names is there that the kit did not write (nothing is
            overwritten), or the files cannot be written.
    """
    folder = RunFolder(run_dir)
    folder.check_writable(METRICS_FILE, GENERATIONS_FILE)
    write_text_atomic(folder.path / METRICS_FILE, json.dumps(report.metrics, indent=2) + "\n")
    text = "# Generations before and after training\n\n" + report.generations.to_markdown()
    write_text_atomic(folder.path / GENERATIONS_FILE, text)
    if folder.run_file.exists():
        folder.record_written(METRICS_FILE, GENERATIONS_FILE)
