"""The configurator driven as a user drives it: set control values, click buttons, read the panel."""

from __future__ import annotations

import copy
import datetime
import json
import warnings

import ipywidgets as W
import peft
import pytest
import yaml
from transformers import AutoModelForCausalLM

from lora_nb.errors import SettingsError
from lora_nb.settings import SECTIONS, KitSettings, LoraSettings, field_specs
from lora_nb.widgets import (TAB_TITLES, LoraConfigurator, StepSlider, inactive_reasons, plot_trainable_vs_rank,
                             trainable_by_rank)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


@pytest.fixture
def conf(model):
    return LoraConfigurator(model)


def peft_count(model, config) -> int:
    """What peft itself reports after wrapping a copy of the model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(copy.deepcopy(model), config)
    return wrapped.get_nb_trainable_parameters()[0]


def open_export_tab(conf):
    conf._tabs.selected_index = TAB_TITLES.index("Export")


def test_controls_are_generated_from_the_field_specs(conf):
    for section, cls in SECTIONS.items():
        for spec in field_specs(cls):
            control = conf.controls[f"{section}.{spec.name}"]
            if spec.name not in ("target_modules", "layers_to_transform"):
                assert spec.help in getattr(control, "slider", control).tooltip
    for name in ("lora.r", "lora.lora_alpha", "train.per_device_train_batch_size"):
        assert isinstance(conf.controls[name], StepSlider)
    assert conf.controls["lora.r"].stops == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    assert conf.controls["lora.lora_alpha"].stops[-1] == 4096
    assert isinstance(conf.controls["train.learning_rate"], W.FloatLogSlider)
    assert isinstance(conf.controls["lora.bias"], W.Dropdown)
    assert [v for _, v in conf.controls["lora.bias"].options] == ["none", "all", "lora_only"]
    assert isinstance(conf.controls["lora.use_dora"], W.Checkbox)
    assert isinstance(conf.controls["train.seed"], W.BoundedIntText)  # 0 .. 2**32-1 is too wide for a slider
    assert "lora-nb-r" in conf.controls["lora.r"]._dom_classes
    assert conf.widget.children[1].children[0].titles == TAB_TITLES


def test_defaults_are_valid_and_counted_exactly(conf, model):
    assert conf.errors == []
    assert conf.settings == KitSettings()
    assert conf.trainable[0] == peft_count(model, conf.peft_config())
    assert f"{conf.trainable[0]:,}" in conf.panel.trainable_html.value
    assert "total" in conf.panel.memory_html.value and "optimizer" in conf.panel.memory_html.value


def test_moving_r_updates_settings_count_and_alpha_advice(conf, model):
    before = conf.trainable[0]
    conf.controls["lora.r"].value = 64  # alpha stays 32: scale 0.5
    assert conf.settings.lora.r == 64
    assert conf.trainable[0] == 4 * before == peft_count(model, conf.peft_config())
    assert f"{conf.trainable[0]:,}" in conf.panel.trainable_html.value
    assert any("lora_alpha / r = 0.5" in w for w in conf.warnings)
    assert "lora_alpha / r = 0.5" in conf.panel.warnings_html.value
    conf.controls["lora.lora_alpha"].value = 128
    assert not any("lora_alpha / r" in w for w in conf.warnings)


def test_apply_wraps_the_model_with_the_chosen_adapter(conf, model):
    conf.controls["lora.r"].value = 4
    conf.targets_tab.buttons[1].click()  # q + v
    wrapped = conf.apply(copy.deepcopy(model))
    assert wrapped.get_nb_trainable_parameters()[0] == conf.trainable[0]
    assert isinstance(conf.peft_config(), peft.LoraConfig)


def test_target_buttons_and_boxes(conf, model):
    assert conf.targets_tab.all_linear.value and all(b.value and b.disabled for b in conf.targets_tab.boxes.values())
    conf.targets_tab.buttons[1].click()  # q + v
    assert conf.settings.lora.target_modules == ["q_proj", "v_proj"]
    assert [n for n, b in conf.targets_tab.boxes.items() if b.value] == ["q_proj", "v_proj"]
    assert not conf.targets_tab.all_linear.value
    conf.targets_tab.boxes["o_proj"].value = True
    assert conf.settings.lora.target_modules == ["q_proj", "v_proj", "o_proj"]
    assert conf.trainable[0] == peft_count(model, conf.peft_config())
    conf.targets_tab.buttons[0].click()  # attention only
    assert conf.settings.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    conf.targets_tab.all_linear.value = True
    assert conf.settings.lora.target_modules == "all-linear"


def test_no_target_is_an_error_in_the_panel_not_an_exception(conf):
    conf.targets_tab.buttons[1].click()
    conf.targets_tab.boxes["q_proj"].value = False
    conf.targets_tab.boxes["v_proj"].value = False
    assert any("empty list" in e for e in conf.errors)
    assert "empty list" in conf.panel.errors_html.value
    assert "n/a" in conf.panel.trainable_html.value
    with pytest.raises(SettingsError, match="empty list"):
        conf.settings


def test_layer_selector_sets_layers_to_transform(conf, model):
    conf.targets_tab.every_block.value = False
    assert any("no block selected" in e for e in conf.errors)
    conf.targets_tab.blocks.value = (1,)
    assert conf.settings.lora.layers_to_transform == [1]
    assert conf.errors == []
    # all-linear with layer indices: expanded to names (peft refuses the string form), counted exactly
    assert conf.trainable[0] == peft_count(model, conf.peft_config())
    conf.targets_tab.every_block.value = True
    assert conf.settings.lora.layers_to_transform is None


def test_bad_combinations_are_shown_not_raised(conf):
    conf.controls["train.warmup_steps"].value = 10
    conf.controls["train.warmup_ratio"].value = 0.1
    assert any("both set" in e for e in conf.errors)
    with pytest.raises(SettingsError, match="both set"):
        conf.settings
    conf.controls["train.warmup_steps"].value = 0
    assert conf.errors == []


def test_yaml_text_fields_parse_and_report(conf):
    box = conf.controls["lora.modules_to_save"]
    assert isinstance(box, W.Text)
    box.value = "[nope"
    assert any("lora.modules_to_save" in e and "cannot read" in e for e in conf.errors)
    box.value = "[nope]"
    assert any("['nope'] not found" in e for e in conf.errors)
    box.value = ""
    assert conf.settings.lora.modules_to_save is None
    conf.controls["train.eval_steps"].value = "5"
    assert conf.settings.train.eval_steps == 5


def test_log_slider_rounds_to_three_digits(conf):
    slider = conf.controls["train.learning_rate"]
    slider.value = 10 ** -3.7  # where the log slider lands near 2e-4
    assert conf.settings.train.learning_rate == 0.0002


def test_preset_dropdown_fills_every_control(conf):
    conf.controls["model_name_or_path"].value = "my/model"
    conf._preset.value = "demo-cpu"
    s = conf.settings
    assert (s.train.learning_rate, s.train.max_steps, s.lora.lora_dropout, s.quant.load_in) == (1e-3, 12, 0.0, "none")
    assert s.model_name_or_path == "my/model"
    assert conf.controls["train.max_steps"].value == 12
    assert conf.controls["quant.load_in"].value == "none"
    assert conf._preset.value == "(choose a preset)"
    assert "demo-cpu" in conf.panel.message_html.value
    conf._preset.value = "qlora-walkthrough"
    assert conf.settings.lora.target_modules == ["q_proj", "v_proj"]
    assert [n for n, b in conf.targets_tab.boxes.items() if b.value] == ["q_proj", "v_proj"]


def test_exports_parse_back_to_the_settings(conf):
    conf.controls["lora.r"].value = 8
    conf.controls["lora.lora_dropout"].value = 0.1
    conf.targets_tab.buttons[1].click()
    open_export_tab(conf)
    axo = yaml.safe_load(conf.export_tab.texts["axolotl"].value)
    assert (axo["lora_r"], axo["lora_alpha"], axo["lora_dropout"]) == (8, 32, 0.1)
    assert axo["lora_target_modules"] == ["q_proj", "v_proj"]
    lora = yaml.safe_load(conf.export_tab.texts["lora"].value)["lora"]
    assert (lora["r"], lora["target_modules"]) == (8, ["q_proj", "v_proj"])
    pj = json.loads(conf.export_tab.texts["peft"].value)
    assert (pj["r"], pj["lora_dropout"], sorted(pj["target_modules"])) == (8, 0.1, ["q_proj", "v_proj"])
    kit = KitSettings.from_dict(yaml.safe_load(conf.export_tab.texts["kit"].value))
    assert kit == conf.settings
    namespace: dict = {}
    exec(conf.export_tab.texts["python"].value, namespace)
    assert namespace["lora_config"].r == 8 and set(namespace["lora_config"].target_modules) == {"q_proj", "v_proj"}
    conf.controls["lora.r"].value = 32  # the open tab follows every change
    assert yaml.safe_load(conf.export_tab.texts["axolotl"].value)["lora_r"] == 32


@pytest.mark.parametrize("form", ["kit", "axolotl", "lora", "peft"])
def test_save_and_load_round_trip_through_files(model, tmp_path, form):
    conf = LoraConfigurator(model, run_dir=tmp_path)
    conf.controls["lora.r"].value = 4
    conf.controls["lora.lora_alpha"].value = 8
    conf.targets_tab.buttons[0].click()
    conf.export_tab.save_buttons[form].click()
    path = tmp_path / {"kit": "configured.yaml", "axolotl": "configured-axolotl.yaml",
                       "lora": "configured-lora.yaml", "peft": "adapter_config.json"}[form]
    assert path.exists() and "saved" in conf.panel.message_html.value
    other = LoraConfigurator(model)
    other.export_tab.load_path.value = str(path)
    other.export_tab.load_button.click()
    assert "loaded" in other.panel.message_html.value
    got, want = other.settings, conf.settings
    if form == "peft":  # adapter_config.json stores target_modules as a set: order is lost
        got.lora.target_modules = sorted(got.lora.target_modules)
        want.lora.target_modules = sorted(want.lora.target_modules)
    assert got.lora == want.lora
    if form in ("kit", "axolotl"):
        assert got.train.learning_rate == want.train.learning_rate


def test_python_export_is_saved(model, tmp_path):
    conf = LoraConfigurator(model, run_dir=tmp_path)
    conf.export_tab.save_buttons["python"].click()
    assert "LoraConfig(" in (tmp_path / "configured_lora.py").read_text()


def test_loading_a_bad_file_shows_the_problem(conf, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  r: 0\n")
    conf.export_tab.load_path.value = str(bad)
    conf.export_tab.load_button.click()
    assert "lora.r" in conf.panel.message_html.value
    conf.export_tab.load_path.value = str(tmp_path / "missing.yaml")
    conf.export_tab.load_button.click()
    assert "missing.yaml" in conf.panel.message_html.value
    assert conf.errors == []  # the shown settings are unchanged


def test_upload_loads_settings(conf):
    conf.export_tab.upload.value = ({"name": "s.yaml", "type": "", "size": 20, "last_modified": datetime.datetime.now(),
                           "content": memoryview(b"lora:\n  r: 24\n  lora_alpha: 48\n")},)
    assert conf.settings.lora.r == 24 and conf.controls["lora.r"].value == 24


def test_invalid_settings_given_are_shown(model):
    conf = LoraConfigurator(model, KitSettings(lora=LoraSettings(r=0)))
    assert any("lora.r" in e for e in conf.errors)
    conf.controls["lora.lora_dropout"].value = 0.1  # another change keeps the invalid r
    assert conf.draft.lora.r == 0 and any("lora.r" in e for e in conf.errors)


def test_help_toggle_shows_help(conf):
    row = conf.controls["lora.r"]
    toggle, panel = next((box.children[0].children[1], box.children[1]) for box in _rows(conf.widget)
                         if box.children[0].children[0] is row)
    assert panel.layout.display == "none"
    toggle.value = True
    assert panel.layout.display == "block" and "usual range 8 to 64" in panel.value


def test_text_summary_is_the_plain_text_form(conf):
    bundle = conf._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    text = bundle["text/plain"]
    assert "r=16" in text and f"trainable parameters: {conf.trainable[0]:,}" in text and "memory estimate" in text
    assert repr(conf) == text


def test_without_a_model_targets_are_text(tmp_path):
    conf = LoraConfigurator()
    assert "give the configurator a model" in conf.panel.trainable_html.value
    conf.controls["lora.target_modules"].value = "[q_proj, v_proj]"
    assert conf.settings.lora.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(SettingsError, match="needs a model"):
        conf.apply()


def test_trainable_by_rank_is_exact_and_plots(model):
    counts = trainable_by_rank(model, [2, 4])
    assert list(counts) == ["q + v", "attention", "all-linear"]
    assert counts["all-linear"][1] == 2 * counts["all-linear"][0]
    assert counts["q + v"][0] == peft_count(model, LoraSettings(r=2, target_modules=["q_proj", "v_proj"]).to_peft())
    fig = plot_trainable_vs_rank(model, ranks=(1, 2, 4))
    assert len(fig.axes[0].lines) >= 3


def _rows(widget):
    """Every help row (VBox of [HBox(control, toggle), help HTML, reason HTML]) under a widget."""
    for child in getattr(widget, "children", ()):
        if (isinstance(child, W.VBox) and len(child.children) == 3 and isinstance(child.children[1], W.HTML)
                and isinstance(child.children[0], W.HBox) and len(child.children[0].children) == 2):
            yield child
        yield from _rows(child)


def test_power_of_two_slider_moves_by_stops_and_takes_typed_values(conf, model):
    r = conf.controls["lora.r"]
    assert (r.slider.value, r.box.value) == (16, 16)
    r.slider.value = 32  # one stop right of 16, as ArrowRight in the browser
    assert conf.settings.lora.r == 32 and r.box.value == 32
    r.box.value = 20  # typed, not a power of two: allowed, and shown on the slider too
    assert conf.settings.lora.r == 20 and r.slider.value == 20 and 20 in r.slider.options
    assert conf.trainable[0] == peft_count(model, conf.peft_config())
    r.box.value = 2000  # beyond the range: kept in the draft, reported, never raised
    assert conf.draft.lora.r == 2000 and any("lora.r" in e for e in conf.errors)
    r.slider.value = 8
    assert conf.errors == [] and r.box.value == 8 and 2000 not in r.slider.options
    conf.set_settings(KitSettings(lora=LoraSettings(r=48, lora_alpha=96)))
    assert (r.value, r.slider.value, conf.controls["lora.lora_alpha"].box.value) == (48, 48, 96)


def test_knobs_without_effect_are_disabled_with_the_reason(conf):
    conf.controls["quant.load_in"].value = "none"
    for name in ("bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype"):
        assert conf.controls[f"quant.{name}"].disabled
        assert "only used with load_in: 4bit (now: none)" in conf._reasons[("quant", name)].value
        assert conf._reasons[("quant", name)].layout.display == "block"
    assert conf.controls["lora.loftq_bits"].disabled
    conf.controls["quant.load_in"].value = "4bit"
    assert not conf.controls["quant.bnb_4bit_quant_type"].disabled
    assert conf._reasons[("quant", "bnb_4bit_quant_type")].layout.display == "none"
    assert ("quant", "bnb_4bit_compute_dtype") not in inactive_reasons(conf.draft)
    assert not conf.controls["quant.load_in"].disabled


def test_tabs_and_panel_keep_their_width(conf):
    tabs = conf._tabs
    panel = conf.widget.children[1].children[1]
    assert tabs.layout.width == tabs.layout.min_width and tabs.layout.width.endswith("px")
    assert panel.layout.width == panel.layout.min_width == "400px"
    widest = int(tabs.layout.width[:-2])
    for form in conf.export_tab.texts:  # the widest page fits inside the fixed tab width
        assert int(conf.export_tab.texts[form].layout.width[:-2]) < widest


def test_nothing_is_saved_until_save_is_pressed(model, tmp_path):
    conf = LoraConfigurator(model, run_dir=tmp_path)
    saved = tmp_path / "configured.yaml"
    assert not saved.exists() and "Not saved yet" in conf.save_bar.status.value
    conf.controls["lora.r"].value = 8
    assert not saved.exists()
    conf.save_bar.button.click()
    assert yaml.safe_load(saved.read_text())["lora"]["r"] == 8
    status = conf.save_bar.status.value
    assert "Saved" in status and str(saved.resolve()) in status
    conf.controls["lora.r"].value = 64
    assert "Changed since saved" in conf.save_bar.status.value
    assert yaml.safe_load(saved.read_text())["lora"]["r"] == 8  # moving a knob saves nothing
    conf.controls["lora.r"].value = 8
    assert "Saved" in conf.save_bar.status.value
    conf.controls["lora.r"].box.value = 2000
    assert conf.save_bar.button.disabled and "Fix the errors" in conf.save_bar.status.value
