"""A training run to be killed: `python -m tests.interrupt_worker MODEL_DIR RUN_DIR STEP`.

Trains the tiny model with `interrupt_settings` and a checkpoint every step; once checkpoint-STEP is
saved it writes RUN_DIR/../killed-at-STEP and waits, so that tests/test_interrupt.py can SIGKILL it
at a known point (a real kill: no handler, no cleanup, run.json still says "running").
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from lora_nb.data import load_examples
from lora_nb.demo_task import demo_data_paths
from lora_nb.settings import KitSettings, LoraSettings, TrainSettings
from lora_nb.train import train


def interrupt_settings(model_dir: str) -> KitSettings:
    """Dropout, warmup and decay on, so that RNG, optimizer and scheduler state all matter on resume."""
    return KitSettings(
        model_name_or_path=model_dir,
        lora=LoraSettings(r=4, lora_alpha=8, lora_dropout=0.1),
        train=TrainSettings(learning_rate=1e-2, max_steps=4, per_device_train_batch_size=2, logging_steps=1,
                            seed=0, precision="fp32", max_seq_length=96, warmup_ratio=0.2, save_steps=1),
    )


def interrupt_data():
    return load_examples(demo_data_paths()[0]).select(range(12))


def marker(run_dir: Path, step: int) -> Path:
    return run_dir.parent / f"killed-at-{step}"


class WaitAfterSave(TrainerCallback):
    def __init__(self, run_dir: Path, step: int):
        self.run_dir, self.step = run_dir, step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:  # checkpoint-STEP is complete on disk now
            marker(self.run_dir, self.step).write_text(str(state.global_step))
            time.sleep(600)


if __name__ == "__main__":
    model_dir, run_dir, step = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train(model, tokenizer, interrupt_data(), interrupt_settings(model_dir), run_dir,
          callbacks=[WaitAfterSave(run_dir, step)])
