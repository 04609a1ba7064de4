"""find_targets on tiny models of seven architectures, checked against what peft's 'all-linear' adapts."""

from __future__ import annotations

import peft
import pytest
import torch.nn as nn

from lora_nb.settings import LoraSettings
from lora_nb.targets import find_targets
from tests.archs import ARCHS, EXPECTED_NAMES, tiny_model


@pytest.mark.parametrize("arch", ARCHS)
def test_names_blocks_and_layout(arch):
    targets = find_targets(tiny_model(arch))
    assert targets.names == EXPECTED_NAMES[arch]
    assert targets.n_layers == 2
    assert targets.layers_pattern == ("h" if arch == "gpt2" else "layers")
    assert targets.fan_in_fan_out is (arch == "gpt2")
    assert targets.output_head == "lm_head" and "lm_head" not in targets.names
    assert {layer.layer_index for layer in targets.layers} == {0, 1}


@pytest.mark.parametrize("arch", ARCHS)
def test_same_layers_as_peft_all_linear(arch):
    model = tiny_model(arch)
    ours = {layer.path for layer in find_targets(model).layers}
    lora = LoraSettings(fan_in_fan_out=arch == "gpt2")
    peft_model = peft.get_peft_model(model, lora.to_peft())
    adapted = {name.removeprefix("base_model.model.") for name, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert ours == adapted


def test_groups_of_fused_and_shared_names():
    gpt2 = find_targets(tiny_model("gpt2"))
    assert gpt2.attention == ["c_attn", "c_proj"] and gpt2.mlp == ["c_fc", "c_proj"] and gpt2.other == []
    assert gpt2.shapes["c_proj"] == [(32, 32), (128, 32)]
    assert gpt2.shapes["c_attn"] == [(32, 96)]
    phi3 = find_targets(tiny_model("phi3"))
    assert phi3.attention == ["o_proj", "qkv_proj"] and phi3.mlp == ["gate_up_proj", "down_proj"]
    assert phi3.shapes["gate_up_proj"] == [(32, 128)]
    neox = find_targets(tiny_model("gpt_neox"))
    assert neox.attention == ["query_key_value", "dense"] and neox.mlp == ["dense_h_to_4h", "dense_4h_to_h"]


def test_layer_details():
    layers = {layer.path: layer for layer in find_targets(tiny_model("qwen2")).layers}
    q = layers["model.layers.1.self_attn.q_proj"]
    assert (q.name, q.kind, q.in_features, q.out_features, q.has_bias, q.group, q.layer_index) == (
        "q_proj", "linear", 32, 32, True, "attention", 1)
    assert layers["model.layers.0.mlp.down_proj"].has_bias is False
    assert find_targets(tiny_model("gpt2")).layers[0].kind == "conv1d"


def test_output_head_on_request_and_plain_modules():
    assert "lm_head" in find_targets(tiny_model("llama"), include_output_head=True).names
    plain = find_targets(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
    assert (plain.names, plain.n_layers, plain.output_head, plain.layers_pattern) == (["0", "2"], 0, None, None)
