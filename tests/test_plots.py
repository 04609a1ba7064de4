"""Plots: the figures hold the data they were given; the live plot works without a notebook."""

from __future__ import annotations

import json
import types

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

from lora_nb.errors import RunFolderError  # noqa: E402
from lora_nb.loading import Footprint  # noqa: E402
from lora_nb.plots import (LiveLossPlot, loss_points, lr_points, plot_length_histogram, plot_losses,  # noqa: E402
                           plot_memory, plot_nf4)

HISTORY = [
    {"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "eval_loss": 2.5},
    {"step": 3, "loss": 1.0}, {"step": 4, "loss": 0.5}, {"step": 4, "eval_loss": 0.9},
]


def _lines(fig):
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in fig.axes[0].lines}


def test_plot_memory_bar_heights_in_mb():
    fig = plot_memory([Footprint("fp32", 540_000_000), Footprint("4bit", 120_000_000),
                       Footprint("8bit", None, False, "no backend")])
    ax = fig.axes[0]
    assert [b.get_height() for b in ax.patches] == pytest.approx([540.0, 120.0, 0.0])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["fp32", "4bit", "8bit"]
    assert [t.get_text() for t in ax.texts] == ["540.0 MB", "120.0 MB", "n/a"]


def test_plot_memory_accepts_mapping():
    fig = plot_memory({"fp32": 2e6, "bf16": 1e6})
    assert [b.get_height() for b in fig.axes[0].patches] == pytest.approx([2.0, 1.0])


def test_length_histogram_counts_every_example_and_draws_cutoff():
    fig = plot_length_histogram([10, 12, 12, 40, 90], max_length=64, bins=5)
    ax = fig.axes[0]
    assert sum(p.get_height() for p in ax.patches) == 5
    (cutoff,) = ax.lines
    assert list(cutoff.get_xdata()) == [64, 64]


def test_plot_losses_from_history():
    lines = _lines(plot_losses(HISTORY))
    assert lines["train"] == ([1, 2, 3, 4], [3.0, 2.0, 1.0, 0.5])
    assert lines["held-out"] == ([2, 4], [2.5, 0.9])


def test_plot_losses_compares_run_folders(tmp_path):
    for name, scale in (("a", 1.0), ("b", 2.0)):
        folder = tmp_path / name
        folder.mkdir()
        records = [{**r, **{k: v * scale for k, v in r.items() if "loss" in k}} for r in HISTORY]
        (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 5, "lo')
    lines = _lines(plot_losses([tmp_path / "a", tmp_path / "b"]))
    assert set(lines) == {"a train", "a held-out", "b train", "b held-out"}
    assert lines["b train"][1] == [6.0, 4.0, 2.0, 1.0]  # the damaged last line is skipped


def test_plot_losses_reads_train_result_and_trainer_state(tmp_path):
    result = types.SimpleNamespace(train_losses=[(1, 2.0), (2, 1.0)], eval_losses=[], run_dir=tmp_path)
    assert _lines(plot_losses(result)) == {"train": ([1, 2], [2.0, 1.0])}
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": HISTORY}))
    assert loss_points(tmp_path)[1] == [(2, 2.5), (4, 0.9)]


def test_plot_losses_on_empty_folder_says_what_is_missing(tmp_path):
    with pytest.raises(RunFolderError, match="neither log.jsonl nor trainer_state.json"):
        plot_losses(tmp_path)


def test_live_plot_collects_and_redraws_headless():
    plot = LiveLossPlot()
    assert plot.display is False  # no Jupyter kernel here
    state = types.SimpleNamespace(log_history=[], max_steps=4, global_step=0)
    plot.on_train_begin(None, state, None)
    for record in HISTORY:
        state.global_step = record["step"]
        plot.on_log(None, state, None, logs={k: v for k, v in record.items() if k != "step"})
    assert plot.train == [(1, 3.0), (2, 2.0), (3, 1.0), (4, 0.5)]
    lines = _lines(plot.figure)
    assert lines["held-out"] == ([2, 4], [2.5, 0.9])
    assert plot.figure.axes[0].get_xlim() == (0, 4)


def test_live_plot_updates_one_display_handle(monkeypatch):
    shown = []

    class Handle:
        def update(self, fig):
            shown.append(("update", fig))

    def fake_display(fig, display_id=False):
        shown.append(("display", fig))
        return Handle()

    monkeypatch.setattr("lora_nb.plots.display", fake_display)  # plots imports it at module level
    plot = LiveLossPlot(display=True)
    state = types.SimpleNamespace(log_history=[{"step": 1, "loss": 2.0}], max_steps=3, global_step=2)
    plot.on_train_begin(None, state, None)  # a resumed run starts from its history
    plot.on_log(None, state, None, logs={"loss": 1.5})
    state.global_step = 3
    plot.on_log(None, state, None, logs={"loss": 1.0})
    assert [kind for kind, _ in shown] == ["display", "update"]
    assert plot.train == [(1, 2.0), (2, 1.5), (3, 1.0)]


def test_learning_rate_is_shown_beside_the_loss(tmp_path):
    history = [{"step": s, "loss": 2.0 / s, "learning_rate": lr} for s, lr in ((1, 0.0), (2, 1e-3), (3, 5e-4))]
    fig = plot_losses(history)
    assert len(fig.axes) == 2
    lr_line = fig.axes[1].lines[0]
    assert list(lr_line.get_xdata()) == [1, 2, 3] and list(lr_line.get_ydata()) == [0.0, 1e-3, 5e-4]
    assert lr_points(history) == [(1, 0.0), (2, 1e-3), (3, 5e-4)]
    plot = LiveLossPlot(display=False)
    state = types.SimpleNamespace(log_history=[], max_steps=3, global_step=0)
    plot.on_train_begin(None, state, None)
    for record in history:
        state.global_step = record["step"]
        plot.on_log(None, state, None, logs={k: v for k, v in record.items() if k != "step"})
    assert plot.lr == [(1, 0.0), (2, 1e-3), (3, 5e-4)]
    assert list(plot.figure.axes[1].lines[0].get_ydata()) == [0.0, 1e-3, 5e-4]


def test_nf4_plot_is_made_from_the_weights():
    import torch

    weight = torch.randn(8, 128, generator=torch.Generator().manual_seed(0))
    fig = plot_nf4(weight, "q_proj", block=1)
    left, middle, right = fig.axes
    assert len(left.lines) == 16  # one line per NF4 level
    original = list(middle.lines[0].get_ydata())
    assert original == pytest.approx(weight.reshape(-1)[64:128].tolist())
    assert len(right.patches) == 120
