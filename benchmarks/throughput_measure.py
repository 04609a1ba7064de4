"""Throughput benchmark, part 2 of 3: measurement (arms taking turns, held-out loss, peak memory).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep instead of spinning on a shared CPU
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contextlib  # noqa: E402
import ctypes  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402

import psutil  # noqa: E402
import torch  # noqa: E402

from benchmarks.throughput_arms import (  # noqa: E402
    ARMS, CountingCollator, _tokenizer, kit_dataset, kit_peft, kit_settings, kit_trainer, make_data_set,
    make_examples, recipe_dataset, recipe_peft, recipe_trainer, same_adapters, warm_up)

ENTRY = Path(__file__).with_name("throughput.py")  # the memory runs start it as a fresh process


def thread_settings() -> dict:
    """The thread settings this process runs with (torch, OpenMP/MKL environment, cores)."""
    env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
            "cores": cores, **env}


# ---------------------------------------------------------------------------------------- the race
class TurnTaker:
    """Lets Trainers in several threads take optimizer steps in turn, so that all see the same load."""

    def __init__(self, names: list[str]):
        self.order = list(names)
        self.current = self.order[0] if self.order else None
        self.cond = threading.Condition()

    def _next(self, name: str) -> str:
        return self.order[(self.order.index(name) + 1) % len(self.order)]

    def wait(self, name: str) -> None:
        """Block until it is `name`'s turn."""
        with self.cond:
            self.cond.wait_for(lambda: self.current == name)

    def done_step(self, name: str) -> None:
        """`name` finished a step: the next arm's turn."""
        with self.cond:
            self.current = self._next(name)
            self.cond.notify_all()

    def leave(self, name: str) -> None:
        """`name` finished training (or failed): drop it from the rotation."""
        with self.cond:
            if name in self.order:
                if self.current == name:
                    self.current = self._next(name) if len(self.order) > 1 else None
                self.order.remove(name)
            self.cond.notify_all()


def _one_malloc_arena() -> None:
    """glibc only: one heap for all threads, so that memory one arm frees is reused by the next."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, 1)  # M_ARENA_MAX = 1
    except (OSError, AttributeError):
        pass


@dataclass
class ArmResult:
    """What one arm measured in one run (one data set, one seed)."""

    arm: str
    steps: int
    real_tokens: int = 0
    padded_tokens: int = 0
    loss_tokens: int = 0
    seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    heldout_loss: float | None = None
    heldout_loss_without_end: float | None = None  # the same chats, end-of-turn tokens not counted

    @property
    def real_tokens_per_s(self) -> float:
        return self.real_tokens / self.seconds if self.seconds else float("nan")

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / len(self.step_seconds) if self.step_seconds else float("nan")

    @property
    def padding_efficiency(self) -> float:
        return self.real_tokens / self.padded_tokens if self.padded_tokens else float("nan")

    def summary(self) -> dict:
        return {**asdict(self), "real_tokens_per_s": self.real_tokens_per_s, "seconds_per_step": self.seconds_per_step,
                "padding_efficiency": self.padding_efficiency}


def _step_callback(name: str, turns: TurnTaker, result: ArmResult, counter: CountingCollator):
    from transformers import TrainerCallback

    class TakeTurns(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            turns.wait(name)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()
            self.batches_before = len(counter.batches)

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            dt = time.perf_counter() - self.t0
            # The batches of this step were collated just before it began (and, with a prefetching
            # loader, possibly one more): the step's batches are those counted for this step number.
            batch = counter.batches[state.global_step - 1]
            result.step_seconds.append(dt)
            result.seconds += dt
            result.real_tokens += batch["real"]
            result.padded_tokens += batch["padded"]
            result.loss_tokens += batch["loss_tokens"]
            print(f"  {name} step {state.global_step}: {dt:.1f} s, {batch['real']} real tokens in "
                  f"{batch['shape'][0]}x{batch['shape'][1]}", flush=True)
            turns.done_step(name)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                result.losses.append(float(logs["loss"]))

    return TakeTurns()


def race(trainers: dict, turns: TurnTaker) -> None:
    """Run the Trainers in threads that take turns step by step; re-raise the first error."""
    errors = []

    def run(name, trainer, turns):
        try:
            trainer.train()
        except BaseException as err:  # noqa: BLE001 - reported from the main thread
            errors.append(err)
        finally:
            turns.leave(name)

    threads = [threading.Thread(target=run, args=(name, t, turns), name=f"arm-{name}") for name, t in trainers.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


# ------------------------------------------------------------------------------------- loss checks
@torch.no_grad()
def per_example_losses(model, input_ids: list[list[int]], labels: list[list[int]], how: str) -> list[float]:
    """Mean token loss of each example: `alone` (one by one, unpadded), `padded` (one batch padded to
    its longest) or `packed` (one padding-free row, through the kit's loss)."""
    from lora_nb.batching import BatchPlan, PackedCollator, ShiftedPadCollator, packed_attention
    from lora_nb.loss import shift_labels

    model.eval()
    feats = [{"input_ids": i, "labels": lab} for i, lab in zip(input_ids, labels)]
    losses = []
    if how == "packed":
        batch = PackedCollator()(feats)
        with packed_attention(model, BatchPlan(padding_free=True, chunked_loss=True)):
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        token_loss = torch.nn.functional.cross_entropy(logits[0].float(), batch["shift_labels"][0], reduction="none")
        start = 0
        for f in feats:
            end = start + len(f["input_ids"])
            target = batch["shift_labels"][0, start:end]
            losses.append((token_loss[start:end].sum() / (target != -100).sum().clamp(min=1)).item())
            start = end
    else:
        for group in ([feats] if how == "padded" else [[f] for f in feats]):
            batch = ShiftedPadCollator(0)(group)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            target = shift_labels(batch["labels"])
            token_loss = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), target, reduction="none")
            losses += (token_loss.sum(1) / (target != -100).sum(1).clamp(min=1)).tolist()
    model.train()
    return losses


