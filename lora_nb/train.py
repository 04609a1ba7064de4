"""Training: wrap the model with a LoRA adapter and train it with transformers' `Trainer`.

A run lives in one folder, so that each later notebook (evaluate, merge, export) finds what it
needs there and a run can be continued after a restart:

    run_dir/
      settings.yaml      every setting of the run (the KitSettings)
      run.json           which base model it trains, status (running / finished / interrupted)
      log.jsonl          one line per logged step: training loss, learning rate, eval loss
      checkpoint-N/      resumable checkpoints: adapter, optimizer, scheduler, RNG, trainer state
      trainer_state.json the Trainer's final state (log history included)
      adapter/           the trained adapter (`PeftModel.from_pretrained(base, run_dir / "adapter")`)

The loop itself is `Trainer`'s; this module sets it up (seed, adapter, data, collator), keeps the
run folder consistent, and turns Ctrl+C / the notebook's stop button into a saved checkpoint.
Display (progress, live loss plots) plugs in from outside through `callbacks`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from .errors import RunFolderError
from .files import cannot_write as _cannot_write
from .files import umask as _umask
from .files import write_text_atomic

SETTINGS_FILE = "settings.yaml"
RUN_FILE = "run.json"
LOG_FILE = "log.jsonl"
ADAPTER_DIR = "adapter"
CHECKPOINT_PREFIX = "checkpoint-"
_FINGERPRINT_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")


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


# ------------------------------------------------------------------------------------ run folder
class RunFolder:
    """The files of one training run (see the module docstring for the layout)."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()

    settings_file = property(lambda self: self.path / SETTINGS_FILE)
    run_file = property(lambda self: self.path / RUN_FILE)
    log_file = property(lambda self: self.path / LOG_FILE)
    adapter_dir = property(lambda self: self.path / ADAPTER_DIR)

    def checkpoints(self) -> list[Path]:
        """Checkpoint folders, oldest (lowest step) first."""
        if not self.path.is_dir():
            return []
        found = [p for p in self.path.glob(CHECKPOINT_PREFIX + "*") if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
        return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))

    def last_checkpoint(self) -> Path | None:
        """The newest checkpoint folder, or None."""
        found = self.checkpoints()
        return found[-1] if found else None

    def has_run(self) -> bool:
        """Whether the folder already holds (part of) a training run."""
        return self.run_file.exists() or bool(self.checkpoints()) or self.adapter_dir.exists()

    def read_run(self) -> dict:
        """The contents of run.json.

        Raises:
            RunFolderError: it is missing or not valid JSON.
        """
        try:
            return json.loads(self.run_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RunFolderError(
                f"{self.path} holds no {RUN_FILE}, so it is not a run folder of this kit (or it is damaged). "
                "Check the path, or start a new run with resume=False in an empty folder."
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RunFolderError(f"{self.run_file} is corrupt ({err}); start a new run in another folder.") from None

    def write_run(self, **fields: Any) -> None:
        """Update run.json with `fields` (atomically)."""
        data = self.read_run() if self.run_file.exists() else {}
        data.update(fields)
        write_text_atomic(self.run_file, json.dumps(data, indent=2, default=str) + "\n")

    def read_log(self) -> list[dict]:
        """The records of log.jsonl (a damaged last line, from a crash while writing, is skipped)."""
        if not self.log_file.exists():
            return []
        records = []
        for line in self.log_file.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def check_checkpoint(self, checkpoint: Path) -> int:
        """The step of a checkpoint, after checking that it holds what resuming needs.

        Raises:
            RunFolderError: the trainer state or the adapter weights are missing or unreadable.
        """
        state_file = checkpoint / "trainer_state.json"
        try:
            step = int(json.loads(state_file.read_text(encoding="utf-8"))["global_step"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise RunFolderError(
                f"Checkpoint {checkpoint} is corrupt: {state_file.name} is missing or unreadable ({err}). "
                f"Delete that folder to resume from the one before, or start a new run."
            ) from None
        if not any((checkpoint / f).exists() for f in ("adapter_model.safetensors", "adapter_model.bin")):
            raise RunFolderError(
                f"Checkpoint {checkpoint} is corrupt: it holds no adapter weights (adapter_model.safetensors). "
                "Delete that folder to resume from the one before, or start a new run."
            )
        return step


def save_adapter(model, target: Path) -> Path:
    """Save the adapter to `target` atomically: written next to it, then swapped in.

    Raises:
        RunFolderError: the adapter cannot be written (disk full, read-only folder); an adapter
            already in `target` is left as it was and no staging folder stays behind.
    """
    staging = None
    old = target.with_name(f".{target.name}.old")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700 folders
        model.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            try:
                os.replace(staging, target)
            except BaseException:
                os.replace(old, target)  # put the previous adapter back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    except OSError as err:
        if isinstance(err, RunFolderError):
            raise
        raise _cannot_write(target, err) from err
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def settings_yaml(settings) -> str:
    """The settings as YAML (the kit's commented format when `lora_nb.formats` provides it)."""
    try:
        from . import formats  # type: ignore[attr-defined]

        return formats.dump_settings(settings)
    except (ImportError, AttributeError):
        import yaml

        return yaml.safe_dump(settings.to_dict(), sort_keys=False)


def model_fingerprint(model) -> dict[str, Any]:
    """Name and shape of the base model, to recognise a run folder of another model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    found = {"name_or_path": str(getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", ""))}
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    found.update({k: getattr(text, k, None) for k in _FINGERPRINT_KEYS})
    return found


def _same_model(saved: dict, current: dict) -> bool:
    if any(saved.get(k) != current.get(k) for k in _FINGERPRINT_KEYS):
        return False
    # A hub ID and its local copy ("org/SmolLM2-135M-Instruct", "~/.cache/.../SmolLM2-135M-Instruct")
    # are the same model: compare the last path component.
    a, b = saved.get("name_or_path") or "", current.get("name_or_path") or ""
    return a == b or Path(a.rstrip("/")).name == Path(b.rstrip("/")).name


# ------------------------------------------------------------------------------------ processes
def is_main_process() -> bool:
    """Whether this process writes files: always when alone, rank 0 of `accelerate launch` / torchrun."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def _sync_processes(args) -> bool:
    """Wait until every process has checked the run folder (so none sees rank 0's first writes as an old
    run); returns `is_main_process()`. `args.world_size` starts the process group under a launcher."""
    if args.world_size > 1:
        import torch.distributed as dist

        dist.barrier()
    return is_main_process()


# ------------------------------------------------------------------------------------ callbacks
def _log_callback(folder: RunFolder):
    from transformers import TrainerCallback

    class LogFileCallback(TrainerCallback):
        """Append every logged record to log.jsonl, one complete line per write."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:
                record = {"step": state.global_step, "epoch": state.epoch, **logs, "time": time.time()}
                with open(folder.log_file, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record, default=float) + "\n")

    return LogFileCallback()


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
        model: the base model (wrapped with `settings.lora.to_peft(model)` here) or an already
            wrapped `PeftModel`. A quantized base should come from `loading.load_model`, which runs
            `prepare_model_for_kbit_training`.
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
        the result has `interrupted=True`.

    Raises:
        RunFolderError: `resume` with no resumable checkpoint, a corrupt one, or a run folder of
            another model; without `resume`, a folder that already holds a run; or the run folder
            cannot be written (disk full, read-only).
        SettingsError: the settings are invalid, or name layers the model does not have.
        DataError: the data cannot be read or tokenized.
    """
    import torch
    import transformers
    from .batching import LengthGroupedTrainer
    from .data import PadCollator

    folder = RunFolder(run_dir)
    settings.train.check()
    checkpoint = _checkpoint_to_resume(folder, model) if resume else _check_fresh(folder)

    transformers.set_seed(settings.train.seed)  # before get_peft_model: it draws LoRA A from torch's RNG
    peft_model = _with_adapter(model, settings)

    t = settings.train
    train_set = _tokenized(train_data, tokenizer, t.max_seq_length, t.train_on_responses_only)
    eval_set = None if eval_data is None else _tokenized(eval_data, tokenizer, t.max_seq_length, t.train_on_responses_only)
    overrides: dict[str, Any] = {}
    if eval_set is None:
        overrides["eval_strategy"] = "no"
    if not torch.cuda.is_available():
        overrides["use_cpu"] = True
    # Under DDP: every adapter weight takes part in each forward, so DDP need not search for unused ones.
    overrides["ddp_find_unused_parameters"] = False
    args = settings.to_training_args(str(folder.path), **overrides)

    try:
        folder.path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _cannot_write(folder.path, err) from err
    main = _sync_processes(args)  # under `accelerate launch` only rank 0 writes the run folder
    if main and checkpoint is None:
        write_text_atomic(folder.settings_file, settings_yaml(settings))
        folder.log_file.unlink(missing_ok=True)
        folder.write_run(model=model_fingerprint(peft_model), model_name_or_path=settings.model_name_or_path,
                         created=time.strftime("%Y-%m-%d %H:%M:%S"), status="running")
    elif main:
        if folder.settings_file.exists() and folder.settings_file.read_text(encoding="utf-8") != settings_yaml(settings):
            warnings.warn(
                f"The settings differ from the ones saved in {folder.settings_file}; the resumed steps use the "
                "new ones, so the run no longer matches an uninterrupted one. Load the saved settings to "
                "continue the same run.",
                stacklevel=2,
            )
        _trim_log(folder, folder.check_checkpoint(checkpoint))
        folder.write_run(status="running", resumed_from=checkpoint.name)

    trainer = LengthGroupedTrainer(
        model=peft_model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=PadCollator(tokenizer),
        processing_class=tokenizer,
        callbacks=[_log_callback(folder), *callbacks],
    )
    started = time.perf_counter()
    interrupted = False
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        if eval_set is not None and t.eval_steps is None:
            trainer.evaluate()
    except KeyboardInterrupt:
        interrupted = True
        _save_interrupted(trainer, folder)
    seconds = time.perf_counter() - started

    adapter_dir = None
    if main and trainer.state.global_step > 0:
        adapter_dir = save_adapter(peft_model, folder.adapter_dir)
        write_text_atomic(folder.path / "trainer_state.json",
                          json.dumps(dataclasses.asdict(trainer.state), indent=2, sort_keys=True, default=str) + "\n")
    step, max_steps = trainer.state.global_step, trainer.state.max_steps
    status = "interrupted" if interrupted else ("stopped" if step < max_steps else "finished")  # stopped: by a callback
    if main:
        folder.write_run(status=status, global_step=step, finished=time.strftime("%Y-%m-%d %H:%M:%S"))
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


def _with_adapter(model, settings):
    """The model wrapped with the settings' LoRA adapter (unchanged when it already has one)."""
    from peft import PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        return model
    # Check the names and layer indices against the model first: peft adapts a partly misspelled
    # target list silently, and answers names that match nothing with its own error type.
    settings.lora.check(model)
    config = settings.lora.to_peft(model)
    with warnings.catch_warnings():
        # peft 0.21 calls a deprecated transformers property on every wrap; not the user's concern.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def _tokenized(data, tokenizer, max_length: int, train_on_responses_only: bool):
    import datasets

    from .data import tokenize_examples

    if isinstance(data, datasets.Dataset) and "input_ids" in data.column_names:
        return data
    return tokenize_examples(data, tokenizer, max_length, train_on_responses_only)


def _check_fresh(folder: RunFolder) -> None:
    if folder.has_run():
        raise RunFolderError(
            f"{folder.path} already holds a training run. Pass resume=True to continue it, choose another "
            "run_dir for a new run, or delete the folder to start over."
        )
    return None


def _checkpoint_to_resume(folder: RunFolder, model) -> Path:
    if not folder.path.is_dir():
        raise RunFolderError(f"Cannot resume: {folder.path} does not exist. Start the run with resume=False.")
    saved = folder.read_run().get("model") or {}
    current = model_fingerprint(model)
    if not _same_model(saved, current):
        raise RunFolderError(
            f"Cannot resume: {folder.path} is a run of another model ({saved.get('name_or_path')!r}, "
            f"{saved.get('model_type')}, hidden size {saved.get('hidden_size')}), not of "
            f"{current['name_or_path']!r} ({current['model_type']}, hidden size {current['hidden_size']}). "
            "Load that model to continue it, or start a new run in another folder."
        )
    checkpoints = folder.checkpoints()
    if not checkpoints:
        raise RunFolderError(
            f"Cannot resume: {folder.path} holds no checkpoint-N folder. Checkpoints are written every "
            "train.save_steps steps and when training is interrupted; start a new run with resume=False."
        )
    # A process killed while writing a checkpoint leaves it incomplete (Trainer writes
    # trainer_state.json last): resume from the newest complete one and say so.
    first_error, skipped = None, []
    for checkpoint in reversed(checkpoints):
        try:
            folder.check_checkpoint(checkpoint)
        except RunFolderError as err:
            first_error, skipped = first_error or err, [*skipped, checkpoint.name]
            continue
        if skipped:
            warnings.warn(
                f"Skipping incomplete {', '.join(skipped)} in {folder.path} (the run was probably stopped while "
                f"writing it): resuming from {checkpoint.name}; the steps after it are trained again.",
                stacklevel=3,
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
