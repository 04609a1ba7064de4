"""Settings: field specs, validation (every field's bad values), advice, conversions to real library objects, presets."""

from __future__ import annotations

import math
import typing

import peft
import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings as hyp_settings, strategies as st

from lora_nb import settings as settings_module
from lora_nb.errors import LoraNbError, SettingsError
from lora_nb.presets import PRESETS, get_preset
from lora_nb.settings import (
    SECTIONS, FieldSpec, KitSettings, LoraSettings, QuantSettings, TrainSettings, field_specs, value_problems,
)
from tests.archs import EXPECTED_NAMES, tiny_model

ALL_SPECS = [(section, spec) for section, cls in SECTIONS.items() for spec in field_specs(cls)]


def _bad_values(spec: FieldSpec) -> list[typing.Any]:
    """Values that must be refused for this field: a wrong type, and values just outside the range or choices."""
    bad: list[typing.Any] = [{"not": "valid"}]
    if spec.min is not None:
        bad.append(spec.min - 1 if spec.type is int or typing.get_origin(spec.type) else spec.min / 2 - 1)
    if spec.max is not None:
        bad.append(spec.max + 1 if spec.type is int else spec.max * 2)
    if spec.choices:
        bad.append("no-such-choice" if isinstance(spec.choices[0], str) else 3)
    if spec.type is float:
        bad += [math.nan, "fast"]
    if spec.type is int:
        bad += [1.5, True]
    return bad


def test_defaults_are_valid():
    assert KitSettings().problems(check_environment=False) == []


@pytest.mark.parametrize("section,spec", ALL_SPECS, ids=[f"{s}.{f.name}" for s, f in ALL_SPECS])
def test_every_field_has_a_spec_and_its_default_passes(section, spec):
    assert spec.help and spec.group
    assert value_problems(SECTIONS[section], spec.name, spec.default) == []
    if spec.recommended:
        low, high = spec.recommended
        assert (spec.min is None or low >= spec.min) and (spec.max is None or high <= spec.max)


@pytest.mark.parametrize("section,spec", ALL_SPECS, ids=[f"{s}.{f.name}" for s, f in ALL_SPECS])
def test_every_field_refuses_bad_values(section, spec):
    for bad in _bad_values(spec):
        kit = KitSettings()
        setattr(getattr(kit, section), spec.name, bad)
        with pytest.raises(SettingsError) as err:
            kit.check(check_environment=False)
        assert len(err.value.problems) == 1
        assert err.value.problems[0].startswith(f"{section}.{spec.name} must be "), err.value.problems
        assert repr(bad) in err.value.problems[0]


def test_choices_come_from_literal_types():
    specs = {s.name: s for s in field_specs(LoraSettings)}
    assert specs["bias"].choices == ("none", "all", "lora_only")
    peft_inits = {a for arg in typing.get_args(typing.get_type_hints(peft.LoraConfig)["init_lora_weights"])
                  for a in typing.get_args(arg)}  # the Literal names of the installed peft
    assert specs["init_lora_weights"].choices[0] == "default"  # peft's True
    assert set(specs["init_lora_weights"].choices[1:]) <= peft_inits
    assert {"gaussian", "pissa", "olora", "loftq", "eva", "corda"} <= set(specs["init_lora_weights"].choices)
    assert specs["layers_to_transform"].optional and not specs["r"].optional
    assert specs["target_modules"].type_name == "'all-linear' | list[str]"
    assert {s.name: s.choices for s in field_specs(QuantSettings)}["load_in"] == ("4bit", "8bit", "none")


@pytest.mark.parametrize("value,expected", [
    (0, "r must be an integer between 1 and 1024, got 0"),
    ("abc", "r must be an integer between 1 and 1024, got 'abc'"),
    (8.0, "r must be an integer between 1 and 1024, got 8.0"),
])
def test_r_messages_name_field_value_and_range(value, expected):
    assert LoraSettings(r=value).problems()[0].startswith(expected)


def test_all_problems_are_collected_into_one_error():
    kit = KitSettings(lora=LoraSettings(r=0, lora_dropout=2.0), train=TrainSettings(seed=-1))
    with pytest.raises(SettingsError) as err:
        kit.check(check_environment=False)
    assert [p.split(" ")[0] for p in err.value.problems] == ["lora.r", "lora.lora_dropout", "train.seed"]
    assert str(err.value).startswith("3 problems in the settings:")


def test_empty_target_list_and_both_warmups_are_problems():
    assert "empty list" in LoraSettings(target_modules=[]).problems()[0]
    assert "both set" in TrainSettings(warmup_steps=5, warmup_ratio=0.1).problems()[0]


