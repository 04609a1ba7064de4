"""Runs: read finished run folders back and compare them (final numbers, differing settings, curves).

A run folder (see `run_folder.py`) holds settings.yaml, run.json, log.jsonl, the adapter and, after
evaluation, metrics.json. `compare_runs` puts several side by side: one row per run with its final
losses, the task metric and the number of held-out examples it was measured on (`n`), plus only the
settings that differ between the runs, since those explain the difference. When runs were evaluated
on different held-out sets (different `n`), the table says so above it: 0.83 on 30 examples and 0.88
on 8 are not a comparison.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .errors import RunFolderError
from .formats import flat_settings, load_settings
from .plots import loss_points, plot_losses
from .run_folder import ADAPTER_CONFIG_FILE, ADAPTER_DIR, METRICS_FILE, RUN_FILE, SETTINGS_FILE
from .table import Table

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .settings import KitSettings


@dataclass
class RunInfo:
    """What one run folder says about its run.

    Attributes:
        path: The folder.
        settings: Its settings (None when settings.yaml is missing or unreadable).
        run: run.json (status, base model, steps).
        metrics: metrics.json (before/after evaluation), or None before evaluation.
        train_losses: `(step, loss)` points from log.jsonl.
        eval_losses: `(step, eval_loss)` points.
    """

    path: Path
    settings: KitSettings | None
    run: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] | None = None
    train_losses: list[tuple[int, float]] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The folder name."""
        return self.path.name

    @property
    def run_dir(self) -> Path:
        """Same as `path` (so plots label the curve with the folder name)."""
        return self.path


def load_run(run_dir: str | Path) -> RunInfo:
    """Read a run folder.

    Args:
        run_dir: The run folder.

    Returns:
        A `RunInfo`; what the folder lacks (metrics before evaluation, a damaged settings file) is None.

    Raises:
        RunFolderError: The folder does not exist or holds neither run.json nor settings.yaml.
    """
    path = Path(run_dir).expanduser()
    if not (path / RUN_FILE).exists() and not (path / SETTINGS_FILE).exists():
        raise RunFolderError(
            f"{path} is not a run folder: it holds neither run.json nor settings.yaml. Pass a folder that "
            "train(..., run_dir=...) or `python -m lora_nb run --out ...` wrote."
        )
    run = _json(path / RUN_FILE) or {}
    metrics = _json(path / METRICS_FILE)
    settings = None
    if (path / SETTINGS_FILE).exists():
        try:
            settings = load_settings(path / SETTINGS_FILE).settings
        except Exception:  # noqa: BLE001 - a damaged settings file should not hide the run's numbers
            settings = None
    try:
        train, evals = loss_points(path)
    except RunFolderError:
        train, evals = [], []
    return RunInfo(path, settings, run, metrics, train, evals)


