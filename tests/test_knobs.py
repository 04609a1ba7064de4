"""Every knob round-trips through every settings form that can carry it, and counts as peft counts.

A knob is one field of :mod:`lora_nb.settings`; which forms carry it is read from its metadata (``peft``:
the ``lora:`` and peft JSON forms and the Python export; ``axolotl``: an axolotl key). A form that cannot
carry it must say so (``lost_in_form``), never drop it silently.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
import transformers

from lora_nb import formats
from lora_nb.estimate import count_trainable
from lora_nb.formats import FORMATS, FORMS, Format, dump_settings, load_settings, lost_in_form
from lora_nb.settings import KitSettings, QuantSettings, field_specs
from lora_nb.targets import find_targets
from tests.archs import ARCHS, tiny_model

# knob -> the overrides that set it to a value other than its default (with what it needs beside it)
KNOBS = {
    "rank_pattern": {"lora.rank_pattern": {"q_proj": 8, "down_proj": 4}},
    "alpha_pattern": {"lora.alpha_pattern": {"v_proj": 64}},
    "exclude_modules": {"lora.exclude_modules": ["down_proj", "o_proj"]},
    "target_parameters": {"lora.target_parameters": ["mlp.experts.gate_up_proj"], "lora.lora_dropout": 0.0},
    "trainable_token_indices": {"lora.trainable_token_indices": {"embed_tokens": [3, 5, 7]}},
    "lora_bias": {"lora.lora_bias": True},
    "ensure_weight_tying": {"lora.ensure_weight_tying": True},
    "loraplus_lr_ratio": {"train.loraplus_lr_ratio": 16.0},
    "loraplus_lr_embedding": {"train.loraplus_lr_embedding": 1e-5, "train.loraplus_lr_ratio": 16.0},
    **{f"init_{init}": {"lora.init_lora_weights": init}
       for init in ("gaussian", "orthogonal", "pissa", "olora", "mica", "eva", "corda")},
    "init_loftq": {"lora.init_lora_weights": "loftq", "lora.loftq_bits": 8},
}
SECTION_FORMS = {"lora": ("kit", "axolotl", "lora", "peft", "python"), "train": ("kit", "axolotl")}


def _settings(overrides: dict) -> KitSettings:
    kit = KitSettings(quant=QuantSettings(load_in="none"))
    kit.override(copy.deepcopy(overrides))
    return kit


def _carries(form: str, key: str) -> bool:
    """Whether a form can carry a knob, from the knob's metadata alone."""
    section, name = key.split(".")
    spec = next(s for s in field_specs(KitSettings().__getattribute__(section)) if s.name == name)
    return form == "kit" or (form == "axolotl" and (spec.axolotl is not None or name == "init_lora_weights")) or (
        form in ("lora", "peft", "python") and section == "lora" and spec.peft)


@pytest.mark.parametrize("form", FORMATS)
@pytest.mark.parametrize("knob", KNOBS)
def test_knob_round_trips_or_is_reported_lost(knob, form):
    overrides = KNOBS[knob]
    key = next(iter(overrides))
    section = key.split(".")[0]
    if form not in SECTION_FORMS[section]:
        pytest.skip(f"the {form} form holds LoRA settings only")
    kit = _settings(overrides)
    assert kit.problems(check_environment=False) == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on the init methods
        if form == "python":
            namespace: dict = {}
            exec(dump_settings(kit, "python"), namespace)
            assert namespace["lora_config"].to_dict() == kit.to_peft().to_dict()
            return
        lost = lost_in_form(kit, form)
        back = load_settings(dump_settings(kit, form)).settings
    value = kit.to_dict()[section][key.split(".")[1]]
    if _carries(form, key):  # (the LoRA-only forms give the other sections their defaults)
        assert not any(item.startswith(key + "=") for item in lost), lost
        assert back.to_dict()[section][key.split(".")[1]] == value
    else:  # axolotl has no key for it: said, never dropped silently
        assert any(item.startswith(key + "=") for item in lost), lost


def test_knobs_axolotl_cannot_carry_are_the_ones_without_an_axolotl_key():
    lost = {knob for knob, overrides in KNOBS.items() if not _carries("axolotl", next(iter(overrides)))}
    assert lost == {"rank_pattern", "alpha_pattern", "exclude_modules", "lora_bias"}


