"""Where a training step's time goes: the kit and the recipe on the same batches, by kind of work.

The throughput benchmark (`benchmarks/throughput.py`) measures the kit / recipe ratio of real
tokens per second. It splits into two factors:

    kit / recipe  =  1 / (the recipe's real share of positions)  x  (the recipe's cost per position / the kit's)
                     what dropping padding gives                    what a cheaper position gives

This profiles one forward, loss and backward pass of each arm (no optimizer step) on the same
batches with `torch.profiler` and splits each arm's cost per position by kind of work (self CPU
time of each operator):

    layer products   the frozen layers' matrix products (forward, and the input gradients backward)
    LoRA products    the adapters' rank-r products (one side of the product is r)
    head and loss    the output head's products and the softmax / cross-entropy around them
    attention        sdpa's kernels
    other            norms, rotary embeddings, activations, adds, copies, autograd's bookkeeping

and gives the layer products' rate (GFLOP/s). The profiler adds a little to every operator, most
to the many small ones; compare the arms, not the absolute times.

    python benchmarks/step_profile.py [--batches 3] [--seed 0] [--out benchmarks/results/step_profile.md]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep instead of spinning on a shared CPU
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import random  # noqa: E402
from collections import defaultdict  # noqa: E402

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from benchmarks.models import model_folder  # noqa: E402
from benchmarks.throughput_arms import (  # noqa: E402
    LORA, MAX_LENGTH, _tokenizer, kit_dataset, kit_peft, kit_settings, make_data_set, recipe_collator, recipe_dataset,
    recipe_peft, warm_up)

KINDS = ("layer products", "LoRA products", "head and loss", "attention", "other")
PRODUCTS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"}
LOSS_OPS = ("log_softmax", "nll_loss", "cross_entropy")
HEAD_FUNCTION = "_FusedLinearCrossEntropy"  # the kit's loss through the head (lora_nb/loss.py)


def kind_of(event, vocab: int, rank: int) -> str:
    """The kind of work (one of `KINDS`) of one profiled operator."""
    name = event.name
    shapes = [s for s in (event.input_shapes or []) if isinstance(s, list)]
    parent, inside_head = event.cpu_parent, False
    while parent is not None and not inside_head:
        inside_head, parent = parent.name == HEAD_FUNCTION, parent.cpu_parent
    if inside_head or any(k in name for k in LOSS_OPS) or any(vocab in s for s in shapes):
        return "head and loss"
    if "scaled_dot_product" in name:
        return "attention"
    if name in PRODUCTS:
        return "LoRA products" if any(rank in s[-2:] for s in shapes if len(s) >= 2) else "layer products"
    return "other"


def _flops(event) -> float:
    """Multiply-adds x 2 of a 2-D product (`mm`: [m, k] x [k, n]; `addmm(_)`: the two matrices after the first)."""
    shapes = [s for s in event.input_shapes if isinstance(s, list) and len(s) == 2]
    a, b = shapes[-2:]
    return 2.0 * a[0] * a[1] * b[1]


def profile_step(step) -> dict:
    """Run `step()` under the profiler; seconds per kind of work and the layer products' GFLOP/s."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    seconds, flops, product_seconds = defaultdict(float), 0.0, 0.0
    for event in prof.events():
        kind = kind_of(event, step.vocab, step.rank)
        seconds[kind] += event.self_cpu_time_total / 1e6
        if kind == "layer products" and event.name in ("aten::mm", "aten::addmm", "aten::addmm_"):
            flops += _flops(event)
            product_seconds += event.self_cpu_time_total / 1e6
    return {"seconds": dict(seconds), "layer_gflops": flops / product_seconds / 1e9 if product_seconds else 0.0}


class RecipeStep:
    """The recipe's forward, loss and backward on one padded batch (the model's own loss)."""

    def __init__(self, model, batch, vocab: int):
        self.model, self.batch, self.vocab, self.rank = model, batch, vocab, LORA["r"]
        self.positions = batch["input_ids"].numel()
        self.real = int(batch["attention_mask"].sum())

    def __call__(self) -> None:
        self.model(**self.batch).loss.backward()
        self.model.zero_grad(set_to_none=True)


class KitStep:
    """The kit's forward, loss and backward on one batch, as `KitTrainer.compute_loss` computes it."""

    def __init__(self, model, batch, plan, vocab: int):
        self.model, self.batch, self.plan, self.vocab, self.rank = model, batch, plan, vocab, LORA["r"]
        self.positions = batch["input_ids"].numel()
        self.real = self.positions if plan.padding_free else int(batch["attention_mask"].sum())

    def __call__(self) -> None:
        from lora_nb.batching import loss_sum

        head = self.model.get_output_embeddings() if self.plan.chunked_loss else None
        total, _ = loss_sum(self.model, self.batch, head=head)
        (total / max(1, int((self.batch["shift_labels"] != -100).sum()))).backward()
        self.model.zero_grad(set_to_none=True)


