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

On a CPU a chunk's scores are not held whole either: the vocabulary goes by in cache-sized blocks
(`CPU_BLOCK_BYTES`) with a running maximum and sum, flash-attention's online softmax, so each block
of scores serves the loss and `softmax @ head weight` while it is still in the cache: for 1,292 rows
through a 49,152 x 576 head (the demo model's step), 1.3-1.4 s instead of 1.7 s, with 2 MiB of
scores at a time instead of 64 MiB. Since its scores are never held whole, a CPU's chunk is sized
for speed instead (`CPU_CHUNK_ROWS`): each chunk reads the whole head weight once, and 682 rows in
blocks of 768 entries beat 341 rows in blocks of 1,537 (medians of 10, interleaved, a 49,152 x 576
head: 1.13x at 1,300 rows, 1.11x at 2,600, 1.21x at 600).

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
CHUNK_BYTES = 64 * 2**20  # fp32 scores of one chunk: 64 MiB (341 rows of a 49k vocabulary)
# Smaller chunks re-read the head weight per chunk: at 85 rows the head took 1.7x the time of 341 rows (CPU).
MIN_CHUNK_ROWS = 16
CPU_BLOCK_BYTES = 2 * 2**20  # a CPU holds one block of a chunk's scores at a time (cache-sized): 682 x 768
CPU_CHUNK_ROWS = 682  # rows per chunk of the fused head on a CPU, whatever the vocabulary (see the module docstring)
MIN_BLOCK = 256


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """The label each position predicts: the next position's label, and -100 after the last one.

    Args:
        labels: `[batch, length]` token ids, -100 where no loss is taken.

    Returns:
        A tensor of the same shape, `shifted[:, i] = labels[:, i + 1]`.
    """
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def chunk_rows(vocab_size: int, chunk_bytes: int = CHUNK_BYTES, device: torch.device | None = None) -> int:
    """Rows per chunk so that one chunk's fp32 scores take about `chunk_bytes`; `CPU_CHUNK_ROWS` for the
    fused head on a CPU (`device`), which holds a block of a chunk's scores at a time, never all of them."""
    if device is not None and device.type == "cpu":
        return CPU_CHUNK_ROWS
    return max(MIN_CHUNK_ROWS, chunk_bytes // (4 * max(1, vocab_size)))


def head_cross_entropy(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
                       chunk_size: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sum of the cross-entropy losses of the positions that have a target, computed in chunks.

    Args:
        hidden: final hidden states, `[..., d]` (after the model's last norm).
        head: the output head (`model.get_output_embeddings()`), mapping d to the vocabulary.
        targets: next-token ids of the same leading shape as `hidden`, -100 where no loss is taken
            (use `shift_labels` on the labels of a causal LM).
        chunk_size: rows per chunk (default: `chunk_rows` of the head's vocabulary and device).
        dtype: the dtype of the head's matrix products under mixed precision (bf16 or fp16, as
            autocast gives the model's own head; softmax and sums stay fp32); None: the weight's.
            The loss runs after the model's forward, outside the autocast that wraps it: without
            this, a GPU computes a float32 head in float32 (for a 128k vocabulary, 47% of a 1B
            model's GPU time on an H200).

    Returns:
        A float32 scalar: the summed loss (0 when no position has a target). Gradients reach
        `hidden` and any trainable weight of `head` as if the whole logits tensor had been built.
    """
    keep = targets != IGNORE_INDEX
    rows = hidden[keep]  # only labelled positions go through the head
    wanted = targets[keep]
    if rows.shape[0] == 0:
        return hidden.sum() * 0.0  # keeps the graph (and its dtype) for backward
    needs_grad = torch.is_grad_enabled() and (rows.requires_grad or any(p.requires_grad for p in head.parameters()))
    fused = type(head) is torch.nn.Linear and needs_grad
    chunk = chunk_size or _default_chunk(head, rows, fused)
    if fused:
        return _FusedLinearCrossEntropy.apply(rows, head.weight, head.bias, wanted, chunk, dtype)
    total = rows.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk):
        part, target = rows[start:start + chunk], wanted[start:start + chunk]
        if needs_grad:
            total = total + checkpoint(_chunk_loss, head, part, target, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, part, target)
    return total


def _default_chunk(head: torch.nn.Module, rows: torch.Tensor, fused: bool) -> int:
    """`chunk_rows` for this head: the fused path on a CPU goes by `CPU_CHUNK_ROWS`, any other by bytes of scores."""
    weight = getattr(head, "weight", None)
    vocab = weight.shape[0] if weight is not None else head(rows[:1]).shape[-1]
    return chunk_rows(vocab, device=rows.device if fused else None)


def _chunk_loss(head: torch.nn.Module, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(rows).float(), targets, reduction="sum")


def vocab_block(rows: int, vocab_size: int, device: torch.device) -> int:
    """Vocabulary entries per block of scores: cache-sized on a CPU (`CPU_BLOCK_BYTES`), all of it elsewhere."""
    if device.type != "cpu":
        return vocab_size
    return max(MIN_BLOCK, min(vocab_size, CPU_BLOCK_BYTES // (4 * max(1, rows))))


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Loss sum of `linear(rows, weight, bias)` against `targets`; gradients computed chunk by chunk
    in the forward pass and only scaled in the backward pass (d loss_sum / d logits = softmax - onehot).

    Within a chunk of rows the vocabulary goes by in blocks (`vocab_block`) with a running maximum
    and sum (the online softmax of flash-attention): a block's scores are used while they are in the
    CPU's cache, for the loss and for `softmax @ weight`, and are never written out whole.
    """

    @staticmethod
    def forward(ctx, rows, weight, bias, targets, chunk, dtype):
        grad_rows = torch.empty_like(rows) if rows.requires_grad else None
        head_trains = weight.requires_grad or (bias is not None and bias.requires_grad)
        grads = [torch.zeros_like(t, dtype=torch.float32) if t is not None and t.requires_grad else None
                 for t in (weight, bias)]
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        products, inputs = (weight, rows) if dtype is None else (weight.to(dtype), rows.to(dtype))
        for start in range(0, rows.shape[0], chunk):
            part, cast, target = rows[start:start + chunk], inputs[start:start + chunk], targets[start:start + chunk]
            logsumexp, softmax_weight = _online_softmax(cast, products, bias)
            target_rows = products[target].float()  # each row's target's row of the head weight
            picked = _target_scores(cast, target_rows, bias, target)
            total += (logsumexp - picked).sum()  # logsumexp - target score, per row
            if grad_rows is not None:  # softmax @ weight, less the target's row of weight
                grad_rows[start:start + chunk] = (softmax_weight - target_rows).to(rows.dtype)
            if head_trains:
                _head_gradients(part, weight, bias, target, logsumexp, *grads)
        ctx.save_for_backward(grad_rows, *grads)
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
            None,
        )


def _scores(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(rows, weight, bias).float()


def _target_scores(rows, target_rows, bias, target) -> torch.Tensor:
    """Each row's score for its own target (`target_rows`: the head weight's rows of the targets), [rows x 1] fp32,
    rounded as `_scores` rounds it (to the rows' dtype), so that it is one of the scores the logsumexp sums."""
    picked = (rows.float() * target_rows).sum(dim=1, keepdim=True)
    picked = picked if bias is None else picked + bias[target].float()[:, None]
    return picked.to(rows.dtype).float()


def _online_softmax(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """Each row's logsumexp over the vocabulary and `softmax @ weight` (fp32), a block of it at a time."""
    top = torch.full((rows.shape[0], 1), -torch.inf, device=rows.device)
    sums = torch.zeros_like(top)
    mixed = rows.new_zeros(rows.shape, dtype=torch.float32)  # running sum of exp(score - top) * weight row
    block = vocab_block(rows.shape[0], weight.shape[0], rows.device)
    for start in range(0, weight.shape[0], block):
        part = weight[start:start + block]
        scores = _scores(rows, part, None if bias is None else bias[start:start + block])
        new_top = torch.maximum(top, scores.amax(dim=1, keepdim=True))
        rescale = (top - new_top).exp_()
        scores.sub_(new_top).exp_()
        sums.mul_(rescale).add_(scores.sum(dim=1, keepdim=True))
        mixed.mul_(rescale)
        if part.dtype == torch.float32:
            mixed.addmm_(scores, part)
        else:
            mixed.add_(scores.to(part.dtype) @ part)
        top = new_top
    return top + sums.log(), mixed.div_(sums)


def _head_gradients(rows, weight, bias, target, logsumexp, grad_weight, grad_bias) -> None:
    """Add this chunk's d loss / d weight (and bias) of a trained head: (softmax - onehot)^T rows, by block."""
    block = vocab_block(rows.shape[0], weight.shape[0], rows.device)
    onehot_rows = torch.arange(rows.shape[0], device=rows.device)
    for start in range(0, weight.shape[0], block):
        end = min(start + block, weight.shape[0])
        grad = _scores(rows, weight[start:end], None if bias is None else bias[start:end]).sub_(logsumexp).exp_()
        inside = (target >= start) & (target < end)
        grad[onehot_rows[inside], target[inside] - start] -= 1.0
        if grad_weight is not None:
            grad_weight[start:end] += grad.T @ rows.float()
        if grad_bias is not None:
            grad_bias[start:end] += grad.sum(0)
