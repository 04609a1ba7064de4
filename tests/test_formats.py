"""Import/export of settings in the kit, axolotl, lora-section and peft forms; Python snippets; fuzzing the reader."""

from __future__ import annotations

import json
import os

import peft
import pytest
import yaml
from hypothesis import HealthCheck, given, settings as hyp_settings, strategies as st

from lora_nb.errors import ConfigFileError, LoraNbError, SettingsError
from lora_nb.formats import FORMS, detect_form, dump_settings, load_settings, save_settings, to_python
from lora_nb.presets import get_preset
from lora_nb.settings import KitSettings, LoraSettings, QuantSettings, TrainSettings, field_specs
from tests.archs import tiny_model

AXOLOTL_LLAMA3 = """\
adapter: lora
lora_model_dir:
lora_r: 32
lora_alpha: 16
lora_dropout: 0.05
lora_target_linear: true
lora_fan_in_fan_out:
"""

LORA_SECTION = """\
lora:
  r: 32
  lora_alpha: 16
  lora_dropout: 0.1
  target_modules:
    - q_proj
    - v_proj
    - k_proj
    - o_proj
    - up_proj
    - down_proj
    - gate_proj
  fan_in_fan_out: false
  modules_to_save: null
  layers_to_transform: null
  layers_pattern: null
"""

AXOLOTL_FULL = """\
base_model: meta-llama/Meta-Llama-3-8B
adapter: qlora
load_in_4bit: true
lora_r: 8
lora_alpha: 16
lora_target_modules: [q_proj, v_proj]
peft_layers_to_transform: [0, 1]
sequence_len: 1024
micro_batch_size: 2
gradient_accumulation_steps: 4
num_epochs: 2
learning_rate: 2e-4
lr_scheduler: cosine
warmup_ratio: 0.05
weight_decay: 0.01
optimizer: paged_adamw_8bit
gradient_checkpointing: true
seed: 3407
train_on_inputs: false
bf16: auto
datasets:
  - path: mhenrichsen/alpaca_2k_test
    type: alpaca
wandb_project: demo
"""


def test_axolotl_reference_example():
    result = load_settings(AXOLOTL_LLAMA3)
    assert result.form == "axolotl"
    assert result.unknown_keys == {"lora_model_dir": None}  # kept aside, not dropped
    lora = result.settings.lora
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.target_modules) == (32, 16, 0.05, "all-linear")
    assert lora.fan_in_fan_out is False  # empty value = default
    assert result.settings.quant.load_in == "none"
    assert result.settings.lora == get_preset("axolotl-llama3").lora


def test_axolotl_full_file_maps_every_key_and_keeps_the_rest():
    result = load_settings(AXOLOTL_FULL)
    kit = result.settings
    assert kit.model_name_or_path == "meta-llama/Meta-Llama-3-8B" and kit.quant.load_in == "4bit"
    assert (kit.lora.r, kit.lora.target_modules, kit.lora.layers_to_transform) == (8, ["q_proj", "v_proj"], [0, 1])
    train = kit.train
    assert (train.max_seq_length, train.per_device_train_batch_size, train.gradient_accumulation_steps) == (1024, 2, 4)
    assert (train.num_train_epochs, train.learning_rate, train.lr_scheduler_type) == (2, 2e-4, "cosine")
    assert (train.warmup_ratio, train.weight_decay, train.optim, train.seed) == (0.05, 0.01, "paged_adamw_8bit", 3407)
    assert train.gradient_checkpointing and train.train_on_responses_only and train.precision == "auto"
    assert set(result.unknown_keys) == {"datasets", "wandb_project"}


def test_lora_section_reference_example():
    result = load_settings(LORA_SECTION)
    assert result.form == "lora" and result.unknown_keys == {}
    assert result.settings.lora == get_preset("lora-section").lora


def test_pyyaml_reads_2e4_as_text_and_the_kit_reads_a_number():
    assert yaml.safe_load("learning_rate: 2e-4")["learning_rate"] == "2e-4"
    assert load_settings("train:\n  learning_rate: 2e-4\n").settings.train.learning_rate == 2e-4


