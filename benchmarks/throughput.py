"""Benchmark: training speed, memory and held-out loss of the kit against the LoRA recipe people copy.

Same model, same synthetic chats, same initial adapter, same optimizer steps, two arms:

- `recipe`: the plain recipe (reference/llama2-qlora-walkthrough.md): `get_peft_model` + `Trainer` +
  `DataCollatorForLanguageModeling(mlm=False)` over chats tokenized with truncation, random order,
  each batch padded to its longest example (dynamic padding), the model's own loss;
- `kit`: what `lora_nb.train.train` builds: `KitSettings.to_peft` / `to_training_args`,
  `data.tokenize_examples`, and `batching.plan_batches` + `KitTrainer`: padding-free rows with
  per-example attention, the loss through the output head in chunks, every label token of a step
  weighing the same.

Per data set (`mixed`: 20-400 tokens; `long_tail`: the same plus a few chats of 1,000+ tokens) and
per seed (the seed draws the chats, the adapter's initial weights and the batch order; both arms
share all three), the two arms train in threads that take turns step by step, so that both see the
same machine load. Reported per arm: real (non-padding) tokens/s, seconds per step, held-out loss
(mean token loss of held-out chats on the tokens both arms learn), and their spread over seeds.
Peak memory is measured per arm in a fresh process (batch 8, the longest batches of the data set,
512-token cut), as the process's peak RSS. The torch/OpenMP thread settings are reported.

    python benchmarks/throughput.py                      # demo model, the committed run
    python benchmarks/throughput.py --model tiny --steps 3 --seeds 0 --no-long-tail --memory-steps 0
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep instead of spinning on a shared CPU
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
import torch  # noqa: E402

RESULTS_DIR = Path(__file__).parent / "results"
ARMS = ("recipe", "kit")
MAX_LENGTH = 512  # truncation length of the mixed set and of the memory measurement
LONG_MAX_LENGTH = 1536  # truncation length of the long-tail set (keeps its 1,000+ token chats whole)
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0}  # dropout 0: the arms compute the same thing
LEARNING_RATE = 1e-3
ACCEPTANCE = {"speedup": 1.9, "heldout_rel": 0.02, "heldout_above_max": 1, "memory_ratio": 0.8}
PADDING_TOLERANCE = 1e-4  # packing or padding must not change a token's loss beyond fp32 rounding
_WORDS = None


# --------------------------------------------------------------------------------------------- data
def _words() -> list[str]:
    global _WORDS
    if _WORDS is None:
        folder = Path(__file__).resolve().parents[1] / "lora_nb" / "demo_data"
        text = " ".join(
            m["content"] for f in sorted(folder.glob("*.jsonl")) for line in f.read_text().splitlines() if line.strip()
            for m in json.loads(line)["messages"]
        )
        _WORDS = sorted({w for w in text.split() if w.isascii()})
    return _WORDS


def make_examples(tokenizer, n: int, min_len: int = 20, max_len: int = 400, seed: int = 0) -> list[list[dict]]:
    """Synthetic chats whose rendered length is spread uniformly over `min_len`-`max_len` tokens.

    Each chat is a user turn and an assistant turn of random words from the demo data; the
    prompt takes 20-60% of the words. Lengths are hit approximately (chat template included;
    chats never go below the template's own length).
    """
    rng = random.Random(seed)
    words = _words()
    overhead = len(tokenizer(tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], tokenize=False),
        add_special_tokens=False)["input_ids"])
    chats = []
    for _ in range(n):
        target = rng.randint(min_len, max_len)
        budget = max(2, target - overhead)
        text = [rng.choice(words) for _ in range(budget)]
        n_tokens = len(tokenizer(" ".join(text), add_special_tokens=False)["input_ids"])
        del text[max(2, len(text) * budget // n_tokens):]  # words are about n_tokens / len(text) tokens each
        while len(text) > 2 and len(tokenizer(" ".join(text), add_special_tokens=False)["input_ids"]) > budget:
            text.pop()
        cut = max(1, min(len(text) - 1, round(len(text) * rng.uniform(0.2, 0.6))))
        chats.append([{"role": "user", "content": " ".join(text[:cut])},
                      {"role": "assistant", "content": " ".join(text[cut:])}])
    return chats


def recipe_dataset(chats, tokenizer, max_length: int = MAX_LENGTH):
    """The recipe's data: rendered chat text, `tokenizer(text, truncation=True)`."""
    import datasets

    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in chats]
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    return datasets.Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})