def heldout_labels(dataset, tokenizer) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """Held-out ids, their labels (every token: what both arms learn), and the labels without end-of-turn tokens.

    The last is what a `DataCollatorForLanguageModeling` recipe learns when the pad token is the
    end-of-turn token (it labels every pad-id token -100): reported beside, for that comparison.
    """
    pad = tokenizer.pad_token_id
    ids = [list(x) for x in dataset["input_ids"]]
    return ids, [list(x) for x in ids], [[t if t != pad else -100 for t in x] for x in ids]


# ------------------------------------------------------------------------------------------ a run
def run_once(path: str, tokenizer, data_set: dict, seed: int, steps: int, batch_size: int, heldout: int,
             work: Path) -> dict:
    """Train both arms on one data set with one seed, taking turns; returns their results."""
    from transformers import PrinterCallback, ProgressCallback

    max_length = data_set["max_length"]
    chats = make_data_set(tokenizer, steps * batch_size, data_set["min_len"], data_set["max_len"],
                          data_set["n_long"], seed)
    held = make_examples(tokenizer, heldout, data_set["min_len"], data_set["max_len"], seed=seed + 500)
    data = {"recipe": recipe_dataset(chats, tokenizer, max_length=max_length),
            "kit": kit_dataset(chats, tokenizer, max_length=max_length)}
    settings = kit_settings(path, steps, batch_size, seed, max_length)
    models = {"recipe": recipe_peft(path, seed), "kit": kit_peft(path, settings)}
    identical_start = same_adapters(models["recipe"], models["kit"])

    held_set = kit_dataset(held, tokenizer, max_length=max_length)
    held_ids, held_labels, held_without_end = heldout_labels(held_set, tokenizer)
    alone = per_example_losses(models["kit"], held_ids, held_labels, "alone")
    checks = {"padded_rel": max(abs(a - b) / abs(a) for a, b in
                                zip(alone, per_example_losses(models["recipe"], held_ids, held_labels, "padded"))),
              "packed_rel": max(abs(a - b) / abs(a) for a, b in
                                zip(alone, per_example_losses(models["kit"], held_ids, held_labels, "packed")))}

    for m in models.values():
        warm_up(m, tokenizer, batch_size)
    results = {name: ArmResult(arm=name, steps=steps) for name in models}
    turns = TurnTaker(list(models))
    trainers, plan = {}, None
    for name, m in models.items():
        run_dir = work / f"{data_set['name']}-{seed}-{name}"
        if name == "kit":
            trainer, counter, plan = kit_trainer(m, tokenizer, data[name], settings, run_dir)
        else:
            trainer, counter, _ = recipe_trainer(m, tokenizer, data[name], steps, batch_size, seed, run_dir)
        trainer.add_callback(_step_callback(name, turns, results[name], counter))
        for quiet in (PrinterCallback, ProgressCallback):  # one line per arm and step instead
            trainer.remove_callback(quiet)
        trainers[name] = trainer
    from lora_nb.batching import packed_attention

    with packed_attention(models["kit"], plan):
        race(trainers, turns)
    for name in ARMS:
        losses = per_example_losses(models[name], held_ids, held_labels, "alone")
        results[name].heldout_loss = sum(losses) / len(losses)
        losses = per_example_losses(models[name], held_ids, held_without_end, "alone")
        results[name].heldout_loss_without_end = sum(losses) / len(losses)
    lengths = list(data["kit"]["length"])
    return {"seed": seed, "identical_start": identical_start, "heldout_before": sum(alone) / len(alone),
            "checks": checks, "plan": {"padding_free": plan.padding_free, "chunked_loss": plan.chunked_loss,
                                       "notes": plan.notes},
            "lengths": {"min": min(lengths), "max": max(lengths), "mean": sum(lengths) / len(lengths),
                        "over_1000": sum(n > 1000 for n in lengths)},
            "kit_lengths": lengths, "arms": {name: r.summary() for name, r in results.items()}}


