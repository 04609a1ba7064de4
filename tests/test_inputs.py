"""What comes in: settings that would quietly train something else, axolotl files read as axolotl reads
them, empty paths, YAML aliases, arguments checked before the long work, the widget's Save and Upload.

Each test drives a real front door (train(), the command line, run_pipeline, the configurator, the
evaluation functions) with a tiny model, and asserts on the kit's answer.
"""

from __future__ import annotations

import datetime
import os
import re
import time
import warnings

import peft
import pytest
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

import lora_nb.loading
import lora_nb.pipeline
from lora_nb.__main__ import main
from lora_nb.data import load_examples
from lora_nb.errors import ArgumentError, ConfigFileError, DataError, SettingsError
from lora_nb.estimate import count_trainable
from lora_nb.evaluate import compare_generations, evaluate_run, generate
from lora_nb.formats import dump_settings, load_settings, load_settings_text, to_python
from lora_nb.pipeline import configure, run_pipeline
from lora_nb.presets import PRESETS, get_preset
from lora_nb.settings import KitSettings, LoraSettings, QuantSettings, TrainSettings
from lora_nb.targets import find_targets
from lora_nb.train import train
from lora_nb.widgets import LoraConfigurator
from tests.archs import tiny_model

BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


class LongWorkStarted(Exception):
    """Raised instead of loading a model: the arguments got past every check."""


@pytest.fixture
def no_model_loading(monkeypatch):
    """Makes any model load fail loudly, so a test proves that a refusal came before it."""
    def refuse(*args, **kwargs):
        raise LongWorkStarted("load_model was reached")
    monkeypatch.setattr(lora_nb.loading, "load_model", refuse)
    monkeypatch.setattr(lora_nb.pipeline, "load_model", refuse)  # the pipeline's own name for it


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


# --------------------------------------------------------------------- item 2: settings that do something else
@pytest.mark.parametrize("lora,says", [
    (LoraSettings(lora_dropout=1.0), "lora_dropout 1 drops every input of the LoRA branch"),
    (LoraSettings(target_modules=["q_proj", "v_proj"], modules_to_save=["v_proj"]),
     "['v_proj'] in both target_modules and modules_to_save"),
    (LoraSettings(target_modules=["q_proj"], layers_to_transform=[]), "layers_to_transform is an empty list"),
    (LoraSettings(target_modules=["q_proj", " "]), "hold an empty name"),
    (LoraSettings(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern=""),
     "layers_pattern is an empty text"),
    (LoraSettings(modules_to_save=["up_proj"]), "['up_proj'] in modules_to_save are also adapted by 'all-linear'"),
])
def test_lora_settings_that_would_train_something_else_stop_train(model, tokenizer, tmp_path, lora, says):
    settings = KitSettings(lora=lora, quant=QuantSettings(load_in="none"), train=TrainSettings(max_steps=1))
    with pytest.raises(SettingsError, match=None) as err:
        train(model, tokenizer, [{"prompt": "a", "response": "b"}], settings, tmp_path / "run")
    assert says in str(err.value)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_max_steps_zero_is_refused_at_every_front_door(model, tokenizer, tmp_path, no_model_loading):
    settings = KitSettings(quant=QuantSettings(load_in="none"), train=TrainSettings(max_steps=0))
    with pytest.raises(SettingsError, match=r"max_steps must be -1 .* or at least 1, got 0"):
        train(model, tokenizer, [{"prompt": "a", "response": "b"}], settings, tmp_path / "run")
    with pytest.raises(SettingsError, match="max_steps must be -1"):
        configure(max_steps=0)
    assert main(["run", "--steps", "0", "--out", str(tmp_path / "cli")]) == 1
    conf = LoraConfigurator(model)
    conf.controls["train.max_steps"].value = 0
    assert any("max_steps must be -1" in e for e in conf.errors)


def test_the_widget_shows_the_same_refusal_as_train(model):
    conf = LoraConfigurator(model)
    conf.controls["lora.lora_dropout"].value = 1.0
    assert any("lora_dropout 1 drops every input" in e for e in conf.errors)
    assert "lora_dropout 1 drops every input" in conf.panel.errors_html.value