def test_peft_refusals_come_back_in_the_kits_error():
    problems = LoraSettings(target_modules=["q_proj"], layers_pattern="layers").problems()
    assert len(problems) == 1 and problems[0].startswith("peft refused the LoRA settings")
    with pytest.raises(SettingsError, match="layers_to_transform"):
        LoraSettings(target_modules=["q_proj"], layers_pattern="layers").to_peft()


# --- checks against a model -------------------------------------------------------------------------------------


def test_misspelled_target_is_caught_and_lists_the_models_names():
    problems = LoraSettings(target_modules=["q_proj", "v_prj"]).problems(tiny_model("llama"))
    assert len(problems) == 1
    assert "['v_prj'] not found" in problems[0] and "silently" in problems[0]
    assert str(EXPECTED_NAMES["llama"] + ["lm_head"]) in problems[0]


def test_layer_indices_outside_the_model():
    problems = LoraSettings(target_modules=["q_proj"], layers_to_transform=[1, 2]).problems(tiny_model("llama"))
    assert problems == ["layers_to_transform [2] outside the model's blocks 0 to 1"]


@pytest.mark.parametrize("arch,wrong", [("gpt2", False), ("llama", True)])
def test_fan_in_fan_out_must_match_the_layer_type(arch, wrong):
    problems = LoraSettings(fan_in_fan_out=wrong).problems(tiny_model(arch))
    assert len(problems) == 1 and problems[0].startswith(f"fan_in_fan_out must be {not wrong} for this model")


def test_layers_pattern_written_as_a_path_regex_matches_nothing():
    # The lora-section reference suggests "transformer\\.h\\.\\d+\\.attn"; peft wants the list's name ("h").
    lora = LoraSettings(fan_in_fan_out=True, target_modules=["c_attn"], layers_to_transform=[0],
                        layers_pattern=r"transformer\.h\.\d+\.attn")
    problems = lora.problems(tiny_model("gpt2"))
    assert len(problems) == 1 and "its blocks are in 'h'" in problems[0]
    lora.layers_pattern = "h"
    assert lora.problems(tiny_model("gpt2")) == []


def test_unknown_modules_to_save():
    assert LoraSettings(modules_to_save=["lm_hed"]).problems(tiny_model("llama")) == [
        "modules_to_save ['lm_hed'] not found in the model: remove them, or use names of its modules (e.g. ['lm_head'])"]


def test_valid_settings_pass_against_every_kind_of_model():
    assert LoraSettings(target_modules=["lm_head"], modules_to_save=["model.embed_tokens"]).problems(
        tiny_model("llama")) == []
    assert LoraSettings(fan_in_fan_out=True, layers_to_transform=1).problems(tiny_model("gpt2")) == []
    assert LoraSettings(target_modules=["qkv_proj"], layers_to_transform=[0]).problems(tiny_model("phi3")) == []


# --- environment --------------------------------------------------------------------------------------------------


def _no_gpu(monkeypatch, missing=()):
    monkeypatch.setattr(settings_module, "cuda_available", lambda: False)
    monkeypatch.setattr(settings_module, "bf16_supported", lambda: False)
    monkeypatch.setattr(settings_module, "has_package", lambda name: name not in missing)


def test_loftq_needs_cuda_and_scipy_and_an_unquantized_model(monkeypatch):
    _no_gpu(monkeypatch, missing=("scipy",))
    kit = KitSettings(lora=LoraSettings(init_lora_weights="loftq"), quant=QuantSettings(load_in="4bit"))
    assert "quantizes the base model itself" in kit.problems()[0]
    kit.quant.load_in = "none"
    problems = kit.problems()
    assert "needs a CUDA GPU (peft computes LoftQ on cuda)" in problems[0]
    assert "scipy" in problems[1]


def test_quantization_and_8bit_optimizers_need_bitsandbytes(monkeypatch):
    _no_gpu(monkeypatch, missing=("bitsandbytes",))
    kit = KitSettings(quant=QuantSettings(load_in="8bit"), train=TrainSettings(optim="paged_adamw_8bit"))
    problems = kit.problems()
    assert len(problems) == 2 and all("bitsandbytes" in p for p in problems)
    assert kit.problems(check_environment=False) == []


def test_fp16_needs_a_gpu(monkeypatch):
    _no_gpu(monkeypatch)
    assert KitSettings(quant=QuantSettings(load_in="none"), train=TrainSettings(precision="fp16")).problems() == [
        "train.precision 'fp16' needs a CUDA GPU: use 'auto', 'bf16' or 'fp32' on CPU"]


# --- advice -------------------------------------------------------------------------------------------------------


