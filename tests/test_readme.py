"""The README's API examples run as written, and what their comments promise is what they print."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_api_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path, monkeypatch):
    code = BLOCKS[index]
    if "run_pipeline(" in code:
        pytest.skip("the full pipeline on the demo model is run by tests/test_memory.py::test_demo_recipe_margins")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, f"README block {index}", "exec"), {})
    out = printed.getvalue()
    for promised in re.findall(r"# (\S+ \d+ \{.*\})$", code, flags=re.M):  # e.g. "axolotl 32 {'wandb_project': 'x'}"
        assert promised in out
    if "advice()" in code:
        assert "lora.lora_alpha / r = 0.5: the usual ratio is 1 to 2" in out
    if "count_trainable" in code:
        assert "4,884,480 of" in out
    if "save_settings" in code:
        assert (tmp_path / "runs" / "example.yaml").is_file()