def kit_dataset(chats, tokenizer, train_on_responses_only: bool = False, max_length: int = MAX_LENGTH):
    """The kit's data: `data.load_examples` + `data.tokenize_examples`."""
    import datasets

    from lora_nb.data import load_examples, tokenize_examples

    examples = load_examples(datasets.Dataset.from_dict({"messages": chats}))
    return tokenize_examples(examples, tokenizer, max_length, train_on_responses_only)


def make_data_set(tokenizer, n: int, min_len: int, max_len: int, n_long: int, seed: int) -> list[list[dict]]:
    """`n` chats of `min_len`-`max_len` tokens; for `long_tail`, `n_long` of them 1,000-1,400 tokens, placed at random."""
    chats = make_examples(tokenizer, n - n_long, min_len, max_len, seed=seed)
    if n_long:
        chats += make_examples(tokenizer, n_long, 1000, 1400, seed=seed + 1000)
        random.Random(seed).shuffle(chats)
    return chats


def model_path(name: str, workdir: Path) -> str:
    """`demo` (SmolLM2-135M-Instruct, local copy) or `tiny` (random 2-layer Llama) or a folder."""
    from lora_nb.demo import build_tiny_model, demo_model_path

    if name == "demo":
        return str(demo_model_path())
    if name == "tiny":
        return str(build_tiny_model(workdir / "tiny-model"))
    return name


def kit_settings(path: str, steps: int, batch_size: int, seed: int, max_length: int = MAX_LENGTH):
    """The kit's settings for the benchmark run (the recipe's hyperparameters)."""
    from lora_nb.settings import KitSettings, LoraSettings, QuantSettings, TrainSettings

    return KitSettings(
        model_name_or_path=path,
        lora=LoraSettings(**LORA, target_modules="all-linear"),
        quant=QuantSettings(load_in="none"),  # fp32 base, as loaded by load_base
        train=TrainSettings(learning_rate=LEARNING_RATE, max_steps=steps, per_device_train_batch_size=batch_size,
                            seed=seed, precision="fp32", logging_steps=1, save_steps=None,
                            train_on_responses_only=False, max_seq_length=max_length, padding_free=True),
    )