def find_runs(root: str | Path = "runs", finished_only: bool = True) -> list[Path]:
    """Run folders directly under `root`, oldest first (by run.json modification time).

    Args:
        root: The folder holding run folders.
        finished_only: Keep only runs whose run.json says "finished" and that hold an adapter.

    Returns:
        The run folders.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        return []
    found = []
    for run_file in root.glob(f"*/{RUN_FILE}"):
        folder = run_file.parent
        if finished_only:
            status = (_json(run_file) or {}).get("status")
            if status != "finished" or not (folder / ADAPTER_DIR / ADAPTER_CONFIG_FILE).exists():
                continue
        found.append(folder)
    return sorted(found, key=lambda p: (p / RUN_FILE).stat().st_mtime)


def latest_run(root: str | Path = "runs") -> Path | None:
    """The most recent finished run under `root`, or None.

    Args:
        root: The folder holding run folders.

    Returns:
        The folder (by run.json modification time), or None when no run there has finished.
    """
    runs = find_runs(root)
    return runs[-1] if runs else None


def _json(file: Path) -> dict | None:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None  # a list or a number is not a file the kit wrote


class RunTable(Table):
    """`compare_runs`' table: a note when the held-out sets differ, headers that wrap, short numbers.

    Attributes:
        note: Shown above the table (empty when the runs compare like with like).
    """

    note: str = ""

    def _repr_html_(self) -> str:
        cols = self.columns()
        head = "".join(f"<th style='text-align:left;vertical-align:bottom'>{_wrappable(c)}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td style='text-align:left'>{html.escape(_short(row.get(c)))}</td>"
                                        for c in cols) + "</tr>" for row in self)
        note = f"<p style='color:#a60'><b>Note:</b> {html.escape(self.note)}</p>" if self.note else ""
        return (f"{note}<div style='max-width:100%;overflow-x:auto'><table style='font-size:85%;"
                f"table-layout:auto'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")


def _wrappable(name: str) -> str:
    """A column name that may break after dots and underscores (so long setting names wrap)."""
    return html.escape(name).replace(".", ".<wbr>").replace("_", "_<wbr>")


def _short(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def heldout_note(sizes: dict[str, int | None]) -> str:
    """A sentence when the runs' metrics were measured on different numbers of held-out examples, else "".

    Args:
        sizes: Each run's number of held-out examples (None when unknown).

    Returns:
        The note `compare_runs` shows above its table.
    """
    known = {name: n for name, n in sizes.items() if n is not None}
    if len(set(known.values())) <= 1:
        return ""
    listed = ", ".join(f"{name}: {n}" for name, n in known.items())
    return (f"the runs were evaluated on different held-out sets (n = {listed}); their metrics are not "
            "directly comparable. Evaluate them on the same examples (evaluate_run with the same limit).")


def compare_runs(run_dirs: Sequence[str | Path | RunInfo]) -> RunTable:
    """One row per run: final train and held-out loss, the metrics before/after, differing settings.

    Args:
        run_dirs: Run folders (or `load_run` results).

    Returns:
        A `RunTable` (HTML in a notebook). `n` is the number of held-out examples the metrics were
        measured on; metric columns are `after.<name>` (and `before.<name>` for the held-out loss);
        settings columns are the dotted setting names, only where runs differ. Its `note` says when
        the runs' held-out sets differ.
    """
    runs = [r if isinstance(r, RunInfo) else load_run(r) for r in run_dirs]
    settings = [flat_settings(r.settings.to_dict()) if r.settings else {} for r in runs]
    keys = list(dict.fromkeys(k for s in settings for k in s))
    differing = [k for k in keys if len({json.dumps(s.get(k), default=str) for s in settings}) > 1]
    table = RunTable()
    for run, flat in zip(runs, settings):
        row: dict[str, Any] = {
            "run": run.name,
            "status": run.run.get("status", ""),
            "steps": run.run.get("global_step", run.train_losses[-1][0] if run.train_losses else None),
            "final train loss": run.train_losses[-1][1] if run.train_losses else None,
            "final held-out loss": run.eval_losses[-1][1] if run.eval_losses else None,
        }
        if run.metrics:
            row["n"] = _heldout_size(run.metrics)
            for side in ("before", "after"):
                for name, value in (run.metrics.get(side) or {}).items():
                    if name != "n" and (side == "after" or name == "heldout_loss"):
                        row[f"{side}.{name}"] = value
        row |= {k: flat.get(k) for k in differing}
        table.append(row)
    table.note = heldout_note({row["run"]: row.get("n") for row in table})
    return table


def _heldout_size(metrics: dict[str, Any]) -> int | None:
    """How many held-out examples the metrics were measured on (metrics.json's n_examples, else a side's n)."""
    for value in (metrics.get("n_examples"), (metrics.get("after") or {}).get("n")):
        if isinstance(value, int):
            return value
    return None


def plot_runs(run_dirs: Sequence[str | Path | RunInfo], title: str = "Loss of each run") -> Figure:
    """The runs' training and held-out loss curves on one axes, one colour per run.

    Args:
        run_dirs: Run folders (or `load_run` results).
        title: The axes title.

    Returns:
        The figure.
    """
    runs = [r if isinstance(r, RunInfo) else load_run(r) for r in run_dirs]
    return plot_losses({r.name: r for r in runs}, title=title)