@pytest.mark.parametrize("train_settings,says", [
    (TrainSettings(max_steps=5, num_train_epochs=3), "num_train_epochs 3 has no effect"),
    (TrainSettings(lr_scheduler_type="constant", warmup_steps=2), "'constant' ignores warmup_steps"),
    (TrainSettings(max_steps=5, warmup_steps=5), "warmup_steps 5 >= max_steps 5"),
    (TrainSettings(max_steps=5, logging_steps=10), "logging_steps 10 > max_steps 5"),
    (TrainSettings(max_steps=5, eval_steps=10), "eval_steps 10 > max_steps 5"),
])
def test_settings_without_effect_warn_when_checked(train_settings, says):
    with pytest.warns(UserWarning, match=says):
        train_settings.check()
    with pytest.warns(UserWarning, match=rf"^train\..*{re.escape(says)}"):
        KitSettings(train=train_settings, quant=QuantSettings(load_in="none")).check(check_environment=False)
    assert any(says in tip for tip in train_settings.advice())  # the widget's panel lists it too


def test_quantization_knobs_without_4bit_and_loftq_bits_warn():
    with pytest.warns(UserWarning, match="bnb_4bit_quant_type have no effect with load_in 'none'"):
        QuantSettings(load_in="none", bnb_4bit_quant_type="fp4").check()
    with pytest.warns(UserWarning, match="loftq_bits 8 has no effect"):
        LoraSettings(loftq_bits=8).check()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_preset("demo-cpu").check(check_environment=False)  # the presets raise no such warning


def test_empty_model_name_is_refused():
    with pytest.raises(SettingsError, match="model_name_or_path is empty"):
        KitSettings(model_name_or_path="  ").check(check_environment=False)


# ------------------------------------------------------------------------------- item 3: axolotl semantics
def test_axolotl_union_of_all_linear_and_listed_modules(model):
    result = load_settings("adapter: lora\nlora_target_linear: true\nlora_target_modules: [lm_head]\n")
    lora = result.settings.lora
    assert lora.target_modules == ["all-linear", "lm_head"]
    names = find_targets(model).names
    assert set(lora.to_peft(model).target_modules) == set(names) | {"lm_head"}
    wrapped = peft.get_peft_model(tiny_model("llama"), lora.to_peft(tiny_model("llama")))
    assert count_trainable(tiny_model("llama"), lora)[0] == wrapped.get_nb_trainable_parameters()[0]
    back = load_settings(dump_settings(result.settings, "axolotl")).settings.lora
    assert back.target_modules == ["all-linear", "lm_head"]  # written back as axolotl's two keys
    with pytest.raises(SettingsError, match="needs the model to expand 'all-linear'"):
        lora.to_peft()


@pytest.mark.parametrize("text,says", [
    ("adapter: lora\nlora_target_linear: false\n", "no layers to adapt: lora_target_linear is false and lora_target_modules is not set"),
    ("adapter: lora\nlora_target_modules: []\n", "no layers to adapt"),
    ("adapter: lora\nlora_target_linear: false\nlora_target_modules: []\n", "no layers to adapt"),
    ("adapter: qlora\nload_in_4bit: true\nload_in_8bit: true\nlora_target_linear: true\n", "both true"),
    ("adapter: qlora\nload_in_8bit: true\nlora_target_linear: true\n", "adapter qlora with load_in_8bit true"),
    ("adapter: qlora\nlora_target_linear: true\n", "adapter qlora needs load_in_4bit: true"),
    ("adapter: lora\nbf16: true\nfp16: true\nlora_target_linear: true\n", "bf16 true and fp16 true are both set"),
    ("adapter: lora\nbf16: auto\nfp16: true\nlora_target_linear: true\n", "bf16 'auto' and fp16 true"),
    ("lora_r: 8\nlora_target_linear: true\n", "adapter is not set"),
    ("load_in_8bit: true\nlora_target_linear: true\n", "adapter is not set"),
    ("adapter: lora\nlora_target_linear: true\nbatch_size: 8\ngradient_accumulation_steps: 2\n",
     "batch_size and gradient_accumulation_steps are both set"),
    ("adapter: lora\nlora_target_linear: true\nmicro_batch_size: 3\nbatch_size: 8\n", "positive multiple"),
    ("adapter: lora\nlora_target_linear: true\npeft_layers_pattern: [layers]\n", "needs peft_layers_to_transform"),
    ("adapter: lora\nlora_target_linear: true\npeft_init_lora_weights: lora_ga\n", "peft_init_lora_weights 'lora_ga'"),
    ("adapter: lora\nlora_target_linear: true\nwarmup_steps: 5\nwarmup_ratio: 0.1\n", "are both set"),
])
def test_axolotl_contradictions_are_refused(text, says):
    with pytest.raises(SettingsError) as err:
        load_settings(text)
    assert says in str(err.value)


