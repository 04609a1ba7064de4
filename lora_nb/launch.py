"""Scale-out: the `accelerate launch` command that runs `python -m lora_nb run` on several GPUs.

The same settings file trains on one process or on N (data parallel, DDP): every process loads the
model and trains on its own share of each step's examples, the gradients are averaged, and rank 0
alone writes the run folder and evaluates. With `train.per_device_train_batch_size` b, N processes
train on N x b examples a step (the same examples, and so the same losses, as one process with
batch N x b or with `gradient_accumulation_steps` N):

    accelerate launch --multi_gpu --num_processes N ... -m lora_nb run --config my.yaml --out runs/x
        rank 0: loads, trains on b examples of each step, writes runs/x/, evaluates
        rank 1: loads, trains on the next b examples of each step
        ...

`--cpu` runs the N processes on the CPU (gloo), which is how the kit tests this on a laptop. Past
one machine's GPUs, or for a model that does not fit one GPU, pass an accelerate config file that
turns on FSDP or DeepSpeed (`accelerate config` writes one).
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Sequence

from .errors import SettingsError
from .run_folder import new_run_dir


def launch_command(processes: int, run_args: Sequence[str] = (), cpu: bool = False,
                   accelerate_config: str | Path | None = None) -> list[str]:
    """The command line that runs `python -m lora_nb run` in `processes` processes.

    Args:
        processes: Number of processes: one per GPU (or CPU processes with `cpu`).
        run_args: Arguments of `run` (`--config`, `--out`, ...). Without `--out`, a new
            `runs/ddp-<date>-<time>` is added, so that every process writes to the same folder.
        cpu: Run the processes on the CPU with the gloo backend (no GPU used, even when there is one).
        accelerate_config: An accelerate config file (FSDP, DeepSpeed, several machines).

    Returns:
        The command as a list of arguments; `shlex.join` it to print.

    Raises:
        SettingsError: `processes` is below 1.
    """
    if processes < 1:
        raise SettingsError(f"--gpus is {processes}; it must be at least 1 (one process per GPU).")
    run_args = list(run_args)
    if "--out" not in run_args and not any(a.startswith("--out=") for a in run_args):
        run_args += ["--out", str(new_run_dir("runs", "ddp"))]
    command = ["env", "CUDA_VISIBLE_DEVICES="] if cpu else []
    command += ["accelerate", "launch"]
    if accelerate_config:  # it sets the machines, the FSDP/DeepSpeed plugin and the rest
        command += ["--config_file", str(accelerate_config), "--num_processes", str(processes)]
    else:
        if processes > 1:
            command += ["--multi_gpu"]  # torchrun-style processes; without a GPU the kit uses gloo on the CPU
        # Precision comes from the settings file (train.precision); "no" only silences accelerate's defaults warning.
        command += ["--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
                    "--dynamo_backend", "no"]
    return command + ["-m", "lora_nb", "run", *run_args]


def process_device_map() -> str | dict[str, int]:
    """Where `from_pretrained` puts a model on GPUs: "auto" (spread over all of them) in a single
    process; under `accelerate launch` / torchrun a whole copy on this process's own GPU
    (`{"": LOCAL_RANK}`), since DDP needs one complete model per process (4-bit ones included)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return "auto"


def format_command(command: Sequence[str]) -> str:
    """A command as one shell line.

    Args:
        command: The arguments, as `launch_command` returns them.

    Returns:
        The line, quoted for a POSIX shell.
    """
    return shlex.join(command)
