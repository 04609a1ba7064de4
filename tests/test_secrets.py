"""Secrets: a hub token in the environment or from `huggingface_hub` login never reaches output or files.

The kit never reads the token itself: huggingface_hub picks it up (``HF_TOKEN``, else the login
file) when it downloads. These tests plant fake tokens, run the command line (training with
checkpoints, evaluation, plots) and a notebook, and look for the tokens in everything printed and
in every byte written, pickles included (Trainer's training_args.bin carries a `hub_token` field).
"""

from __future__ import annotations

import io
from pathlib import Path

import huggingface_hub
import matplotlib
import pytest
import torch
from huggingface_hub import constants
from transformers import TrainingArguments

matplotlib.use("Agg")

from lora_nb.__main__ import main  # noqa: E402
from lora_nb.formats import save_settings  # noqa: E402
from lora_nb.pipeline import configure  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ENV_TOKEN = "hf_FAKEenvTokenThatMustNeverBeWritten0123"
LOGIN_TOKEN = "hf_FAKEloginTokenThatMustNeverBeWritten45"
TOKENS = (ENV_TOKEN, LOGIN_TOKEN)


@pytest.fixture
def planted_tokens(tmp_path, monkeypatch):
    """HF_TOKEN in the environment and a `huggingface-cli login` token file."""
    token_file = tmp_path / "hf_home" / "token"
    token_file.parent.mkdir()
    token_file.write_text(LOGIN_TOKEN)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(token_file))
    monkeypatch.setenv("HF_TOKEN_PATH", str(token_file))  # for child processes (the notebook's kernel)
    monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)
    assert huggingface_hub.get_token() == ENV_TOKEN  # the libraries see it during the run
    return token_file


def leaks(data: bytes | str) -> list[str]:
    raw = data.encode() if isinstance(data, str) else data
    return [t for t in TOKENS if t.encode() in raw or t.encode("utf-16-le") in raw]


def test_cli_run_writes_and_prints_no_token(planted_tokens, tiny_model_dir, tmp_path, capfd):
    settings = configure(model=tiny_model_dir)
    settings.train.save_steps = 1  # checkpoints too: they hold Trainer's pickled training_args.bin
    save_settings(settings, tmp_path / "settings.yaml")
    out = tmp_path / "run"
    status = main(["run", "--config", str(tmp_path / "settings.yaml"), "--out", str(out),
                   "--max-steps", "2", "--limit", "2", "--max-new-tokens", "4"])
    printed = capfd.readouterr()
    assert status == 0, printed.err[-2000:]
    assert "[4/4] evaluating" in printed.out

    written = sorted(p for p in out.rglob("*") if p.is_file())
    names = {p.relative_to(out).as_posix() for p in written}
    assert {"settings.yaml", "run.json", "log.jsonl", "metrics.json", "generations.md", "loss.png",
            "trainer_state.json", "adapter/adapter_config.json", "checkpoint-2/training_args.bin",
            "checkpoint-2/optimizer.pt", "checkpoint-2/adapter_config.json"} <= names
    found = {p.relative_to(out).as_posix(): leaks(p.read_bytes()) for p in written}
    assert {name: hit for name, hit in found.items() if hit} == {}
    assert leaks(printed.out + printed.err) == []
    # The scan would see a token that Trainer pickled: training_args.bin is written with torch.save.
    planted = io.BytesIO()
    torch.save(TrainingArguments(output_dir=str(tmp_path / "x"), hub_token=ENV_TOKEN), planted)
    assert leaks(planted.getvalue()) == [ENV_TOKEN]
    args = torch.load(out / "checkpoint-2" / "training_args.bin", weights_only=False)
    assert args.hub_token is None and not args.push_to_hub
    assert "<HUB_TOKEN>" in args.to_json_string()  # transformers masks the field when it prints the arguments


def test_environment_notebook_outputs_hold_no_token(planted_tokens, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(ROOT / "notebooks" / "00_environment.ipynb", as_version=4)
    client = NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # the kernel inherits HF_TOKEN and HF_TOKEN_PATH from this process
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    text = nbformat.writes(notebook)
    assert "[OK]" in text and "loads from:" in text  # the check really ran and printed its report
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert leaks(text) == []
