"""The run folder: its layout, and reading, writing and locking it.

A run lives in one folder, so that each later notebook (evaluate, merge, export) finds what it
needs there and a run can be continued after a restart:

    run_dir/
      settings.yaml      every setting of the run (the KitSettings)
      run.json           which base model it trains, status (running / finished / interrupted)
      log.jsonl          one line per logged step: training loss, learning rate, eval loss
      checkpoint-N/      resumable checkpoints: adapter, optimizer, scheduler, RNG, trainer state
      trainer_state.json the Trainer's final state (log history included)
      adapter/           the trained adapter (`PeftModel.from_pretrained(base, run_dir / "adapter")`)
      initial_adapter/   only for inits that rewrite the base weights (PiSSA, OLoRA...): the adapter
                         as made, which converts the trained one back to a plain LoRA (adapters.py)
      metrics.json       held-out loss, perplexity and task metric before and after (evaluate.py)
      generations.md     the held-out answers before and after, side by side (evaluate.py)
      loss.png           training and held-out loss against the step (pipeline.py)
      .lora-nb.lock      while a run uses the folder: a second run into it is refused

run.json also records which files the kit wrote (`written`): a new run never starts where files of
these names exist without that record, so nothing the user put there is overwritten.

Every stage that reads or writes a run folder (train, evaluate, runs, plots, the pipeline) takes
the names from here; `RunFolder` reads and writes the kit's own files, and `model_fingerprint`
recognises a run folder of another base model.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from .errors import RunFolderError
from .files import cannot_write, damaged_weights, write_text_atomic
from .formats import dump_settings

SETTINGS_FILE = "settings.yaml"
RUN_FILE = "run.json"
LOG_FILE = "log.jsonl"
ADAPTER_DIR = "adapter"
INITIAL_ADAPTER_DIR = "initial_adapter"
CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.json"
GENERATIONS_FILE = "generations.md"
LOSS_PLOT_FILE = "loss.png"
LOCK_FILE = ".lora-nb.lock"
# peft's names inside an adapter folder (and inside each checkpoint-N/).
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
# Every name a run of the kit writes into its folder (train, the pipeline, the evaluation): a new
# run never starts in a folder where one of them exists without the kit's own record (run.json).
RUN_FILES = (SETTINGS_FILE, RUN_FILE, LOG_FILE, ADAPTER_DIR, INITIAL_ADAPTER_DIR, TRAINER_STATE_FILE,
             METRICS_FILE, GENERATIONS_FILE, LOSS_PLOT_FILE)
# Config keys that, with the weights digest, tell one base model from another.
FINGERPRINT_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")


def new_run_dir(root: str | Path = "runs", prefix: str = "run") -> Path:
    """A fresh, not yet existing run folder name under `root`: `<prefix>-YYYYmmdd-HHMMSS` (made unique).

    Each notebook run trains into a new folder, so re-running a notebook never clashes with a finished run.

    Args:
        root: The folder that holds run folders.
        prefix: The start of the new folder's name (`run`, `quick`, `ddp`...).

    Returns:
        The path (not created).
    """
    root = Path(root).expanduser()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = root / f"{prefix}-{stamp}", 1
    while path.exists():
        n += 1
        path = root / f"{prefix}-{stamp}-{n}"
    return path


class RunFolder:
    """The files of one training run (see the module docstring for the layout).

    Args:
        path: The run folder (`~` is expanded; it need not exist yet).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()

    settings_file = property(lambda self: self.path / SETTINGS_FILE)
    run_file = property(lambda self: self.path / RUN_FILE)
    log_file = property(lambda self: self.path / LOG_FILE)
    adapter_dir = property(lambda self: self.path / ADAPTER_DIR)

    def checkpoints(self) -> list[Path]:
        """Checkpoint folders, oldest (lowest step) first.

        Returns:
            The `checkpoint-N` folders (none when the folder does not exist).
        """
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
            data = json.loads(self.run_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RunFolderError(
                f"{self.path} holds no {RUN_FILE}, so it is not a run folder of this kit (or it is damaged). "
                "Check the path, or start a new run with resume=False in an empty folder."
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RunFolderError(f"{self.run_file} is corrupt ({err}); start a new run in another folder.") from None
        if not isinstance(data, dict):
            raise RunFolderError(
                f"{self.run_file} is corrupt: it holds a JSON {type(data).__name__}, where the kit writes an object "
                "({\"status\": ..., \"model\": ...}). Start a new run in another folder."
            )
        return data

    def write_run(self, **fields: Any) -> None:
        """Update run.json with `fields` (atomically)."""
        data = self.read_run() if self.run_file.exists() else {}
        data.update(fields)
        write_text_atomic(self.run_file, json.dumps(data, indent=2, default=str) + "\n")

    def read_log(self) -> list[dict]:
        """The records of log.jsonl.

        A damaged last line (a crash while writing) is skipped in silence; any other line that is
        not a JSON object with an integer `step` is skipped with a warning naming the file and line.
        """
        if not self.log_file.exists():
            return []
        lines = self.log_file.read_text(encoding="utf-8", errors="replace").splitlines()
        records, bad = [], []
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number < len(lines):
                    bad.append(number)
                continue
            if isinstance(record, dict) and isinstance(record.get("step", 0), int):
                records.append(record)
            else:
                bad.append(number)
        if bad:
            warnings.warn(
                f"{self.log_file}: line(s) {bad[:5]} are not log records of the kit (a JSON object with an integer "
                "'step'); they were skipped. The file was edited by hand or damaged: the other lines are used.",
                stacklevel=2,
            )
        return records

    def written(self) -> set[str]:
        """Names of the files the kit wrote here, as the folder's run.json records them.

        Returns:
            The names; a run folder of an earlier kit version without the record gives all of `RUN_FILES`.
        """
        if not self.run_file.exists():
            return set()
        data = self.read_run()
        return set(data.get("written") or RUN_FILES)  # run folders of earlier kit versions: the kit's names

    def record_written(self, *names: str) -> None:
        """Add `names` to the run.json record of files the kit wrote."""
        self.write_run(written=sorted(self.written() | set(names)))

    def foreign_files(self) -> list[str]:
        """Files with the names a run writes that the kit did not write here (the user's own).

        Returns:
            The names, sorted; checkpoints count as the kit's when its run.json is there.
        """
        if not self.path.is_dir():
            return []
        ours = self.written()
        present = [p.name for p in self.path.iterdir() if p.name in RUN_FILES or p.name.startswith(CHECKPOINT_PREFIX)]
        # Checkpoints are the kit's when its run.json is there (Trainer names them by step).
        return sorted(n for n in present
                      if n not in ours and not (n.startswith(CHECKPOINT_PREFIX) and self.run_file.exists()))

    def check_writable(self, *names: str) -> None:
        """Check that none of `names` in the folder is a file the kit did not write, before writing them.

        Args:
            names: File names inside the run folder (e.g. `METRICS_FILE`).

        Raises:
            RunFolderError: one of them exists and the folder's run.json does not record writing it.
        """
        ours = self.written()
        foreign = [n for n in names if (self.path / n).exists() and n not in ours]
        if foreign:
            raise RunFolderError(
                f"{self.path} already holds {', '.join(foreign)}, which this kit did not write there (no run.json of "
                "the kit records it). Nothing was overwritten: pass a run folder of the kit, or move those files away."
            )

    def lock(self) -> "_RunLock":
        """Hold the folder for one run (a context manager); a second run into it gets a `RunFolderError`.

        Returns:
            The lock, to use in a `with` block.

        Raises:
            RunFolderError: on entering, when another process holds the folder or it cannot be written.
        """
        return _RunLock(self)

    def checkpoint_problem(self, checkpoint: Path) -> str | None:
        """What makes a checkpoint unusable for resuming (a phrase), or None when it is whole.

        Args:
            checkpoint: A `checkpoint-N` folder.

        Returns:
            A phrase such as "adapter_model.safetensors is cut short: ...", or None.
        """
        state_file = checkpoint / TRAINER_STATE_FILE
        try:
            int(json.loads(state_file.read_text(encoding="utf-8"))["global_step"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            return f"{state_file.name} is missing or unreadable ({err})"
        if not any((checkpoint / f).exists() for f in (ADAPTER_WEIGHTS_FILE, "adapter_model.bin")):
            return f"it holds no adapter weights ({ADAPTER_WEIGHTS_FILE})"
        for file in sorted(checkpoint.iterdir()):
            problem = damaged_weights(file)
            if problem:
                return f"{file.name} {problem}"
        return None

    def checkpoint_error(self, checkpoint: Path, problem: str) -> RunFolderError:
        """The kit's error for an unusable checkpoint.

        Args:
            checkpoint: The checkpoint folder.
            problem: What `checkpoint_problem` said.

        Returns:
            The error, naming the folder and what to do.
        """
        return RunFolderError(
            f"Checkpoint {checkpoint} is corrupt: {problem}. Delete that folder to resume from the one before, "
            "or start a new run."
        )

    def check_checkpoint(self, checkpoint: Path) -> int:
        """The step of a checkpoint, after checking that it holds what resuming needs, whole.

        Args:
            checkpoint: A `checkpoint-N` folder.

        Returns:
            The checkpoint's global step.

        Raises:
            RunFolderError: the trainer state or the adapter weights are missing or unreadable, or a
                weight, optimizer or RNG file is cut short.
        """
        problem = self.checkpoint_problem(checkpoint)
        if problem is not None:
            raise self.checkpoint_error(checkpoint, problem)
        return int(json.loads((checkpoint / TRAINER_STATE_FILE).read_text(encoding="utf-8"))["global_step"])


class _RunLock:
    """An exclusive `flock` on the run folder's lock file for as long as a run uses the folder.

    The operating system drops the lock when the process ends, however it ends, so a killed run
    never leaves the folder locked.
    """

    def __init__(self, folder: RunFolder):
        self.folder = folder
        self.file = folder.path / LOCK_FILE
        self.handle = None

    def __enter__(self) -> "_RunLock":
        try:
            self.folder.path.mkdir(parents=True, exist_ok=True)
            handle = open(self.file, "a+", encoding="utf-8")
        except OSError as err:
            raise cannot_write(self.folder.path, err) from err
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunFolderError(
                f"{self.folder.path} is in use by another training run ({holder}). Two runs in one folder would mix "
                "their logs and checkpoints: wait until that run ends, or choose another run_dir / --out."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc) -> None:
        self.file.unlink(missing_ok=True)
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


def settings_yaml(settings) -> str:
    """The settings as the kit's commented YAML, as settings.yaml holds them.

    Args:
        settings: A `KitSettings`.

    Returns:
        The YAML text, each key with its help as a comment (`formats.dump_settings`).
    """
    return dump_settings(settings)


def model_fingerprint(model) -> dict[str, Any]:
    """Name, shape and a digest of the weights of the base model, to recognise a run folder of another model.

    Args:
        model: The base model, or a `PeftModel` around it.

    Returns:
        `name_or_path`, the config's `model_type`, `hidden_size`, `num_hidden_layers`, `vocab_size`,
        and `weights` (`weights_digest`).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    found = {"name_or_path": str(getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", ""))}
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    found.update({k: getattr(text, k, None) for k in FINGERPRINT_KEYS})
    found["weights"] = weights_digest(base)
    return found


def weights_digest(model) -> str:
    """A cheap digest of the model's weights: 4,096 evenly spaced values of its token embeddings.

    Embeddings are never quantized and do not train with LoRA, so the digest is the same for a model
    loaded in 4-bit, 8-bit or full precision; values are rounded to bfloat16 so that loading in
    float32 or bfloat16 gives the same digest too. Another checkpoint of the same architecture
    (a fine-tune, another size of the family) differs.

    Args:
        model: A transformers model (any precision, quantized included).

    Returns:
        16 hex digits.
    """
    weight = model.get_input_embeddings().weight.detach().reshape(-1)
    count = min(4096, weight.numel())  # integer spacing: float32 positions go wrong past 2**24 values
    picks = (torch.arange(count, dtype=torch.int64) * (weight.numel() - 1) // max(count - 1, 1)).to(weight.device)
    values = weight[picks].to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes()
    return hashlib.sha256(values).hexdigest()[:16]


def same_model(saved: dict, current: dict) -> bool:
    """Whether two `model_fingerprint`s are of the same base model (the weights digest decides when both have one).

    Args:
        saved: The fingerprint run.json recorded.
        current: The fingerprint of the model at hand.

    Returns:
        True for the same model; a hub ID and its local copy count as the same when no digest decides.
    """
    if any(saved.get(k) != current.get(k) for k in FINGERPRINT_KEYS):
        return False
    if saved.get("weights") and current.get("weights"):
        return saved["weights"] == current["weights"]  # the weights decide, whatever the folder is called
    # A hub ID and its local copy ("org/SmolLM2-135M-Instruct", "~/.cache/.../SmolLM2-135M-Instruct")
    # are the same model: compare the last path component.
    a, b = saved.get("name_or_path") or "", current.get("name_or_path") or ""
    return a == b or Path(a.rstrip("/")).name == Path(b.rstrip("/")).name
