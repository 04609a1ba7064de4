"""Workshop: what travels from one notebook to the next, said out loud, and a reset for the teacher.

``02_configure_lora`` writes ``runs/configured.yaml`` only when the learner presses Save;
``03_train`` trains with that file when it exists. :func:`training_choice` reads it and says what
training will use (r, alpha, targets, quantization, learning rate, steps) and when it was saved,
or that there is no saved file and the preset's defaults are used. :func:`reset_workshop` puts the
folder back as a fresh clone has it, between two groups of learners. :func:`memory_report` says,
before anything big is loaded, whether this session's memory (Binder gives 1-2 GB) is enough.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .formats import FORMATS
from .pipeline import DEFAULT_PRESET, REHEARSAL_VARIABLE, configure, rehearse
from .probes import memory_limit
from .run_folder import RUN_FILE
from .settings import ALL_LINEAR, KitSettings

CONFIGURED = FORMATS["kit"].file_name  # what the configurator's Save button writes in the run folder
EXPORTS = tuple(form.file_name for form in FORMATS.values())  # the configurator's export files

NEEDED_BYTES = 2_000_000_000  # the demo command (tests/test_memory.py) and notebooks 03 + 04 (tests/test_colab.py) run under a 2 GB cap


@dataclass
class TrainingChoice:
    """The settings a training notebook uses, and where they came from.

    Attributes:
        settings: The checked settings.
        path: The saved file, or None when the preset's defaults are used.
        saved_at: When the file was written (seconds since the epoch), or None.
        preset: The preset used when there is no saved file.
        rehearsal_of: In a rehearsal (`LORA_NB_REHEARSAL_STEPS`), the configured steps that were cut.
    """

    settings: KitSettings
    path: Path | None
    saved_at: float | None
    preset: str
    rehearsal_of: int | None = None

    def describe(self, now: float | None = None) -> str:
        """Two lines: where the settings come from (and when they were saved), then the main values."""
        if self.path is None:
            head = (f"No saved settings (nothing saved with the Save button of 02_configure_lora): training with "
                    f"the {self.preset!r} preset's defaults.")
        else:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.saved_at))
            head = f"Training with the settings saved at {stamp} ({_ago(self.saved_at, now)}) in {self.path}."
        lines = [head, "  " + settings_line(self.settings)]
        if self.rehearsal_of is not None:
            configured = f"{self.rehearsal_of} steps" if self.rehearsal_of > 0 else "its epochs"
            lines.append(f"  Rehearsal ({REHEARSAL_VARIABLE} is set): training is cut to {self.settings.train.max_steps} "
                         f"steps instead of {configured}; unset {REHEARSAL_VARIABLE} to train for real.")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()


def settings_line(settings: KitSettings) -> str:
    """The values a learner changes most, in one line (r, alpha, targets, quantization, lr, steps, batch)."""
    lo, qu, tr = settings.lora, settings.quant, settings.train
    targets = lo.target_modules if lo.target_modules == ALL_LINEAR else "+".join(map(str, lo.target_modules))
    quant = qu.load_in if qu.load_in != "4bit" else f"4bit ({qu.bnb_4bit_quant_type})"
    steps = f"{tr.max_steps} steps" if tr.max_steps > 0 else f"{tr.num_train_epochs:g} epochs"
    return (f"r {lo.r}, lora_alpha {lo.lora_alpha}, targets {targets}, quantization {quant}, "
            f"learning rate {tr.learning_rate:g}, {steps}, batch {tr.per_device_train_batch_size}")


def training_choice(root: str | Path = "runs", preset: str = DEFAULT_PRESET) -> TrainingChoice:
    """The settings ``03_train`` trains with: ``<root>/configured.yaml`` when saved, else the preset,
    with training cut short in a rehearsal (`pipeline.rehearsal_steps`).

    Args:
        root: The run folder root the configurator saved into.
        preset: The preset used when nothing was saved.

    Returns:
        A :class:`TrainingChoice`; print it to show the learner what training uses.

    Raises:
        ConfigFileError, SettingsError: When the saved file cannot be read or holds invalid settings, or
            `LORA_NB_REHEARSAL_STEPS` is not a whole number of steps.
    """
    saved = Path(root).expanduser() / CONFIGURED
    path = saved if saved.is_file() else None
    settings, before = rehearse(configure(path, preset))
    return TrainingChoice(settings, path, path.stat().st_mtime if path else None, preset, before)


def reset_workshop(root: str | Path = "runs", keep_runs: bool = False) -> list[Path]:
    """Puts the workshop back to a fresh start: removes the saved configuration and exports, and the runs.

    Args:
        root: The run folder root (``"../runs"`` from a notebook in ``notebooks/``).
        keep_runs: Keep the trained run folders; remove only what the configurator saved.

    Returns:
        The paths removed.
    """
    root = Path(root).expanduser()
    removed = []
    for name in EXPORTS:
        if (root / name).is_file():
            (root / name).unlink()
            removed.append(root / name)
    if not keep_runs and root.is_dir():
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and (p / RUN_FILE).exists()):
            shutil.rmtree(folder)
            removed.append(folder)
    return removed


def memory_report(needed: int = NEEDED_BYTES) -> str:
    """One line: this session's memory against the 2 GB the demo notebooks were measured to run in."""
    limit, source = memory_limit()
    if limit is None:
        return "memory: could not read this session's limit; the demo notebooks were measured to run in 2.0 GB"
    gb = limit / 1e9
    if limit >= needed:
        return f"memory: {gb:.1f} GB ({source}); enough for the demo (notebooks 03 and 04 were measured to run in 2.0 GB)"
    return (f"memory: only {gb:.1f} GB ({source}), less than the 2.0 GB the demo notebooks were measured to run in "
            "(training in 03 peaked at about 1 GB there, 03 and 04 together at 1.8 GB): training or evaluation may be "
            "stopped here (the kernel restarts). Shut down each notebook's kernel before the next, or use Colab or "
            "your own machine")


def _ago(then: float | None, now: float | None = None) -> str:
    seconds = max(0, int((now if now is not None else time.time()) - (then or 0)))
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} minutes ago"
    return f"{seconds // 3600} hours ago" if seconds < 2 * 86400 else f"{seconds // 86400} days ago"


__all__ = ["TrainingChoice", "memory_report", "reset_workshop", "settings_line", "training_choice"]
