"""Threads: how the kit shares the CPU with the other programs on a workshop laptop.

Measured on 2 cores (FACTS.md, benchmarks/busy.py): with one other CPU-heavy process running, the
demo took 9.5x its quiet time and used 5x the CPU for the same work. torch's OpenMP threads, when
a parallel region ends, *spin* waiting for the next one; with a competitor on the same cores the
spinning threads take the cores from the threads that have work, and every region waits for its
slowest thread::

    core 0: [work]spin spin spin[work]spin spin ...      <- torch thread 0
    core 1: [work][other program][work][other ...        <- torch thread 1 waits for its turn
            the region ends when thread 1 finishes: thread 0's spinning only delays it

`apply_thread_settings()` is what every entry point runs first (``import lora_nb`` does it, so the
command line, notebooks and the tests' subprocesses get it alike). Each setting keeps a value the
user set in the environment already:

- ``OMP_WAIT_POLICY=PASSIVE`` (and ``GOMP_SPINCOUNT=0``, ``KMP_BLOCKTIME=0`` for GNU and Intel
  OpenMP): threads sleep instead of spinning when a region ends. OpenMP reads these once, when
  torch loads it, so they only take effect when lora_nb is imported before torch; the report says
  when that was too late.
- ``TOKENIZERS_PARALLELISM=false``: the Rust tokenizer's own thread pool stays off (the examples
  are short; its pool would be one more set of threads, and it warns after a fork).
- torch's intra-op threads: one per core this process may use (``os.sched_getaffinity``), inter-op 1
  (the kit runs no parallel graph branches).
- data loader workers: 0 (``TrainingArguments.dataloader_num_workers``'s default; the data is
  tokenized up front, so a worker process would only add a copy of the data set and a fork).

``LORA_NB_THREADS=off`` leaves everything as torch and the environment have it (what the benchmark
measures as "before"); ``LORA_NB_THREADS=<n>`` sets n intra-op threads.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

SWITCH = "LORA_NB_THREADS"  # "off": leave thread settings alone; a number: that many intra-op threads
OPENMP_SETTINGS = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0", "KMP_BLOCKTIME": "0"}
ENV_SETTINGS = {**OPENMP_SETTINGS, "TOKENIZERS_PARALLELISM": "false"}
DATALOADER_WORKERS = 0


@dataclass
class ThreadChoice:
    """What :func:`apply_thread_settings` chose, for the report.

    Attributes:
        enabled: False when ``LORA_NB_THREADS=off`` left everything alone.
        env: Variable -> value in effect, with who set it ("kit" or "user").
        intra_op: torch's intra-op threads (None while torch is not imported yet).
        inter_op: torch's inter-op threads (None while torch is not imported yet).
        cores: Cores this process may run on.
        too_late: True when torch (and so OpenMP) was imported before the kit set the wait policy.
    """

    enabled: bool
    env: dict[str, tuple[str, str]] = field(default_factory=dict)
    intra_op: int | None = None
    inter_op: int | None = None
    cores: int = 1
    too_late: bool = False

    def report(self) -> str:
        """One line saying what the kit chose, e.g. for the environment check and the command line."""
        if not self.enabled:
            return f"threads: left as they are ({SWITCH}=off)"
        threads = (f"torch {self.intra_op} intra-op / {self.inter_op} inter-op on {self.cores} cores"
                   if self.intra_op is not None else f"torch not imported yet ({self.cores} cores)")
        wait = self.env.get("OMP_WAIT_POLICY", ("?", ""))
        line = (f"threads: {threads}; OMP_WAIT_POLICY={wait[0]} ({wait[1]}); TOKENIZERS_PARALLELISM="
                f"{self.env.get('TOKENIZERS_PARALLELISM', ('?', ''))[0]}; data loader workers {DATALOADER_WORKERS}")
        if self.too_late:
            line += (" -- torch was imported before lora_nb, so the wait policy could not take effect: "
                     "import lora_nb first (restart the kernel) for full speed on a busy machine")
        return line


_choice: ThreadChoice | None = None


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS tells, else the CPU count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def apply_thread_settings() -> ThreadChoice:
    """Sets the kit's thread choice (see the module docstring); safe to call again.

    Returns:
        The :class:`ThreadChoice` in effect.
    """
    global _choice
    if _choice is None:
        _choice = _choose()
    if _choice.enabled and "torch" in sys.modules:
        _set_torch_threads(_choice, os.environ.get(SWITCH, "").strip().lower())
    return _choice


def _choose() -> ThreadChoice:
    """Sets the environment variables once, keeping any the user set."""
    if os.environ.get(SWITCH, "").strip().lower() == "off":
        return ThreadChoice(enabled=False, cores=usable_cores())
    env = {}
    for name, value in ENV_SETTINGS.items():
        if name in os.environ:
            env[name] = (os.environ[name], "user")
        else:
            os.environ[name] = value
            env[name] = (value, "kit")
    too_late = "torch" in sys.modules and env["OMP_WAIT_POLICY"][1] == "kit"
    return ThreadChoice(enabled=True, env=env, cores=usable_cores(), too_late=too_late)


def _set_torch_threads(choice: ThreadChoice, switch: str) -> None:
    import torch

    wanted = int(switch) if switch.isdigit() and int(switch) > 0 else choice.cores
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)
    try:
        torch.set_num_interop_threads(1)  # allowed once, before any inter-op work
    except RuntimeError:
        pass
    choice.intra_op, choice.inter_op = torch.get_num_threads(), torch.get_num_interop_threads()


def thread_report() -> str:
    """What the kit chose for threads, as one line (applies the settings first if nothing did)."""
    return apply_thread_settings().report()


__all__ = ["ThreadChoice", "apply_thread_settings", "thread_report", "usable_cores"]
