"""Environment check: what this machine has for LoRA/QLoRA, and what follows from it.

`check_environment()` probes, never assumes: versions of the stack, a CUDA GPU and its memory,
whether bitsandbytes can really quantize a layer to 4-bit here, whether the hub answers, and where
the demo model comes from. Each finding is one `Check` with a plain-words consequence.
"""

from __future__ import annotations

import platform
import sys
from dataclasses import dataclass

import torch

from .demo import DEMO_MODEL_ID, find_demo_gguf
from .errors import ModelLoadError
from .probes import bf16_supported, cuda_available, hub_reachable, package_version, quantization_available

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "ipywidgets", "matplotlib")


@dataclass
class Check:
    """One line of the environment report."""

    name: str
    ok: bool
    detail: str
    advice: str = ""

    def __str__(self) -> str:
        mark = "[OK]  " if self.ok else "[FAIL]"
        tail = f" -> {self.advice}" if self.advice else ""
        return f"{mark} {self.name}: {self.detail}{tail}"


def check_environment(probe_hub: bool = True) -> list[Check]:
    """Run every check and return them in reading order.

    Args:
        probe_hub: also test whether the Hugging Face hub answers (a 2-second probe).

    Returns:
        One `Check` per finding: Python, each package, the GPU, 4-bit and 8-bit, the hub, the demo model.
    """
    checks = [Check("Python", sys.version_info >= (3, 10), platform.python_version(), _python_advice())]
    checks += [_package_check(name) for name in PACKAGES]
    checks.append(_gpu_check())
    checks += [_quantization_check("4bit"), _quantization_check("8bit")]
    if probe_hub:
        checks.append(_hub_check())
    checks.append(_demo_model_check())
    return checks


def report(checks: list[Check] | None = None) -> str:
    """The checks as text, one line each, ending with a one-line verdict.

    Args:
        checks: The checks to report (default: `check_environment()`, the hub probe included).

    Returns:
        The report, one `[OK]` / `[FAIL]` line per check, then the verdict.
    """
    checks = check_environment() if checks is None else checks
    failed = [c.name for c in checks if not c.ok]
    verdict = "Everything the walkthrough needs is here." if not failed else f"Needs attention: {', '.join(failed)}."
    return "\n".join([*map(str, checks), verdict])


def _python_advice() -> str:
    return "" if sys.version_info >= (3, 10) else "the kit needs Python 3.10 or newer"


def _package_check(name: str) -> Check:
    version = package_version(name)
    if version is None:
        return Check(name, False, "not installed", f"run `pip install {name}` (or `python kit.py setup`)")
    return Check(name, True, version)


def _gpu_check() -> Check:
    if not cuda_available():
        return Check(
            "CUDA GPU",
            True,
            "none",
            "training runs on the CPU: fine for the demo model, too slow for multi-billion-parameter models",
        )
    props = torch.cuda.get_device_properties(0)
    gib = props.total_memory / 2**30
    bf16 = "supports bf16" if bf16_supported() else "no bf16: fp16 compute"
    return Check("CUDA GPU", True, f"{props.name}, {gib:.1f} GiB, {bf16}", _gpu_advice(gib))


def _gpu_advice(gib: float) -> str:
    """Rule of thumb: 4-bit weights take ~0.6 GB per billion parameters plus working memory."""
    largest = max(int((gib - 3) / 0.9), 0)
    return f"QLoRA (4-bit) fits models up to roughly {largest}B parameters at short sequence lengths"


def _quantization_check(load_in: str) -> Check:
    ok, detail = quantization_available(load_in)
    where = "CUDA" if "cuda" in detail else "CPU backend: slower than a GPU, but correct"
    advice = where if ok else "the kit loads models in full precision instead (more memory, same results)"
    return Check(f"{load_in[0]}-bit (bitsandbytes)", ok, detail, advice)


def _hub_check() -> Check:
    if hub_reachable():
        return Check("Hugging Face hub", True, "reachable", "models and data sets load by hub ID")
    return Check(
        "Hugging Face hub",
        True,
        "not reachable (offline)",
        f"the demo model {DEMO_MODEL_ID} comes from its offline copy; other models need a local path",
    )


def _demo_model_check() -> Check:
    try:
        gguf = find_demo_gguf()
    except ModelLoadError as err:
        if hub_reachable():
            return Check("Demo model", True, f"{DEMO_MODEL_ID} from the hub")
        return Check("Demo model", False, "no offline copy and no hub", str(err))
    return Check("Demo model", True, f"offline copy available ({gguf.name})")
