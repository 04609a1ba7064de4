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

from .adapters import check_pristine_base
from .errors import ModelLoadError, RunFolderError
from .files import damaged_weights

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
    from .arguments import check_generation
    from .data import render_prompt

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
    from .arguments import check_generation

    check_generation(max_new_tokens)  # before the first of two generation passes
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
    from jinja2 import TemplateError
    from tqdm.auto import tqdm

    from .arguments import check_generation
    from .data import load_examples
    from .demo_task import score_predictions
    from .model_checks import template_refusal

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

    folder = _writable_run_folder(run_dir, METRICS_FILE, GENERATIONS_FILE)
    write_text_atomic(folder.path / METRICS_FILE, json.dumps(report.metrics, indent=2) + "\n")
    text = "# Generations before and after training\n\n" + report.generations.to_markdown()
    write_text_atomic(folder.path / GENERATIONS_FILE, text)
    if folder.run_file.exists():
        folder.record_written(METRICS_FILE, GENERATIONS_FILE)


def _writable_run_folder(run_dir: str | Path, *names: str):
    """The run folder, after checking that none of `names` there is a file the kit did not write.

    Raises:
        RunFolderError: one of them exists and the folder's run.json does not record writing it.
    """
    from .train import RunFolder

    folder = RunFolder(run_dir)
    ours = folder.written()
    foreign = [n for n in names if (folder.path / n).exists() and n not in ours]
    if foreign:
        raise RunFolderError(
            f"{folder.path} already holds {', '.join(foreign)}, which this kit did not write there (no run.json of "
            "the kit records it). Nothing was overwritten: pass a run folder of the kit, or move those files away."
        )
    return folder


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
    for file in sorted(folder.iterdir()):
        problem = damaged_weights(file)
        if problem:
            raise ModelLoadError(
                f"The adapter file {file} {problem}, so the adapter cannot be loaded. Copy it again from where it "
                "was saved, or train the run again."
            )
    _warn_other_weights(base_model, folder)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return PeftModel.from_pretrained(base_model, str(folder), is_trainable=trainable)
    except (ValueError, RuntimeError, KeyError) as err:  # peft's and torch's own refusals
        from .model_checks import model_name

        trained_on = _adapter_base(folder)
        raise ModelLoadError(
            f"The adapter in {folder} (trained on {trained_on!r}) does not fit {model_name(base_model)}: "
            f"{str(err).splitlines()[0][:300]} Load the base model it was trained on "
            "(evaluate.base_model_of(run_dir) names it) and put the adapter on that."
        ) from None


def _adapter_base(folder: Path) -> str:
    try:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "an unknown model"
    return str(config.get("base_model_name_or_path") or "an unknown model") if isinstance(config, dict) else "an unknown model"


def _warn_other_weights(base_model, adapter_folder: Path) -> None:
    """Warn when the run that saved the adapter recorded other base weights than `base_model` has."""
    import warnings

    from .train import RUN_FILE, RunFolder, weights_digest

    run = adapter_folder.parent
    if not (run / RUN_FILE).exists():
        return
    try:
        saved = (RunFolder(run).read_run().get("model") or {}).get("weights")
    except RunFolderError:
        return
    if saved and saved != weights_digest(base_model):
        warnings.warn(
            f"The adapter in {adapter_folder} was trained on a model with other weights than this one (same names "
            f"and shapes, different values: {run / RUN_FILE} records another weights digest). Its answers will not "
            "be the trained ones: load the run's base model (evaluate.base_model_of) to get them.",
            UserWarning,
            stacklevel=3,
        )


def base_model_of(run_or_adapter_dir: str | Path) -> str:
    """Which base model an adapter belongs to: the run's `model_name_or_path`, else the adapter config's."""
    from .train import RunFolder

    path = Path(run_or_adapter_dir).expanduser()
    if (path / "run.json").exists():
        name = RunFolder(path).read_run().get("model_name_or_path")
        if name:
            return str(name)
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
        `out_dir`, loadable with `AutoModelForCausalLM.from_pretrained(out_dir)`; it also holds
        `lora-nb-merged.json`, the kit's record that it wrote the folder (a later merge may replace it).

    Raises:
        RunFolderError: `out_dir` is a file, the base model's or the adapter's folder, or a folder
            with files the kit did not write; nothing is overwritten then.
    """
    from .demo import resolve_model
    from .files import write_folder_atomic
    from .loading import load_model

    adapter = find_adapter(run_or_adapter_dir)
    base = base or base_model_of(run_or_adapter_dir)
    out = Path(out_dir).expanduser()
    _check_merge_target(out, Path(resolve_model(base)).expanduser(), adapter)
    model, tokenizer = load_model(base, "none", dtype=dtype)
    merged = load_adapter(model, adapter).merge_and_unload()

    def write(staging: Path) -> None:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        record = {"base": str(base), "adapter": str(adapter), "dtype": dtype, "merged": time.strftime("%Y-%m-%d %H:%M:%S")}
        (staging / MERGE_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    return write_folder_atomic(out, write)


MERGE_RECORD = "lora-nb-merged.json"


def _check_merge_target(out: Path, base: Path, adapter: Path) -> None:
    """Refuse a merge target that would overwrite what the kit did not write.

    Raises:
        RunFolderError: `out` is a file, the base model's folder (or inside or around it), the
            adapter's folder, or a non-empty folder without the kit's merge record.
    """
    resolved = out.resolve()
    for folder, what in ((base.resolve(), "the base model's folder"), (adapter.resolve(), "the adapter's folder")):
        if folder.exists() and (resolved == folder or folder in resolved.parents or resolved in folder.parents):
            raise RunFolderError(
                f"Cannot merge into {out}: it is {what} ({folder}) or holds it, and merging there would overwrite "
                "its files. Pass a new folder, e.g. runs/merged-<name>."
            )
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"Cannot merge into {out}: it is a file, not a folder. Pass a new folder name.")
    if out.is_dir() and any(out.iterdir()) and not (out / MERGE_RECORD).exists():
        names = sorted(p.name for p in out.iterdir())
        raise RunFolderError(
            f"Cannot merge into {out}: it already holds {names[:5]}{' ...' if len(names) > 5 else ''}, which this kit "
            f"did not write (a merged model of the kit holds {MERGE_RECORD}). Nothing was overwritten: pass a new or "
            "empty folder."
        )
