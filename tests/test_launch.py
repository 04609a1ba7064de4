"""Scale-out: the printed `accelerate launch` command, and 2 CPU processes (DDP, gloo) against 1 process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lora_nb.__main__ import main
from lora_nb.demo_task import demo_data_paths
from lora_nb.errors import SettingsError
from lora_nb.formats import save_settings
from lora_nb.launch import format_command, launch_command
from lora_nb.loading import load_model
from lora_nb.settings import KitSettings, LoraSettings, QuantSettings, TrainSettings
from lora_nb.train import train

ROOT = Path(__file__).resolve().parents[1]
# The 2-process run reduces the two half-batch gradients in another order than one process sums the
# whole batch: float32 round-off, measured at most 5e-7 on losses near 6.2 (about 1e-7 relative)
# over 4 steps. 1e-5 relative leaves a margin of 100 and still catches a different batch (0.01 and more).
LOSS_TOLERANCE = 1e-5


def settings_for(model_dir: str, batch: int, accumulation: int = 1) -> KitSettings:
    """Tiny, deterministic (no dropout, fp32), 4 steps, a checkpoint every 2 steps."""
    return KitSettings(
        model_name_or_path=model_dir,
        lora=LoraSettings(r=4, lora_alpha=8, lora_dropout=0.0),
        quant=QuantSettings(load_in="none"),
        train=TrainSettings(learning_rate=1e-3, max_steps=4, per_device_train_batch_size=batch,
                            gradient_accumulation_steps=accumulation, logging_steps=1, save_steps=2,
                            max_seq_length=128, precision="fp32"),
    )


def train_losses(settings: KitSettings, run_dir: Path) -> list[float]:
    model, tokenizer = load_model(settings.model_name_or_path, settings.quant)
    return [loss for _, loss in train(model, tokenizer, demo_data_paths()[0], settings, run_dir).train_losses]


def log_losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


# ------------------------------------------------------------------------------ the printed command
def test_launch_command_for_gpus_cpu_and_accelerate_config():
    run_args = ["--config", "my.yaml", "--out", "runs/x"]
    assert format_command(launch_command(4, run_args)) == (
        "accelerate launch --multi_gpu --num_processes 4 --num_machines 1 --mixed_precision no "
        "--dynamo_backend no -m lora_nb run --config my.yaml --out runs/x")
    assert "--multi_gpu" not in launch_command(1, run_args)
    assert launch_command(2, run_args, cpu=True)[:2] == ["env", "CUDA_VISIBLE_DEVICES="]
    assert format_command(launch_command(8, run_args, accelerate_config="fsdp.yaml")) == (
        "accelerate launch --config_file fsdp.yaml --num_processes 8 -m lora_nb run --config my.yaml --out runs/x")
    with pytest.raises(SettingsError, match="at least 1"):
        launch_command(0)


def test_launch_names_one_run_folder_for_all_processes(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    command = launch_command(2, ["--config", "my.yaml"])
    out = command[command.index("--out") + 1]
    assert out.startswith("runs/ddp-") and not Path(out).exists()


def test_launch_sub_command_prints_and_checks_run_arguments(capsys):
    assert main(["launch", "--gpus", "2", "--config", "my.yaml", "--out", "runs/x", "--max-steps", "5"]) == 0
    assert capsys.readouterr().out.strip() == (
        "accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no "
        "--dynamo_backend no -m lora_nb run --config my.yaml --out runs/x --max-steps 5")
    with pytest.raises(SystemExit):
        main(["launch", "--gpus", "2", "--confg", "my.yaml"])  # misspelled: refused before any process starts
    assert "unrecognized arguments: --confg" in capsys.readouterr().err
    assert main(["launch", "--gpus", "0"]) == 1
    assert "--gpus is 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "--gpus", "2"])


def test_each_process_keeps_its_model_on_its_own_gpu(monkeypatch):
    from lora_nb.launch import process_device_map

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert process_device_map() == "auto"
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert process_device_map() == {"": 3}


# ------------------------------------------------------------------------------ the same examples per step
def test_accumulation_trains_on_the_same_examples_as_the_bigger_batch(tiny_model_dir, tmp_path):
    # The length-grouped sampler groups the examples of one optimizer step, so how a step is cut
    # into passes (accumulation here, processes under DDP) does not change which examples it sees.
    whole = train_losses(settings_for(tiny_model_dir, batch=4), tmp_path / "b4")
    halves = train_losses(settings_for(tiny_model_dir, batch=2, accumulation=2), tmp_path / "b2a2")
    assert halves == pytest.approx(whole, rel=LOSS_TOLERANCE)
    assert len(set(whole)) == 4


# ------------------------------------------------------------------------------ 2 processes (slow)
def _launch(settings_file: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    command = launch_command(2, ["--config", str(settings_file), "--out", str(out), "--limit", "1",
                                 "--max-new-tokens", "2", *extra], cpu=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=out.parent, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_two_processes_match_one_process_and_resume(tiny_model_dir, tmp_path):
    """`accelerate launch` with 2 CPU processes of batch 2 = 1 process of batch 4; rank 0 writes; resume works."""
    settings_file = tmp_path / "ddp.yaml"
    save_settings(settings_for(tiny_model_dir, batch=2), settings_file)
    out = tmp_path / "ddp"
    _launch(settings_file, out)
    reference = train_losses(settings_for(tiny_model_dir, batch=4), tmp_path / "one")
    assert log_losses(out) == pytest.approx(reference, rel=LOSS_TOLERANCE)  # 4 lines: rank 1 logged nothing
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["global_step"] == 4
    assert sorted(p.name for p in (out / "checkpoint-2").glob("rng_state_*.pth")) == ["rng_state_0.pth",
                                                                                      "rng_state_1.pth"]
    assert (out / "metrics.json").exists() and (out / "adapter" / "adapter_config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "ddp.yaml", "one"]  # no second run folder

    # A crash after checkpoint-2: the later checkpoint and the adapter are gone; resume on 2 processes.
    shutil.rmtree(out / "checkpoint-4")
    shutil.rmtree(out / "adapter")
    _launch(settings_file, out, "--resume")
    assert log_losses(out) == pytest.approx(reference, rel=LOSS_TOLERANCE)
    run = json.loads((out / "run.json").read_text())
    assert run["resumed_from"] == "checkpoint-2" and run["status"] == "finished"
    assert (out / "adapter" / "adapter_model.safetensors").exists()