ROUND_TRIP = {
    "kit": KitSettings(model_name_or_path="m", lora=LoraSettings(r=4, bias="all", init_lora_weights="pissa",
                                                                  layers_to_transform=[0], target_modules=["q_proj"]),
                       quant=QuantSettings(bnb_4bit_quant_type="fp4"),
                       train=TrainSettings(eval_steps=5, precision="bf16", warmup_steps=3)),
    "axolotl": KitSettings(model_name_or_path="m", lora=LoraSettings(r=8, lora_dropout=0.0, use_dora=True,
                                                                      target_modules=["q_proj", "v_proj"],
                                                                      layers_to_transform=[1], layers_pattern="layers"),
                           quant=QuantSettings(load_in="8bit"),
                           train=TrainSettings(num_train_epochs=2.5, optim="adamw_8bit", precision="fp32",
                                               train_on_responses_only=False, save_steps=50, group_by_length=False)),
    "lora": KitSettings(lora=LoraSettings(r=4, lora_alpha=8, bias="lora_only", use_rslora=True,
                                          modules_to_save=["lm_head"], target_modules=["k_proj", "q_proj"],
                                          init_lora_weights="loftq", loftq_bits=2),
                        quant=QuantSettings(load_in="none")),
    "peft": KitSettings(model_name_or_path="org/model",
                        lora=LoraSettings(r=4, lora_dropout=0.2, target_modules=["k_proj", "q_proj"],
                                          layers_to_transform=[1], layers_pattern="layers", use_dora=True)),
}


@pytest.mark.parametrize("form", FORMS)
def test_round_trip_gives_equal_settings(form, tmp_path):
    original = ROUND_TRIP[form]
    path = tmp_path / ("adapter_config.json" if form == "peft" else "settings.yaml")
    assert save_settings(original, path, form=form) == []
    result = load_settings(path)
    assert (result.form, result.unknown_keys) == (form, {})
    assert result.settings == original
    assert os.listdir(tmp_path) == [path.name]  # the temporary file was renamed, nothing left behind


@pytest.mark.parametrize("form", FORMS)
def test_default_settings_round_trip_in_every_form(form):
    assert load_settings(dump_settings(KitSettings(), form)).settings == KitSettings()


def test_axolotl_peft_keys_and_lists(tmp_path):
    text = "adapter: lora\nlora_r: 8\npeft_layers_to_transform: [0]\npeft_layers_pattern: [h]\npeft:\n  loftq_config: {loftq_bits: 2}\n"
    lora = load_settings(text).settings.lora
    assert (lora.layers_pattern, lora.init_lora_weights, lora.loftq_bits) == ("h", "loftq", 2)
    one = KitSettings(lora=LoraSettings(target_modules=["q_proj"], layers_to_transform=1))
    assert "peft_layers_to_transform: [1]\n" in dump_settings(one, "axolotl")
    assert save_settings(one, tmp_path / "a.yaml", "axolotl") == []  # [1] means 1
    loftq = KitSettings(lora=LoraSettings(init_lora_weights="loftq", loftq_bits=8), quant=QuantSettings(load_in="none"))
    assert load_settings(dump_settings(loftq, "axolotl")).settings == loftq


def test_lost_settings_are_reported(tmp_path):
    kit = KitSettings(lora=LoraSettings(bias="all"), quant=QuantSettings(load_in="none"),
                      train=TrainSettings(seed=1))
    assert save_settings(kit, tmp_path / "kit.yaml", form="kit") == []
    assert save_settings(kit, tmp_path / "lora.yaml", form="lora") == ["quant.load_in='none'", "train.seed=1"]
    assert save_settings(kit, tmp_path / "axolotl.yaml", form="axolotl") == ["lora.bias='all'"]


def test_kit_yaml_has_a_help_comment_above_every_key():
    text = dump_settings(KitSettings(), "kit")
    lines = text.splitlines()
    specs = {s.name: s for cls in (LoraSettings, QuantSettings, TrainSettings) for s in field_specs(cls)}
    for index, line in enumerate(lines):
        key = line.strip().split(":")[0]
        if key in specs and not line.strip().startswith("#"):
            block = []
            while lines[index - 1 - len(block)].strip().startswith("#"):
                block.insert(0, lines[index - 1 - len(block)].strip().removeprefix("# "))
            comment = " ".join(block)
            assert comment.startswith(specs[key].help[:30]) and "(type: " in comment, line
            assert comment.endswith(f"default: {specs[key].default!r})"), line
    assert "  # LoRA rank: the inner size" in text and "(type: int, default: 16)" in text
    assert "(type: 'none' | 'all' | 'lora_only', default: 'none')" in text.replace("\n  # ", " ")


def test_peft_form_is_a_valid_adapter_config(tmp_path):
    kit = ROUND_TRIP["peft"]
    save_settings(kit, tmp_path / "adapter_config.json", form="peft")
    config = peft.LoraConfig.from_pretrained(str(tmp_path))
    assert config.base_model_name_or_path == "org/model"
    config.base_model_name_or_path = None
    assert config == kit.to_peft()


def test_reads_an_adapter_config_written_by_peft(tmp_path):
    model = tiny_model("llama")
    peft_model = peft.get_peft_model(model, LoraSettings(r=4, target_modules=["q_proj", "v_proj"]).to_peft())
    peft_model.save_pretrained(str(tmp_path))
    result = load_settings(tmp_path / "adapter_config.json")
    assert result.form == "peft" and result.unknown_keys == {}
    assert (result.settings.lora.r, result.settings.lora.target_modules) == (4, ["q_proj", "v_proj"])


