"""The fit planner: verdicts for the shipped configs, the largest batch/length, the suggested change, the CLI."""

from __future__ import annotations

import json

import pytest

from lora_nb.__main__ import main
from lora_nb.errors import ModelLoadError, SettingsError
from lora_nb.fit import GPUS, TIGHT_SHARE, find_gpu, load_config, meta_model, plan_fit, shipped_models
from lora_nb.settings import KitSettings

# The kit's defaults (4-bit, r 16 all-linear, dropout 0.05, batch 4 x 512, AdamW, no checkpointing) on a T4.
T4_DEFAULTS = {
    "Qwen/Qwen2.5-0.5B": "fits",
    "meta-llama/Llama-3.2-1B": "fits",
    "google/gemma-2-2b": "does not fit",
    "meta-llama/Llama-3.2-3B": "does not fit",
    "microsoft/Phi-3-mini-4k-instruct": "does not fit",
    "mistralai/Mistral-7B-v0.3": "does not fit",
    "Qwen/Qwen2.5-7B": "does not fit",
    "meta-llama/Llama-3.1-8B": "does not fit",
}
# Published parameter counts (billions), which the shipped configs must reproduce.
PARAMETERS_B = {"Qwen/Qwen2.5-0.5B": 0.49, "meta-llama/Llama-3.2-1B": 1.24, "google/gemma-2-2b": 2.61,
                "meta-llama/Llama-3.2-3B": 3.21, "microsoft/Phi-3-mini-4k-instruct": 3.82,
                "mistralai/Mistral-7B-v0.3": 7.25, "Qwen/Qwen2.5-7B": 7.62, "meta-llama/Llama-3.1-8B": 8.03}


def test_shipped_configs_have_the_published_sizes():
    assert set(shipped_models()) == set(PARAMETERS_B)
    for name, billions in PARAMETERS_B.items():
        model = meta_model(load_config(name))
        assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.01), name


@pytest.mark.slow
def test_verdicts_for_every_shipped_config_on_a_t4_and_an_a100():
    for name, verdict in T4_DEFAULTS.items():
        report = plan_fit(name, "T4")
        assert report.verdict == verdict, name
        assert report.settings.train.precision == "fp16"  # no bf16 on a T4
        assert (report.fix == "") == (verdict == "fits")
        assert plan_fit(name, "A100-80").verdict == "fits", name


def test_verdict_thresholds_and_largest_shapes():
    report = plan_fit("Qwen/Qwen2.5-0.5B", "T4")
    card = GPUS["T4"].memory_bytes
    assert report.need_bytes <= TIGHT_SHARE * card and report.verdict == "fits"
    # the largest batch fits on the card, one more does not
    assert plan_fit("Qwen/Qwen2.5-0.5B", "T4", batch_size=report.largest_batch).need_bytes <= card
    assert plan_fit("Qwen/Qwen2.5-0.5B", "T4", batch_size=report.largest_batch + 1).need_bytes > card
    assert plan_fit("Qwen/Qwen2.5-0.5B", "T4", seq_len=report.largest_seq + 1).need_bytes > card
    need = plan_fit("Qwen/Qwen2.5-0.5B", memory_gib=80).need_bytes / 2**30  # a memory size alone: bf16 assumed
    assert plan_fit("Qwen/Qwen2.5-0.5B", memory_gib=need / 0.95).verdict == "tight"
    assert plan_fit("Qwen/Qwen2.5-0.5B", memory_gib=need * 0.9).verdict == "does not fit"


def test_the_suggested_change_makes_it_fit():
    report = plan_fit("meta-llama/Llama-3.2-3B", "T4")
    assert report.verdict == "does not fit" and report.fix.startswith("turn on gradient checkpointing")
    settings = KitSettings()
    settings.train.gradient_checkpointing = True
    assert plan_fit("meta-llama/Llama-3.2-3B", "T4", settings=settings).verdict == "fits"
    big = plan_fit("meta-llama/Llama-3.1-8B", "T4")
    assert big.fix.startswith("combine: turn on gradient checkpointing")


def test_config_file_and_gpu_names(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(load_config("Qwen2.5-0.5B").to_dict()))
    assert plan_fit(path, "t4").estimate.total_bytes == plan_fit("Qwen/Qwen2.5-0.5B", "T4").estimate.total_bytes
    assert find_gpu("NVIDIA A100-SXM4-80GB").name == "A100-80" and find_gpu("Tesla T4").name == "T4"
    with pytest.raises(SettingsError, match="unknown GPU 'V100'.*T4, L4"):
        find_gpu("V100")
    with pytest.raises(SettingsError, match="give a GPU name"):
        plan_fit("Qwen/Qwen2.5-0.5B")
    with pytest.raises(ModelLoadError, match="no config for 'no/such-model'"):
        load_config("no/such-model")


def test_fit_command(capsys):
    assert main(["fit", "Qwen2.5-0.5B", "--gpu", "T4", "--batch", "2", "--checkpointing"]) == 0
    out = capsys.readouterr().out
    assert "Qwen2.5-0.5B on T4" in out and "batch 2 x 512" in out and "checkpointing on" in out and "FITS" in out
    assert main(["fit", "Qwen2.5-0.5B", "--gpu", "V100"]) == 1
    assert "unknown GPU" in capsys.readouterr().err


def test_fit_options_are_the_settings_fields(capsys):
    assert main(["fit", "Qwen2.5-0.5B", "--gpu", "T4", "--quant", "none", "--r", "32", "--dora",
                 "--optim", "paged_adamw_8bit"]) == 0
    out = capsys.readouterr().out
    assert "(none base, r 32, fp16, checkpointing off, paged_adamw_8bit)" in out
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "Qwen2.5-0.5B", "--gpu", "T4", "--optim", "adamw9"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'adamw9'" in err and "paged_adamw_8bit" in err
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    assert "20-30% slower" in capsys.readouterr().out  # the field's own help text, '%' intact
