"""Will it fit? Plans a LoRA/QLoRA run on a GPU from the model's config alone, before any download.

The model is built on the meta device (shapes, no weights) from a shipped ``config.json``, a local
one, or a hub ID (online); :func:`lora_nb.estimate.estimate_memory` gives the peak for the settings,
and the card's memory decides::

    need = estimate x allocator headroom + CUDA context
    fits          need <= 90% of the card      (room for longer batches and other processes)
    tight         need <= the card             (may run out on an unlucky batch)
    does not fit  need >  the card

It also finds the largest batch size and sequence length that fit, and the one change that makes a
run fit that does not (gradient checkpointing, a smaller batch, an 8-bit optimizer, 4-bit weights,
shorter sequences: in that order, least harm to the result first).

    python -m lora_nb fit meta-llama/Llama-3.1-8B --gpu T4
    python -m lora_nb fit path/to/config.json --memory 24 --batch 8 --seq 1024
"""

from __future__ import annotations

import copy
import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import transformers

from .errors import ModelLoadError, SettingsError
from .estimate import MemoryEstimate, estimate_memory
from .settings import KitSettings

CONFIG_DIR = Path(__file__).parent / "model_configs"
TIGHT_SHARE = 0.90  # above this share of the card a run is "tight"
MAX_BATCH = 1024
MAX_SEQ = 131072
Verdict = Literal["fits", "tight", "does not fit"]


@dataclass(frozen=True)
class Gpu:
    """A GPU as the planner and the GPU check see it.

    Attributes:
        name: Short name (``T4``, ``A100-80``).
        memory_gib: Memory the driver reports (``nvidia-smi``), GiB.
        bf16: Whether it computes in bfloat16 (T4 and older do not: they train in fp16 with loss scaling).
        peak_tflops: Dense 16-bit tensor-core peak with fp32 accumulation (datasheet), for MFU.
    """

    name: str
    memory_gib: float
    bf16: bool
    peak_tflops: float

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * 2**30)


GPUS = {gpu.name: gpu for gpu in (
    Gpu("T4", 15.0, False, 65.0),
    Gpu("L4", 22.5, True, 121.0),
    Gpu("A10G", 22.5, True, 70.0),
    Gpu("RTX3090", 24.0, True, 71.0),
    Gpu("RTX4090", 24.0, True, 165.2),
    Gpu("A100-40", 40.0, True, 312.0),
    Gpu("A100-80", 80.0, True, 312.0),
    Gpu("H100", 79.6, True, 989.0),
    Gpu("H200", 140.4, True, 989.0),
)}


def find_gpu(name: str) -> Gpu:
    """The GPU named ``name`` (``t4``, ``A100 80GB``, ``rtx 4090``, ``NVIDIA H100 80GB HBM3``...).

    Raises:
        SettingsError: When no known GPU matches; the message lists them.
    """
    key = re.sub(r"NVIDIA|GEFORCE|TESLA|HBM\d?E?|PCIE|SXM\d?|NVL|GB|[^A-Z0-9]", "", name.upper())
    plain = {gpu.name.replace("-", ""): gpu for gpu in GPUS.values()}
    if key in plain:
        return plain[key]
    for short, gpu in plain.items():  # "H100 80GB" -> H100; "A100" alone -> the 40 GB one
        if key.startswith(short) and key[len(short):].isdigit() or short.startswith(key) and short[len(key):].isdigit():
            return gpu
    raise SettingsError(f"unknown GPU {name!r}: choose one of {', '.join(GPUS)}, or give the memory size in GiB "
                        "(--memory 24)")


def shipped_models() -> dict[str, Path]:
    """Hub ID -> shipped ``config.json`` copy (works offline)."""
    return {path.stem.replace("--", "/"): path for path in sorted(CONFIG_DIR.glob("*.json"))}


