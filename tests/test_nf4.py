"""NF4 by hand equals bitsandbytes' NF4, and parameter counts of a 4-bit model explain the 'missing' weights."""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import torch

from lora_nb.loading import load_model
from lora_nb.nf4 import bits_per_weight, count_parameters, nf4_levels, nf4_round_trip


def test_hand_round_trip_equals_bitsandbytes():
    weight = torch.randn(32, 128, generator=torch.Generator().manual_seed(1))
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    restored = bnbf.dequantize_4bit(packed, state).reshape(-1)
    rt = nf4_round_trip(weight)
    assert torch.equal(rt.restored, restored)
    assert rt.codes.min() >= 0 and rt.codes.max() <= 15 and rt.scales.shape == (weight.numel() // 64,)
    assert torch.equal(rt.scales, state.absmax)


def test_levels_are_normal_quantiles_dense_near_zero():
    levels = nf4_levels()
    assert len(levels) == 16 and levels[0] == -1 and levels[-1] == 1 and 0 in levels
    gaps = levels.diff()
    assert gaps[7] < gaps[0] and gaps[8] < gaps[-1]  # closer together near 0 than in the tails


def test_bits_per_weight():
    assert bits_per_weight(False) == 4.5
    assert round(bits_per_weight(True), 3) == 4.127


def test_4bit_model_counts_packed_weights_half(tiny_model_dir):
    full = load_model(tiny_model_dir, "none").model
    quant = load_model(tiny_model_dir, "4bit").model
    counts = count_parameters(quant)
    full_count = sum(p.numel() for p in full.parameters())
    assert counts.real == full_count
    assert counts.stored == sum(p.numel() for p in quant.parameters()) == counts.packed // 2 + counts.unquantized
    assert counts.packed > 0
    assert count_parameters(full).packed == 0
