"""The benchmarks' models by name: the demo model's local copy, a random tiny Llama, or a folder."""

from __future__ import annotations

from pathlib import Path


def model_folder(name: str, workdir: Path) -> str:
    """`demo` (SmolLM2-135M-Instruct, local copy), `tiny` (a random 2-layer Llama built in `workdir`) or a folder."""
    from lora_nb.demo import build_tiny_model, demo_model_path

    if name == "demo":
        return str(demo_model_path())
    if name == "tiny":
        return str(build_tiny_model(workdir / "tiny-model"))
    return name