def build_steps(model: str, batches: int, seed: int, batch_size: int = 8) -> tuple[list, list, object]:
    """The two arms' steps on the same `batches` batches of the mixed set (chats of 20-400 tokens)."""
    from lora_nb.batching import packed_attention, plan_batches

    path = model_folder(model, Path("/tmp/lora-nb-step-profile"))
    tokenizer = _tokenizer(path)
    chats = make_data_set(tokenizer, batches * batch_size, 20, 400, 0, seed)
    order = list(range(len(chats)))
    random.Random(seed).shuffle(order)
    groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    recipe_data, kit_data = recipe_dataset(chats, tokenizer), kit_dataset(chats, tokenizer, max_length=MAX_LENGTH)
    settings = kit_settings(path, batches, batch_size, seed)
    recipe_model, kit_model = recipe_peft(path, seed), kit_peft(path, settings)
    plan = plan_batches(kit_model, settings.train.padding_free)
    vocab = kit_model.get_output_embeddings().weight.shape[0]
    collate_recipe, collate_kit = recipe_collator(tokenizer), plan.collator(tokenizer)
    recipe = [RecipeStep(recipe_model, collate_recipe([recipe_data[i] for i in g]), vocab) for g in groups]
    kit = [KitStep(kit_model, collate_kit([kit_data[i] for i in g]), plan, vocab) for g in groups]
    for m in (recipe_model, kit_model):
        warm_up(m, tokenizer, batch_size)
    return recipe, kit, packed_attention(kit_model, plan)


def measure(model: str = "demo", batches: int = 3, seed: int = 0) -> dict:
    """Profile both arms on the same batches, alternating; seconds per kind, positions and real tokens."""
    recipe, kit, training = build_steps(model, batches, seed)
    totals = {arm: {"seconds": defaultdict(float), "positions": 0, "real": 0, "gflops": []} for arm in ("recipe", "kit")}
    with training:
        kit[0]()  # the first pass of the kit's attention and lean layers, untimed
        for pair in zip(recipe, kit):
            for arm, step in zip(("recipe", "kit"), pair):
                found = profile_step(step)
                for kind, s in found["seconds"].items():
                    totals[arm]["seconds"][kind] += s
                totals[arm]["positions"] += step.positions
                totals[arm]["real"] += step.real
                totals[arm]["gflops"].append(found["layer_gflops"])
                print(f"  {arm}: {step.positions} positions, {sum(found['seconds'].values()):.1f} s", flush=True)
    return {"model": model, "batches": batches, "seed": seed, "threads": torch.get_num_threads(), "arms": {
        arm: {"seconds": dict(t["seconds"]), "positions": t["positions"], "real": t["real"],
              "layer_gflops": sum(t["gflops"]) / len(t["gflops"])} for arm, t in totals.items()}}


def render(result: dict) -> str:
    """The markdown report: ms per position by kind of work, and the two factors of the speed-up."""
    arms = result["arms"]
    per = {arm: {k: 1e3 * a["seconds"].get(k, 0.0) / a["positions"] for k in KINDS} for arm, a in arms.items()}
    total = {arm: sum(v.values()) for arm, v in per.items()}
    share = arms["recipe"]["real"] / arms["recipe"]["positions"]
    lines = [
        f"# Where a training step's time goes: model `{result['model']}`, {result['batches']} batches of 8 chats "
        f"(20-400 tokens, seed {result['seed']}), torch {result['threads']} threads",
        "",
        "Self CPU time of each operator (`torch.profiler`) of one forward, loss and backward pass per batch and arm, "
        "per position the arm computes. Reproduce: `python benchmarks/step_profile.py`.",
        "",
        "| kind of work | recipe ms / position | kit ms / position | recipe / kit | share of the kit's step |",
        "| --- | --- | --- | --- | --- |",
    ]
    for kind in KINDS:
        r, k = per["recipe"][kind], per["kit"][kind]
        lines.append(f"| {kind} | {r:.3f} | {k:.3f} | {r / k:.2f}x | {k / total['kit']:.0%} |" if k else
                     f"| {kind} | {r:.3f} | {k:.3f} | | 0% |")
    lines += [
        f"| all | {total['recipe']:.3f} | {total['kit']:.3f} | {total['recipe'] / total['kit']:.2f}x | 100% |",
        "",
        f"- Positions computed: recipe {arms['recipe']['positions']:,} (real share {share:.0%}), kit "
        f"{arms['kit']['positions']:,} (all real).",
        f"- Layer products' rate: recipe {arms['recipe']['layer_gflops']:.0f} GFLOP/s, kit "
        f"{arms['kit']['layer_gflops']:.0f} GFLOP/s.",
        f"- Factors of the real-token speed-up on these batches: {1 / share:.2f}x from the padding the kit drops, "
        f"{total['recipe'] / total['kit']:.2f}x from the cost per position: "
        f"{total['recipe'] / total['kit'] / share:.2f}x (without the optimizer step and the Trainer's own work).",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="demo, tiny, or a model folder")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the markdown report here (default: print it only)")
    args = parser.parse_args(argv)
    result = measure(args.model, args.batches, args.seed)
    text = render(result)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return result


if __name__ == "__main__":
    main()
