"""GPU check: proves that a QLoRA run works on this GPU, and measures it (``python -m lora_nb gpu-check``).

Offline by design: random-weight models of real sizes are built from the shipped configs
(``lora_nb/model_configs``: Llama-3.2-1B and Llama-3.2-3B shapes), saved once, and loaded in 4-bit
NF4 through :func:`lora_nb.loading.load_model`, the loader the notebooks use. Each variant trains
20 steps on mixed-length token sequences (64-512 tokens) and is measured:

- ``kit``: :func:`lora_nb.train.train` (padding-free rows where the model passes the packing check,
  else length-grouped batches; the chunked loss; the kit's settings);
- ``plain``: the plain recipe (``get_peft_model`` + ``Trainer`` + ``DataCollatorForSeq2Seq`` with labels =
  input ids, random order; the benchmark's recipe arm) on the same model and data;

in bf16 (where the card has it), in fp16 with loss scaling (the T4 path, forced on every card), and
the kit with ``paged_adamw_8bit`` and with gradient checkpointing, and the plain recipe without cuDNN's
attention kernel (``batching.TRAINING_SDPA_BACKENDS``, as the kit trains: the ratio once cuDNN's
per-length plans are out of the picture); the 3B model runs the kit and the
plain recipe in the card's best precision only (129 s for the whole check on an H200). Per variant:
real (non-padding) tokens/s from the end of the first step to the end of the last (not the saving
after it), how the batches were built, peak allocated and reserved memory beside ``estimate_memory``
for the longest batch, MFU (useful FLOP/s over the card's peak), the loss at the first and last
step, the kit/plain ratios of speed and memory, and the kit's reasons for any slower path it took.
A variant that cannot run here gets its reason. The report is Markdown + JSON, rewritten after
every variant.

Without CUDA it runs a smoke version on a tiny random model (fp32 only, seconds) and says that the
real check needs a CUDA GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import platform
import random
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import peft
import torch
import transformers
from peft import get_peft_model
from torch.nn.attention import sdpa_kernel
from transformers import TrainerCallback

from .batching import TRAINING_SDPA_BACKENDS, PackedCollator
from .data import PadCollator
from .demo import build_tiny_model
from .errors import SettingsError
from .estimate import estimate_memory
from .files import write_text_atomic
from .fit import Gpu, find_gpu, load_config
from .loading import load_model
from .probes import bf16_supported, cuda_available, package_version
from .settings import KitSettings, LoraSettings, QuantSettings, TrainSettings
from .train import train

MODELS = ("meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-3B")
STEPS = 20  # optimizer steps per variant; the first is warm-up (kernels, allocator) and is not timed
BATCH = 4
MIN_LEN, MAX_LEN = 64, 512
LEARNING_RATE = 2e-3
SMOKE_STEPS = 3


@dataclass
class VariantResult:
    """One variant's measurement (or the reason it did not run)."""

    model: str
    variant: str
    path: str  # "kit" or "plain"
    precision: str
    batches: str = ""  # "padding-free rows" or "padded"
    optim: str = "adamw_torch"
    checkpointing: bool = False
    cudnn_attention: bool = True  # False: sdpa without cuDNN's kernel, as the kit trains
    steps: int = 0
    real_tokens_per_s: float = 0.0
    peak_allocated_gib: float = 0.0  # while training (the estimate's scope); loading is counted apart
    loading_peak_gib: float = 0.0
    peak_reserved_gib: float = 0.0
    estimate_gib: float = 0.0
    estimate_over_allocated: float = 0.0
    mfu: float = 0.0
    first_loss: float = math.nan
    last_loss: float = math.nan
    ratio_vs_plain: float = math.nan
    memory_vs_plain: float = math.nan
    error: str = ""
    notes: list[str] = field(default_factory=list)  # why the kit took a slower path (its warnings)

    @property
    def ok(self) -> bool:
        return not self.error