def load_base(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def recipe_peft(path: str, seed: int):
    """The recipe's model: `LoraConfig` + `get_peft_model`, seeded like the kit."""
    import transformers
    from peft import LoraConfig, get_peft_model

    base = load_base(path)
    transformers.set_seed(seed)
    config = LoraConfig(**LORA, target_modules="all-linear", bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        return get_peft_model(base, config)


def kit_peft(path: str, settings):
    """The kit's model: `settings.lora.to_peft` + `get_peft_model`, seeded as `train.train` does."""
    import transformers
    from peft import get_peft_model

    base = load_base(path)
    transformers.set_seed(settings.train.seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        return get_peft_model(base, settings.lora.to_peft(base))


def same_adapters(a, b) -> bool:
    """Whether two LoRA models start from identical adapter weights (same names, same values)."""
    wa = {k: v for k, v in a.state_dict().items() if "lora_" in k}
    wb = {k: v for k, v in b.state_dict().items() if "lora_" in k}
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


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


class CountingCollator:
    """Wraps a collator and records each batch's real tokens, positions computed and loss tokens."""

    def __init__(self, collator):
        self.collator = collator
        self.batches: list[dict] = []

    def __call__(self, features):
        batch = self.collator(features)
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        targets = batch["shift_labels"] if "shift_labels" in batch else batch["labels"][:, 1:]
        self.batches.append({"real": int(mask.sum()) if mask is not None else ids.numel(), "padded": ids.numel(),
                             "loss_tokens": int((targets != -100).sum()), "shape": tuple(ids.shape),
                             "examples": len(features)})
        return batch


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


def recipe_trainer(model, tokenizer, dataset, steps: int, batch_size: int, seed: int, run_dir: Path):
    """The recipe's Trainer: TrainingArguments by hand, `DataCollatorForLanguageModeling`."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(run_dir), per_device_train_batch_size=batch_size, max_steps=steps,
        learning_rate=LEARNING_RATE, lr_scheduler_type="linear", weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", seed=seed, data_seed=seed, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=not torch.cuda.is_available(),
    )
    collator = CountingCollator(DataCollatorForLanguageModeling(tokenizer, mlm=False))
    return Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator), collator, None


def kit_trainer(model, tokenizer, dataset, settings, run_dir: Path):
    """The kit's Trainer, built as `train.train` builds it (checked batch plan, `KitTrainer`)."""
    from lora_nb.batching import KitTrainer, plan_batches

    plan = plan_batches(model, settings.train.padding_free)
    overrides = {"train_sampling_strategy": "random"} if plan.padding_free else {}
    args = settings.to_training_args(str(run_dir), save_strategy="no", eval_strategy="no", **overrides)
    collator = CountingCollator(plan.collator(tokenizer))
    trainer = KitTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                         processing_class=tokenizer, plan=plan)
    return trainer, collator, plan


def warm_up(model, tokenizer, batch_size: int) -> None:
    """One forward/backward per model before timing (kernels, allocator); gradients discarded."""
    ids = torch.randint(10, min(1000, len(tokenizer)), (min(batch_size, 2), 64), device=model.device)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)


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
    from lora_nb.batching import BatchPlan, PackedCollator, ShiftedPadCollator, loss_sum, packed_attention
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


def heldout_labels(dataset, tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """Held-out ids, and labels on the tokens both arms learn (the recipe's collator skips pad-id tokens)."""
    pad = tokenizer.pad_token_id
    ids = [list(x) for x in dataset["input_ids"]]
    return ids, [[t if t != pad else -100 for t in x] for x in ids]


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
    held_ids, held_labels = heldout_labels(held_set, tokenizer)
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
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", arm, "--model", path,
               "--memory-steps", str(steps), "--batch-size", str(batch_size), "--max-length", str(max_length)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"  memory {arm}: peak RSS {row['peak_rss_mb']:.0f} MiB (model loaded: {row['model_rss_mb']:.0f} MiB)",
              flush=True)
    return rows


def _tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # as the recipe does
    return tokenizer


# ------------------------------------------------------------------------------------------ report
def summarize(runs: list[dict]) -> dict:
    """Per arm: mean and spread over seeds; kit vs recipe ratios and held-out differences per seed."""
    out = {}
    for arm in ARMS:
        speeds = [r["arms"][arm]["real_tokens_per_s"] for r in runs]
        steps = [r["arms"][arm]["seconds_per_step"] for r in runs]
        held = [r["arms"][arm]["heldout_loss"] for r in runs]
        out[arm] = {"real_tokens_per_s": statistics.mean(speeds), "real_tokens_per_s_min": min(speeds),
                    "real_tokens_per_s_max": max(speeds), "seconds_per_step": statistics.mean(steps),
                    "heldout_loss": statistics.mean(held), "heldout_loss_min": min(held), "heldout_loss_max": max(held),
                    "heldout_loss_sd": statistics.stdev(held) if len(held) > 1 else 0.0,
                    "padding_efficiency": statistics.mean(r["arms"][arm]["padding_efficiency"] for r in runs)}
    ratios = [r["arms"]["kit"]["real_tokens_per_s"] / r["arms"]["recipe"]["real_tokens_per_s"] for r in runs]
    rel = [(r["arms"]["kit"]["heldout_loss"] - r["arms"]["recipe"]["heldout_loss"]) / r["arms"]["recipe"]["heldout_loss"]
           for r in runs]
    out["ratio_per_seed"] = ratios
    out["ratio"] = out["kit"]["real_tokens_per_s"] / out["recipe"]["real_tokens_per_s"]
    out["heldout_rel_per_seed"] = rel
    out["heldout_rel_mean"] = (out["kit"]["heldout_loss"] - out["recipe"]["heldout_loss"]) / out["recipe"]["heldout_loss"]
    out["heldout_kit_above"] = sum(x > 0 for x in rel)
    return out


def acceptance(report: dict) -> dict:
    """The issue's acceptance checks on the mixed set and the memory rows (None = not measured)."""
    mixed = report["data_sets"].get("mixed", {}).get("summary")
    memory = {row["arm"]: row for row in report["memory"]}
    result = {}
    if mixed:
        result["speedup"] = (mixed["ratio"], mixed["ratio"] >= ACCEPTANCE["speedup"])
        result["heldout_within"] = (mixed["heldout_rel_mean"], abs(mixed["heldout_rel_mean"]) <= ACCEPTANCE["heldout_rel"])
        result["heldout_above"] = (mixed["heldout_kit_above"], mixed["heldout_kit_above"] <= ACCEPTANCE["heldout_above_max"])
    if set(memory) == set(ARMS):
        ratio = memory["kit"]["peak_rss_mb"] / memory["recipe"]["peak_rss_mb"]
        above = ((memory["kit"]["peak_rss_mb"] - memory["kit"]["model_rss_mb"])
                 / (memory["recipe"]["peak_rss_mb"] - memory["recipe"]["model_rss_mb"]))
        result["memory"] = (ratio, ratio <= ACCEPTANCE["memory_ratio"])
        result["memory_above_model"] = (above, above <= ACCEPTANCE["memory_ratio"])
    return result


CSV_FIELDS = ["data_set", "seed", "arm", "steps", "real_tokens", "padded_tokens", "padding_efficiency", "seconds_per_step",
              "real_tokens_per_s", "heldout_loss"]


def write_report(report: dict, out: Path) -> None:
    """report.json, results.csv, throughput.png and report.md in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for name, ds in report["data_sets"].items():
            for run in ds["runs"]:
                for arm in run["arms"].values():
                    w.writerow({"data_set": name, "seed": run["seed"],
                                **{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in arm.items() if k in CSV_FIELDS}})
    _plot(report, out / "throughput.png")
    (out / "report.md").write_text(render_markdown(report))


def _plot(report: dict, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = [n for n, ds in report["data_sets"].items() if ds.get("summary")]
    fig, axes = plt.subplots(1, max(1, len(sets)), figsize=(5 * max(1, len(sets)), 3.8), squeeze=False)
    for ax, name in zip(axes[0], sets):
        s = report["data_sets"][name]["summary"]
        speeds = [s[a]["real_tokens_per_s"] for a in ARMS]
        low = [s[a]["real_tokens_per_s"] - s[a]["real_tokens_per_s_min"] for a in ARMS]
        high = [s[a]["real_tokens_per_s_max"] - s[a]["real_tokens_per_s"] for a in ARMS]
        bars = ax.bar(ARMS, speeds, yerr=[low, high], color=["#999999", "#2a7ab9"], capsize=4)
        for bar, arm in zip(bars, ARMS):
            ax.annotate(f"{s[arm]['padding_efficiency']:.0%} real", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("real (non-padding) tokens / s")
        ax.set_title(f"{name}: kit {s['ratio']:.2f}x the recipe")
    fig.suptitle(f"{report['model']}: LoRA training throughput, batch {report['batch_size']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)


def _verdict(item) -> str:
    return "met" if item[1] else "NOT met"


def render_markdown(r: dict) -> str:
    th = r["threads"]
    lines = [
        "# Training speed, memory and loss: the kit vs the LoRA recipe people copy",
        "",
        f"Model `{r['model']}` ({r['device']}), LoRA r{LORA['r']} all-linear, fp32, AdamW lr {LEARNING_RATE:g} with linear "
        f"decay, batch {r['batch_size']}, {r['steps']} optimizer steps per arm and run (every chat seen once). "
        f"Threads: torch {th['torch_threads']} intra-op / {th['torch_interop_threads']} inter-op on {th['cores']} cores, "
        f"OMP_NUM_THREADS={th['OMP_NUM_THREADS']}, MKL_NUM_THREADS={th['MKL_NUM_THREADS']}, "
        f"OMP_WAIT_POLICY={th['OMP_WAIT_POLICY']}. Load average at the end "
        f"{', '.join(f'{x:.1f}' for x in r['load_average'])} (a shared machine). Wall time {r['wall_seconds']:.0f} s.",
        "",
        "Arms: **recipe** = `Trainer` + `DataCollatorForLanguageModeling`, random batches padded to their longest, the "
        "model's own loss; **kit** = `lora_nb.train`'s path: padding-free rows (one row per batch, `position_ids` "
        "restarting per example, attention per example), the loss through the output head in chunks, every label "
        "token of a step weighing the same. Both arms of a run share the chats, the initial adapter and the batch "
        "order, and take optimizer steps in turn so that both see the same machine load.",
    ]
    acc = r.get("acceptance", {})
    if acc:
        lines += ["", "## Acceptance (CPU)", ""]
        if "speedup" in acc:
            lines.append(f"- Real tokens/s on 20-400 tokens: kit {acc['speedup'][0]:.2f}x the recipe (needed "
                         f">= {ACCEPTANCE['speedup']}x): {_verdict(acc['speedup'])}.")
            lines.append(f"- Held-out loss, mean of the seeds: kit {acc['heldout_within'][0]:+.2%} vs the recipe "
                         f"(needed within {ACCEPTANCE['heldout_rel']:.0%}): {_verdict(acc['heldout_within'])}; kit above the "
                         f"recipe in {acc['heldout_above'][0]} of {len(r['seeds'])} seeds (allowed "
                         f"{ACCEPTANCE['heldout_above_max']}): {_verdict(acc['heldout_above'])}.")
        if "memory" in acc:
            lines.append(f"- Peak memory (whole process, batch {r['batch_size']}, {r['memory_max_length']}-token cut): kit "
                         f"{acc['memory'][0]:.2f}x the recipe (needed <= {ACCEPTANCE['memory_ratio']}x): "
                         f"{_verdict(acc['memory'])}; memory above the loaded model: {acc['memory_above_model'][0]:.2f}x.")
    for name, ds in r["data_sets"].items():
        s = ds.get("summary")
        if not s:
            continue
        first = ds["runs"][0]
        lines += [
            "", f"## {name}: {ds['description']}", "",
            f"{len(ds['runs'])} seed(s) ({', '.join(str(x['seed']) for x in ds['runs'])}); lengths of the first seed's "
            f"chats {first['lengths']['min']}-{first['lengths']['max']} tokens (mean {first['lengths']['mean']:.0f}, "
            f"{first['lengths']['over_1000']} over 1,000), cut at {ds['max_length']}, batch {ds['batch_size']}. Kit plan: padding-free "
            f"{first['plan']['padding_free']}, chunked loss {first['plan']['chunked_loss']}.",
            "",
            "| arm | real tokens / s (mean, min-max) | s / step | real share of positions | held-out loss (mean, min-max, sd) |",
            "| --- | --- | --- | --- | --- |",
        ]
        for arm in ARMS:
            a = s[arm]
            lines.append(f"| {arm} | {a['real_tokens_per_s']:.1f} ({a['real_tokens_per_s_min']:.1f}-{a['real_tokens_per_s_max']:.1f}) | "
                         f"{a['seconds_per_step']:.2f} | {a['padding_efficiency']:.0%} | {a['heldout_loss']:.4f} "
                         f"({a['heldout_loss_min']:.4f}-{a['heldout_loss_max']:.4f}, {a['heldout_loss_sd']:.4f}) |")
        lines += ["", "| seed | kit / recipe real tokens/s | held-out recipe | held-out kit | kit vs recipe | "
                      "packed = alone (max rel diff) | padded = alone | same start |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for run, ratio, rel in zip(ds["runs"], s["ratio_per_seed"], s["heldout_rel_per_seed"]):
            lines.append(f"| {run['seed']} | {ratio:.2f}x | {run['arms']['recipe']['heldout_loss']:.4f} | "
                         f"{run['arms']['kit']['heldout_loss']:.4f} | {rel:+.2%} | {run['checks']['packed_rel']:.1e} | "
                         f"{run['checks']['padded_rel']:.1e} | {run['identical_start']} |")
        lines += ["", f"**Kit / recipe real-token throughput on {name}: {s['ratio']:.2f}x** (held-out loss before "
                      f"training {first['heldout_before']:.3f})."]
    if r["memory"]:
        lines += ["", "## Peak memory", "",
                  f"Each arm in a fresh process: {r['memory'][0]['steps']} training steps of batch "
                  f"{r['memory'][0]['batch_size']} over the longest chats of a long-tail set cut at "
                  f"{r['memory'][0]['max_length']} tokens (every example cut to that length). Peak RSS of the whole process (VmHWM).",
                  "", "| arm | peak RSS MiB | RSS with the model loaded MiB | peak above the loaded model MiB |",
                  "| --- | --- | --- | --- |"]
        for m in r["memory"]:
            lines.append(f"| {m['arm']} | {m['peak_rss_mb']:.0f} | {m['model_rss_mb']:.0f} | "
                         f"{m['peak_rss_mb'] - m['model_rss_mb']:.0f} |")
    lines += [
        "", "## Notes", "",
        "- Held-out loss: mean token loss of held-out chats of the same length range, computed alone (unpadded), on "
        "the tokens both arms learn: the recipe's collator labels every pad-id token -100, and the pad token is the "
        "end-of-turn token, so the recipe never learns to end a turn; the kit does.",
        "- `packed = alone` and `padded = alone`: per-example loss of the held-out chats in one padding-free row (the "
        f"kit's attention) or one padded batch vs alone, before training; tolerance {PADDING_TOLERANCE:g}.",
        "- Timings come from a shared CPU: the arms alternate step by step so that each sees the same load; compare "
        "ratios, not absolute speeds.",
        "", "![throughput](throughput.png)", "",
        f"Reproduce: `{r['command']}`", "",
    ]
    return "\n".join(lines)


def run_benchmark(model: str = "demo", steps: int = 20, seeds: tuple[int, ...] = (0, 1, 2), batch_size: int = 8,
                  min_len: int = 20, max_len: int = 400, heldout: int = 8, threads: int | None = None,
                  long_tail: bool = True, long_tail_seeds: int = 1, n_long: int = 4, long_tail_batch_size: int = 2,
                  memory_steps: int = 2,
                  max_length: int = MAX_LENGTH, out_dir: Path | None = RESULTS_DIR, workdir: Path | None = None,
                  command: str = "") -> dict:
    """Run the whole benchmark and return the report as a dict (written to `out_dir` after every run).

    Args:
        model: `demo`, `tiny` or a model folder.
        steps: optimizer steps per arm and run (the data set is `steps * batch_size` chats, so every
            chat is seen once).
        seeds: one run per seed on the mixed set.
        batch_size: chats per step.
        min_len, max_len: range of the mixed chats' lengths, in tokens.
        heldout: held-out chats per run.
        threads: torch CPU threads (default: torch's choice).
        long_tail: also run the long-tail set (the mixed lengths plus `n_long` chats of 1,000-1,400
            tokens, cut at `LONG_MAX_LENGTH`), with the first `long_tail_seeds` seeds, at batch
            `long_tail_batch_size` (the recipe pads a batch to its longest chat: 8 x 1,400 positions
            would take about 35 GB on the demo model on CPU).
        memory_steps: steps of the peak-memory measurement per arm (0 = skip).
        max_length: truncation length of the mixed set and the memory measurement.
        out_dir: where report.md, report.json, results.csv and throughput.png go (None = nowhere).
        workdir: scratch folder (default: a temporary one).
        command: the command line, quoted in the report.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    if threads:
        torch.set_num_threads(threads)
    _one_malloc_arena()
    started = time.perf_counter()
    tmp = tempfile.TemporaryDirectory() if workdir is None else None
    work = Path(workdir or tmp.name)
    path = model_path(model, work)
    tokenizer = _tokenizer(path)
    data_sets = {"mixed": {"description": f"chats of {min_len}-{max_len} tokens", "min_len": min_len,
                           "max_len": max_len, "n_long": 0, "max_length": max_length, "seeds": list(seeds),
                           "batch_size": batch_size}}
    if long_tail:
        data_sets["long_tail"] = {"description": f"chats of {min_len}-{max_len} tokens and {n_long} of 1,000-1,400",
                                  "min_len": min_len, "max_len": max_len, "n_long": n_long,
                                  "max_length": LONG_MAX_LENGTH, "seeds": list(seeds)[:long_tail_seeds],
                                  "batch_size": long_tail_batch_size}
    report = {"model": model, "model_path": path, "device": "cuda" if torch.cuda.is_available() else "cpu",
              "threads": thread_settings(), "batch_size": batch_size, "steps": steps, "seeds": list(seeds),
              "heldout": heldout, "memory_max_length": max_length, "command": command or "python benchmarks/throughput.py",
              "data_sets": {name: {**ds, "runs": []} for name, ds in data_sets.items()}, "memory": [],
              "python": platform.python_version(), "torch": torch.__version__}

    def save():
        report["load_average"] = os.getloadavg()
        report["wall_seconds"] = time.perf_counter() - started
        report["acceptance"] = acceptance(report)
        if out_dir is not None:
            write_report(report, Path(out_dir))

    def run_set(name):
        ds = report["data_sets"][name]
        for seed in ds["seeds"]:
            print(f"{name}, seed {seed}:", flush=True)
            ds["runs"].append(run_once(path, tokenizer, {**ds, "name": name}, seed, steps, ds["batch_size"], heldout,
                                       work))
            ds["summary"] = summarize(ds["runs"])
            save()

    if memory_steps:  # the acceptance measurements first (the shortest first): results are saved after each
        report["memory"] = measure_memory(path, memory_steps, batch_size, max_length)
        save()
    run_set("mixed")
    if long_tail:
        run_set("long_tail")
    if tmp is not None:
        tmp.cleanup()
    return report


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo", help="demo, tiny, or a model folder")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per arm and run")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of the mixed set")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--min-len", type=int, default=20)
    p.add_argument("--max-len", type=int, default=400)
    p.add_argument("--heldout", type=int, default=8)
    p.add_argument("--max-length", type=int, default=MAX_LENGTH, help="truncation length (mixed set, memory)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-long-tail", action="store_true", help="skip the long-tail set")
    p.add_argument("--long-tail-seeds", type=int, default=1, help="how many of the seeds also run the long-tail set")
    p.add_argument("--long-tail-batch-size", type=int, default=2, help="batch size of the long-tail set")
    p.add_argument("--memory-steps", type=int, default=2, help="steps of the peak-memory run per arm (0 = skip)")
    p.add_argument("--memory-child", choices=ARMS, help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(RESULTS_DIR))
    a = p.parse_args(argv)
    if a.memory_child:
        if a.threads:
            torch.set_num_threads(a.threads)
        row = memory_child(a.memory_child, model_path(a.model, Path(tempfile.mkdtemp())), a.memory_steps,
                           a.batch_size, a.max_length)
        print(json.dumps(row))
        return row
    report = run_benchmark(a.model, a.steps, tuple(int(s) for s in a.seeds.split(",") if s), a.batch_size, a.min_len,
                           a.max_len, a.heldout, a.threads, not a.no_long_tail, a.long_tail_seeds,
                           long_tail_batch_size=a.long_tail_batch_size, memory_steps=a.memory_steps, max_length=a.max_length, out_dir=Path(a.out),
                           command="python benchmarks/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(render_markdown(report))
    return report


if __name__ == "__main__":
    main()