def test_advice_flags_unusual_but_allowed_values():
    assert LoraSettings().advice() == []
    tips = LoraSettings(r=256, lora_alpha=16, lora_dropout=0.3).advice()
    assert [t.split(" ")[0] for t in tips] == ["lora_alpha", "lora_dropout", "r"]
    assert TrainSettings(learning_rate=5e-3, num_train_epochs=5).advice()[0].startswith("learning_rate 0.005")
    assert "num_train_epochs 5 > 3" in TrainSettings(num_train_epochs=5).advice()[0]
    assert [t.split(" has ")[0] for t in TrainSettings(num_train_epochs=5, max_steps=20).advice()] == [
        "num_train_epochs 5"]  # max_steps decides: the epochs are ignored, and the advice says so
    assert LoraSettings(r=16, lora_alpha=4, use_rslora=True).advice() == []  # alpha/sqrt(r) = 1


# --- conversions --------------------------------------------------------------------------------------------------


def test_to_peft_maps_every_field():
    lora = LoraSettings(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], bias="lora_only",
                        modules_to_save=["lm_head"], layers_to_transform=[0], layers_pattern="layers",
                        use_rslora=True, use_dora=True, init_lora_weights="gaussian")
    config = lora.to_peft()
    assert isinstance(config, peft.LoraConfig)
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias) == (8, 16, 0.1, "lora_only")
    assert config.target_modules == {"q_proj", "v_proj"} and config.modules_to_save == ["lm_head"]
    assert (config.layers_to_transform, config.layers_pattern) == ([0], "layers")
    assert config.use_rslora and config.use_dora and config.init_lora_weights == "gaussian"
    assert config.task_type == "CAUSAL_LM"
    assert LoraSettings().to_peft().init_lora_weights is True
    assert LoraSettings().to_peft().target_modules == "all-linear"


def test_loftq_builds_peft_loftq_config():
    config = LoraSettings(init_lora_weights="loftq", loftq_bits=8).to_peft()
    assert config.init_lora_weights == "loftq" and config.loftq_config["loftq_bits"] == 8


def test_all_linear_with_layers_needs_and_uses_the_model():
    lora = LoraSettings(layers_to_transform=[1])
    with pytest.raises(SettingsError, match="needs the model"):
        lora.to_peft()
    assert lora.problems() == []  # checked once a model is known
    model = tiny_model("gpt2")
    config = LoraSettings(layers_to_transform=[1], fan_in_fan_out=True).to_peft(model)
    assert config.target_modules == set(EXPECTED_NAMES["gpt2"])
    peft_model = peft.get_peft_model(model, config)
    adapted = {n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted and all(".h.1." in n for n in adapted)


@pytest.mark.parametrize("use_rslora,scale", [(False, 32 / 16), (True, 32 / 4)])
def test_real_peft_model_gets_rank_and_scale(use_rslora, scale):
    model = peft.get_peft_model(tiny_model("llama"), LoraSettings(use_rslora=use_rslora).to_peft())
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.lora_A["default"].weight.shape == (16, 32)
    assert q.scaling["default"] == pytest.approx(scale)


def test_to_bnb():
    assert QuantSettings(load_in="none").to_bnb() is None
    four = QuantSettings(bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False,
                         bnb_4bit_compute_dtype="float16").to_bnb()
    assert isinstance(four, transformers.BitsAndBytesConfig) and four.load_in_4bit
    assert (four.bnb_4bit_quant_type, four.bnb_4bit_use_double_quant) == ("fp4", False)
    assert four.bnb_4bit_compute_dtype == torch.float16
    assert QuantSettings(load_in="8bit").to_bnb().load_in_8bit


def test_to_training_args_on_cpu(tmp_path, monkeypatch):
    _no_gpu(monkeypatch)
    train = TrainSettings(learning_rate=1e-3, warmup_ratio=0.1, max_steps=20, per_device_train_batch_size=8,
                          eval_steps=5, save_steps=10, save_total_limit=2, gradient_checkpointing=True, seed=7)
    args = train.to_training_args(str(tmp_path))
    assert isinstance(args, transformers.TrainingArguments)
    assert args.use_cpu and not args.bf16 and not args.fp16  # auto -> fp32 without a GPU
    assert (args.learning_rate, args.max_steps, args.per_device_train_batch_size) == (1e-3, 20, 8)
    assert args.warmup_steps == 0.1  # transformers 5: a float below 1 is a ratio
    assert (args.eval_strategy, args.eval_steps, args.save_strategy, args.save_steps) == ("steps", 5, "steps", 10)
    assert (args.seed, args.data_seed, args.save_total_limit) == (7, 7, 2)
    assert args.remove_unused_columns is False and args.report_to == []
    assert args.train_sampling_strategy == "group_by_length"
    # the old names: the only ones before transformers renamed them (5.17), an alias after (5.24)
    assert args.gradient_checkpointing and args.gradient_checkpointing_kwargs == {"use_reentrant": False}


def test_to_training_args_precision_and_overrides(tmp_path, monkeypatch):
    _no_gpu(monkeypatch)
    args = KitSettings(train=TrainSettings(precision="bf16", group_by_length=False)).to_training_args(
        str(tmp_path), logging_steps=3)
    assert args.bf16 and args.logging_steps == 3 and args.train_sampling_strategy == "random"
    assert args.save_strategy == "steps" and (args.save_steps, args.save_total_limit) == (50, 2)
    assert args.eval_strategy == "no"
    no_saves = TrainSettings(save_steps=None).to_training_args(str(tmp_path))
    assert no_saves.save_strategy == "no"
    monkeypatch.setattr(settings_module, "bf16_supported", lambda: True)
    assert TrainSettings().resolved_precision() == "bf16"
    with pytest.raises(SettingsError, match="transformers refused"):
        TrainSettings().to_training_args(str(tmp_path), no_such_argument=1)


# --- dicts --------------------------------------------------------------------------------------------------------


def test_dict_round_trip_and_numeric_text():
    kit = KitSettings(lora=LoraSettings(r=8, target_modules=["q_proj"]), train=TrainSettings(eval_steps=5))
    assert KitSettings.from_dict(kit.to_dict()) == kit
    assert KitSettings.from_dict({"train": {"learning_rate": "2e-4"}}).train.learning_rate == 2e-4


@pytest.mark.parametrize("data,match", [
    ([1, 2], "must be a mapping"),
    ({"lora": 3}, "lora must be a mapping"),
    ({"lora": {"rank": 8}}, r"unknown lora keys \['rank'\]"),
    ({"modle": "x"}, r"unknown settings keys \['modle'\]"),
])
def test_from_dict_refuses_bad_shapes(data, match):
    with pytest.raises(SettingsError, match=match):
        KitSettings.from_dict(data)


values = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8),
                   st.lists(st.one_of(st.integers(), st.text(max_size=5)), max_size=3),
                   st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@hyp_settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(ALL_SPECS), values)
