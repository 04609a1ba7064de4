"""Loss through the output head in chunks: the same loss and gradients as the whole logits tensor."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from lora_nb.batching import loss_sum
from lora_nb.loss import chunk_rows, head_cross_entropy, shift_labels, vocab_block


def _targets(shape, vocab, seed=0):
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, vocab, shape, generator=generator)
    targets[torch.rand(shape, generator=generator) < 0.3] = -100  # masked prompt / padding / first tokens
    return targets


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("trainable_head", [False, True])
@pytest.mark.parametrize("blocks", [1, 8])
def test_fused_linear_head_matches_the_whole_logits(bias, trainable_head, blocks, monkeypatch):
    from lora_nb import loss

    if blocks > 1:  # the vocabulary in blocks of 7 scores, as a CPU takes a large one
        monkeypatch.setattr(loss, "CPU_BLOCK_BYTES", 1)
        monkeypatch.setattr(loss, "MIN_BLOCK", 7)
    assert -(-50 // loss.vocab_block(5, 50, torch.device("cpu"))) == blocks
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias).requires_grad_(trainable_head)
    hidden = torch.randn(3, 23, 16, requires_grad=True)
    targets = _targets((3, 23), 50)
    expected = F.cross_entropy(head(hidden).flatten(0, 1), targets.flatten(), reduction="sum")
    grads = torch.autograd.grad(expected, [hidden, *(p for p in head.parameters() if p.requires_grad)])
    chunked = head_cross_entropy(hidden, head, targets, chunk_size=5)  # 10 chunks of labelled rows
    chunk_grads = torch.autograd.grad(chunked / 7.0, [hidden, *(p for p in head.parameters() if p.requires_grad)])
    assert chunked.item() == pytest.approx(expected.item(), rel=1e-5)
    for got, want in zip(chunk_grads, grads):
        torch.testing.assert_close(got * 7.0, want, rtol=1e-4, atol=1e-6)  # the outer scale reaches every gradient


def test_half_precision_products_give_the_recipes_bf16_logits_loss():
    # Under mixed precision autocast runs the model's own head in bf16; the chunked loss runs after
    # the forward, outside autocast, and takes the same dtype as an argument.
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 300, bias=False).requires_grad_(False)
    hidden = (3 * torch.randn(2, 40, 64)).requires_grad_()
    targets = _targets((2, 40), 300)
    logits = F.linear(hidden.to(torch.bfloat16), head.weight.to(torch.bfloat16)).float()
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    (want,) = torch.autograd.grad(expected, hidden)
    half = head_cross_entropy(hidden, head, targets, dtype=torch.bfloat16)
    (got,) = torch.autograd.grad(half, hidden)
    full = head_cross_entropy(hidden, head, targets)
    assert abs(half.item() - expected.item()) < abs(full.item() - expected.item()) / 10
    assert half.item() == pytest.approx(expected.item(), rel=1e-5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)


def test_any_head_module_goes_through_checkpointed_chunks():
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 40))
    hidden = torch.randn(2, 17, 16, requires_grad=True)
    targets = _targets((2, 17), 40, seed=1)
    expected = F.cross_entropy(head(hidden).flatten(0, 1), targets.flatten(), reduction="sum")
    params = [hidden, *head.parameters()]
    grads = torch.autograd.grad(expected, params)
    chunked = head_cross_entropy(hidden, head, targets, chunk_size=4)
    for got, want in zip(torch.autograd.grad(chunked, params), grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_no_labelled_token_gives_zero_with_a_graph():
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    total = head_cross_entropy(hidden, torch.nn.Linear(8, 10), torch.full((1, 4), -100))
    total.backward()
    assert total.item() == 0.0 and hidden.grad is not None


def test_chunk_rows_bounds_the_scores_held_at_once():
    assert chunk_rows(49152) == 341  # 64 MiB of fp32 scores
    assert chunk_rows(128256) == 130
    assert chunk_rows(10**9) == 16
    assert chunk_rows(49152, device=torch.device("cpu")) == chunk_rows(10**9, device=torch.device("cpu")) == 682
    assert vocab_block(682, 49152, torch.device("cpu")) == 768  # 2 MiB: what a CPU holds at a time
    assert vocab_block(341, 49152, torch.device("meta")) == 49152  # a GPU takes the chunk's whole vocabulary


def test_shift_labels():
    assert shift_labels(torch.tensor([[5, 6, 7]])).tolist() == [[6, 7, -100]]


@pytest.mark.parametrize("modules_to_save", [None, ["lm_head"]])
def test_lora_model_gradients_equal_with_and_without_chunks(tiny_model_dir, modules_to_save):
    """A LoRA model whose head is tied and frozen (fused path) or trained via modules_to_save (checkpointed)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False,
                                            modules_to_save=modules_to_save))
    ids = torch.randint(3, 400, (2, 33), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    batch["labels"][1, 20:] = -100
    results = []
    for head in (None, model.get_output_embeddings()):
        model.zero_grad()
        total, _ = loss_sum(model, batch, head=head)
        total.backward()
        results.append((total.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (plain, plain_grads), (chunked, chunked_grads) = results
    assert chunked == pytest.approx(plain, rel=1e-5)
    assert any("lm_head" in n for n in chunked_grads) == bool(modules_to_save)
    for n, g in chunked_grads.items():
        torch.testing.assert_close(g, plain_grads[n], rtol=1e-4, atol=1e-6)
