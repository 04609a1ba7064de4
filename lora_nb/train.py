"""Training: wrap the model with a LoRA adapter and train it with transformers' `Trainer`.

A run lives in one folder (its layout: `run_folder.py`), so that each later notebook (evaluate,
merge, export) finds what it needs there and a run can be continued after a restart. A new run
never starts where files of the run's names exist that the kit did not write.

The loop itself is `Trainer`'s; this module sets it up (seed, adapter, data, collator), keeps the
run folder consistent, and turns Ctrl+C / the notebook's stop button into a saved checkpoint.
Display (progress, live loss plots) plugs in from outside through `callbacks`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import datasets
import torch.distributed as dist
import transformers
from jinja2 import TemplateError
from peft import get_peft_model
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .adapters import (base_model, check_init_supported, has_adapter, load_converted, restore_base_weights,
                       save_adapter, save_initial_adapter)
from .batching import KitTrainer, packed_attention, plan_batches
from .data import load_examples, tokenize_examples
from .errors import RunFolderError, SettingsError
from .files import write_text_atomic
from .host_memory import return_freed_memory_in_small_sessions
from .loading import disable_cpu_weight_repacking
from .model_checks import check_causal, check_positions, model_name, template_refusal
from .run_folder import (ADAPTER_CONFIG_FILE, ADAPTER_DIR, ADAPTER_WEIGHTS_FILE, CHECKPOINT_PREFIX,
                         FINGERPRINT_KEYS, INITIAL_ADAPTER_DIR, LOG_FILE, RUN_FILE, SETTINGS_FILE,
                         TRAINER_STATE_FILE, RunFolder, model_fingerprint, same_model, settings_yaml)

# Adapter fields that decide the shape of its tensors: a checkpoint with other values cannot be resumed.
_SHAPE_KEYS = ("r", "use_dora", "bias", "layers_to_transform")


@dataclasses.dataclass
class TrainResult:
    """What a training run produced.

    Attributes:
        run_dir: the run folder.
        adapter_dir: folder of the saved adapter (None when nothing was trained).
        model: the trained `PeftModel` (base model + adapter), ready for generation.
        global_step: optimizer steps done (resumed runs count the earlier steps too).
        max_steps: optimizer steps the run was set up for.
        interrupted: True when training was stopped (Ctrl+C); resume with `resume=True`.
        train_losses: `(step, loss)` of every logged training loss.
        eval_losses: `(step, eval_loss)` of every evaluation.
        history: every log record (`Trainer.state.log_history`).
        train_seconds: wall time of this call's training, in seconds.
    """

    run_dir: Path
    adapter_dir: Path | None
    model: Any
    global_step: int
    max_steps: int
    interrupted: bool
    train_losses: list[tuple[int, float]]
    eval_losses: list[tuple[int, float]]
    history: list[dict]
    train_seconds: float

    @property
    def final_loss(self) -> float | None:
        """The last logged training loss."""
        return self.train_losses[-1][1] if self.train_losses else None


# ------------------------------------------------------------------------------------ processes
def is_main_process() -> bool:
    """Whether this process writes files: always when alone, rank 0 of `accelerate launch` / torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def _sync_processes(args) -> bool:
    """Wait until every process has checked the run folder (so none sees rank 0's first writes as an old
    run); returns `is_main_process()`. `args.world_size` starts the process group under a launcher."""
    if args.world_size > 1:
        dist.barrier()
    return is_main_process()


