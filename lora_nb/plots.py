"""Plots: memory per precision, NF4 on real weights, token lengths, loss curves (with the learning rate
beside the loss), and a live loss plot during training.

Every function returns a matplotlib `Figure` (already closed in pyplot, so a notebook shows it once,
as the cell's value) and takes plain data: numbers, a `TrainResult`, a log history, or run folders.
`LiveLossPlot` is a `TrainerCallback`: the training loop only fires it; in a notebook it redraws
one figure in place, elsewhere it just collects the points.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import matplotlib.pyplot as plt
from IPython import get_ipython
from IPython.display import display
from transformers import TrainerCallback

from .errors import RunFolderError
from .nf4 import BLOCK, nf4_levels, nf4_round_trip
from .run_folder import LOG_FILE, TRAINER_STATE_FILE, RunFolder

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Points = list[tuple[int, float]]


def _new_figure(width: float = 6.0, height: float = 3.5, ncols: int = 1):
    fig, axes = plt.subplots(1, ncols, figsize=(width, height), squeeze=False)
    plt.close(fig)  # returned to the caller, not left in pyplot's list (that would display it twice)
    return fig, list(axes[0])


# ---------------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------------


def plot_memory(footprints: Sequence[Any] | Mapping[str, float | None], title: str = "Model memory by precision") -> Figure:
    """Bar chart of model footprints in MB.

    Args:
        footprints: `loading.compare_precisions()` results (objects with `label`, `bytes`,
            `available`, `reason`), or a mapping label -> bytes (None = unavailable).
        title: Axes title.

    Returns:
        The figure; bar heights are MB (10^6 bytes), unavailable precisions are a 0-height bar
        labelled "n/a".
    """
    if isinstance(footprints, Mapping):
        rows = [(label, value) for label, value in footprints.items()]
    else:
        rows = [(f.label, f.bytes if getattr(f, "available", True) else None) for f in footprints]
    fig, (ax,) = _new_figure()
    labels = [label for label, _ in rows]
    heights = [0.0 if b is None else b / 1e6 for _, b in rows]
    bars = ax.bar(labels, heights, color=["#bbbbbb" if b is None else "#4c72b0" for _, b in rows])
    top = max(heights, default=0.0) or 1.0
    for bar, (_, b) in zip(bars, rows):
        text = "n/a" if b is None else f"{b / 1e6:,.1f} MB"
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + top * 0.01, text, ha="center", va="bottom")
    ax.set_ylim(0, top * 1.15)
    ax.set_ylabel("memory footprint (MB)")
    ax.set_title(title)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# NF4
# ---------------------------------------------------------------------------------------------------------------


def plot_nf4(weight: Any, name: str = "weight", block: int = 0) -> Figure:
    """NF4 on one real weight matrix: the 16 levels over the weights, one block before and after, the error.

    Args:
        weight: A weight tensor (a full-precision linear layer's ``weight``).
        name: The layer's name, for the titles.
        block: Which block of 64 weights to show in the middle panel.

    Returns:
        The figure: left, the weights divided by their block's absmax (histogram) with the 16 NF4 levels
        as lines; middle, the 64 weights of one block and what 4-bit storage gives back; right, the
        error of every weight of the matrix.
    """
    rt = nf4_round_trip(weight)
    levels = nf4_levels().numpy()
    fig, (left, middle, right) = _new_figure(13.0, 3.6, ncols=3)
    scaled = (rt.original.reshape(-1, BLOCK) / rt.scales[:, None]).reshape(-1).numpy()
    left.hist(scaled, bins=120, color="#4c72b0")
    for level in levels:
        left.axvline(level, color="#c44e52", lw=0.8)
    left.set_xlabel("weight / absmax of its block")
    left.set_ylabel("weights")
    left.set_title(f"{name}: the 16 NF4 levels (red)")

    start = block * BLOCK
    xs = range(BLOCK)
    before = rt.original[start:start + BLOCK].numpy()
    after = rt.restored[start:start + BLOCK].numpy()
    middle.plot(xs, before, "o", ms=3.5, color="#4c72b0", label="original")
    middle.plot(xs, after, "_", ms=9, mew=2, color="#c44e52", label="4-bit, restored")
    middle.vlines(xs, before, after, color="grey", lw=0.6)
    middle.set_xlabel(f"weight in block {block} (absmax {rt.scales[block]:.3g})")
    middle.set_title("one block of 64 weights")
    middle.legend(fontsize=8)

    error = rt.error.numpy()
    right.hist(error, bins=120, color="#55a868")
    rel = float(rt.error.abs().mean() / rt.original.abs().mean())
    right.set_xlabel("restored - original")
    right.set_title(f"error: mean |error| = {rel:.0%} of mean |w|")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Lengths
# ---------------------------------------------------------------------------------------------------------------


def plot_length_histogram(lengths: Any, max_length: int | None = None, bins: int = 30,
                          title: str = "Tokens per example") -> Figure:
    """Histogram of example lengths in tokens, with the cut-off drawn when given.

    Args:
        lengths: A list of token counts, or a tokenized data set (its `length` column, else the
            lengths of `input_ids`).
        max_length: The `max_seq_length` cut-off, drawn as a dashed vertical line.
        bins: Number of histogram bins.
        title: Axes title.

    Returns:
        The figure.
    """
    lengths = _lengths(lengths)
    fig, (ax,) = _new_figure()
    ax.hist(lengths, bins=bins, color="#4c72b0")
    if max_length is not None:
        ax.axvline(max_length, color="#c44e52", linestyle="--", label=f"max_seq_length = {max_length}")
        ax.legend()
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    ax.set_title(title)
    return fig


def _lengths(data: Any) -> list[int]:
    columns = getattr(data, "column_names", None)
    if columns is not None:
        return list(data["length"]) if "length" in columns else [len(x) for x in data["input_ids"]]
    return [int(n) for n in data]


# ---------------------------------------------------------------------------------------------------------------
# Loss curves
# ---------------------------------------------------------------------------------------------------------------


def loss_points(source: Any) -> tuple[Points, Points]:
    """The `(step, loss)` training points and `(step, eval_loss)` evaluation points of a run.

    Args:
        source: A `TrainResult`, a log history (list of dicts as `Trainer.state.log_history` or
            the run folder's log.jsonl records), or a run folder path (its log.jsonl, else its
            trainer_state.json).

    Returns:
        `(train, eval)` lists of `(step, loss)`.
    """
    if hasattr(source, "train_losses") and hasattr(source, "eval_losses"):
        return list(source.train_losses), list(source.eval_losses)
    records = _history(source) if isinstance(source, (str, Path)) else list(source)
    train = [(int(r["step"]), float(r["loss"])) for r in records if "loss" in r and "step" in r]
    evals = [(int(r["step"]), float(r["eval_loss"])) for r in records if "eval_loss" in r and "step" in r]
    return train, evals


def lr_points(source: Any) -> Points:
    """The `(step, learning_rate)` points of a run (same sources as `loss_points`).

    Args:
        source: A `TrainResult`, a `RunInfo`, a run folder, or log records.

    Returns:
        The points of the logged training steps (none for a `RunInfo` whose folder holds no log).
    """
    if hasattr(source, "history"):  # a TrainResult
        source = source.history
    elif hasattr(source, "train_losses"):  # a RunInfo: its folder's log
        run_dir = Path(getattr(source, "run_dir", None) or "")
        if not ((run_dir / LOG_FILE).exists() or (run_dir / TRAINER_STATE_FILE).exists()):
            return []
        source = run_dir
    records = _history(source) if isinstance(source, (str, Path)) else list(source)
    return [(int(r["step"]), float(r["learning_rate"])) for r in records if "learning_rate" in r and "step" in r
            and "loss" in r]


def _history(run_dir: str | Path) -> list[dict]:
    run_dir = Path(run_dir)
    if (run_dir / LOG_FILE).exists():
        return RunFolder(run_dir).read_log()  # one reader of log.jsonl: skips damaged and foreign lines
    state = run_dir / TRAINER_STATE_FILE
    if state.exists():
        return json.loads(state.read_text(encoding="utf-8")).get("log_history", [])
    raise RunFolderError(
        f"{run_dir} holds neither log.jsonl nor trainer_state.json, so it has no losses to plot. "
        "Pass the folder a training run wrote (train(..., run_dir=...))."
    )


def plot_losses(sources: Any, labels: Sequence[str] | None = None, title: str = "Loss",
                log_scale: bool = False) -> Figure:
    """Training loss (solid) and held-out loss (dashed, dots) against the optimizer step.

    Args:
        sources: One run (anything `loss_points` reads), or a list of them, or a mapping
            label -> run, to compare runs on one axes.
        labels: Names of the runs (default: the folder name, or "run N").
        title: Axes title.
        log_scale: Logarithmic loss axis (useful when the loss falls by orders of magnitude).

    Returns:
        The figure: per run, a line "<label> train" and, when evaluated, "<label> held-out".
    """
    runs = _runs(sources, labels)
    single = len(runs) == 1 and bool(lr_points(runs[0][1]))
    fig, axes = _new_figure(11.0 if single else 7.0, 4.0, ncols=2 if single else 1)
    ax = axes[0]
    colors = [f"C{i}" for i in range(10)]
    for i, (label, source) in enumerate(runs):
        train, evals = loss_points(source)
        color = colors[i % len(colors)]
        prefix = f"{label} " if len(runs) > 1 else ""
        if train:
            ax.plot(*zip(*train), color=color, label=f"{prefix}train")
        if evals:
            ax.plot(*zip(*evals), color=color, linestyle="--", marker="o", label=f"{prefix}held-out")
    _style_loss_axes(ax, title, log_scale)
    if single:
        _plot_lr(axes[1], lr_points(runs[0][1]))
        fig.tight_layout()
    return fig


def _plot_lr(ax, points: Points, max_steps: int | None = None) -> None:
    """The learning rate per step, beside the loss: warmup from 0, then the schedule."""
    if points:
        ax.plot(*zip(*points), color="C2", marker=".")
    if max_steps:
        ax.set_xlim(0, max_steps)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title("Learning rate (warmup, then decay)")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.grid(alpha=0.3)


def _style_loss_axes(ax, title: str, log_scale: bool = False) -> None:
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    if log_scale:
        ax.set_yscale("log")
    if ax.lines:
        ax.legend()
    ax.grid(alpha=0.3)


def _runs(sources: Any, labels: Sequence[str] | None) -> list[tuple[str, Any]]:
    if isinstance(sources, Mapping):
        return [(str(k), v) for k, v in sources.items()]
    single = isinstance(sources, (str, Path)) or hasattr(sources, "train_losses") or (
        isinstance(sources, list) and (not sources or isinstance(sources[0], dict))
    )
    items = [sources] if single else list(sources)
    names = list(labels) if labels else [_default_label(s, i) for i, s in enumerate(items)]
    return list(zip(names, items))


def _default_label(source: Any, i: int) -> str:
    if isinstance(source, (str, Path)):
        return Path(source).name
    run_dir = getattr(source, "run_dir", None)
    return Path(run_dir).name if run_dir else f"run {i + 1}"


# ---------------------------------------------------------------------------------------------------------------
# Live plot while training
# ---------------------------------------------------------------------------------------------------------------


def _in_notebook() -> bool:
    """True inside a Jupyter kernel (where display handles can update a figure in place)."""
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


class LiveLossPlot(TrainerCallback):
    """Redraws training and held-out loss, and the learning rate beside them, in place while `Trainer` runs.

    In a notebook the figure is shown once when training starts and updated through an IPython
    display handle at each log; elsewhere (a script, a test) nothing is displayed and the points
    are only collected. Pass it to `train(..., callbacks=[LiveLossPlot()])`.

    Attributes:
        train: `(step, loss)` points so far.
        eval: `(step, eval_loss)` points so far.
        figure: The figure, after the first log.
    """

    def __init__(self, title: str = "Loss (live)", display: bool | None = None):
        """
        Args:
            title: Axes title.
            display: Show and update the figure; default: only inside a Jupyter kernel.
        """
        self.title = title
        self.display = _in_notebook() if display is None else display
        self.train: Points = []
        self.eval: Points = []
        self.lr: Points = []
        self.figure: Figure | None = None
        self._handle = None

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed run starts with the history of the steps already done.
        self.train, self.eval = loss_points(state.log_history)
        self.lr = lr_points(state.log_history)
        self._max_steps = state.max_steps

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.train.append((state.global_step, float(logs["loss"])))
            if "learning_rate" in logs:
                self.lr.append((state.global_step, float(logs["learning_rate"])))
        if "eval_loss" in logs:
            self.eval.append((state.global_step, float(logs["eval_loss"])))
        if "loss" in logs or "eval_loss" in logs:
            self.redraw(max_steps=state.max_steps)

    def redraw(self, max_steps: int | None = None) -> Figure:
        """Draw the current points (and update the notebook output when displaying).

        Args:
            max_steps: The run's optimizer steps (the x-axis ends there), when known.

        Returns:
            The figure.
        """
        if self.figure is None:
            self.figure, (self._ax, self._lr_ax) = _new_figure(11.0, 4.0, ncols=2)
        ax = self._ax
        ax.clear()
        self._lr_ax.clear()
        _plot_lr(self._lr_ax, self.lr, max_steps)
        if self.train:
            ax.plot(*zip(*self.train), color="C0", label="train")
        if self.eval:
            ax.plot(*zip(*self.eval), color="C1", linestyle="--", marker="o", label="held-out")
        if max_steps and max_steps > 0:
            ax.set_xlim(0, max_steps)
        _style_loss_axes(ax, self.title)
        self.figure.tight_layout()
        if self.display:
            self._show()
        return self.figure

    def _show(self) -> None:
        if self._handle is None:
            self._handle = display(self.figure, display_id=True)
        else:
            self._handle.update(self.figure)
