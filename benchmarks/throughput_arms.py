"""Throughput benchmark, part 1 of 3: the two arms (data, models, Trainers) and their constants.

See `benchmarks/throughput.py` for what the benchmark measures and how to run it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep instead of spinning on a shared CPU
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import json  # noqa: E402
import random  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402

RESULTS_DIR = Path(__file__).parent / "results"
ARMS = ("recipe", "kit")
MAX_LENGTH = 512  # truncation length of the mixed set and of the memory measurement
LONG_MAX_LENGTH = 1536  # truncation length of the long-tail set (keeps its 1,000+ token chats whole)
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0}  # dropout 0: the arms compute the same thing
LEARNING_RATE = 1e-3
ACCEPTANCE = {"speedup": 1.9, "heldout_rel": 0.02, "heldout_above_max": 1, "memory_ratio": 0.8, "seeds": 3, "steps": 20}
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
    """The recipe's data: rendered chat text, `tokenizer(text, truncation=True)`, labels = input ids (alpaca-lora)."""
    import datasets

    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in chats]
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    return datasets.Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                                       "labels": [list(x) for x in enc["input_ids"]]})


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


def recipe_collator(tokenizer):
    """The recipe's collator: `DataCollatorForSeq2Seq`, padding to the longest, labels padded with -100.

    Not `DataCollatorForLanguageModeling`: it labels every pad-id token -100, and where the pad token
    is the end-of-turn token (SmolLM2, and any model given `pad_token = eos_token`) the model then
    never learns to end a turn. alpaca-lora's recipe (labels = input ids, `DataCollatorForSeq2Seq`)
    learns every token, as the kit does, so both arms optimize the same objective.
    """
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, padding=True)


def recipe_trainer(model, tokenizer, dataset, steps: int, batch_size: int, seed: int, run_dir: Path):
    """The recipe's Trainer: TrainingArguments by hand, `recipe_collator`."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(run_dir), per_device_train_batch_size=batch_size, max_steps=steps,
        learning_rate=LEARNING_RATE, lr_scheduler_type="linear", weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", seed=seed, data_seed=seed, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=not torch.cuda.is_available(),
    )
    collator = CountingCollator(recipe_collator(tokenizer))
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


def _tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # as the recipe does
    return tokenizer
