"""The configurator's memory panel: the data's own lengths beside the worst case, and a GPU verdict."""

from __future__ import annotations

import datasets

from lora_nb.settings import KitSettings, TrainSettings
from lora_nb.widgets import LoraConfigurator
from tests.archs import tiny_model


def test_panel_shows_the_data_lengths_beside_the_worst_case():
    configurator = LoraConfigurator(tiny_model("llama"), KitSettings(train=TrainSettings(max_seq_length=64)))
    assert list(configurator.memory_by_length) == ["worst case"]
    assert "For your data" not in configurator.panel.memory_html.value
    worst = configurator.memory.total_bytes

    configurator.set_data_lengths(datasets.Dataset.from_dict({"input_ids": [[1] * n for n in (5, 9, 12, 40, 300)]}))
    shapes = {name: e.seq_len for name, e in configurator.memory_by_length.items()}
    assert shapes == {"longest batch": 64, "typical batch": 12, "worst case": 64}  # 300 is cut to max_seq_length
    configurator.set_data_lengths([5, 9, 12, 40])
    assert configurator.memory.seq_len == 40 and configurator.memory.total_bytes < worst  # the panel's total
    text = configurator.panel.memory_html.value
    assert "For your data" in text and "4 examples" in text and "typical batch" in text and "worst case" in text

    configurator.controls["train.per_device_train_batch_size"].value = 8  # a change re-estimates all three
    assert all(e.batch_size == 8 for e in configurator.memory_by_length.values())


def test_panel_gives_a_verdict_for_the_chosen_gpu():
    configurator = LoraConfigurator(tiny_model("llama"))
    assert configurator.gpu_verdict() is None and "lora-nb-verdict" not in configurator.panel.memory_html.value
    configurator.panel.gpu.value = "T4"
    report = configurator.gpu_verdict()
    assert report.gpu == "T4" and report.verdict == "fits"
    assert "On a T4:" in configurator.panel.memory_html.value and "fits" in configurator.panel.memory_html.value