def load_config(model: str | Path | Any) -> Any:
    """The ``transformers`` config of a model: a shipped copy, a local file or folder, or a hub ID (online).

    Shipped: Llama-3.2-1B/3B, Llama-3.1-8B, Mistral-7B-v0.3, Qwen2.5-0.5B/7B, gemma-2-2b, Phi-3-mini;
    they match by hub ID or by the name after the slash, in any case.

    Raises:
        ModelLoadError: When no config can be found.
    """
    if not isinstance(model, (str, Path)):
        return model
    text = str(model)
    shipped = {k.lower(): v for k, v in shipped_models().items()} | {
        k.split("/")[-1].lower(): v for k, v in shipped_models().items()}
    path = shipped.get(text.lower()) or Path(text)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        values = json.loads(path.read_text())
        model_type = values.pop("model_type", None)
        if model_type is None:
            raise ModelLoadError(f"{path} has no 'model_type': give the config.json of a transformers model.")
        return transformers.AutoConfig.for_model(model_type, **values)
    try:
        return transformers.AutoConfig.from_pretrained(text)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"no config for {text!r}: it is not a shipped model ({', '.join(shipped_models())}), a config.json or "
            f"folder, nor a hub ID that could be reached ({type(err).__name__}). Give a path to its config.json."
        ) from err


@functools.lru_cache(maxsize=8)
def _meta_model_cached(key: str) -> torch.nn.Module:
    values = json.loads(key)
    config = transformers.AutoConfig.for_model(values.pop("model_type"), **values)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def meta_model(config: Any) -> torch.nn.Module:
    """A parameter-free copy of the model (meta device), cached per config."""
    return _meta_model_cached(json.dumps(config.to_dict(), sort_keys=True, default=str))


@dataclass
class FitReport:
    """The planner's answer for one model, GPU and settings.

    Attributes:
        model: What was asked for (hub ID or path).
        gpu: The GPU name, or the memory size given.
        memory_bytes: The card's memory.
        estimate: The estimate for the settings.
        verdict: ``fits``, ``tight`` or ``does not fit``.
        largest_batch: Largest batch size that fits at the settings' sequence length (0: none).
        largest_seq: Longest sequence that fits at the settings' batch size (0: none).
        fix: The one change that makes it fit ("" when it fits).
        alternatives: Other single changes that also make it fit.
        settings: The settings the estimate is for (precision resolved for the GPU).
    """

    model: str
    gpu: str
    memory_bytes: int
    estimate: MemoryEstimate
    verdict: Verdict
    largest_batch: int
    largest_seq: int
    fix: str = ""
    alternatives: list[str] = field(default_factory=list)
    settings: KitSettings | None = None

    @property
    def need_bytes(self) -> int:
        """What the run needs on the card: the estimate with allocator headroom and the CUDA context."""
        return self.estimate.device_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "gpu": self.gpu, "memory_gib": round(self.memory_bytes / 2**30, 1),
                "need_gib": round(self.need_bytes / 2**30, 2), "verdict": self.verdict,
                "batch": self.estimate.batch_size, "seq": self.estimate.seq_len,
                "largest_batch": self.largest_batch, "largest_seq": self.largest_seq, "fix": self.fix}

    def __str__(self) -> str:
        e = self.estimate
        s = self.settings
        what = (f"{s.quant.load_in} base, r {s.lora.r}, {s.train.resolved_precision()}, "
                f"checkpointing {'on' if e.gradient_checkpointing else 'off'}, {s.train.optim}") if s else ""
        lines = [f"{self.model} on {self.gpu} ({self.memory_bytes / 2**30:.1f} GiB), batch {e.batch_size} x "
                 f"{e.seq_len} tokens ({what}):",
                 f"  needs about {self.need_bytes / 2**30:.1f} GiB ({e.total_bytes / 2**30:.1f} GiB of tensors at the "
                 f"peak + allocator headroom + CUDA context): {self.verdict.upper()}",
                 f"  largest batch at {e.seq_len} tokens: {self.largest_batch or 'none'}; longest sequence at batch "
                 f"{e.batch_size}: {self.largest_seq or 'none'}"]
        if self.fix:
            lines.append(f"  to make it fit: {self.fix}")
        lines += [f"  or: {alt}" for alt in self.alternatives]
        return "\n".join(lines)