def test_peft_keys_the_kit_lacks_are_kept_aside():
    data = json.loads(dump_settings(KitSettings(), "peft"))
    data |= {"layer_replication": [[0, 2], [1, 2]], "use_qalora": True, "exclude_modules": None}
    result = load_settings(json.dumps(data))
    assert result.unknown_keys == {"layer_replication": [[0, 2], [1, 2]], "use_qalora": True}


@pytest.mark.parametrize("lora", [
    LoraSettings(),
    LoraSettings(r=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[0], layers_pattern="layers",
                 bias="lora_only", use_dora=True, init_lora_weights="olora"),
    LoraSettings(init_lora_weights="loftq", loftq_bits=8),
])
def test_python_snippet_rebuilds_the_same_config(lora):
    namespace: dict = {}
    exec(to_python(KitSettings(lora=lora)), namespace)
    assert namespace["lora_config"] == lora.to_peft()


def test_python_snippet_with_a_model_names_the_layers():
    code = to_python(LoraSettings(layers_to_transform=[1]), model=tiny_model("llama"))
    assert "'q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'" in code


@pytest.mark.parametrize("text,error,match", [
    ("lora: [unclosed", ConfigFileError, "not valid YAML"),
    ("- a\n- b\n", ConfigFileError, "must be a mapping"),
    ("hello: world\n", ConfigFileError, "cannot tell the settings form"),
    ("lora_r: abc\n", SettingsError, "lora_r must be an integer between 1 and 1024, got 'abc'"),
    ("adapter: ia3\n", SettingsError, "adapter must be one of 'lora', 'qlora', None, got 'ia3'"),
    ("lora_target_modules: q_proj\n", SettingsError, "lora_target_modules 'q_proj' is one text"),
    ("load_in_4bit: true\nload_in_8bit: true\n", SettingsError, "both true"),
    ("lora:\n  r: 0\n", SettingsError, "lora.r must be an integer"),
    ("train:\n  seed: x\n", SettingsError, "train.seed must be an integer"),
    ('{"peft_type": "IA3"}', ConfigFileError, "peft_type must be 'LORA'"),
])
def test_bad_files_name_the_key_and_value(text, error, match):
    with pytest.raises(error, match=match):
        load_settings(text)


def test_missing_file_and_unknown_form(tmp_path):
    with pytest.raises(ConfigFileError, match="cannot read settings file"):
        load_settings(tmp_path / "none.yaml")
    with pytest.raises(ConfigFileError, match="cannot read"):
        load_settings("missing.yaml")
    with pytest.raises(SettingsError, match="form must be one of kit, axolotl, lora, peft"):
        save_settings(KitSettings(), tmp_path / "x.yaml", form="toml")
    with pytest.raises(SettingsError):
        save_settings(KitSettings(lora=LoraSettings(r=0)), tmp_path / "x.yaml")
    assert not (tmp_path / "x.yaml").exists()


def test_save_replaces_an_existing_file(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("old")
    save_settings(get_preset("demo-cpu"), path)
    assert load_settings(str(path)).settings == get_preset("demo-cpu")


def test_detect_form():
    assert detect_form({"peft_type": "LORA"}) == "peft"
    assert detect_form({"train": {}}) == "kit"
    assert detect_form({"lora": {}}) == "lora"
    assert detect_form({"lora_r": 8}) == "axolotl"


KEYS = st.sampled_from(["adapter", "lora_r", "lora_alpha", "lora_target_modules", "lora_target_linear",
                        "load_in_4bit", "learning_rate", "lora", "train", "quant", "peft_type", "r",
                        "target_modules", "model_name_or_path", "base_model", "bf16", "x"])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 5000), st.floats(allow_nan=True),
                    st.text(max_size=6), st.sampled_from(["LORA", "lora", "qlora", "all-linear", "auto", "2e-4"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(KEYS, inner, max_size=4)), max_leaves=8)


@hyp_settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(KEYS, VALUES, max_size=6))
def test_reading_any_mapping_raises_only_kit_errors(data):
    try:
        result = load_settings(json.dumps(data, default=str) if data else "{}")
    except LoraNbError:
        return
    assert result.settings.problems(check_environment=False) == []


@hyp_settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=st.sampled_from(list("abr_: \n-[]{}'\"#0123456789.,!&*?|>\t")), max_size=60))
def test_reading_any_text_raises_only_kit_errors(text):
    try:
        load_settings(text if "\n" in text or not text.strip() else text + "\n")
    except LoraNbError:
        pass