# ------------------------------------------------------------------------------------ callbacks
def _log_callback(folder: RunFolder):
    class LogFileCallback(transformers.TrainerCallback):
        """Append every logged record to log.jsonl, one complete line per write."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:
                record = {"step": state.global_step, "epoch": state.epoch, **logs, "time": time.time()}
                with open(folder.log_file, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record, default=float) + "\n")

    return LogFileCallback()


def _readable_progress(trainer) -> None:
    """Print each logged step with its numbers as numbers, 4 significant digits; label the held-out loss bar.

    transformers 5's console callbacks print `{'loss': '6.295', 'learning_rate': '0.0002'}`: numbers
    turned into strings. The notebook's progress table is left as it is.
    """
    class ReadableProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None:
                self.training_bar.write(str(_rounded(logs)))

        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
            super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)
            if self.prediction_bar is not None:  # transformers' bar has no label: say what it measures
                self.prediction_bar.set_description("held-out loss", refresh=False)

    class ReadablePrinter(PrinterCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_local_process_zero:
                print(_rounded(logs))

    for old, new in ((ProgressCallback, ReadableProgress), (PrinterCallback, ReadablePrinter)):
        if any(type(cb) is old for cb in trainer.callback_handler.callbacks):
            trainer.remove_callback(old)
            trainer.add_callback(new)


def _rounded(logs: dict | None) -> dict:
    return {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in (logs or {}).items() if k != "total_flos"}


# --------------------------------------------------------------------------------------- train
def train(
    model,
    tokenizer,
    train_data,
    settings,
    run_dir: str | Path,
    eval_data=None,
    resume: bool = False,
    callbacks: Sequence = (),
) -> TrainResult:
    """Train a LoRA adapter with `transformers.Trainer` and keep the run in `run_dir`.

    Args:
        model: the base model (wrapped with `settings.lora.to_peft(model)` here). A model that
            already carries an adapter (a `PeftModel`, or the same model passed to an earlier
            `train()`, as a re-run notebook cell does) has it taken off first, with a warning: every
            run trains the adapter its settings describe, from the base model. A quantized base
            should come from `loading.load_model`, which runs `prepare_model_for_kbit_training`.
        tokenizer: the model's tokenizer (needs a pad or EOS token).
        train_data: examples as `data.tokenize_examples` returns them, or anything
            `data.load_examples` accepts (tokenized here with the settings' `max_seq_length` and
            `train_on_responses_only`).
        settings: a `KitSettings`.
        run_dir: the run folder (created).
        eval_data: held-out examples (same forms as `train_data`): evaluated every
            `settings.train.eval_steps` steps, or once at the end when that is not set.
        resume: continue the run in `run_dir` from its last checkpoint (same settings and data).
        callbacks: extra `TrainerCallback`s, e.g. a live loss plot.

    Returns:
        A `TrainResult` (losses, the trained model, where the adapter is). After Ctrl+C (or the
        notebook's stop button) the steps done so far are saved as a checkpoint and an adapter, and
        the result has `interrupted=True`. With an init that rewrites the base weights (PiSSA,
        OLoRA...) the saved adapter and `result.model` are converted to a plain LoRA on the
        original base (see `adapters.py`).

    Raises:
        RunFolderError: `resume` with no resumable checkpoint, a corrupt one, a run folder of
            another model (weights digest) or of another adapter shape; without `resume`, a folder
            that already holds a run or files of the run's names the kit did not write; a folder
            another run is using (locked); or the run folder cannot be written (disk full,
            read-only; also while Trainer writes a checkpoint: the message names the last good one).
        SettingsError: the settings are invalid, name layers the model does not have, peft refuses
            them for this model, or `max_seq_length` exceeds the model's learned positions.
        ModelLoadError: the model is not a causal LM (an encoder such as BERT).
        DataError: the data cannot be read or tokenized (a chat template refusing an example
            included: the file and line are named).
    """
    folder = RunFolder(run_dir)
    settings.check(check_environment=False)  # every section, before any data or model work
    model = _base_for_run(model)
    disable_cpu_weight_repacking(model)  # before any forward: the AVX512-BF16 trap (loading.py), for models loaded elsewhere
    check_causal(model)
    settings.lora.check(model)  # targets against this model, before the data is read
    t = settings.train
    train_set = _tokenized(train_data, tokenizer, t.max_seq_length, t.train_on_responses_only)
    eval_set = None if eval_data is None else _tokenized(eval_data, tokenizer, t.max_seq_length, t.train_on_responses_only)
    check_positions(model, t.max_seq_length, _longest(train_set, eval_set))
    # Read-only folder checks before the adapter is made, so a refusal changes nothing; repeated
    # below under the folder's lock, where no other run can change the folder in between.
    adapter = settings.lora.peft_kwargs(model)
    checkpoint = _resume_or_fresh(folder, model, adapter, resume)

    transformers.set_seed(settings.train.seed)  # before get_peft_model: it draws LoRA A from torch's RNG
    peft_model = _with_adapter(model, settings)

    overrides: dict[str, Any] = {}
    plan = plan_batches(peft_model, t.padding_free)  # probes the model once; a path it fails falls back, with a warning
    if plan.padding_free:
        overrides["train_sampling_strategy"] = "random"  # packed rows hold no padding for length grouping to save
    # Under DDP: every adapter weight takes part in each forward, so DDP need not search for unused ones.
    overrides["ddp_find_unused_parameters"] = False
    # use_cpu and the eval strategy are the settings' to decide (with or without held-out data).
    args = settings.to_training_args(str(folder.path), with_eval=eval_set is not None, **overrides)

    main = _sync_processes(args)  # every process has checked the folder; under `accelerate launch` rank 0 alone writes it
    with folder.lock() if main else contextlib.nullcontext():
        if main:
            checkpoint = _resume_or_fresh(folder, model, adapter, resume)
        initial = _start_run(folder, settings, peft_model, checkpoint) if main else None

        return_freed_memory_in_small_sessions()  # Binder's 1-2 GB: freed activations go back at once
        trainer = KitTrainer(
            model=peft_model,
            args=args,
            train_dataset=train_set,
            eval_dataset=eval_set,
            data_collator=plan.collator(tokenizer),
            processing_class=tokenizer,
            callbacks=[_log_callback(folder), *callbacks],
            optimizers=(settings.train.make_optimizer(peft_model, args), None),
            plan=plan,
        )
        _readable_progress(trainer)
        started = time.perf_counter()
        interrupted = False
        try:
            with packed_attention(peft_model, plan):
                trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
                if eval_set is not None and t.eval_steps is None:
                    trainer.evaluate()
        except KeyboardInterrupt:
            interrupted = True
            _save_interrupted(trainer, folder)
        except OSError as err:
            raise _write_failed(folder, err) from err
        finally:
            if initial is not None:  # the base weights go back whatever happened (see adapters.py)
                restore_base_weights(peft_model, initial)
        seconds = time.perf_counter() - started

        adapter_dir = None
        if main and trainer.state.global_step > 0:
            adapter_dir = save_adapter(peft_model, folder.adapter_dir, convert_from=initial)
            write_text_atomic(folder.path / TRAINER_STATE_FILE,
                              json.dumps(dataclasses.asdict(trainer.state), indent=2, sort_keys=True, default=str) + "\n")
        if initial is not None:
            # The live adapter is still B A on the residual: swap in the converted one on the restored base.
            peft_model = load_converted(base_model(peft_model), adapter_dir) if adapter_dir else base_model(peft_model)
        step, max_steps = trainer.state.global_step, trainer.state.max_steps
        status = "interrupted" if interrupted else ("stopped" if step < max_steps else "finished")  # stopped: by a callback
        if main:
            folder.write_run(status=status, global_step=step, finished=time.strftime("%Y-%m-%d %H:%M:%S"))
            folder.record_written(ADAPTER_DIR, TRAINER_STATE_FILE)
    history = list(trainer.state.log_history)
    return TrainResult(
        run_dir=folder.path,
        adapter_dir=adapter_dir,
        model=peft_model,
        global_step=trainer.state.global_step,
        max_steps=trainer.state.max_steps,
        interrupted=interrupted,
        train_losses=[(h["step"], h["loss"]) for h in history if "loss" in h],
        eval_losses=[(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h],
        history=history,
        train_seconds=seconds,
    )


def _base_for_run(model):
    """The base model of `model`: a model that already carries an adapter has it taken off, with a note.

    A re-run notebook cell passes the model an earlier `train()` wrapped in place; a `PeftModel`
    from `load_adapter` carries a saved adapter. Either way the run trains exactly the adapter its
    settings describe, from the base model, and settings.yaml tells the truth.
    """
    if not has_adapter(model):
        return model
    base = base_model(model)
    warnings.warn(
        "The model passed to train() already carried a LoRA adapter (an earlier train() on the same model, or a "
        "loaded adapter); it was taken off, and this run trains a new adapter from the settings on the base model. "
        "To continue an earlier run instead, pass its run_dir with resume=True. An earlier TrainResult.model shares "
        "these weights: to use an earlier run later, load it with adapters.load_adapter(base, run_dir).",
        UserWarning,
        stacklevel=3,
    )
    return base


def _with_adapter(model, settings):
    """The model wrapped with the settings' LoRA adapter.

    Raises:
        SettingsError: the settings do not fit the model (checked by the kit first, then peft's own
            refusal in the kit's words); the model is left without any adapter layer.
    """
    # Check the names and layer indices against the model first: peft adapts a partly misspelled
    # target list silently, and answers names that match nothing with its own error type.
    settings.lora.check(model)
    config = settings.lora.to_peft(model)
    check_init_supported(config.init_lora_weights, model, config.use_dora)
    try:
        with warnings.catch_warnings():
            # peft 0.21 calls a deprecated transformers property on every wrap; not the user's concern.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model = get_peft_model(model, config)
    except (ValueError, TypeError, KeyError) as err:
        base_model(model)  # take off whatever peft put on before it gave up
        raise SettingsError(
            f"peft could not put the LoRA adapter on {model_name(model)}: {err} Check lora.target_modules, "
            "lora.layers_to_transform and lora.layers_pattern against the model's layer names "
            "(targets.find_targets(model) lists them; layers_pattern is one plain name such as 'layers' or 'h')."
        ) from None
    peft_model._lora_nb_base_restored = False
    return peft_model


def _longest(*sets) -> int:
    return max((max(s["length"]) if "length" in s.column_names else max(len(x) for x in s["input_ids"])
                for s in sets if s is not None and len(s)), default=0)


def _start_run(folder: RunFolder, settings, peft_model, checkpoint: Path | None) -> Path | None:
    """Write the run's record (fresh run) or update it (resume); returns the initial adapter folder, if any."""
    if checkpoint is None:
        write_text_atomic(folder.settings_file, settings_yaml(settings))
        folder.log_file.unlink(missing_ok=True)
        folder.write_run(model=model_fingerprint(peft_model), model_name_or_path=settings.model_name_or_path,
                         created=time.strftime("%Y-%m-%d %H:%M:%S"), status="running")
        folder.record_written(SETTINGS_FILE, RUN_FILE, LOG_FILE)
        initial = save_initial_adapter(peft_model, folder.path)
        if initial is not None:
            folder.record_written(INITIAL_ADAPTER_DIR)
        return initial
    if folder.settings_file.exists() and folder.settings_file.read_text(encoding="utf-8") != settings_yaml(settings):
        warnings.warn(
            f"The settings differ from the ones saved in {folder.settings_file}; the resumed steps use the "
            "new ones, so the run no longer matches an uninterrupted one. Load the saved settings to "
            "continue the same run.",
            stacklevel=3,
        )
    _trim_log(folder, folder.check_checkpoint(checkpoint))
    folder.write_run(status="running", resumed_from=checkpoint.name)
    initial = folder.path / INITIAL_ADAPTER_DIR
    return initial if (initial / ADAPTER_WEIGHTS_FILE).exists() else save_initial_adapter(peft_model, folder.path)


def _write_failed(folder: RunFolder, err: OSError) -> RunFolderError:
    """The kit's error for a write that failed during training (disk full while Trainer saves a checkpoint)."""
    if isinstance(err, RunFolderError):
        return err
    try:
        folder.write_run(status="failed", error=str(err))
    except RunFolderError:
        pass  # the disk is still full: run.json keeps "running", which resume accepts as well
    good = None
    for checkpoint in reversed(folder.checkpoints()):
        if folder.checkpoint_problem(checkpoint) is None:
            good = checkpoint
            break
    last = (f"The last good checkpoint is {good} (step {good.name[len(CHECKPOINT_PREFIX):]}): free some space, then "
            "call train(..., resume=True) with the same run_dir (command line: --resume) to continue from it."
            if good else "No complete checkpoint was written: free some space and start the run again.")
    reason = err.strerror or str(err)
    where = f" ({err.filename})" if getattr(err, "filename", None) else ""
    return RunFolderError(f"Training stopped: writing into {folder.path} failed{where}: {reason}. {last}")


def _tokenized(data, tokenizer, max_length: int, train_on_responses_only: bool):
    if isinstance(data, datasets.Dataset) and "input_ids" in data.column_names:
        return data
    examples = load_examples(data)
    try:
        return tokenize_examples(examples, tokenizer, max_length, train_on_responses_only)
    except TemplateError as err:  # e.g. "System role not supported", raised inside the chat template
        raise template_refusal(err, examples["messages"], tokenizer, data) from None


def _resume_or_fresh(folder: RunFolder, model, adapter: dict, resume: bool) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run, after checking the folder allows it.

    `adapter` is the `LoraConfig` keywords the settings make for the base model.
    """
    return _checkpoint_to_resume(folder, model, adapter) if resume else _check_fresh(folder)


def _check_fresh(folder: RunFolder) -> None:
    if folder.run_file.exists():
        raise RunFolderError(
            f"{folder.path} already holds a training run. Pass resume=True to continue it, choose another "
            "run_dir for a new run, or delete the folder to start over."
        )
    foreign = folder.foreign_files()
    if foreign:
        raise RunFolderError(
            f"{folder.path} already holds {', '.join(foreign)}, which this kit did not write there (its run.json "
            "records what it wrote, and there is none). A run would overwrite them: choose an empty or new folder "
            "for run_dir / --out, or move those files away."
        )
    return None


def check_resumable(run_dir: str | Path, settings) -> None:
    """Check, before any model is loaded, that `settings` can continue the run in `run_dir`.

    Compares the settings' base model name and adapter shape with what the run folder records,
    so a wrong model or a changed `lora.r` is said at once instead of after loading. `train` checks
    the model's weights too, once it has the model.

    Args:
        run_dir: The run folder to continue.
        settings: The `KitSettings` the continued run would use.

    Raises:
        RunFolderError: the folder holds no run, a run of another model, or checkpoints of another
            adapter shape.
    """
    folder = RunFolder(run_dir)
    if not folder.path.is_dir():
        raise RunFolderError(f"Cannot resume: {folder.path} does not exist. Start the run with resume=False.")
    saved = folder.read_run().get("model_name_or_path")
    wanted = settings.model_name_or_path
    if saved and wanted and Path(str(saved).rstrip("/")).name != Path(str(wanted).rstrip("/")).name:
        raise RunFolderError(
            f"Cannot resume: {folder.path} is a run of {saved!r}, but the settings name {wanted!r}. Use that model "
            "(--model) to continue it, or start a new run in another folder."
        )
    checkpoint = folder.last_checkpoint()
    if checkpoint is not None:
        _check_adapter_shape(checkpoint, settings.lora.peft_kwargs() if not settings.lora._needs_model() else {})


def _check_adapter_shape(checkpoint: Path, wanted: dict) -> None:
    """Refuse a checkpoint whose adapter has another shape than the settings make (r, targets, DoRA...)."""
    try:
        saved = json.loads((checkpoint / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # no readable config: check_checkpoint names what is wrong with the checkpoint
    if not isinstance(saved, dict):
        return
    changed = [f"{k} {saved.get(k)!r} -> {wanted[k]!r}" for k in _SHAPE_KEYS
               if k in wanted and k in saved and _norm(saved.get(k)) != _norm(wanted[k])]
    targets = wanted.get("target_modules")
    if isinstance(targets, list) and isinstance(saved.get("target_modules"), list) and set(targets) != set(saved["target_modules"]):
        changed.append(f"target_modules {sorted(saved['target_modules'])} -> {sorted(targets)}")
    if changed:
        raise RunFolderError(
            f"Cannot resume: {checkpoint} holds an adapter of another shape than the settings make "
            f"({'; '.join(changed)}). Its weights cannot be loaded into the new shape: use the run's own settings "
            f"({checkpoint.parent / SETTINGS_FILE}) to continue it, or start a new run in another folder."
        )


def _norm(value: Any) -> Any:
    return [value] if isinstance(value, int) and not isinstance(value, bool) else value


def _checkpoint_to_resume(folder: RunFolder, model, adapter: dict) -> Path:
    if not folder.path.is_dir():
        raise RunFolderError(f"Cannot resume: {folder.path} does not exist. Start the run with resume=False.")
    saved = folder.read_run().get("model") or {}
    current = model_fingerprint(model)
    if not same_model(saved, current):
        other_weights = all(saved.get(k) == current.get(k) for k in FINGERPRINT_KEYS)
        raise RunFolderError(
            f"Cannot resume: {folder.path} is a run of another model ({saved.get('name_or_path')!r}, "
            f"{saved.get('model_type')}, hidden size {saved.get('hidden_size')}), not of "
            f"{current['name_or_path']!r} ({current['model_type']}, hidden size {current['hidden_size']})"
            + (": same architecture and size, but other weights" if other_weights else "")
            + ". Load that model to continue it, or start a new run in another folder."
        )
    checkpoints = folder.checkpoints()
    if not checkpoints:
        raise RunFolderError(
            f"Cannot resume: {folder.path} holds no checkpoint-N folder. Checkpoints are written every "
            "train.save_steps steps and when training is interrupted; start a new run with resume=False."
        )
    _check_adapter_shape(checkpoints[-1], adapter)
    # A process killed while writing a checkpoint leaves it incomplete (Trainer writes
    # trainer_state.json last), a full disk or a broken copy leaves files cut short: resume from
    # the newest whole one and say so.
    first_error, skipped = None, []
    for checkpoint in reversed(checkpoints):
        problem = folder.checkpoint_problem(checkpoint)
        if problem is not None:
            first_error = first_error or folder.checkpoint_error(checkpoint, problem)
            skipped.append(f"{checkpoint.name} ({problem})")
            continue
        if skipped:
            warnings.warn(
                f"Skipping incomplete {', '.join(skipped)} in {folder.path} (the run was probably stopped while "
                f"writing it): resuming from {checkpoint.name}; the steps after it are trained again.",
                stacklevel=4,
            )
        return checkpoint
    raise first_error


def _trim_log(folder: RunFolder, step: int) -> None:
    """Drop log lines written after the checkpoint being resumed: those steps are trained again."""
    kept = [r for r in folder.read_log() if r.get("step", 0) <= step]
    write_text_atomic(folder.log_file, "".join(json.dumps(r) + "\n" for r in kept))


def _save_interrupted(trainer, folder: RunFolder) -> None:
    """After Ctrl+C: save a resumable checkpoint of the steps done, and say how to continue."""
    step = trainer.state.global_step
    if step == 0:
        print("Training was interrupted before the first optimizer step; nothing was saved.")
        return
    try:
        trainer._save_checkpoint(trainer.model, trial=None)  # adapter + optimizer + scheduler + RNG + state
        where = f"checkpoint {folder.path / (CHECKPOINT_PREFIX + str(step))}"
    except Exception as err:  # noqa: BLE001 - the adapter below is still worth saving
        where = f"no checkpoint ({err})"
    print(
        f"Training was interrupted after step {step} of {trainer.state.max_steps}. Saved {where} and the "
        f"adapter so far in {folder.adapter_dir}. To continue, call train(..., run_dir={str(folder.path)!r}, "
        "resume=True) with the same model, data and settings."
    )
