"""`python -m lora_nb gpu-check`: the CPU smoke version runs every variant it can and explains the rest."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lora_nb.__main__ import main
from lora_nb.gpu_check import (
    CheckReport,
    VariantResult,
    _add_findings,
    _add_ratios,
    _flops_per_token,
    run_gpu_check,
    variants,
)
from lora_nb.fit import load_config


def test_variants_cover_the_gpu_paths():
    names = [v["variant"] for v in variants(cuda=True, bf16=True)]
    assert names == ["kit bf16", "plain bf16", "kit fp16", "plain fp16", "kit paged 8-bit AdamW",
                     "kit gradient checkpointing", "plain without cuDNN attention"]
    t4 = {v["variant"]: v["reason"] for v in variants(cuda=True, bf16=False)}
    assert "no bf16" in t4["kit bf16"] and t4["kit fp16"] == ""  # fp16 with loss scaling runs on every card
    cpu = {v["variant"]: v["reason"] for v in variants(cuda=False, bf16=False)}
    assert cpu["kit fp32"] == "" and "CUDA" in cpu["kit fp16"] and "CUDA" in cpu["kit paged 8-bit AdamW"]
    assert "CUDA" in cpu["plain without cuDNN attention"]


def test_the_kit_is_compared_with_the_default_recipe_and_the_recipe_without_cudnn_is_a_note():
    rows = [VariantResult("m", "kit bf16", "kit", "bf16", real_tokens_per_s=300, peak_allocated_gib=3),
            VariantResult("m", "plain bf16", "plain", "bf16", real_tokens_per_s=100, peak_allocated_gib=6),
            VariantResult("m", "plain without cuDNN attention", "plain", "bf16", cudnn_attention=False,
                          real_tokens_per_s=200, peak_allocated_gib=6)]
    _add_ratios(rows)
    assert (rows[0].ratio_vs_plain, rows[0].memory_vs_plain) == (3.0, 0.5)
    report = CheckReport(device="d", gpu="g", cuda=True, smoke=False, results=rows)
    _add_findings(report)
    assert "m kit bf16: 1.50x the recipe without cuDNN attention" in " ".join(report.notes)


def test_flops_per_token_of_a_1b_llama():
    # 4 x 1.236e9 matrix parameters (forward + input gradient) + attention at 288 tokens
    config = load_config("meta-llama/Llama-3.2-1B")
    assert _flops_per_token(config, 288) == pytest.approx(4 * 1.236e9 + 12 * 16 * 288 * 2048, rel=0.01)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke version is the CPU path")
def test_smoke_version_on_cpu(tmp_path, capsys):
    assert main(["gpu-check", "--out", str(tmp_path), "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "The real check needs a CUDA GPU" in out
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["smoke"] and not report["cuda"]
    rows = {r["variant"]: r for r in report["results"]}
    for name in ("kit fp32", "plain fp32", "kit gradient checkpointing"):
        row = rows[name]
        assert row["error"] == "" and row["steps"] == 2, row
        assert row["real_tokens_per_s"] > 0 and math.isfinite(row["first_loss"]) and math.isfinite(row["last_loss"])
        assert row["estimate_gib"] > 0
    assert rows["kit fp32"]["ratio_vs_plain"] > 0
    assert rows["kit fp32"]["batches"] == "padding-free rows" and rows["plain fp32"]["batches"] == "padded"
    assert rows["kit fp32"]["notes"] == []  # no slower path taken, so no reason to give
    assert rows["kit fp16"]["error"] == "needs a CUDA GPU"
    assert "not run: needs a CUDA GPU" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke version is the CPU path")
def test_the_report_is_on_disk_after_every_variant(tmp_path):
    written = []

    def log(line: str) -> None:  # called before each variant: the variants before it are on disk
        report = tmp_path / "gpu_check.json"
        written.append(len(json.loads(report.read_text())["results"]) if report.exists() else 0)

    report = run_gpu_check(tmp_path, steps=2, smoke=True, log=log)
    assert written == list(range(len(report.results)))
    assert len(json.loads((tmp_path / "gpu_check.json").read_text())["results"]) == len(report.results)
