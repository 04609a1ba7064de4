"""Shared fixtures: a tiny random model for fast tests, the demo model for slow ones."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never wait on the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from lora_nb.demo import build_tiny_model, demo_model_path  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny random Llama with an offline-trained chat tokenizer, saved once per session."""
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="session")
def demo_model_dir() -> str:
    """The demo model (SmolLM2-135M-Instruct) as a local folder, converted from GGUF on first use."""
    return str(demo_model_path())


def pytest_collection_modifyitems(config, items):
    """Skip GPU-only tests where there is no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