def plan_fit(model: str | Path | torch.nn.Module | Any, gpu: str | Gpu | None = None, memory_gib: float | None = None,
             settings: KitSettings | None = None, batch_size: int | None = None,
             seq_len: int | None = None) -> FitReport:
    """Answers "will this LoRA run fit on this GPU?" from the model's config alone.

    Args:
        model: Hub ID (shipped configs work offline), path to a ``config.json`` or model folder, a config,
            or a model (its shapes are used as they are).
        gpu: A GPU name (see :data:`GPUS`) or a :class:`Gpu`.
        memory_gib: The card's memory in GiB, instead of ``gpu`` (bf16 assumed).
        settings: The run's settings (default: the kit's defaults: 4-bit, r 16, all linear layers).
        batch_size: Overrides ``settings.train.per_device_train_batch_size``.
        seq_len: Overrides ``settings.train.max_seq_length``.

    Returns:
        The verdict, the largest batch and sequence length that fit, and the change that makes it fit.

    Raises:
        SettingsError: No GPU or memory size, or an unknown GPU.
        ModelLoadError: No config for the model.
    """
    card = _card(gpu, memory_gib)
    settings = for_gpu(settings or KitSettings(), card)
    if batch_size:
        settings.train.per_device_train_batch_size = batch_size
    if seq_len:
        settings.train.max_seq_length = seq_len
    base = model if isinstance(model, torch.nn.Module) else meta_model(load_config(model))
    name = getattr(base.config, "_name_or_path", "") or "model" if isinstance(model, torch.nn.Module) else str(model)
    estimate = _estimate(base, settings)
    verdict = _verdict(estimate, card.memory_bytes)
    report = FitReport(name, card.name, card.memory_bytes, estimate, verdict,
                       largest_batch=_largest(base, settings, card, "batch"),
                       largest_seq=_largest(base, settings, card, "seq"), settings=settings)
    if verdict != "fits":
        fixes = _fixes(base, settings, card, report)
        report.fix, report.alternatives = fixes[0], fixes[1:]
    return report


def for_gpu(settings: KitSettings, card: Gpu) -> KitSettings:
    """A copy of the settings with the precision the card trains in (fp16 where there is no bf16)."""
    settings = copy.deepcopy(settings)
    if settings.train.precision in ("auto", "bf16"):
        settings.train.precision = "bf16" if card.bf16 else "fp16"
    if not card.bf16 and settings.quant.bnb_4bit_compute_dtype == "bfloat16":
        settings.quant.bnb_4bit_compute_dtype = "float16"
    return settings


def _card(gpu: str | Gpu | None, memory_gib: float | None) -> Gpu:
    if isinstance(gpu, Gpu):
        return gpu
    if gpu:
        return find_gpu(gpu)
    if memory_gib is None or memory_gib <= 0:
        raise SettingsError("give a GPU name (--gpu T4) or its memory in GiB (--memory 24)")
    return Gpu(f"{memory_gib:g} GiB", float(memory_gib), True, 0.0)


def _estimate(model: torch.nn.Module, settings: KitSettings, **override: int) -> MemoryEstimate:
    return estimate_memory(model, settings, override.get("batch"), override.get("seq"), device="cuda")


def _verdict(estimate: MemoryEstimate, memory: int) -> Verdict:
    need = estimate.device_bytes
    if need <= TIGHT_SHARE * memory:
        return "fits"
    return "tight" if need <= memory else "does not fit"


def _largest(model: torch.nn.Module, settings: KitSettings, card: Gpu, what: Literal["batch", "seq"]) -> int:
    """Largest batch (or sequence length) whose need stays within the card: doubling, then bisection."""
    def ok(n: int) -> bool:
        return _estimate(model, settings, **{what: n}).device_bytes <= card.memory_bytes

    low = 1 if what == "batch" else 8
    top = MAX_BATCH if what == "batch" else MAX_SEQ
    if not ok(low):
        return 0
    high = low
    while high < top and ok(min(high * 2, top)):
        high = min(high * 2, top)
    if high == top:
        return top
    bad = min(high * 2, top)
    while bad - high > 1:
        mid = (high + bad) // 2
        high, bad = (mid, bad) if ok(mid) else (high, mid)
    return high