# ---------------------------------------------------------------------------------------- memory
def _peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (VmHWM; Linux)."""
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))


def memory_child(arm: str, path: str, steps: int, batch_size: int, max_length: int) -> dict:
    """In a fresh process: peak RSS of `steps` training steps of one arm over the longest batches."""
    warnings.filterwarnings("ignore")
    tokenizer = _tokenizer(path)
    chats = make_data_set(tokenizer, 4 * steps * batch_size, 20, 400, steps * batch_size, seed=0)
    data = recipe_dataset(chats, tokenizer, max_length=max_length) if arm == "recipe" else kit_dataset(chats, tokenizer, max_length=max_length)
    lengths = [len(x) for x in data["input_ids"]]
    longest = sorted(range(len(lengths)), key=lambda i: -lengths[i])[: steps * batch_size]
    data = data.select(sorted(longest))  # every batch holds 512-token examples: the memory worst case
    base_rss = psutil.Process().memory_info().rss
    with tempfile.TemporaryDirectory() as work:
        if arm == "recipe":
            model = recipe_peft(path, 0)
            trainer, _, plan = recipe_trainer(model, tokenizer, data, steps, batch_size, 0, Path(work))
        else:
            settings = kit_settings(path, steps, batch_size, 0, max_length)
            model = kit_peft(path, settings)
            trainer, _, plan = kit_trainer(model, tokenizer, data, settings, Path(work))
        model_rss = psutil.Process().memory_info().rss
        from lora_nb.batching import packed_attention

        with packed_attention(model, plan) if plan else contextlib.nullcontext():
            trainer.train()
    gpu = {"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20} if torch.cuda.is_available() else {}
    return {"arm": arm, "steps": steps, "batch_size": batch_size, "max_length": max_length, **gpu,
            "peak_rss_mb": _peak_rss_bytes() / 2**20, "base_rss_mb": base_rss / 2**20,
            "model_rss_mb": model_rss / 2**20, "tokens_per_batch_max": max(lengths) * batch_size}


def measure_memory(path: str, steps: int, batch_size: int, max_length: int) -> list[dict]:
    """`memory_child` of each arm in its own fresh process (peak RSS is per process)."""
    rows = []
    for arm in ARMS:
        cmd = [sys.executable, str(ENTRY), "--memory-child", arm, "--model", path,
               "--memory-steps", str(steps), "--batch-size", str(batch_size), "--max-length", str(max_length)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"  memory {arm}: peak RSS {row['peak_rss_mb']:.0f} MiB (model loaded: {row['model_rss_mb']:.0f} MiB)",
              flush=True)
    return rows
