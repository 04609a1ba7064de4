"""Measure the demo run: held-out loss and task metric before and after LoRA training, wall time.

Run from the repository root: `python scripts/measure_demo.py [run_dir]`. Prints one JSON object.
The recipe is the "demo-cpu" preset when the settings module has it, else the same values spelled
out: fp32, r16/alpha32/dropout 0/all-linear, lr 1e-3, warmup 10%, linear decay, clip 1.0, batch 8,
20 steps.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import warnings

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_nb.data import PadCollator, load_examples, render_prompt, tokenize_examples
from lora_nb.demo import DEMO_MODEL_ID, demo_model_path
from lora_nb.demo_task import demo_data_paths, score_predictions
from lora_nb.train import train

GENERAL = ["What is the capital of Italy?", "How many legs does a spider have?", "What is water made of?",
           "Name a planet in our solar system.", "What do cows drink?", "What is 10 minus 4?",
           "What season comes after winter?", "What language is spoken in Brazil?"]


def demo_settings():
    """The demo-cpu preset, or its values spelled out when the preset does not exist yet."""
    from lora_nb import settings as s

    for name in ("preset", "load_preset", "get_preset"):
        if hasattr(s, name):
            try:
                return getattr(s, name)("demo-cpu")
            except Exception:  # noqa: BLE001
                pass
    return s.KitSettings(
        model_name_or_path=DEMO_MODEL_ID,
        lora=s.LoraSettings(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"),
        quant=s.QuantSettings(load_in="none"),
        train=s.TrainSettings(learning_rate=1e-3, max_steps=20, per_device_train_batch_size=8, warmup_ratio=0.1,
                              lr_scheduler_type="linear", max_grad_norm=1.0, precision="fp32", logging_steps=1,
                              group_by_length=True, seed=42),
    )


@torch.no_grad()
def heldout_loss(model, tokenized, tokenizer, batch_size: int = 8) -> float:
    """Mean loss per answer token over the held-out split."""
    model.eval()
    collate, total, count = PadCollator(tokenizer), 0.0, 0
    for start in range(0, len(tokenized), batch_size):
        batch = collate([tokenized[i] for i in range(start, min(start + batch_size, len(tokenized)))])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), reduction="sum")
        total, count = total + losses.item(), count + (labels != -100).sum().item()
    return total / count


@torch.no_grad()
def greedy(model, tokenizer, chats, max_new_tokens: int = 40, batch_size: int = 16) -> list[str]:
    """Greedy answers to the chats' prompts (left padding for batched generation)."""
    model.eval()
    tokenizer.padding_side = "left"
    answers = []
    for start in range(0, len(chats), batch_size):
        prompts = [render_prompt(c, tokenizer) for c in chats[start:start + batch_size]]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    tokenizer.padding_side = "right"
    return [a.strip() for a in answers]


def measure(model_dir: str, run_dir: str, general: bool = True) -> dict:
    """Train the demo recipe on the demo data in `run_dir`; scores before and after, and timings."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    settings = demo_settings()
    train_path, heldout_path = demo_data_paths()
    heldout = load_examples(heldout_path)
    chats = [m[:-1] for m in heldout["messages"]]
    refs = [m[-1]["content"] for m in heldout["messages"]]
    tok_heldout = tokenize_examples(heldout, tokenizer, settings.train.max_seq_length)
    questions = [[{"role": "user", "content": q}] for q in GENERAL] if general else []

    def scores(m) -> dict:
        t0 = time.perf_counter()
        predictions = greedy(m, tokenizer, chats)
        found = {"heldout_loss": heldout_loss(m, tok_heldout, tokenizer), **score_predictions(predictions, refs)}
        found["examples"] = [(p, r) for p, r in zip(predictions, refs)][:3]
        if questions:
            found["general_answers"] = greedy(m, tokenizer, questions)
        found["eval_seconds"] = time.perf_counter() - t0
        return found

    before = scores(model)
    result = train(model, tokenizer, train_path, settings, run_dir)
    after = scores(result.model)
    return {"train_seconds": result.train_seconds, "steps": result.global_step,
            "train_losses": result.train_losses, "before": before, "after": after, "run_dir": str(result.run_dir)}


def main() -> None:
    torch.set_num_threads(2)
    run_dir = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="demo-run-")
    print(json.dumps(measure(str(demo_model_path()), run_dir), indent=1))


if __name__ == "__main__":
    warnings.filterwarnings("ignore", category=FutureWarning)
    main()
