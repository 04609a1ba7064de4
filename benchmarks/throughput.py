"""Benchmark: training throughput and memory of the kit against the plain LoRA recipe.

Trains the same model on the same synthetic chats (lengths spread uniformly over ~20-400 tokens)
for the same number of optimizer steps, three ways, in one process:

- `plain_dynamic`: the plain recipe (reference/llama2-qlora-walkthrough.md): `get_peft_model` +
  `Trainer` + `DataCollatorForLanguageModeling(mlm=False)` over chats tokenized with truncation,
  random order, each batch padded to its longest example;
- `plain_fixed`: the same, every example padded to `max_length` (fewer steps: it is the slowest);
- `kit`: the kit's path: `KitSettings.to_training_args` / `to_peft`, `data.tokenize_examples`,
  `data.PadCollator`, and length-grouped batches (`batching.LengthGroupedTrainer`).

The Trainers run in threads that take turns step by step (a callback passes the turn), so every
arm sees the same machine load; a warm-up forward/backward per model comes first. Per arm it
reports real (non-padding) tokens/s, seconds per step, peak RSS, losses and the ratio to
`plain_dynamic`. The kit runs with `train_on_responses_only=False` here, so that both arms learn
the same tokens and their losses compare (prompt masking changes labels, not compute).

Loss checks ("equal loss within tolerance", defined in `LOSS_TOLERANCES`):
- padding invariance: per-example loss inside a batch padded to its longest vs alone, unpadded;
- after training: held-out loss of the plain-trained and kit-trained adapters, same labels.

Then `estimate.estimate_memory` against the measured peak RSS (one fresh process per shape).

    python benchmarks/throughput.py                  # demo model, ~6 min on 2 idle CPU cores
    python benchmarks/throughput.py --model tiny --steps 3 --no-memory   # seconds, for tests
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import json
import os
import platform
import random
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
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
import torch  # noqa: E402

RESULTS_DIR = Path(__file__).parent / "results"
MAX_LENGTH = 512  # truncation length of every arm, and the fixed-length arm's padded width
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0}  # dropout 0: the arms compute the same thing
LEARNING_RATE = 1e-3
SEED = 42
LOSS_TOLERANCES = {
    # Padding must not change a token's loss: fp32 rounding only.
    "padding_rel": 1e-4,
    # Held-out loss after training: the arms see the same examples in other batches and orders, so
    # their adapters differ a little; 5% relative is far below what training moves (see report).
    "heldout_rel": 0.05,
}
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


def plain_dataset(chats, tokenizer, fixed: bool = False, max_length: int = MAX_LENGTH):
    """The plain recipe's data: rendered chat text, `tokenizer(text, truncation=True)` (optionally padded)."""
    import datasets

    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in chats]
    padding = "max_length" if fixed else False
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding=padding)
    return datasets.Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})


def kit_dataset(chats, tokenizer, train_on_responses_only: bool = False, max_length: int = MAX_LENGTH):
    """The kit's data: `data.load_examples` + `data.tokenize_examples`."""
    import datasets

    from lora_nb.data import load_examples, tokenize_examples

    examples = load_examples(datasets.Dataset.from_dict({"messages": chats}))
    return tokenize_examples(examples, tokenizer, max_length, train_on_responses_only)


# -------------------------------------------------------------------------------------------- model
def model_path(name: str, workdir: Path) -> str:
    """`demo` (SmolLM2-135M-Instruct, local copy) or `tiny` (random 2-layer Llama) or a folder."""
    from lora_nb.demo import build_tiny_model, demo_model_path

    if name == "demo":
        return str(demo_model_path())
    if name == "tiny":
        return str(build_tiny_model(workdir / "tiny-model"))
    return name


