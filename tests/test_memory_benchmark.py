"""The memory estimate against the committed CPU measurements of benchmarks/memory.py, and the harness itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import memory as bench

RAW = Path(bench.RESULTS_DIR) / bench.RAW_FILE


@pytest.fixture(scope="module")
def rows():
    raw = json.loads(RAW.read_text())
    return {row["name"]: row for row in bench.score(raw)}  # today's estimate beside the recorded peaks


def test_every_grid_point_was_measured(rows):
    assert set(rows) == set(bench.GRID)
    assert all(row["device"] == "cpu" and row["measured"] > 0 for row in rows.values())


def test_estimate_never_under_0_9_of_the_measured_peak(rows):
    ratios = {name: round(row["ratio"], 3) for name, row in rows.items()}
    assert min(ratios.values()) >= 0.9, ratios  # under is the dangerous side: it promises a fit that fails
    assert max(ratios.values()) <= 1.15, ratios


@pytest.mark.parametrize("variant,reference", [("dora", "base"), ("mlp", "attention"), ("r64", "base"),
                                               ("dropout", "base"), ("checkpointing", "base"), ("8x128", "base")])
def test_estimated_differences_follow_the_measured_ones(rows, variant, reference):
    measured = rows[variant]["measured"] - rows[reference]["measured"]
    estimated = rows[variant]["estimate"] - rows[reference]["estimate"]
    assert (measured > 0) == (estimated > 0), (measured, estimated)
    assert 0.5 <= estimated / measured <= 2.0, (measured / 2**20, estimated / 2**20)


@pytest.mark.slow
def test_harness_measures_fresh_processes(tmp_path):
    assert bench.main(["--model", "tiny", "--points", "base,dora", "--out", str(tmp_path)]) == 0
    raw = json.loads((tmp_path / bench.RAW_FILE).read_text())
    assert [row["name"] for row in raw["rows"]] == ["base", "dora"]
    assert all(row["peak_rss"] > 0 and row["loss"] > 0 for row in raw["rows"])
    assert (tmp_path / "memory_grid.png").stat().st_size > 0
    table = (tmp_path / "memory_grid.md").read_text()
    assert "| dora | 4 x 128 | dora True |" in table
