"""The 02 -> 03 hand-off says what training uses and since when; a teacher resets the workshop in one call."""

from __future__ import annotations

import json
import time

from transformers import AutoModelForCausalLM

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
