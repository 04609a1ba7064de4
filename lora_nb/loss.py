"""Loss: token-level cross-entropy through the output head, a chunk of tokens at a time.

A causal LM's head turns every position's hidden state into one score per vocabulary entry. The
usual path computes them all at once and keeps them for the backward pass:

    hidden [batch x length x d] ──► head ──► logits [batch x length x vocab] (fp32) ──► loss
    batch 8 x 512 tokens x 49,152 (SmolLM2) = 805 MB of logits, and as much again for their gradient;
    with a 128k vocabulary (Llama 3) 2.1 GB each.

Here only the positions that have a label go through the head, a chunk of rows at a time, and the
gradient is computed while each chunk's scores are at hand; then they are freed:

    hidden rows with a label ──► chunk 1 ──► head ──► scores ──► loss sum, d loss / d hidden ─┐
                             ──► chunk 2 ──► ...                                             ├─► sum
                             ...                                                             ┘
    held at once: one chunk's scores (CHUNK_BYTES), not the whole batch's.

The loss is the SUM of token losses; the caller divides by the number of label tokens of the whole
optimizer step (`num_items_in_batch`), so that every token weighs the same however the examples
were batched. A plain `nn.Linear` head (frozen or trained, tied to the embeddings or not) takes the
fused path above; any other head module (a LoRA-wrapped or `modules_to_save` head) is called on
each chunk under activation checkpointing, which recomputes the chunk's scores in the backward pass.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
CHUNK_BYTES = 64 * 2**20  # fp32 scores of one chunk: 64 MiB (341 rows of a 49k vocabulary); they add to the peak.
# Smaller chunks re-read the head weight per chunk: at 85 rows the head took 1.7x the time of 341 rows (CPU).
MIN_CHUNK_ROWS = 16


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """The label each position predicts: the next position's label, and -100 after the last one.

    Args:
        labels: `[batch, length]` token ids, -100 where no loss is taken.

    Returns:
        A tensor of the same shape, `shifted[:, i] = labels[:, i + 1]`.
    """
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def chunk_rows(vocab_size: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk so that one chunk's fp32 scores take about `chunk_bytes`."""
    return max(MIN_CHUNK_ROWS, chunk_bytes // (4 * max(1, vocab_size)))


def head_cross_entropy(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
                       chunk_size: int | None = None) -> torch.Tensor:
    """Sum of the cross-entropy losses of the positions that have a target, computed in chunks.

    Args:
        hidden: final hidden states, `[..., d]` (after the model's last norm).
        head: the output head (`model.get_output_embeddings()`), mapping d to the vocabulary.
        targets: next-token ids of the same leading shape as `hidden`, -100 where no loss is taken
            (use `shift_labels` on the labels of a causal LM).
        chunk_size: rows per chunk (default: `chunk_rows` of the head's vocabulary).

    Returns:
        A float32 scalar: the summed loss (0 when no position has a target). Gradients reach
        `hidden` and any trainable weight of `head` as if the whole logits tensor had been built.
    """
    keep = targets != IGNORE_INDEX
    rows = hidden[keep]  # only labelled positions go through the head
    wanted = targets[keep]
    if rows.shape[0] == 0:
        return hidden.sum() * 0.0  # keeps the graph (and its dtype) for backward
    weight = getattr(head, "weight", None)
    chunk = chunk_size or chunk_rows(weight.shape[0] if weight is not None else head(rows[:1]).shape[-1])
    needs_grad = torch.is_grad_enabled() and (rows.requires_grad or any(p.requires_grad for p in head.parameters()))
    if type(head) is torch.nn.Linear and needs_grad:
        return _FusedLinearCrossEntropy.apply(rows, head.weight, head.bias, wanted, chunk)
    total = rows.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk):
        part, target = rows[start:start + chunk], wanted[start:start + chunk]
        if needs_grad:
            total = total + checkpoint(_chunk_loss, head, part, target, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, part, target)
    return total


def _chunk_loss(head: torch.nn.Module, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(rows).float(), targets, reduction="sum")


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Loss sum of `linear(rows, weight, bias)` against `targets`; gradients computed chunk by chunk
    in the forward pass and only scaled in the backward pass (d loss_sum / d logits = softmax - onehot)."""

    @staticmethod
    def forward(ctx, rows, weight, bias, targets, chunk):
        grad_rows = torch.empty_like(rows) if rows.requires_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and bias.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        for start in range(0, rows.shape[0], chunk):
            part, target = rows[start:start + chunk], targets[start:start + chunk]
            scores = F.linear(part, weight, bias).float()
            picked = scores.gather(1, target[:, None])
            top = scores.amax(dim=1, keepdim=True)
            grad = scores.sub_(top).exp_()  # in place: one [chunk x vocab] tensor, no temporaries
            sums = grad.sum(dim=1, keepdim=True)
            total += (top + sums.log() - picked).sum()  # logsumexp - target score, per row
            grad.div_(sums)  # softmax = d loss / d scores, less the one-hot below
            grad[torch.arange(grad.shape[0], device=grad.device), target] -= 1.0
            if grad_rows is not None:
                grad_rows[start:start + chunk] = grad.to(weight.dtype) @ weight
            if grad_weight is not None:
                grad_weight += grad.T @ part.float()
            if grad_bias is not None:
                grad_bias += grad.sum(0)
        ctx.save_for_backward(grad_rows, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_rows, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_total.float()
        weight_dtype, bias_dtype = ctx.dtypes
        return (
            None if grad_rows is None else grad_rows * scale.to(grad_rows.dtype),
            None if grad_weight is None else (grad_weight * scale).to(weight_dtype),
            None if grad_bias is None else (grad_bias * scale).to(bias_dtype),
            None,
            None,
        )