def kit_settings(path: str, steps: int, batch_size: int, max_length: int = MAX_LENGTH):
    """The kit's settings for the benchmark run (same hyperparameters as the plain arm)."""
    from lora_nb.settings import KitSettings, LoraSettings, QuantSettings, TrainSettings

    return KitSettings(
        model_name_or_path=path,
        lora=LoraSettings(**LORA, target_modules="all-linear"),
        quant=QuantSettings(load_in="none"),  # fp32 base, as loaded by load_base
        train=TrainSettings(learning_rate=LEARNING_RATE, max_steps=steps, per_device_train_batch_size=batch_size,
                            seed=SEED, precision="fp32", logging_steps=1, group_by_length=True,
                            train_on_responses_only=False, max_seq_length=max_length),
    )


def load_base(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def plain_peft(path: str):
    """The plain recipe's model: `LoraConfig` + `get_peft_model`, seeded like the kit."""
    import transformers
    from peft import LoraConfig, get_peft_model

    transformers.set_seed(SEED)
    config = LoraConfig(**LORA, target_modules="all-linear", bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        return get_peft_model(load_base(path), config)


def kit_peft(path: str, settings):
    """The kit's model: `settings.lora.to_peft` + `get_peft_model`, seeded as `train.train` does."""
    import transformers
    from peft import get_peft_model

    base = load_base(path)
    transformers.set_seed(SEED)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        return get_peft_model(base, settings.lora.to_peft(base))


def same_adapters(a, b) -> bool:
    """Whether two LoRA models start from identical adapter weights (same names, same values)."""
    wa = {k: v for k, v in a.state_dict().items() if "lora_" in k}
    wb = {k: v for k, v in b.state_dict().items() if "lora_" in k}
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


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


def _trim_memory() -> None:
    """glibc only: return freed heap memory to the system (else RSS keeps every arm's largest step)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _one_malloc_arena() -> None:
    """glibc only: one heap for all threads, so that memory one arm frees is reused by the next."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, 1)  # M_ARENA_MAX = 1
    except (OSError, AttributeError):
        pass


class RssSampler:
    """Samples the process RSS every `interval` seconds in a thread; `peak_since(mark)` reads it."""

    def __init__(self, interval: float = 0.01):
        self.proc = psutil.Process()
        self.interval = interval
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def reset(self) -> int:
        self.peak = self.proc.memory_info().rss
        return self.peak

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class CountingCollator:
    """Wraps a collator and records each batch's real tokens, padded positions and loss tokens."""

    def __init__(self, collator):
        self.collator = collator
        self.batches: list[dict] = []

    def __call__(self, features):
        batch = self.collator(features)
        mask = batch["attention_mask"]
        self.batches.append({"real": int(mask.sum()), "padded": int(mask.numel()),
                             "loss_tokens": int((batch["labels"] != -100).sum()), "shape": tuple(mask.shape)})
        return batch


@dataclass
class ArmResult:
    """What one arm measured."""

    arm: str
    steps: int
    real_tokens: int = 0
    padded_tokens: int = 0
    loss_tokens: int = 0
    seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    step_peak_mb: float = 0.0
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

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")


def _step_callback(name: str, turns: TurnTaker, result: ArmResult, counter: CountingCollator, rss: RssSampler):
    from transformers import TrainerCallback

    class TakeTurns(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            turns.wait(name)
            _trim_memory()  # hand freed memory back, so that the RSS of this step starts low
            self.rss0 = rss.reset()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            dt = time.perf_counter() - self.t0
            batch = counter.batches[state.global_step - 1]  # collated just before this step began
            result.step_seconds.append(dt)
            result.seconds += dt
            result.real_tokens += batch["real"]
            result.padded_tokens += batch["padded"]
            result.loss_tokens += batch["loss_tokens"]
            if torch.cuda.is_available():
                peak = torch.cuda.max_memory_allocated() / 2**20
                result.peak_rss_mb = max(result.peak_rss_mb, peak)  # GPU: peak allocated memory
            else:
                result.peak_rss_mb = max(result.peak_rss_mb, rss.peak / 2**20)
                result.step_peak_mb = max(result.step_peak_mb, (rss.peak - self.rss0) / 2**20)
            print(f"  {name} step {state.global_step}: {dt:.1f} s, {batch['real']} real tokens in "
                  f"{batch['shape'][0]}x{batch['shape'][1]}", flush=True)
            turns.done_step(name)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                result.losses.append(float(logs["loss"]))

    return TakeTurns()


def plain_trainer(model, tokenizer, dataset, steps: int, batch_size: int, run_dir: Path, callbacks):
    """The plain recipe's Trainer: TrainingArguments by hand, `DataCollatorForLanguageModeling`."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(run_dir), per_device_train_batch_size=batch_size, max_steps=steps,
        learning_rate=LEARNING_RATE, lr_scheduler_type="linear", weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", seed=SEED, data_seed=SEED, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=not torch.cuda.is_available(),
    )
    collator = CountingCollator(DataCollatorForLanguageModeling(tokenizer, mlm=False))
    return Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=callbacks), collator


def kit_trainer(model, tokenizer, dataset, settings, run_dir: Path, callbacks):
    """The kit's Trainer, built as `train.train` builds it, with length-grouped batches."""
    from lora_nb.batching import LengthGroupedTrainer
    from lora_nb.data import PadCollator

    args = settings.to_training_args(str(run_dir), save_strategy="no", eval_strategy="no")
    collator = CountingCollator(PadCollator(tokenizer))
    trainer = LengthGroupedTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                                   processing_class=tokenizer, callbacks=callbacks)
    return trainer, collator


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
def per_example_losses(model, tokenizer, input_ids: list[list[int]], labels: list[list[int]], padded: bool) -> list[float]:
    """Mean token loss of each example, computed in one batch padded to its longest, or one by one."""
    from lora_nb.data import PadCollator

    model.eval()
    feats = [{"input_ids": i, "labels": lab} for i, lab in zip(input_ids, labels)]
    groups = [feats] if padded else [[f] for f in feats]
    losses = []
    for group in groups:
        batch = {k: v.to(model.device) for k, v in PadCollator(tokenizer)(group).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        target = batch["labels"][:, 1:]
        token_loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), target, ignore_index=-100, reduction="none")
        counts = (target != -100).sum(1).clamp(min=1)
        losses += (token_loss.sum(1) / counts).tolist()
    model.train()
    return losses


def heldout_labels(dataset, tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """Held-out ids, and labels on the tokens both arms learn (the plain collator skips pad-id tokens)."""
    pad = tokenizer.pad_token_id
    ids = [list(x) for x in dataset["input_ids"]]
    return ids, [[t if t != pad else -100 for t in x] for x in ids]


# ---------------------------------------------------------------------------------------- memory
_MEMORY_CHILD = r"""
import json, os, resource, sys, warnings
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, sys.argv[1])
import torch, transformers, peft, psutil
from benchmarks.throughput import kit_settings, kit_peft
b, s, path, threads = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
torch.set_num_threads(threads)
base_rss = psutil.Process().memory_info().rss
settings = kit_settings(path, 1, b)
model = kit_peft(path, settings)
from lora_nb.estimate import estimate_memory
est = estimate_memory(model.get_base_model(), settings, batch_size=b, seq_len=s)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
ids = torch.randint(10, 1000, (b, s))
for _ in range(2):  # the second step holds the optimizer states too
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step(); opt.zero_grad(set_to_none=True)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec.
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"batch_size": b, "seq_len": s, "measured_mb": (peak - base_rss) / 2**20,
                  "peak_rss_mb": peak / 2**20, "base_rss_mb": base_rss / 2**20,
                  "estimate_mb": est.total_bytes / 2**20,
                  "parts_mb": {k: v / 2**20 for k, v in est.parts.items()}}))
"""


def measure_memory(path: str, shapes: list[tuple[int, int]], threads: int) -> list[dict]:
    """Peak RSS of two training steps per (batch, seq_len), each in a fresh process, vs `estimate_memory`.

    Measured = peak RSS minus the RSS after importing torch/transformers/peft (the libraries'
    own memory, which the estimate does not count). Linux, CPU only (reads VmHWM).
    """
    rows = []
    root = str(Path(__file__).resolve().parents[1])
    for b, s in shapes:
        out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, root, str(b), str(s), path, str(threads)],
                             capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["estimate_over_measured"] = row["estimate_mb"] / row["measured_mb"]
        rows.append(row)
        print(f"  memory {b}x{s} s={s}: estimate {row['estimate_mb']:.0f} MiB, measured {row['measured_mb']:.0f} MiB", flush=True)
    return rows


# ------------------------------------------------------------------------------------------ report
def run_benchmark(model: str = "demo", steps: int = 6, fixed_steps: int = 1, batch_size: int = 8,
                  min_len: int = 20, max_len: int = 400, heldout: int = 8, threads: int | None = None,
                  memory_shapes: list[tuple[int, int]] | None = None, out_dir: Path | None = RESULTS_DIR,
                  workdir: Path | None = None, max_length: int = MAX_LENGTH) -> dict:
    """Run the whole benchmark and return the report as a dict (also written to `out_dir`).

    Args:
        model: `demo`, `tiny` or a model folder.
        steps: optimizer steps of `plain_dynamic` and `kit` (the data set is `steps * batch_size`
            examples, so both arms see every example exactly once).
        fixed_steps: optimizer steps of `plain_fixed` (0 = skip it).
        batch_size: examples per step.
        min_len, max_len: range of the synthetic chat lengths, in tokens.
        heldout: held-out examples for the loss checks.
        threads: torch CPU threads (default: torch's choice).
        memory_shapes: (batch, seq_len) pairs for the estimate-vs-measured table ([] = skip).
        max_length: truncation length of every arm, and the width `plain_fixed` pads to.
        out_dir: where report.md, results.csv, memory.csv and throughput.png go (None = nowhere).
        workdir: scratch folder (default: a temporary one).
    """
    from transformers import AutoTokenizer, PrinterCallback, ProgressCallback
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
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # as the plain recipe does

    chats = make_examples(tokenizer, steps * batch_size, min_len, max_len, seed=0)
    held = make_examples(tokenizer, heldout, min_len, max_len, seed=1)
    data = {"plain_dynamic": plain_dataset(chats, tokenizer, max_length=max_length),
            "kit": kit_dataset(chats, tokenizer, max_length=max_length)}
    if fixed_steps:
        data["plain_fixed"] = plain_dataset(chats[: fixed_steps * batch_size], tokenizer, fixed=True, max_length=max_length)
    settings = kit_settings(path, steps, batch_size, max_length)

    models = {"plain_dynamic": plain_peft(path), "kit": kit_peft(path, settings)}
    if fixed_steps:
        models["plain_fixed"] = plain_peft(path)
    identical_start = same_adapters(models["plain_dynamic"], models["kit"])
    trainable = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in models.items()}

    # Loss check 1: padding does not change the loss of a token (same computation).
    held_set = kit_dataset(held, tokenizer, max_length=max_length)
    held_ids, held_labels = heldout_labels(held_set, tokenizer)
    alone = per_example_losses(models["kit"], tokenizer, held_ids, held_labels, padded=False)
    in_batch = per_example_losses(models["plain_dynamic"], tokenizer, held_ids, held_labels, padded=True)
    padding_rel = max(abs(a - b) / abs(a) for a, b in zip(alone, in_batch))

    for m in models.values():
        warm_up(m, tokenizer, batch_size)

    arm_steps = {"plain_dynamic": steps, "kit": steps, "plain_fixed": fixed_steps}
    results = {name: ArmResult(arm=name, steps=arm_steps[name]) for name in models}
    turns = TurnTaker(list(models))
    trainers, collators = {}, {}
    with RssSampler() as rss:
        for name, m in models.items():
            run_dir = work / name
            if name == "kit":
                trainer, counter = kit_trainer(m, tokenizer, data[name], settings, run_dir, [])
            else:
                trainer, counter = plain_trainer(m, tokenizer, data[name], arm_steps[name], batch_size, run_dir, [])
            trainer.add_callback(_step_callback(name, turns, results[name], counter, rss))
            for quiet in (PrinterCallback, ProgressCallback):  # one line per arm below, not per step
                trainer.remove_callback(quiet)
            trainers[name], collators[name] = trainer, counter
        race(trainers, turns)

    # Loss check 2: held-out loss after training, same tokens, same (unpadded) computation.
    for name in ("plain_dynamic", "kit"):
        losses = per_example_losses(models[name], tokenizer, held_ids, held_labels, padded=False)
        results[name].heldout_loss = sum(losses) / len(losses)
    before = sum(alone) / len(alone)
    plain, kit = results["plain_dynamic"], results["kit"]
    heldout_rel = abs(kit.heldout_loss - plain.heldout_loss) / plain.heldout_loss
    del models, trainers

    memory = measure_memory(path, memory_shapes, threads or torch.get_num_threads()) if memory_shapes else []
    report = {
        "model": model, "model_path": path, "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(), "batch_size": batch_size, "steps": steps, "heldout": heldout, "max_length": max_length, "fixed_steps": fixed_steps,
        "n_examples": len(chats), "lengths_arg": [min_len, max_len], "lengths": {"min": min(data["kit"]["length"]), "max": max(data["kit"]["length"]),
                                              "mean": sum(data["kit"]["length"]) / len(chats)},
        "kit_lengths": list(data["kit"]["length"]),
        "plain_lengths": [len(x) for x in data["plain_dynamic"]["input_ids"]],
        "trainable": trainable, "identical_start": identical_start,
        "arms": {name: {**asdict(r), "real_tokens_per_s": r.real_tokens_per_s, "seconds_per_step": r.seconds_per_step,
                        "padding_efficiency": r.padding_efficiency, "final_loss": r.final_loss,
                        "mean_loss": r.mean_loss,
                        "ratio_vs_plain_dynamic": r.real_tokens_per_s / plain.real_tokens_per_s}
                 for name, r in results.items()},
        "ratio": kit.real_tokens_per_s / plain.real_tokens_per_s,
        "hf_group_by_length_efficiency": _hf_grouping_efficiency(list(data["kit"]["length"]), batch_size),
        "loss_check": {
            "tolerances": LOSS_TOLERANCES, "heldout_before": before,
            "padding_max_rel_diff": padding_rel, "padding_equal": padding_rel <= LOSS_TOLERANCES["padding_rel"],
            "heldout_plain": plain.heldout_loss, "heldout_kit": kit.heldout_loss, "heldout_rel_diff": heldout_rel,
            "heldout_equal": heldout_rel <= LOSS_TOLERANCES["heldout_rel"],
        },
        "memory": memory,
        "python": platform.python_version(), "torch": torch.__version__,
        "wall_seconds": time.perf_counter() - started,
    }
    if out_dir is not None:
        write_report(report, Path(out_dir))
    if tmp is not None:
        tmp.cleanup()
    return report