def _fixes(model: torch.nn.Module, settings: KitSettings, card: Gpu, report: FitReport) -> list[str]:
    """Single changes that bring the run to "fits", least harm to the result first; when none is
    enough alone, the shortest combination of them in that order (as one entry)."""
    t = settings.train
    candidates: list[tuple[str, Callable[[KitSettings], None]]] = []
    if not t.gradient_checkpointing:
        candidates.append(("turn on gradient checkpointing (about 20-30% slower steps)",
                           lambda c: setattr(c.train, "gradient_checkpointing", True)))
    if settings.lora.lora_dropout > 0:
        candidates.append(("lora_dropout 0 (each adapted layer keeps a dropped copy of its input)",
                           lambda c: setattr(c.lora, "lora_dropout", 0.0)))
    if t.optim in ("adamw_torch", "adamw_torch_fused", "paged_adamw_32bit"):
        candidates.append(("the 8-bit optimizer paged_adamw_8bit", lambda c: setattr(c.train, "optim", "paged_adamw_8bit")))
    if settings.quant.load_in != "4bit":
        candidates.append(("load the base in 4-bit NF4 (QLoRA)", lambda c: setattr(c.quant, "load_in", "4bit")))
    if t.per_device_train_batch_size > 1:
        candidates.append(("batch size 1 with gradient_accumulation_steps x"
                           f"{t.per_device_train_batch_size * t.gradient_accumulation_steps} (same effective batch)",
                           lambda c: setattr(c.train, "per_device_train_batch_size", 1)))
    if report.largest_seq and report.largest_seq < t.max_seq_length:
        short = max(8, int(report.largest_seq * TIGHT_SHARE))
        candidates.append((f"cut sequences to {short} tokens (max_seq_length)",
                           lambda c: setattr(c.train, "max_seq_length", short)))

    def fits(changes: list[Callable[[KitSettings], None]]) -> bool:
        changed = copy.deepcopy(settings)
        for change in changes:
            change(changed)
        return _verdict(_estimate(model, changed), card.memory_bytes) == "fits"

    found = [text for text, change in candidates if fits([change])]
    smaller = _largest_fitting(model, settings, card)
    if smaller:  # a smaller batch that fits, rather than batch 1
        steps = -(-t.per_device_train_batch_size // smaller) * t.gradient_accumulation_steps
        found = [f"batch size {smaller} with gradient_accumulation_steps x{steps} (same effective batch)"
                 if text.startswith("batch size 1 ") else text for text in found]
    if found:
        return found
    for n in range(2, len(candidates) + 1):
        if fits([change for _, change in candidates[:n]]):
            return ["combine: " + "; ".join(text for text, _ in candidates[:n])]
    return ["no combination of these changes is enough: " + "; ".join(text for text, _ in candidates)
            + ". Use a GPU with more memory or a smaller model"]


def _largest_fitting(model: torch.nn.Module, settings: KitSettings, card: Gpu) -> int:
    """Largest batch whose verdict is "fits" (not only "tight")."""
    for b in range(settings.train.per_device_train_batch_size - 1, 0, -1):
        if _verdict(_estimate(model, settings, batch=b), card.memory_bytes) == "fits":
            return b
    return 0


def fit_table(models: list[str], gpu: str, settings: KitSettings | None = None) -> list[dict[str, Any]]:
    """:func:`plan_fit` for several models on one GPU, as rows (for a notebook table or plot)."""
    return [plan_fit(m, gpu, settings=settings).to_dict() for m in models]


def plot_fit(rows: list[dict[str, Any]], title: str = "") -> Any:
    """Bar chart of :func:`fit_table` rows: what each model needs beside the card's memory.

    Returns:
        The matplotlib figure.
    """
    import matplotlib.pyplot as plt  # only for the plot: the configurator's fit panel imports this module

    fig, ax = plt.subplots(figsize=(8, 3.5))
    colors = {"fits": "tab:green", "tight": "tab:orange", "does not fit": "tab:red"}
    names = [r["model"].split("/")[-1] for r in rows]
    ax.bar(names, [r["need_gib"] for r in rows], color=[colors[r["verdict"]] for r in rows])
    if rows:
        ax.axhline(rows[0]["memory_gib"], color="black", linestyle="--", label=f"{rows[0]['gpu']} memory")
        ax.axhline(rows[0]["memory_gib"] * TIGHT_SHARE, color="gray", linestyle=":", label="tight above this")
    for i, r in enumerate(rows):
        ax.text(i, r["need_gib"], r["verdict"], ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("GiB needed")
    ax.set_title(title or "Will it fit? (estimate incl. allocator headroom and CUDA context)")
    ax.legend(loc="upper left")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    return fig
