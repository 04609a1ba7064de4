"""The 02 -> 03 hand-off says what training uses and since when; a teacher resets the workshop in one call."""

from __future__ import annotations

import json
import time

import pytest
from transformers import AutoModelForCausalLM

from lora_nb.errors import SettingsError
from lora_nb.pipeline import REHEARSAL_VARIABLE, ensure_run
from lora_nb.widgets import LoraConfigurator
from lora_nb.workshop import reset_workshop, training_choice


def test_without_a_saved_file_training_says_it_uses_the_preset(tmp_path):
    choice = training_choice(tmp_path)
    assert choice.path is None and choice.settings.lora.r == 16
    text = str(choice)
    assert "No saved settings" in text and "'demo-cpu' preset's defaults" in text
    assert "r 16, lora_alpha 32, targets all-linear, quantization none, learning rate 0.001, 12 steps" in text


def test_the_saved_choice_is_what_training_prints(tiny_model_dir, tmp_path):
    conf = LoraConfigurator(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run_dir=tmp_path)
    conf.controls["lora.r"].value = 32
    conf.targets_tab.buttons[1].click()  # q + v
    conf.controls["train.learning_rate"].value = 2e-4
    conf.save_bar.button.click()
    choice = training_choice(tmp_path)
    assert choice.settings.lora.r == 32 and choice.path == tmp_path / "configured.yaml"
    text = choice.describe(now=choice.saved_at + 90)
    assert "saved at " + time.strftime("%Y-%m-%d %H:%M", time.localtime(choice.saved_at)) in text
    assert "(90 s ago)" in text
    assert "r 32, lora_alpha 32, targets q_proj+v_proj" in text and "learning rate 0.0002" in text


def test_a_rehearsal_cuts_training_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv(REHEARSAL_VARIABLE, "2")
    choice = training_choice(tmp_path)
    assert choice.settings.train.max_steps == 2 and choice.rehearsal_of == 12
    assert f"Rehearsal ({REHEARSAL_VARIABLE} is set): training is cut to 2 steps instead of 12 steps" in str(choice)
    assert "2 steps, batch 8" in str(choice)
    monkeypatch.setenv(REHEARSAL_VARIABLE, "50")  # never more steps than configured
    assert training_choice(tmp_path).settings.train.max_steps == 12
    monkeypatch.delenv(REHEARSAL_VARIABLE)
    assert training_choice(tmp_path).rehearsal_of is None and "Rehearsal" not in str(training_choice(tmp_path))


@pytest.mark.parametrize("value", ["0", "two", "-1", "1.5"])
def test_a_rehearsal_with_a_bad_step_count_says_what_is_allowed(tmp_path, monkeypatch, value):
    monkeypatch.setenv(REHEARSAL_VARIABLE, value)
    with pytest.raises(SettingsError, match=rf"{REHEARSAL_VARIABLE} is '{value}'; it must be a whole number of steps, "
                                            rf"at least 1 \(e\.g\. 2\), or unset for real training"):
        training_choice(tmp_path)


def test_a_rehearsal_run_for_evaluation_trains_the_cut_steps(tiny_model_dir, tmp_path, monkeypatch):
    """04 and 06 train a run themselves when 03 made none: in a rehearsal, only the cut steps."""
    import lora_nb.pipeline as pipeline
    from lora_nb.presets import get_preset

    def tiny_preset(name):
        settings = get_preset(name)
        settings.model_name_or_path = tiny_model_dir
        settings.train.per_device_train_batch_size = 2
        return settings

    monkeypatch.setattr(pipeline, "get_preset", tiny_preset)
    monkeypatch.setenv(REHEARSAL_VARIABLE, "1")
    lines = []
    run = ensure_run(tmp_path, log=lines.append)
    assert json.loads((run / "run.json").read_text())["global_step"] == 1
    assert "(rehearsal: 1 of 12 steps)" in lines[0]


def test_reset_removes_saved_settings_and_runs(tmp_path):
    (tmp_path / "configured.yaml").write_text("lora:\n  r: 8\n")
    (tmp_path / "configured_lora.py").write_text("")
    run = tmp_path / "train-1"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"status": "finished"}))
    other = tmp_path / "notes"
    other.mkdir()
    assert set(reset_workshop(tmp_path, keep_runs=True)) == {tmp_path / "configured.yaml",
                                                              tmp_path / "configured_lora.py"}
    assert run.exists()
    assert reset_workshop(tmp_path) == [run]
    assert not run.exists() and other.exists()  # only run folders go
    assert training_choice(tmp_path).path is None


def test_memory_report_reads_binders_limit(monkeypatch):
    from lora_nb.probes import memory_limit
    from lora_nb.workshop import memory_report

    monkeypatch.setenv("MEM_LIMIT", str(1_000_000_000))
    assert memory_limit() == (1_000_000_000, "MEM_LIMIT (Binder)")
    assert "only 1.0 GB (MEM_LIMIT (Binder))" in memory_report() and "2.0 GB" in memory_report()
    monkeypatch.setenv("MEM_LIMIT", str(8_000_000_000))
    limit, _ = memory_limit()
    assert limit <= 8_000_000_000
    if limit >= 2_000_000_000:
        assert "enough for the demo (notebooks 03 and 04" in memory_report()