def _hf_grouping_efficiency(lengths: list[int], batch_size: int) -> float:
    """Padding efficiency transformers' own `group_by_length` sampler reaches on these lengths."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from lora_nb.data import padding_efficiency

    order = get_length_grouped_indices(lengths, batch_size, generator=torch.Generator().manual_seed(SEED))
    return padding_efficiency(lengths, batch_size, order)


CSV_FIELDS = ["arm", "steps", "real_tokens", "padded_tokens", "padding_efficiency", "seconds_per_step",
              "real_tokens_per_s", "ratio_vs_plain_dynamic", "peak_rss_mb", "step_peak_mb", "final_loss",
              "mean_loss", "heldout_loss"]


def write_report(report: dict, out: Path) -> None:
    """report.json, results.csv, memory.csv, throughput.png and report.md in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for arm in report["arms"].values():
            w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in arm.items() if k in CSV_FIELDS})
    if report["memory"]:
        with open(out / "memory.csv", "w", newline="") as f:
            keys = ["batch_size", "seq_len", "estimate_mb", "measured_mb", "estimate_over_measured", "peak_rss_mb", "base_rss_mb"]
            w = csv.DictWriter(f, keys, extrasaction="ignore")
            w.writeheader()
            for row in report["memory"]:
                w.writerow({k: (f"{row[k]:.4g}" if isinstance(row[k], float) else row[k]) for k in keys})
    _plot(report, out / "throughput.png")
    (out / "report.md").write_text(render_markdown(report))


