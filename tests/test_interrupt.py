"""Interruption: a training run killed with SIGKILL after a checkpoint resumes to the same losses.

The run goes in a subprocess (tests/interrupt_worker.py) that is killed without warning right after
checkpoint-2 is on disk: no KeyboardInterrupt handler, no final save, run.json still "running".
`train(..., resume=True)` must then give per-step losses equal to an uninterrupted run: the adapter,
optimizer, scheduler, RNG state and data order all come back from the checkpoint.
Ctrl+C (KeyboardInterrupt) is tested in tests/test_train.py::test_ctrl_c_saves_a_checkpoint_and_the_run_resumes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_nb.run_folder import RunFolder
from lora_nb.train import train
from tests.interrupt_worker import interrupt_data, interrupt_settings, marker

ROOT = Path(__file__).resolve().parent.parent
KILL_AFTER = 2


def _train(model_dir: str, run_dir: Path, resume: bool = False, checkpoints: bool = True):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    settings = interrupt_settings(model_dir)
    if not checkpoints:
        settings.train.save_steps = None  # saving does not change the losses; it only costs time
    return train(model, tokenizer, interrupt_data(), settings, run_dir, resume=resume)


def _start(model_dir: str, run_dir: Path, step: int) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen([sys.executable, "-m", "tests.interrupt_worker", model_dir, str(run_dir), str(step)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_after_checkpoint(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 240) -> int:
    """Wait until the worker saved checkpoint-`step`, SIGKILL it; returns its exit code."""
    try:
        deadline = time.monotonic() + timeout
        while not marker(run_dir, step).exists():
            if proc.poll() is not None:
                pytest.fail(f"the worker ended before checkpoint-{step}: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no checkpoint-{step} after {timeout} s")
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        return proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_killed_run_resumes_to_the_same_losses(tiny_model_dir, tmp_path):
    run = tmp_path / "killed" / "run"
    run.parent.mkdir()
    worker = _start(tiny_model_dir, run, KILL_AFTER)
    full = _train(tiny_model_dir, tmp_path / "full" / "run", checkpoints=False)  # meanwhile, the reference run
    assert _kill_after_checkpoint(worker, run, KILL_AFTER) == -signal.SIGKILL

    folder = RunFolder(run)
    assert folder.read_run()["status"] == "running"  # killed: nothing got to write "interrupted"
    assert folder.last_checkpoint().name == f"checkpoint-{KILL_AFTER}"
    assert not folder.adapter_dir.exists()  # no final save happened
    assert [r["step"] for r in folder.read_log() if "loss" in r] == [1, 2]

    resumed = _train(tiny_model_dir, run, resume=True)

    assert full.global_step == resumed.global_step == 4
    assert [s for s, _ in resumed.train_losses] == [1, 2, 3, 4]
    expected = [loss for _, loss in full.train_losses]
    assert [loss for _, loss in resumed.train_losses] == pytest.approx(expected, abs=1e-6)
    assert len(set(expected)) == 4  # the losses really vary from step to step
    lrs = lambda result: [h["learning_rate"] for h in result.history if "loss" in h]  # noqa: E731
    assert lrs(resumed) == pytest.approx(lrs(full), rel=1e-9)  # the scheduler went on where it stopped
    assert folder.read_run()["status"] == "finished" and folder.read_run()["resumed_from"] == f"checkpoint-{KILL_AFTER}"
    # log.jsonl: the killed process's lines for steps 1-2, then the resumed ones, each step once.
    assert [r["loss"] for r in folder.read_log() if "loss" in r] == pytest.approx(expected, abs=1e-6)
