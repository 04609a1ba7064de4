"""NF4, the 4-bit format of QLoRA, worked by hand on real weights (and checked against bitsandbytes).

How a weight matrix is stored in 4-bit NormalFloat::

    weights, in blocks of 64      w1 w2 ... w64 | w65 ... w128 | ...
    one scale per block           absmax = max |w| of the block          (fp32, or 8-bit: double quantization)
    each weight becomes           the index (0..15) of the NF4 level nearest to w / absmax
    NF4 levels                    16 values in [-1, 1] at quantiles of a normal distribution:
                                  dense near 0, where most weights are, sparse in the tails
    back for compute              w ~ level[index] * absmax, in the compute dtype (bf16/fp16/fp32)

Storage per weight: 4 bits + 32 bits / 64 for the scale = 4.5 bits; with double quantization the
scales are themselves stored in 8 bits (in blocks of 256, each with one fp32 scale): 4 + 8/64 +
32/(64*256) = 4.127 bits. Two 4-bit indices are packed in one byte, which is why a 4-bit model
reports about half of its quantized weights in ``sum(p.numel())``: 81M "parameters" for the 135M
demo model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import torch.nn

BLOCK = 64  # weights sharing one absmax scale (bitsandbytes' default blocksize for 4-bit)
SCALE_BLOCK = 256  # scales sharing one fp32 scale under double quantization


@dataclass
class RoundTrip:
    """One weight matrix quantized to NF4 and back.

    Attributes:
        original: The weights, flattened (fp32).
        restored: What the 4-bit storage gives back (fp32).
        codes: The 4-bit index of each weight (0..15).
        scales: The absmax of each block of :data:`BLOCK` weights.
    """

    original: torch.Tensor
    restored: torch.Tensor
    codes: torch.Tensor
    scales: torch.Tensor

    @property
    def error(self) -> torch.Tensor:
        """restored - original, per weight."""
        return self.restored - self.original


@dataclass
class ParameterCounts:
    """What ``numel()`` counts in a (possibly) 4-bit model, and the real number of weights.

    Attributes:
        stored: ``sum(p.numel())``: packed 4-bit weights count half.
        packed: Real weights stored in 4-bit (two per stored element).
        unquantized: Weights kept in 16/32 bits (embeddings, norms, the output head).
    """

    stored: int
    packed: int
    unquantized: int

    @property
    def real(self) -> int:
        """The number of weights the model really has."""
        return self.packed + self.unquantized


def nf4_levels() -> torch.Tensor:
    """The 16 NF4 levels in [-1, 1], as bitsandbytes uses them."""
    import bitsandbytes.functional as bnbf

    return bnbf.get_4bit_type("nf4", device="cpu").float()


def bits_per_weight(double_quant: bool) -> float:
    """Storage per weight in NF4: 4 bits plus the share of the block scale (see the module docstring)."""
    if double_quant:
        return 4 + 8 / BLOCK + 32 / (BLOCK * SCALE_BLOCK)
    return 4 + 32 / BLOCK


def nf4_round_trip(weight: torch.Tensor) -> RoundTrip:
    """Quantizes weights to NF4 by hand (blocks of 64, absmax scale, nearest level) and dequantizes them.

    Gives the same numbers as ``bitsandbytes.functional.quantize_4bit`` + ``dequantize_4bit`` without
    double quantization (``tests/test_nf4.py`` checks it).

    Args:
        weight: Any float tensor; its element count must be a multiple of 64 (every linear layer's is here).

    Returns:
        A :class:`RoundTrip`.
    """
    flat = weight.detach().float().reshape(-1)
    blocks = flat.reshape(-1, BLOCK)
    scales = blocks.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    levels = nf4_levels()
    codes = ((blocks / scales).unsqueeze(-1) - levels).abs().argmin(dim=-1)
    restored = (levels[codes] * scales).reshape(-1)
    return RoundTrip(flat, restored, codes.reshape(-1), scales.reshape(-1))


def count_parameters(model: torch.nn.Module) -> ParameterCounts:
    """Counts what ``numel()`` reports against the real weights (4-bit weights are packed two per byte).

    Args:
        model: A model, loaded in 4-bit or not.

    Returns:
        :class:`ParameterCounts`.
    """
    stored = packed = unquantized = 0
    for p in model.parameters():
        stored += p.numel()
        state = getattr(p, "quant_state", None)
        if state is not None and getattr(state, "quant_type", None) in ("nf4", "fp4"):
            packed += int(torch.Size(state.shape).numel())
        else:
            unquantized += p.numel()
    return ParameterCounts(stored, packed, unquantized)


__all__ = ["BLOCK", "ParameterCounts", "RoundTrip", "bits_per_weight", "count_parameters", "nf4_levels",
           "nf4_round_trip"]