def test_validator_never_raises_anything_but_the_kits_errors(section_spec, value):
    section, spec = section_spec
    kit = KitSettings()
    setattr(getattr(kit, section), spec.name, value)
    assert all(isinstance(p, str) for p in kit.problems(check_environment=False))
    try:
        kit.check(check_environment=False)
        kit.advice()
    except LoraNbError:
        pass


# --- presets ------------------------------------------------------------------------------------------------------


def test_presets_are_valid_and_faithful():
    for name, preset in PRESETS.items():
        assert preset.description and preset.settings.problems(check_environment=False) == [], name
    demo = get_preset("demo-cpu")
    assert (demo.lora.r, demo.lora.lora_alpha, demo.lora.lora_dropout, demo.lora.target_modules) == (
        16, 32, 0.0, "all-linear")
    assert (demo.train.learning_rate, demo.train.warmup_ratio, demo.train.max_steps, demo.train.seed) == (
        1e-3, 0.1, 12, 42)
    assert demo.quant.load_in == "none" and demo.train.per_device_train_batch_size == 8
    qlora = get_preset("qlora-walkthrough")
    assert (qlora.lora.r, qlora.lora.lora_alpha, qlora.lora.target_modules, qlora.quant.load_in) == (
        8, 32, ["q_proj", "v_proj"], "4bit")
    assert get_preset("axolotl-llama3").lora.r == 32 and get_preset("lora-section").lora.lora_dropout == 0.1


def test_get_preset_returns_a_copy_and_names_the_choices():
    get_preset("demo-cpu").lora.r = 99
    assert PRESETS["demo-cpu"].settings.lora.r == 16
    with pytest.raises(SettingsError, match="choose one of axolotl-llama3, lora-section"):
        get_preset("nope")


def test_field_specs_hand_out_copies_of_defaults():
    spec = next(s for s in field_specs(KitSettings) if s.name == "lora")
    spec.default.r = 99
    assert next(s for s in field_specs(KitSettings) if s.name == "lora").default.r == 16


@pytest.mark.gpu
def test_on_a_gpu_loftq_and_bf16_are_available():
    kit = KitSettings(lora=LoraSettings(init_lora_weights="loftq"), quant=QuantSettings(load_in="none"))
    assert kit.problems() == []
    assert TrainSettings().resolved_precision() == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    model = peft.get_peft_model(tiny_model("llama").cuda(), kit.to_peft())
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.shape == (16, 32)
