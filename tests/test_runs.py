"""Runs: reading run folders back and comparing them."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

from lora_nb.errors import RunFolderError  # noqa: E402
from lora_nb.formats import save_settings  # noqa: E402
from lora_nb.presets import get_preset  # noqa: E402
from lora_nb.runs import compare_runs, load_run, plot_runs  # noqa: E402


def _fake_run(folder, r, losses, exact):
    folder.mkdir(parents=True)
    settings = get_preset("demo-cpu")
    settings.lora.r = r
    save_settings(settings, folder / "settings.yaml")
    (folder / "run.json").write_text(json.dumps({"status": "finished", "global_step": len(losses)}))
    log = [{"step": i + 1, "loss": loss} for i, loss in enumerate(losses)] + [{"step": len(losses), "eval_loss": 1.5}]
    (folder / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in log))
    (folder / "metrics.json").write_text(json.dumps({
        "before": {"heldout_loss": 3.0, "exact_match": 0.0, "n": 4},
        "after": {"heldout_loss": 1.5, "exact_match": exact, "n": 4}}))
    return folder


def test_compare_runs_lists_final_numbers_and_only_differing_settings(tmp_path):
    a = _fake_run(tmp_path / "r8", 8, [3.0, 2.0], 0.5)
    b = _fake_run(tmp_path / "r16", 16, [3.0, 1.0, 0.5], 0.75)
    table = compare_runs([a, b])
    assert [row["run"] for row in table] == ["r8", "r16"]
    assert [row["final train loss"] for row in table] == [2.0, 0.5]
    assert [row["after.exact_match"] for row in table] == [0.5, 0.75]
    assert [row["lora.r"] for row in table] == [8, 16]
    assert "lora.lora_alpha" not in table.columns()  # the same in both runs
    assert table[1]["steps"] == 3 and table[0]["before.heldout_loss"] == 3.0


def test_plot_runs_draws_each_run(tmp_path):
    runs = [_fake_run(tmp_path / n, 8, [2.0, 1.0], 0.5) for n in ("a", "b")]
    labels = [line.get_label() for line in plot_runs(runs).axes[0].lines]
    assert labels == ["a train", "a held-out", "b train", "b held-out"]


def test_load_run_of_a_plain_folder_says_what_is_missing(tmp_path):
    with pytest.raises(RunFolderError, match="neither run.json nor settings.yaml"):
        load_run(tmp_path)
    info = load_run(_fake_run(tmp_path / "x", 4, [1.0], 0.0))
    assert info.settings.lora.r == 4 and info.metrics["after"]["exact_match"] == 0.0


def test_find_and_latest_run_keep_finished_runs_with_adapters(tmp_path):
    from lora_nb.run_folder import new_run_dir
    from lora_nb.runs import find_runs, latest_run

    assert latest_run(tmp_path) is None
    done = _fake_run(tmp_path / "done", 8, [1.0], 0.5)
    (done / "adapter").mkdir()
    (done / "adapter" / "adapter_config.json").write_text("{}")
    _fake_run(tmp_path / "no-adapter", 8, [1.0], 0.5)
    assert find_runs(tmp_path) == [done] and latest_run(tmp_path) == done
    fresh = new_run_dir(tmp_path, "train")
    assert fresh.parent == tmp_path and fresh.name.startswith("train-") and not fresh.exists()


def test_compare_runs_shows_n_and_says_when_heldout_sets_differ(tmp_path):
    a = _fake_run(tmp_path / "thirty", 8, [2.0], 0.833)
    b = _fake_run(tmp_path / "eight", 16, [2.0], 0.875)
    for folder, n in ((a, 30), (b, 8)):
        metrics = json.loads((folder / "metrics.json").read_text())
        (folder / "metrics.json").write_text(json.dumps({**metrics, "n_examples": n}))
    table = compare_runs([a, b])
    assert [row["n"] for row in table] == [30, 8]
    assert "different held-out sets (n = thirty: 30, eight: 8)" in table.note
    page = table._repr_html_()
    assert page.startswith("<p style='color:#a60'><b>Note:</b>") and "max-width:100%" in page
    assert "lora.<wbr>r" in page and "0.833" in page
    same = compare_runs([_fake_run(tmp_path / "c", 8, [2.0], 0.5), _fake_run(tmp_path / "d", 4, [2.0], 0.5)])
    assert [row["n"] for row in same] == [4, 4] and same.note == "" and "Note" not in same._repr_html_()