def _plot(report: dict, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if report["memory"] else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 3.8), squeeze=False)
    ax = axes[0][0]
    names = list(report["arms"])
    speeds = [report["arms"][n]["real_tokens_per_s"] for n in names]
    bars = ax.bar(names, speeds, color=["#999999" if n != "kit" else "#2a7ab9" for n in names])
    for bar, n in zip(bars, names):
        eff = report["arms"][n]["padding_efficiency"]
        ax.annotate(f"{eff:.0%} real", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("real (non-padding) tokens / s")
    ax.set_title(f"{report['model']}: LoRA training throughput, batch {report['batch_size']}")
    if report["memory"]:
        ax = axes[0][1]
        labels = [f"{r['batch_size']}x{r['seq_len']}" for r in report["memory"]]
        x = range(len(labels))
        ax.bar([i - 0.2 for i in x], [r["estimate_mb"] for r in report["memory"]], 0.4, label="estimate_memory")
        ax.bar([i + 0.2 for i in x], [r["measured_mb"] for r in report["memory"]], 0.4, label="measured (peak RSS - libraries)")
        ax.set_xticks(list(x), labels)
        ax.set_xlabel("batch x sequence length")
        ax.set_ylabel("MiB")
        ax.legend(fontsize=8)
        ax.set_title("training memory: estimate vs measured")
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)