# knobs that change what trains, set for one architecture's own layer names
def _count_cases(model: torch.nn.Module) -> dict[str, dict]:
    names = find_targets(model).names
    first, last = names[0], names[-1]
    return {
        "rank_pattern": {"rank_pattern": {first: 4, last: 12}},
        "exclude_modules": {"exclude_modules": [last]},
        **({} if find_targets(model).fan_in_fan_out else {  # peft's parameter wrapper refuses Conv1D's layout
            "target_parameters": {"target_modules": [first], "target_parameters": [f"{last}.weight"],
                                  "lora_dropout": 0.0}}),
        "trainable_token_indices": {"trainable_token_indices": [3, 5, 7]},
        "tied tokens": {"trainable_token_indices": [3, 5], "ensure_weight_tying": True},
        "lora_bias": {"lora_bias": True},
        "mica": {"init_lora_weights": "mica", "r": 4},
        "orthogonal": {"init_lora_weights": "orthogonal"},
        "pissa": {"init_lora_weights": "pissa", "r": 4, "rank_pattern": {first: 2}},
        "olora": {"init_lora_weights": "olora", "r": 4},
        "eva": {"init_lora_weights": "eva"},
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_knob_counts_equal_peft(arch):
    cases = _count_cases(tiny_model(arch))
    for case, values in cases.items():
        model = tiny_model(arch)
        kit = KitSettings(quant=QuantSettings(load_in="none"))
        kit.override({"lora.fan_in_fan_out": arch == "gpt2", **{f"lora.{k}": v for k, v in values.items()}})
        assert kit.lora.problems(model) == [], (arch, case)
        predicted = count_trainable(model, kit.lora)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reported = peft.get_peft_model(model, kit.lora.to_peft(model)).get_nb_trainable_parameters()
        assert predicted == reported, (arch, case)


def test_loraplus_optimizer_is_peft_own():
    model = tiny_model("llama")
    kit = _settings(KNOBS["loraplus_lr_ratio"])
    wrapped = peft.get_peft_model(model, kit.to_peft(model))
    args = kit.to_training_args("/tmp/unused", use_cpu=True)
    optimizer = kit.train.make_optimizer(wrapped, args)
    lrs = {g["lr"] for g in optimizer.param_groups if g["params"]}
    assert lrs == {kit.train.learning_rate, kit.train.learning_rate * 16.0}
    assert KitSettings().train.make_optimizer(wrapped, args) is None  # no ratio: the Trainer builds its own


@pytest.mark.parametrize("overrides,words", [
    ({"lora.rank_pattern": {"q_proj": 0}}, "rank_pattern must be"),
    ({"lora.exclude_modules": [" "]}, "exclude_modules holds an empty name"),
    ({"lora.target_parameters": ["mlp.experts.gate_up_proj"]}, "needs lora_dropout 0"),
    ({"lora.target_parameters": ["c_fc.weight"], "lora.lora_dropout": 0.0, "lora.fan_in_fan_out": True},
     "cannot be used with fan_in_fan_out"),
    ({"lora.init_lora_weights": "orthogonal", "lora.r": 5}, "needs even ranks, got [5]"),
    ({"lora.trainable_token_indices": [-1]}, "trainable_token_indices must be"),
    ({"train.loraplus_lr_ratio": 0.5}, "loraplus_lr_ratio must be"),
    ({"lora.lora_bias": True, "lora.use_dora": True}, "lora_bias=True is not supported for DoRA"),
])
def test_bad_knob_values_are_named(overrides, words):
    problems = _settings(overrides).problems(check_environment=False)
    assert any(words in p for p in problems), problems


def test_data_driven_inits_are_refused_for_training():
    problems = _settings(KNOBS["init_eva"]).problems()
    assert any("pass over the training data" in p for p in problems), problems


def test_mica_rank_larger_than_a_weight_is_named():
    problems = _settings({"lora.init_lora_weights": "mica", "lora.r": 16}).lora.problems(tiny_model("gemma"))
    assert any("'mica' needs a rank of at most the smaller side" in p and "k_proj (8 x 32)" in p for p in problems)
    assert _settings({"lora.init_lora_weights": "pissa", "lora.r": 16}).lora.problems(tiny_model("gemma"))


def test_knob_keys_that_match_no_layer_are_named():
    problems = _settings({"lora.rank_pattern": {"qq_proj": 8}}).lora.problems(tiny_model("llama"))
    assert any("rank_pattern keys ['qq_proj'] match no adaptable layer" in p for p in problems), problems


def test_a_new_format_is_one_entry(monkeypatch, tmp_path):
    """A form added to the registry is written, saved and shown as a configurator export tab."""
    from lora_nb.widgets import LoraConfigurator

    entry = Format("toml", "TOML", "configured.toml", lambda s, model: f'r = {s.lora.r}\n')
    monkeypatch.setitem(formats.FORMATS, "toml", entry)
    assert dump_settings(KitSettings(), "toml") == "r = 16\n"
    conf = LoraConfigurator(run_dir=tmp_path)
    assert conf.save("toml") == tmp_path / "configured.toml" and (tmp_path / "configured.toml").read_text() == "r = 16\n"
    assert "toml" in conf.export_tab.texts and "Save TOML" in conf.export_tab.save_buttons["toml"].description
    assert "toml" not in FORMS  # written only: no reader


def test_expert_parameters_count_equals_peft():
    """target_parameters on the fused 3-D expert weights of a tiny mixture-of-experts model."""
    config = transformers.Qwen3MoeConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=8, intermediate_size=64,
                                         moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                                         max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    kit = _settings({"lora.r": 4, "lora.target_modules": ["q_proj"], "lora.lora_dropout": 0.0,
                     "lora.target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                     "lora.rank_pattern": {"down_proj": 2}})
    assert kit.lora.problems(model) == []
    predicted = count_trainable(model, kit.lora)
    assert predicted == peft.get_peft_model(model, kit.lora.to_peft(model)).get_nb_trainable_parameters()


def test_loraplus_embedding_knob_is_disabled_without_the_ratio():
    from lora_nb.widgets import inactive_reasons

    assert ("train", "loraplus_lr_embedding") in inactive_reasons(KitSettings())
    assert ("train", "loraplus_lr_embedding") not in inactive_reasons(_settings(KNOBS["loraplus_lr_ratio"]))


def test_loraplus_optimizer_trains_through_the_trainer(tmp_path):
    """The hook train.py needs: ``optimizers=(settings.train.make_optimizer(model, args), None)``."""
    kit = _settings({**KNOBS["loraplus_lr_ratio"], "train.max_steps": 1, "train.per_device_train_batch_size": 2,
                     "train.save_steps": None, "train.precision": "fp32"})
    model = peft.get_peft_model(tiny_model("llama"), kit.to_peft(tiny_model("llama")))
    args = kit.to_training_args(str(tmp_path), use_cpu=True)
    optimizer = kit.train.make_optimizer(model, args)
    rows = [{"input_ids": torch.tensor([1, 5, 6, 7]), "labels": torch.tensor([1, 5, 6, 7])}] * 2
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, optimizers=(optimizer, None))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    trainer.train()
    assert trainer.optimizer.optimizer is optimizer  # (accelerate wraps it)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)