@dataclass
class CheckReport:
    """The whole check: where it ran and every variant."""

    device: str
    gpu: str
    cuda: bool
    smoke: bool
    seconds: float = 0.0
    versions: dict[str, str] = field(default_factory=dict)
    results: list[VariantResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def markdown(self) -> str:
        head = "smoke check on CPU (tiny random model)" if self.smoke else f"{self.gpu}"
        lines = [f"# GPU check: {head}", "",
                 f"{self.device}; " + ", ".join(f"{k} {v}" for k, v in self.versions.items())
                 + f"; {self.seconds:.0f} s in all.", ""]
        lines += [f"- {note}" for note in self.notes]
        lines += ["", "| model | variant | precision | optimizer | ckpt | batches | real tokens/s | kit/plain "
                  "| peak allocated GiB (training) | kit/plain memory | peak reserved GiB | estimate GiB "
                  "| estimate/allocated | loading peak GiB | MFU | loss first -> last |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in self.results:
            if not r.ok:
                lines.append(f"| {r.model} | {r.variant} | {r.precision} | {r.optim} | {r.checkpointing} | "
                             f"not run: {r.error} |  |  |  |  |  |  |  |  |  |  |")
                continue
            lines.append(f"| {r.model} | {r.variant} | {r.precision} | {r.optim} | {r.checkpointing} | {r.batches} | "
                         f"{r.real_tokens_per_s:.0f} | {_times(r.ratio_vs_plain)} | {r.peak_allocated_gib:.2f} | "
                         f"{_times(r.memory_vs_plain)} | {r.peak_reserved_gib:.2f} | "
                         f"{r.estimate_gib:.2f} | {r.estimate_over_allocated:.2f} | {r.loading_peak_gib:.2f} | {r.mfu:.1%} | "
                         f"{r.first_loss:.3f} -> {r.last_loss:.3f} |")
        return "\n".join(lines) + "\n"


def _times(ratio: float) -> str:
    return "" if math.isnan(ratio) else f"{ratio:.2f}x"


def variants(cuda: bool, bf16: bool) -> list[dict[str, Any]]:
    """The variants to run: (name, path, precision, optimizer, checkpointing), with a reason where not here."""
    rows = []
    for precision in (("bf16", "fp16") if cuda else ("fp32",)):
        reason = "" if precision != "bf16" or bf16 else "this GPU has no bf16 (the fp16 rows are its path)"
        for path in ("kit", "plain"):
            rows.append({"variant": f"{path} {precision}", "path": path, "precision": precision, "reason": reason})
    best = "bf16" if cuda and bf16 else ("fp16" if cuda else "fp32")
    rows.append({"variant": "kit paged 8-bit AdamW", "path": "kit", "precision": best, "optim": "paged_adamw_8bit",
                 "reason": "" if cuda else "paged optimizers need CUDA"})
    rows.append({"variant": "kit gradient checkpointing", "path": "kit", "precision": best, "checkpointing": True,
                 "reason": ""})
    # The recipe with the kit's attention kernels: what is left of the ratio once cuDNN's per-length
    # plans are out of the picture (as over a long run, where few lengths are new).
    rows.append({"variant": "plain without cuDNN attention", "path": "plain", "precision": best, "cudnn_attention": False,
                 "reason": "" if cuda else "cuDNN attention runs only on CUDA"})
    if not cuda:
        rows += [{"variant": f"kit {p}", "path": "kit", "precision": p, "reason": "needs a CUDA GPU"}
                 for p in ("bf16", "fp16")]
    return rows


def run_gpu_check(out: str | Path | None = None, models: tuple[str, ...] = MODELS, steps: int | None = None,
                  smoke: bool | None = None, log=print) -> CheckReport:
    """Runs the check and writes ``gpu_check.md`` and ``gpu_check.json`` into ``out`` (when given).

    Args:
        out: Folder for the report (None: nowhere).
        models: Shipped configs to build random-weight models from (CUDA only).
        steps: Optimizer steps per variant (default 20 on CUDA, 3 in the smoke version).
        smoke: Force the tiny smoke version (default: when there is no CUDA).
        log: Where progress lines go.

    Returns:
        The report.
    """
    started = time.perf_counter()
    cuda = cuda_available()
    smoke = (not cuda) if smoke is None else smoke
    gpu = _this_gpu() if cuda else None
    report = CheckReport(device=torch.cuda.get_device_name() if cuda else f"CPU ({platform.machine()})",
                         gpu=gpu.name if gpu else "none", cuda=cuda, smoke=smoke,
                         versions={"torch": torch.__version__, "transformers": transformers.__version__,
                                   "peft": peft.__version__, "bitsandbytes": _bnb_version()})
    if not cuda:
        report.notes.append("No CUDA GPU here: this is the smoke version on a tiny random model, fp32, to show that "
                            "the check's code runs. The real check needs a CUDA GPU: run `python -m lora_nb gpu-check` "
                            "on one (129 s on an H200).")
    steps = steps or (SMOKE_STEPS if smoke else STEPS)
    with tempfile.TemporaryDirectory() as work:
        for index, name in enumerate(("tiny",) if smoke else models):
            folder = _random_model(name, Path(work))
            specs = variants(cuda, bool(gpu and gpu.bf16))
            if index > 0:  # the larger models: kit and plain in the card's best precision (keeps the check short)
                best = specs[-1]["precision"]
                specs = [v for v in specs if v["precision"] == best and v.get("optim") is None
                         and not v.get("checkpointing") and v.get("cudnn_attention", True)]
            for spec in specs:
                log(f"gpu-check: {name} {spec['variant']} ...")
                report.results.append(_run_variant(name, folder, spec, steps, gpu, Path(work)))
                _free()
                _add_ratios(report.results)
                report.seconds = time.perf_counter() - started
                _write(report, out)  # after every variant: a check stopped part-way keeps what it measured
    _add_findings(report)
    _write(report, out)
    return report


def _write(report: CheckReport, out: str | Path | None) -> None:
    if out is None:
        return
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "gpu_check.md", report.markdown())
    write_text_atomic(out / "gpu_check.json", json.dumps(report.to_dict(), indent=1, default=str) + "\n")


def _this_gpu() -> Gpu:
    name = torch.cuda.get_device_name()
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30
    try:
        peak = find_gpu(name).peak_tflops
    except SettingsError:
        peak = 0.0  # unknown card: no MFU
    return Gpu(name, memory, bf16_supported(), peak)


def _bnb_version() -> str:
    return package_version("bitsandbytes") or "missing"


def _random_model(name: str, work: Path) -> Path:
    """A random-weight model folder (with the tiny test tokenizer) of a shipped config's shape."""
    tiny = build_tiny_model(work / "tiny")
    if name == "tiny":
        return tiny
    folder = work / name.replace("/", "--")
    config = load_config(name)
    torch.manual_seed(0)
    with torch.device("cuda" if cuda_available() else "cpu"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    _free()
    transformers.AutoTokenizer.from_pretrained(tiny).save_pretrained(folder)
    return folder


def _settings(spec: dict[str, Any], steps: int) -> KitSettings:
    compute = {"bf16": "bfloat16", "fp16": "float16"}.get(spec["precision"], "float32")
    return KitSettings(
        lora=LoraSettings(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"),
        quant=QuantSettings(load_in="4bit", bnb_4bit_compute_dtype=compute),
        train=TrainSettings(learning_rate=LEARNING_RATE, max_steps=steps, per_device_train_batch_size=BATCH,
                            max_seq_length=MAX_LEN, precision=spec["precision"], optim=spec.get("optim", "adamw_torch"),
                            gradient_checkpointing=spec.get("checkpointing", False), save_steps=None, logging_steps=1,
                            train_on_responses_only=False, warmup_steps=0, lr_scheduler_type="constant"))


def _data(vocab: int, n: int, seed: int = 0) -> list[list[int]]:
    """Mixed-length token sequences; each repeats a short random motif, so the loss can fall in a few steps."""
    rng = random.Random(seed)
    high = min(vocab, 1000)
    motifs = [[rng.randrange(10, high) for _ in range(16)] for _ in range(4)]
    return [(motifs[i % 4] * (MAX_LEN // 16 + 1))[:rng.randint(MIN_LEN, MAX_LEN)] for i in range(n)]


class _StepTimer:
    """Trainer callback: times the steps after the first (to the end of the last step, before any
    saving), records losses."""

    def __init__(self):
        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == 1:
                    timer.start = _now()

            def on_step_end(self, args, state, control, **kwargs):
                timer.end = _now()

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    timer.losses.append(float(logs["loss"]))

        self.callback = Callback()
        self.start = 0.0
        self.end = 0.0
        self.losses: list[float] = []


def _now() -> float:
    """Wall time once the GPU's queued work is done."""
    if cuda_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def _run_variant(name: str, folder: Path, spec: dict[str, Any], steps: int, gpu: Gpu | None, work: Path) -> VariantResult:
    result = VariantResult(model=name, variant=spec["variant"], path=spec["path"], precision=spec["precision"],
                           optim=spec.get("optim", "adamw_torch"), checkpointing=spec.get("checkpointing", False),
                           cudnn_attention=spec.get("cudnn_attention", True))
    if spec.get("reason"):
        result.error = spec["reason"]
        return result
    settings = _settings(spec, steps)
    try:
        _measure(result, folder, settings, steps, gpu, work)
    except Exception as err:  # a variant that fails is reported with its reason; the check goes on
        result.error = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return result


def _measure(result: VariantResult, folder: Path, settings: KitSettings, steps: int, gpu: Gpu | None,
             work: Path) -> None:
    cuda = cuda_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model, tokenizer = load_model(str(folder), settings.quant, dtype="auto", strict=True,
                                  gradient_checkpointing=settings.train.gradient_checkpointing)
    if cuda:  # loading's transients (quantizing, upcasting) are not a training step's: measured apart
        result.loading_peak_gib = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    seqs = _data(model.config.vocab_size, steps * BATCH)
    data = datasets.Dataset.from_dict({"input_ids": seqs, "labels": seqs})
    timer = _StepTimer()
    run_dir = work / f"run-{result.model.replace('/', '--')}-{result.variant.replace(' ', '-')}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer_tokens, result.batches = _train(result.path, model, tokenizer, data, settings, run_dir, timer,
                                                result.cudnn_attention)
    result.notes = sorted({str(w.message) for w in caught if "off for this model" in str(w.message)})
    seconds = timer.end - timer.start
    timed_tokens = sum(trainer_tokens[1:])
    result.steps = len(trainer_tokens)
    result.real_tokens_per_s = timed_tokens / seconds if seconds > 0 else 0.0
    result.first_loss, result.last_loss = (timer.losses[0], timer.losses[-1]) if timer.losses else (math.nan, math.nan)
    longest = max(len(s) for s in seqs)
    estimate = estimate_memory(load_config(str(folder)), settings, BATCH, longest, device="cuda" if cuda else "cpu")
    result.estimate_gib = estimate.total_bytes / 2**30
    if cuda:
        result.peak_allocated_gib = torch.cuda.max_memory_allocated() / 2**30
        result.peak_reserved_gib = torch.cuda.max_memory_reserved() / 2**30
        result.estimate_over_allocated = result.estimate_gib / result.peak_allocated_gib
    if gpu and gpu.peak_tflops:
        result.mfu = result.real_tokens_per_s * _flops_per_token(model.config, (MIN_LEN + MAX_LEN) // 2) / (
            gpu.peak_tflops * 1e12)
    del model


def _train(path: str, model, tokenizer, data, settings: KitSettings, run_dir: Path,
           timer: _StepTimer, cudnn_attention: bool = True) -> tuple[list[int], str]:
    """Trains with the kit's `train()` or the plain recipe (with or without cuDNN's attention kernel);
    returns the real tokens of each step and how the batches were built ("padding-free rows" or "padded")."""
    counted: list[int] = []
    kinds: set[str] = set()

    def count(batch: dict) -> dict:
        packed = "attention_mask" not in batch  # packed rows hold no padding
        counted.append(int(batch["input_ids"].numel() if packed else batch["attention_mask"].sum()))
        kinds.add("padding-free rows" if packed else "padded")
        return batch

    if path == "kit":
        originals = {cls: cls.__call__ for cls in (PadCollator, PackedCollator)}
        for cls, original in originals.items():  # count what the kit batches, padded or packed
            cls.__call__ = lambda self, features, original=original: count(original(self, features))
        try:
            train(model, tokenizer, data, settings, run_dir, callbacks=[timer.callback])
        finally:
            for cls, original in originals.items():
                cls.__call__ = original
        return counted, ", ".join(sorted(kinds))
    t = settings.train
    peft_model = get_peft_model(model, settings.lora.to_peft(model))
    # Not DataCollatorForLanguageModeling: it labels every pad-id token -100, the end-of-turn token where
    # pad = eos, so that recipe never learns to end a turn (benchmarks/throughput_arms.py, recipe_collator).
    plain = transformers.DataCollatorForSeq2Seq(tokenizer, padding=True)
    args = transformers.TrainingArguments(
        output_dir=str(run_dir), per_device_train_batch_size=t.per_device_train_batch_size, max_steps=t.max_steps,
        learning_rate=t.learning_rate, lr_scheduler_type="constant", optim=t.optim, logging_steps=1,
        save_strategy="no", report_to="none", bf16=t.precision == "bf16", fp16=t.precision == "fp16",
        use_cpu=not cuda_available(), gradient_checkpointing=t.gradient_checkpointing, seed=t.seed)
    trainer = transformers.Trainer(model=peft_model, args=args, train_dataset=data,
                                   data_collator=lambda rows: count(plain(rows)), callbacks=[timer.callback])
    with contextlib.nullcontext() if cudnn_attention else sdpa_kernel(TRAINING_SDPA_BACKENDS):
        trainer.train()
    return counted, ", ".join(sorted(kinds))


def _flops_per_token(config: Any, seq: int) -> float:
    """Useful FLOPs per token of a LoRA step: forward 2N and input-gradient backward 2N over the matrix
    weights (frozen weights get no weight gradient), plus attention (QK and PV: 12 s q per block, fwd + bwd)."""
    h = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    q = heads * head_dim
    per_block = h * q + 2 * h * kv + q * h + 3 * h * config.intermediate_size
    n = config.num_hidden_layers * per_block + h * config.vocab_size
    return 4 * n + 12 * config.num_hidden_layers * seq * q


def _recipes(results: list[VariantResult], cudnn_attention: bool) -> dict[tuple[str, str], VariantResult]:
    """The plain recipe's measured rows by (model, precision), with or without cuDNN attention."""
    return {(r.model, r.precision): r for r in results
            if r.path == "plain" and r.ok and r.real_tokens_per_s and r.cudnn_attention == cudnn_attention}


def _comparable_kit(r: VariantResult) -> bool:
    """A measured kit row that differs from the plain recipe only in path (its optimizer, no checkpointing)."""
    return r.path == "kit" and r.ok and r.optim == "adamw_torch" and not r.checkpointing


def _add_ratios(results: list[VariantResult]) -> None:
    """kit/plain tokens/s and peak allocated memory, for the kit rows that differ from plain only in path."""
    plain = _recipes(results, cudnn_attention=True)
    for r in results:
        ref = plain.get((r.model, r.precision))
        if ref and _comparable_kit(r):
            r.ratio_vs_plain = r.real_tokens_per_s / ref.real_tokens_per_s
            if ref.peak_allocated_gib:
                r.memory_vs_plain = r.peak_allocated_gib / ref.peak_allocated_gib


def _add_findings(report: CheckReport) -> None:
    plain = _recipes(report.results, cudnn_attention=False)
    for r in report.results:
        ref = plain.get((r.model, r.precision))
        if ref and _comparable_kit(r):
            report.notes.append(f"{r.model} {r.variant}: {r.real_tokens_per_s / ref.real_tokens_per_s:.2f}x the recipe "
                                "without cuDNN attention (no per-length plans to build: the ratio of a long run)")
    seen = set()
    for r in report.results:
        for note in r.notes:
            if (r.model, note) not in seen:
                seen.add((r.model, note))
                report.notes.append(f"{r.model} {r.variant}: {note}")
    for r in report.results:
        if r.ok and not (math.isfinite(r.last_loss) and r.last_loss < r.first_loss):
            report.notes.append(f"{r.model} {r.variant}: the loss did not fall ({r.first_loss:.3f} -> {r.last_loss:.3f}).")
    fp16 = [r for r in report.results if r.precision == "fp16" and r.path == "kit"]
    for r in fp16:
        if not r.ok:
            report.notes.append(f"fp16 with loss scaling (the T4 path), {r.model}: not run ({r.error})")
            continue
        state = "trained" if math.isfinite(r.last_loss) and r.last_loss < r.first_loss else "FAILED"
        report.notes.append(f"fp16 with loss scaling (the T4 path), {r.model}: {state}, loss {r.first_loss:.3f} -> "
                            f"{r.last_loss:.3f}")


def _free() -> None:
    gc.collect()
    if cuda_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