def render_markdown(r: dict) -> str:
    lc = r["loss_check"]
    lines = [
        "# Training throughput and memory: the kit vs the plain LoRA recipe",
        "",
        f"Model `{r['model']}` ({r['device']}, {r['torch_threads']} torch threads on {r['cpu_count']} cores, "
        f"load average at the end {', '.join(f'{x:.1f}' for x in r['load_average'])}), LoRA r{LORA['r']} all-linear, "
        f"AdamW lr {LEARNING_RATE:g}, batch {r['batch_size']}, {r['n_examples']} synthetic chats of "
        f"{r['lengths']['min']}-{r['lengths']['max']} tokens (mean {r['lengths']['mean']:.0f}), one epoch = "
        f"{r['steps']} optimizer steps. The arms take turns step by step in one process after a warm-up "
        f"forward/backward, so they share the machine's load. Same initial adapter in every arm: "
        f"{r['identical_start']}. Total wall time {r['wall_seconds']:.0f} s.",
        "",
        "| arm | steps | real tokens | padding efficiency | s / step | real tokens / s | vs plain_dynamic | peak RSS MiB | final loss | mean loss |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, a in r["arms"].items():
        lines.append(f"| {name} | {a['steps']} | {a['real_tokens']} | {a['padding_efficiency']:.0%} | "
                     f"{a['seconds_per_step']:.2f} | {a['real_tokens_per_s']:.1f} | {a['ratio_vs_plain_dynamic']:.2f}x | "
                     f"{a['peak_rss_mb']:.0f} | {a['final_loss']:.3f} | {a['mean_loss']:.3f} |")
    lines += [
        "",
        f"**Kit / plain (dynamic padding) real-token throughput: {r['ratio']:.2f}x.** "
        f"transformers' own `group_by_length` sampler would reach {r['hf_group_by_length_efficiency']:.0%} padding "
        f"efficiency on these {r['n_examples']} lengths (it sorts only within megabatches of "
        f"`min(n // (4 * batch), 50)` batches); `lora_nb.batching.LengthGroupedSampler` sorts within up to 50 batches.",
        "",
        "Peak RSS is the whole process (all arms' models are loaded at once); the memory table below measures "
        "one shape per fresh process. `plain_fixed` pads every example to "
        f"{r['max_length']} tokens and runs {r['fixed_steps']} steps only, so its losses do not compare.",
        "",
        "## Equal loss on the same tokens",
        "",
        "The kit arm trains with `train_on_responses_only=False` so both arms learn the same tokens (prompt "
        "masking only changes labels; the forward/backward is the same). One difference remains: the plain "
        "collator labels pad-id tokens -100, and the pad token is the end-of-turn token, so the plain recipe never "
        "learns to end its turn. The held-out loss below counts the tokens both arms learn.",
        "",
        f"- Padding invariance: per-example mean token loss of the {r['heldout']} "
        f"held-out chats, alone (unpadded) vs in one batch padded to its longest: max relative difference "
        f"{lc['padding_max_rel_diff']:.1e} (tolerance {lc['tolerances']['padding_rel']:.0e}): "
        f"{'equal' if lc['padding_equal'] else 'NOT equal'}.",
        f"- After training: held-out loss {lc['heldout_before']:.3f} before, {lc['heldout_plain']:.3f} plain_dynamic, "
        f"{lc['heldout_kit']:.3f} kit; relative difference {lc['heldout_rel_diff']:.1%} (tolerance "
        f"{lc['tolerances']['heldout_rel']:.0%}): {'equal' if lc['heldout_equal'] else 'NOT equal'}. "
        "Both arms saw the same examples once, in different batches and order.",
    ]
    if r["memory"]:
        lines += [
            "",
            "## `estimate_memory` vs measured",
            "",
            "Measured = peak RSS of two training steps (forward, backward, AdamW) in a fresh process minus the RSS "
            "after importing torch/transformers/peft. Sequences are full (no padding).",
            "",
            "| batch x seq | estimate MiB | measured MiB | estimate / measured |",
            "| --- | --- | --- | --- |",
        ]
        for m in r["memory"]:
            lines.append(f"| {m['batch_size']} x {m['seq_len']} | {m['estimate_mb']:.0f} | {m['measured_mb']:.0f} | "
                         f"{m['estimate_over_measured']:.2f} |")
        parts = r["memory"][-1]["parts_mb"]
        lines += ["", "Estimate parts of the last row (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in parts.items()) + "."]
    lines += [
        "",
        "## Caveats",
        "",
        "- Timings come from a shared CPU (see the load average above): the arms alternate step by step so "
        "that each sees the same load, but single step times still vary; compare ratios, not absolute speeds.",
        "- Length grouping keeps every token's loss the same (padding invariance above) but not the weight of "
        "a token in the update: `Trainer` averages the loss per batch, so tokens in a short batch weigh more "
        "than in a random batch. The held-out check bounds the effect on what the adapter learns.",
        "- `final loss` is the loss of each arm's last batch, which holds different examples in each arm; "
        "`mean loss` averages all steps (every example once). The held-out loss is the like-for-like comparison.",
        "- Peak RSS in the table above is the whole process with all arms' models; per-step memory is "
        "compared with the estimate in the memory table.",
    ]
    lines += ["", "![throughput](throughput.png)", "",
              f"Reproduce: `python benchmarks/throughput.py --model {r['model']} --steps {r['steps']} "
              f"--fixed-steps {r['fixed_steps']} --max-len {r['lengths_arg'][1]} --min-len {r['lengths_arg'][0]} "
              f"--max-length {r['max_length']} --heldout {r['heldout']}`", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo", help="demo, tiny, or a model folder")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps of plain_dynamic and kit")
    p.add_argument("--fixed-steps", type=int, default=1, help="optimizer steps of plain_fixed (0 = skip)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--min-len", type=int, default=20)
    p.add_argument("--max-len", type=int, default=400)
    p.add_argument("--heldout", type=int, default=8)
    p.add_argument("--max-length", type=int, default=MAX_LENGTH, help="truncation length; plain_fixed pads to it")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--memory", default="1x128,4x128,8x256", help="batch x seq_len shapes for the memory table")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--out", default=str(RESULTS_DIR))
    a = p.parse_args(argv)
    shapes = [] if a.no_memory else [tuple(int(v) for v in s.split("x")) for s in a.memory.split(",") if s]
    report = run_benchmark(a.model, a.steps, a.fixed_steps, a.batch_size, a.min_len, a.max_len, a.heldout,
                           a.threads, shapes, Path(a.out), max_length=a.max_length)
    print(render_markdown(report))
    return report


if __name__ == "__main__":
    main()
