"""Pipeline: the whole walkthrough without notebooks, load -> configure -> train -> evaluate.

`run_pipeline` is what `python -m lora_nb run` (and the `lora-nb` console script) calls. With no
arguments it trains the demo model on the demo data with the "demo-cpu" preset and writes one run
folder:

    out/
      settings.yaml, run.json, log.jsonl, adapter/   written by train()
      metrics.json       held-out loss, perplexity and task metric before and after
      generations.md     the held-out answers before and after, side by side
      loss.png           training and held-out loss against the step
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .arguments import check_run_arguments
from .demo import DEMO_MODEL_ID
from .demo_task import demo_data_paths
from .errors import SettingsError
from .formats import load_settings
from .host_memory import release_memory, return_freed_memory_in_small_sessions
from .loading import describe_model, load_model
from .presets import get_preset
from .run_folder import (ADAPTER_DIR, GENERATIONS_FILE, LOG_FILE, LOSS_PLOT_FILE, METRICS_FILE, SETTINGS_FILE, RunFolder,
                         new_run_dir)

DEFAULT_PRESET = "demo-cpu"
REHEARSAL_VARIABLE = "LORA_NB_REHEARSAL_STEPS"  # set: notebooks train this many steps at most (a dry run)


@dataclass
class PipelineResult:
    """What a pipeline run produced.

    Attributes:
        run_dir: The run folder.
        metrics: The before/after metrics (as in metrics.json).
        train: The `TrainResult`.
        seconds: Wall time of the whole pipeline.
    """

    run_dir: Path
    metrics: dict[str, Any]
    train: Any
    seconds: float


def configure(config: str | Path | None = None, preset: str = DEFAULT_PRESET, model: str | None = None,
              quant: str | None = None, max_steps: int | None = None, overrides: dict[str, Any] | None = None):
    """The run's settings: a settings file (the kit's YAML or an axolotl config) or a preset, plus overrides.

    Args:
        config: A settings file; None uses `preset`.
        preset: Name of a preset (see `presets.PRESETS`).
        model: Base model ID or folder, replacing the one in the settings.
        quant: "4bit", "8bit" or "none", replacing `quant.load_in`.
        max_steps: Optimizer steps, replacing `train.max_steps`.
        overrides: More fields to replace, by `section.field` name (`{"lora.r": 8}`).

    Returns:
        The checked `KitSettings`.
    """
    if config is not None:
        loaded = load_settings(Path(config))
        settings = loaded.settings
        if loaded.unknown_keys:
            # Often a misspelled key (lora_rr): say so rather than train with the default in silence.
            warnings.warn(
                f"{config}: the kit does not use the keys {sorted(loaded.unknown_keys)}; they are ignored and "
                "their settings keep the defaults. Check their spelling against the kit's YAML "
                "(formats.dump_settings) or an axolotl config.",
                stacklevel=2,
            )
    else:
        settings = get_preset(preset)
    if model is not None:
        settings.model_name_or_path = model
    if quant is not None:
        settings.quant.load_in = quant
    if max_steps is not None:
        settings.train.max_steps = max_steps
    settings.override(overrides or {})
    settings.check(check_environment=False)
    return settings


def rehearsal_steps() -> int | None:
    """The step limit of a teacher's rehearsal (`LORA_NB_REHEARSAL_STEPS`), or None for real runs.

    A teacher checks a room's machines by running every notebook with training cut to a few steps
    (`LORA_NB_REHEARSAL_STEPS=2 jupyter lab`); the test command runs the notebooks that way too.

    Raises:
        SettingsError: When the variable is set to anything but a whole number of at least 1.
    """
    value = os.environ.get(REHEARSAL_VARIABLE, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise SettingsError(f"{REHEARSAL_VARIABLE} is {value!r}; it must be a whole number of steps, at least 1 "
                            f"(e.g. 2), or unset for real training. Set it with `export {REHEARSAL_VARIABLE}=2` or "
                            f"remove it with `unset {REHEARSAL_VARIABLE}`.")
    return int(value)


def rehearse(settings):
    """`settings` with training cut to the rehearsal's steps (when `LORA_NB_REHEARSAL_STEPS` is set).

    Returns:
        `(settings, steps_before)`: the settings (changed in place) and the configured step count
        (`train.max_steps`; 0 when training by epochs), or `(settings, None)` when this is no rehearsal.
    """
    steps = rehearsal_steps()
    if steps is None:
        return settings, None
    before = settings.train.max_steps
    settings.train.max_steps = steps if before <= 0 else min(before, steps)
    return settings, before


def ensure_run(root: str | Path = "runs", preset: str = DEFAULT_PRESET, log: Callable[[str], None] = print) -> Path:
    """The latest finished run under `root`; when there is none, train one with the preset first.

    Lets the evaluation notebook run on its own: without a run from 03_train it trains the demo
    model on the demo data (the "demo-cpu" preset: 12 steps, about a minute on CPU).

    Args:
        root: The folder holding run folders.
        preset: The preset to train with when there is no run.
        log: Where progress lines go.

    Returns:
        The run folder.
    """
    # The stages import peft, datasets and matplotlib: only when a run starts, not for `configure`
    # (notebooks 00 and 02 reach this module through workshop.py).
    from .runs import latest_run
    from .train import train

    found = latest_run(root)
    if found is not None:
        log(f"using the latest finished run: {found}")
        return found
    settings, before = rehearse(configure(preset=preset))
    out = new_run_dir(root, "quick")
    log(f"no finished run under {root}: training one with the {preset!r} preset into {out}"
        + (f" (rehearsal: {settings.train.max_steps} of {before} steps)" if before is not None else ""))
    model, tokenizer = load_model(settings.model_name_or_path, settings.quant)
    train_path, heldout_path = demo_data_paths()
    result = train(model, tokenizer, train_path, settings, out, eval_data=heldout_path)
    log(f"trained {result.global_step} steps in {result.train_seconds:.0f} s")
    return out


def run_pipeline(
    config: str | Path | None = None,
    *,
    model: str | None = None,
    data: str | Path | None = None,
    heldout: str | Path | None = None,
    out: str | Path = "runs/demo",
    preset: str = DEFAULT_PRESET,
    quant: str | None = None,
    max_steps: int | None = None,
    limit: int | None = None,
    max_new_tokens: int = 40,
    resume: bool = False,
    log: Callable[[str], None] = print,
    overrides: dict[str, Any] | None = None,
) -> PipelineResult:
    """Load, configure, train and evaluate; write everything into the run folder `out`.

    Args:
        config: Settings file (kit YAML or axolotl); default: the `preset`.
        model: Base model (default: the settings' `model_name_or_path`, the demo model).
        data: Training examples (default: the demo task's train split).
        heldout: Held-out examples (default: the demo task's held-out split).
        out: The run folder.
        preset: Preset used when no `config` is given.
        quant: Override of `quant.load_in`.
        max_steps: Override of `train.max_steps`.
        limit: Evaluate on the first `limit` held-out examples only.
        max_new_tokens: Longest generated answer in the evaluation.
        resume: Continue an interrupted run in `out`.
        log: Where progress lines go.
        overrides: Settings to replace, by `section.field` name (`{"lora.r": 8}`).

    Returns:
        A `PipelineResult`.
    """
    from .evaluate import evaluate_run  # the stages: only when a run starts (see ensure_run)
    from .plots import plot_losses
    from .train import check_resumable, is_main_process, train

    check_run_arguments(config=config, preset=preset, model=model, data=data, heldout=heldout, out=out,
                        max_new_tokens=max_new_tokens, limit=limit)  # before any long work
    started = time.perf_counter()
    return_freed_memory_in_small_sessions()  # the demo within 2 GB (Binder): see tests/test_memory.py
    out = Path(out)
    settings = configure(config, preset, model, quant, max_steps, overrides)
    source = f"settings file {config}" if config else f"preset {preset!r}"
    log(f"[1/4] settings   : {source}; model {settings.model_name_or_path}, quant {settings.quant.load_in}, "
        f"r {settings.lora.r}, lr {settings.train.learning_rate:g}, max_steps {settings.train.max_steps}")

    if resume:
        check_resumable(out, settings)  # a wrong model or a changed r, said before the model loads
    t = time.perf_counter()
    loaded = load_model(settings.model_name_or_path, settings.quant,
                        gradient_checkpointing=settings.train.gradient_checkpointing)
    report = describe_model(loaded.model)
    log(f"[2/4] model      : loaded in {time.perf_counter() - t:.1f} s; {report.parameters:,} parameters, "
        f"{report.footprint_mb:,.1f} MB, {report.quantization}" + (f" ({loaded.note})" if loaded.note else ""))

    train_path, heldout_path = demo_data_paths()
    data = train_path if data is None else data
    heldout = heldout_path if heldout is None else heldout
    log(f"[3/4] training   : {data} -> {out}")
    result = train(loaded.model, loaded.tokenizer, data, settings, out, eval_data=heldout, resume=resume)
    if not is_main_process():  # under `accelerate launch`: rank 0 alone evaluates and writes the reports
        return PipelineResult(out, {}, result, time.perf_counter() - started)
    final = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
    log(f"      {result.global_step} steps in {result.train_seconds:.1f} s, final training loss {final}"
        + (" (interrupted; rerun with --resume)" if result.interrupted else ""))

    release_memory()  # the trainer and its activations are gone: evaluation starts from the model alone
    log(f"[4/4] evaluating : {heldout}" + (f" (first {limit})" if limit else ""))
    evaluation = evaluate_run(result.model, loaded.tokenizer, heldout, run_dir=out, limit=limit,
                              max_new_tokens=max_new_tokens, max_length=settings.train.max_seq_length)
    plot_losses(out, title=f"Loss of {out.name}").savefig(out / LOSS_PLOT_FILE, dpi=100, bbox_inches="tight")
    RunFolder(out).record_written(LOSS_PLOT_FILE)
    for row in evaluation.summary():
        log(f"      {row['metric']:<13} {row['before']:>10.4g} -> {row['after']:<10.4g}")
    seconds = time.perf_counter() - started
    log(f"done in {seconds:.0f} s: {out}/ holds {SETTINGS_FILE}, {LOG_FILE}, {ADAPTER_DIR}/, {METRICS_FILE}, "
        f"{GENERATIONS_FILE}, {LOSS_PLOT_FILE}")
    return PipelineResult(out, evaluation.metrics, result, seconds)


__all__ = ["DEMO_MODEL_ID", "PipelineResult", "configure", "ensure_run", "rehearsal_steps", "rehearse", "run_pipeline"]