def test_axolotl_values_mean_what_axolotl_means():
    kit = load_settings("adapter: qlora\nload_in_4bit: true\nlora_target_modules: [q_proj]\nmicro_batch_size: 2\n"
                        "batch_size: 8\npeft_init_lora_weights: pissa\nfp16: false\nbf16: false\n").settings
    assert kit.lora.lora_dropout == 0.0  # axolotl's default when lora_dropout is not given (the kit's is 0.05)
    assert (kit.train.per_device_train_batch_size, kit.train.gradient_accumulation_steps) == (2, 4)
    assert (kit.lora.init_lora_weights, kit.quant.load_in, kit.train.precision) == ("pissa", "4bit", "fp32")
    union = load_settings("adapter: lora\nlora_target_linear: true\nlora_target_modules: lm_head\n").settings.lora
    assert union.target_modules == ["all-linear", "lm_head"]  # axolotl's load_lora wraps one text in a list
    with pytest.warns(UserWarning, match="neither lora_target_linear nor lora_target_modules is set"):
        assert load_settings("adapter: lora\nlora_r: 4\n").settings.lora.target_modules == "all-linear"


# ----------------------------------------------------------------------- item 8: empty strings from the shell
@pytest.mark.parametrize("option", ["--data", "--heldout", "--config", "--model", "--out", "--preset"])
def test_cli_refuses_an_empty_path_before_loading(option, tmp_path, capsys, no_model_loading, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", option, ""]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"lora-nb: {option[2:]} is empty (an unset shell variable?)")
    assert "Traceback" not in err and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", ["data", "heldout", "config", "model", "out", "preset"])
def test_run_pipeline_refuses_an_empty_path(name, tmp_path, no_model_loading):
    kwargs = {"out": tmp_path / "run", name: ""}
    config = kwargs.pop("config", None)
    with pytest.raises(ArgumentError, match=f"^{name} is empty"):
        run_pipeline(config, **kwargs)


def test_readers_refuse_an_empty_path():
    with pytest.raises(DataError, match="The data path is empty"):
        load_examples("")
    with pytest.raises(ConfigFileError, match="the settings path is empty"):
        load_settings("")


# ------------------------------------------------------------------------------- item 9: YAML aliases
def test_billion_laughs_is_refused_quickly_everywhere(tmp_path, model, capsys, no_model_loading):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    started = time.perf_counter()
    for source in (BOMB, path, str(path)):
        with pytest.raises(ConfigFileError, match="expand to more than 100,000 values through YAML aliases") as err:
            load_settings(source)
        assert len(str(err.value)) < 400
    assert main(["run", "--config", str(path), "--out", str(tmp_path / "run")]) == 1
    assert "YAML aliases" in capsys.readouterr().err
    conf = LoraConfigurator(model, run_dir=tmp_path)
    conf.export_tab.load_path.value = str(path)
    conf.export_tab.load_button.click()
    assert "YAML aliases" in conf.panel.message_html.value
    upload(conf, "bomb.yaml", BOMB.encode())
    assert "YAML aliases" in conf.panel.message_html.value and conf.errors == []
    assert time.perf_counter() - started < 10


def test_self_reference_huge_files_and_values_in_messages(tmp_path):
    with pytest.raises(ConfigFileError, match="refer to themselves"):
        load_settings("lora: &l\n  r: *l\n")
    big = tmp_path / "big.yaml"
    big.write_text("lora:\n  r: 8\n" + "# padding\n" * 30_000)
    with pytest.raises(ConfigFileError, match="more than a settings file's 200,000"):
        load_settings(big)
    with pytest.raises(SettingsError) as err:  # a huge value is quoted short, never whole
        load_settings("lora:\n  target_modules: " + str(list(range(30_000))) + "\n")
    assert len(str(err.value)) < 400


# ------------------------------------------------------------------ item 10: arguments before the long work
@pytest.mark.parametrize("args,says", [
    (["--max-new-tokens", "0"], "max_new_tokens must be an integer between 1 and 8192, got 0"),
    (["--max-new-tokens", "-3"], "max_new_tokens must be an integer between 1 and 8192, got -3"),
    (["--limit", "0"], "limit must be an integer or null, with values >= 1, got 0"),
    (["--r", "0"], "lora.r must be an integer between 1 and 1024, got 0"),
    (["--lr", "nan"], "train.learning_rate must be a number between 1e-07 and 1, got nan"),
    (["--alpha", "-1"], "lora.lora_alpha must be"),
])
def test_cli_checks_counts_before_loading(args, says, tmp_path, capsys, no_model_loading):
    assert main(["run", "--out", str(tmp_path / "run"), *args]) == 1
    assert says in capsys.readouterr().err


def test_out_that_is_a_file_is_refused_before_loading(tmp_path, capsys, no_model_loading):
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    for out in (afile, afile / "run"):
        assert main(["run", "--out", str(out)]) == 1
        assert "is a file" in capsys.readouterr().err
        with pytest.raises(ArgumentError, match="not a folder"):
            run_pipeline(out=out)
    assert afile.read_text() == "mine"


def test_overrides_reach_the_settings(tmp_path, capsys, no_model_loading, monkeypatch):
    seen = {}
    real = lora_nb.pipeline.configure

    def spy(*args, **kwargs):
        seen["settings"] = real(*args, **kwargs)
        return seen["settings"]
    monkeypatch.setattr(lora_nb.pipeline, "configure", spy)
    with pytest.raises(LongWorkStarted):
        main(["run", "--out", str(tmp_path / "run"), "--r", "8", "--alpha", "16", "--lr", "5e-4", "--steps", "3"])
    s = seen["settings"]
    assert (s.lora.r, s.lora.lora_alpha, s.train.learning_rate, s.train.max_steps) == (8, 16, 5e-4, 3)


def test_run_help_lists_presets_and_examples(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS) and "examples:" in out
    assert "--r INT" in out and "--alpha INT" in out and "--lr FLOAT" in out and "--steps INT" in out


def test_evaluation_functions_check_generation_counts_first(model, tokenizer):
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(SettingsError, match="max_new_tokens must be an integer between 1 and 8192, got 0"):
        generate(model, tokenizer, "hi", max_new_tokens=0)
    with pytest.raises(SettingsError, match="max_new_tokens"):
        compare_generations(model, model, tokenizer, ["hi"], max_new_tokens=-1)
    with pytest.raises(SettingsError, match="limit must be an integer or null, with values >= 1, got 0"):
        evaluate_run(model, tokenizer, [{"prompt": "a", "response": "b"}], limit=0)
    assert all((p == before[n]).all() for n, p in model.named_parameters())


def test_csv_rows_with_more_fields_than_the_header(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("prompt,response\nWhat is 2+2?,4\nName a color, please,blue\n")
    with pytest.raises(DataError, match=r"train\.csv:3: 3 fields, but the header has 2 \(prompt, response\)"):
        load_examples(path)


# ----------------------------------------------------------------------- item 11: the widget's Save and Upload
def upload(conf: LoraConfigurator, name: str, content: bytes) -> None:
    conf.export_tab.upload.value = ({"name": name, "type": "", "size": len(content), "last_modified": datetime.datetime.now(),
                           "content": memoryview(content)},)


def test_python_export_is_atomic(model, tmp_path, monkeypatch):
    conf = LoraConfigurator(model, run_dir=tmp_path)
    target = tmp_path / "configured_lora.py"
    target.write_text("# the user's previous export\n")

    def full_disk(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(ConfigFileError, match="No space left on device. Nothing was overwritten"):
        conf.save("python")
    assert target.read_text() == "# the user's previous export\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["configured_lora.py"]  # no temporary file left


def test_unknown_export_form_is_a_kit_error(model, tmp_path):
    conf = LoraConfigurator(model, run_dir=tmp_path)
    for action in (lambda: conf.save("toml"), lambda: conf.export_text("toml")):
        with pytest.raises(SettingsError, match="export form must be one of kit, axolotl, lora, peft, python, got 'toml'"):
            action()


def test_upload_never_reads_a_file_named_in_it(model, tmp_path):
    secret = tmp_path / "server-side.yaml"
    secret.write_text("lora:\n  r: 7\n")
    conf = LoraConfigurator(model, run_dir=tmp_path)
    for content in (str(secret), secret.name):
        upload(conf, "innocent.yaml", content.encode())
        assert conf.settings.lora.r != 7
        assert "neither" in conf.panel.message_html.value or "must be a mapping" in conf.panel.message_html.value
    with pytest.raises(ConfigFileError):
        load_settings_text(str(secret))


def test_non_utf8_upload_says_how_to_fix_it(model):
    conf = LoraConfigurator(model)
    upload(conf, "latin1.yaml", "lora:\n  r: 8  # é\n".encode("latin-1"))
    assert "not UTF-8 text (byte 0xe9" in conf.panel.message_html.value
    assert "save it as UTF-8" in conf.panel.message_html.value


# ------------------------------------------------------------------------------------ unclear messages
def test_a_settings_path_without_suffix_is_named_as_a_path(tmp_path):
    with pytest.raises(ConfigFileError, match="'my_settings' is neither a settings file that exists nor settings text"):
        load_settings("my_settings")
    with pytest.raises(ConfigFileError, match="is a folder"):
        load_settings(tmp_path)


# ---------------------------------------------------------------------------- across architectures
def test_opt_fc1_fc2_in_the_block_are_mlp(tmp_path):
    config = transformers.OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)
    opt = transformers.OPTForCausalLM(config)
    targets = find_targets(opt)
    assert targets.mlp == ["fc1", "fc2"] and "fc1" not in targets.other
    assert targets.attention == ["k_proj", "v_proj", "q_proj", "out_proj"]
    groups = {}
    stack = [LoraConfigurator(opt).widget]
    while stack:  # the configurator's target groups: a VBox of an <i>title</i> and an HBox of boxes
        widget = stack.pop()
        children = list(getattr(widget, "children", ()))
        if len(children) == 2 and str(getattr(children[0], "value", "")).startswith("<i>"):
            groups[children[0].value] = [box.description for box in children[1].children]
        stack += children
    assert groups["<i>MLP</i>"] == ["fc1", "fc2"] and "<i>other</i>" not in groups


def test_count_trainable_with_targets_matching_nothing_names_the_layers():
    with pytest.raises(SettingsError) as err:
        count_trainable(tiny_model("gpt2"), LoraSettings(target_modules=["q_proj"], fan_in_fan_out=True))
    assert "target_modules ['q_proj'] match no layer of this model" in str(err.value)
    assert "'c_attn', 'c_proj', 'c_fc'" in str(err.value)


def test_python_export_builds_the_quantization_and_loading_code():
    settings = get_preset("qlora-walkthrough")
    code = to_python(settings)
    namespace: dict = {}
    exec(code, namespace)
    assert namespace["bnb_config"].to_dict() == settings.to_bnb().to_dict()
    assert namespace["lora_config"] == settings.to_peft()
    assert "prepare_model_for_kbit_training" in code and callable(namespace["load_for_training"])
    assert "BitsAndBytesConfig" not in to_python(KitSettings(quant=QuantSettings(load_in="none")))


def test_presets_cite_sources_that_exist():
    for name, preset in PRESETS.items():
        assert "reference/" not in preset.description, name  # no file outside the repository
    assert "alpha/r = 4" in PRESETS["qlora-walkthrough"].description


def test_the_configurator_shows_an_axolotl_union_as_all_linear():
    conf = LoraConfigurator(tiny_model("llama"))
    conf.set_settings(load_settings("adapter: lora\nlora_target_linear: true\nlora_target_modules: [lm_head]\n").settings)
    assert conf.targets_tab.all_linear.value and all(box.value for box in conf.targets_tab.boxes.values())
    wrapped = peft.get_peft_model(tiny_model("llama"), conf.settings.to_peft(tiny_model("llama")))
    assert conf.errors == [] and conf.trainable[0] == wrapped.get_nb_trainable_parameters()[0]
