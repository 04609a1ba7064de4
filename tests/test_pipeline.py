"""Pipeline and command line: one quick run on the tiny model, asserting on the files it writes."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

from lora_nb.__main__ import main  # noqa: E402
from lora_nb.formats import save_settings  # noqa: E402
from lora_nb.pipeline import configure  # noqa: E402

QUICK = ["--max-steps", "2", "--limit", "2", "--max-new-tokens", "4"]


@pytest.fixture(scope="module")
def cli_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "demo"
    return out, main(["run", "--model", tiny_model_dir, "--out", str(out), *QUICK])


def test_cli_writes_the_run_folder(cli_run, capsys):
    out, status = cli_run
    assert status == 0
    for name in ("settings.yaml", "run.json", "log.jsonl", "metrics.json", "generations.md", "loss.png"):
        assert (out / name).is_file(), name
    assert (out / "adapter" / "adapter_config.json").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_examples"] == 2
    assert {"heldout_loss", "perplexity", "exact_match"} <= set(metrics["before"]) & set(metrics["after"])
    assert json.loads((out / "run.json").read_text())["global_step"] == 2
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_reads_a_settings_file_and_reports_progress(tiny_model_dir, tmp_path, capsys):
    settings = configure(model=tiny_model_dir)
    settings.lora.r = 4
    save_settings(settings, tmp_path / "mine.yaml")
    out = tmp_path / "mine"
    assert main(["run", "--config", str(tmp_path / "mine.yaml"), "--out", str(out), *QUICK]) == 0
    printed = capsys.readouterr().out
    for step in ("[1/4] settings", "[2/4] model", "[3/4] training", "[4/4] evaluating", "done in"):
        assert step in printed
    assert "r 4," in printed
    assert "r: 4" in (out / "settings.yaml").read_text()


def test_cli_explains_problems_without_a_traceback(tmp_path, capsys):
    assert main(["run", "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lora-nb: ") and "Traceback" not in err


def test_cli_refuses_to_overwrite_a_run(cli_run, tiny_model_dir, capsys):
    out, _ = cli_run
    assert main(["run", "--model", tiny_model_dir, "--out", str(out), *QUICK]) == 1
    assert "already holds a training run" in capsys.readouterr().err


def test_configure_overrides_the_preset(tiny_model_dir):
    settings = configure(model=tiny_model_dir, quant="4bit", max_steps=3)
    assert (settings.model_name_or_path, settings.quant.load_in, settings.train.max_steps) == (tiny_model_dir, "4bit", 3)
    assert settings.lora.r == 16  # from the demo-cpu preset
