"""Lean layers: the same loss and gradients as peft's and transformers' own layers, on real tiny models."""

from __future__ import annotations

import contextlib

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lora_nb import lean_layers
from lora_nb.batching import BatchPlan, loss_sum, packed_attention
from lora_nb.lean_layers import lean_layers as lean
from tests.archs import ARCHS, tiny_model


def _lora(arch: str, dropout: float = 0.0, **config):
    model = get_peft_model(tiny_model(arch), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                        target_modules="all-linear", init_lora_weights=False, **config))
    model.train()
    return model


def _loss_and_grads(model, seed: int = 0):
    """Loss sum and every trainable gradient of one batch (dropout drawn from `seed`)."""
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(3, vocab, (2, 9), generator=torch.Generator().manual_seed(1))
    model.zero_grad()
    torch.manual_seed(seed)
    total, _ = loss_sum(model, {"input_ids": ids, "labels": ids})
    total.backward()
    return total.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(model):
    own_loss, own = _loss_and_grads(model)
    with lean(model):
        lean_loss, mine = _loss_and_grads(model)
    assert lean_loss == pytest.approx(own_loss, rel=1e-5)
    assert own.keys() == mine.keys() and own
    for name in own:
        torch.testing.assert_close(mine[name], own[name], rtol=1e-4, atol=1e-6)  # fp32 rounding


@pytest.mark.parametrize("arch", ARCHS)
def test_same_loss_and_gradients_as_peft_on_every_architecture(arch):
    model = _lora(arch)
    _assert_same(model)
    assert not [m for m in model.modules() if "forward" in vars(m)]  # restored on exit
    plain_linears = len(lean_layers.lora_linears(model))  # gpt2's Conv1D layers are not nn.Linear
    assert plain_linears > 0 or arch == "gpt2"
    assert _fused_calls(model) == plain_linears  # each one runs fused


def test_same_gradients_with_dropout_and_with_a_trained_bias():
    _assert_same(_lora("llama", dropout=0.2))
    _assert_same(_lora("qwen2", bias="all"))  # q/k/v biases trained, beside the LoRA weights


def test_peft_forward_kept_where_the_fused_one_does_not_apply():
    model = _lora("llama", use_dora=True)
    assert lean_layers.lora_linears(model) and _fused_calls(model) == 0  # DoRA: a LoRA variant
    model = _lora("llama")
    model.add_adapter("second", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.base_model.set_adapter(["default", "second"])
    assert _fused_calls(model) < len(lean_layers.lora_linears(model))  # two active adapters: peft's sum
    _assert_same(model)
    with lean(model), torch.no_grad(), model.disable_adapter():
        assert _fused_calls(model) == 0


def _fused_calls(model) -> int:
    """How many `_LoraLinear` calls one forward of `model` makes under `lean_layers`."""
    calls = []
    apply = lean_layers._LoraLinear.apply
    try:
        lean_layers._LoraLinear.apply = lambda *a: calls.append(1) or apply(*a)
        with lean(model), torch.no_grad():
            model(input_ids=torch.tensor([[5, 6, 7]]))
    finally:
        lean_layers._LoraLinear.apply = apply
    return len(calls)


def test_the_fused_function_passes_gradcheck():
    generator = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)

    x, weight, bias, a, b = rand(2, 3, 5), rand(4, 5), rand(4), rand(2, 5), rand(4, 2)
    assert torch.autograd.gradcheck(lean_layers._LoraLinear.apply, (x, None, weight, bias, a, b, 1.5))
    assert torch.autograd.gradcheck(lean_layers._LoraLinear.apply, (x, rand(2, 3, 5), weight, None, a, b, 0.5))


def test_lean_swiglu_gives_the_same_loss_and_gradients_and_is_restored():
    model = _lora("llama")
    with packed_attention(model, BatchPlan(padding_free=False, chunked_loss=False)):
        mlps = [m for m in model.modules() if "forward" in vars(m) and hasattr(m, "gate_proj")]
        assert len(mlps) == model.config.num_hidden_layers  # every layer's MLP switched
    _assert_same(model)
    x = torch.randn(4, 6, requires_grad=True)
    u = torch.randn(4, 6, requires_grad=True)
    assert torch.autograd.gradcheck(lean_layers._SiluTimes.apply, (x.double(), u.double()))
    upstream = torch.randn(4, 6)
    own = torch.autograd.grad(torch.nn.functional.silu(x) * u, (x, u), upstream)
    mine = torch.autograd.grad(lean_layers._SiluTimes.apply(x, u), (x, u), upstream)
    assert all(torch.equal(a, b) for a, b in zip(mine, own))  # autograd's kernels: bit for bit


def _saved_bytes(model, use_lean: bool) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves for one forward of `model`."""
    seen, held = {}, []

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        held.append(t)  # no address is reused while counting
        return t

    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with lean(model) if use_lean else contextlib.nullcontext():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_sum(model, {"input_ids": ids, "labels": ids})
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in params)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lean_layers_keep_less_than_peft_with_and_without_dropout(dropout):
    # With dropout the LoRA linear needs the dropped copy, not x itself, unless W trains; keeping x too
    # was a second copy of each adapted input (11% of the demo model's peak at dropout 0.1, batch 4 x 128).
    model = _lora("llama", dropout=dropout)
    config = model.get_base_model().config
    own, mine = _saved_bytes(model, use_lean=False), _saved_bytes(model, use_lean=True)
    silu = config.num_hidden_layers * 2 * 16 * config.intermediate_size * 4  # the lean MLP recomputes silu(gate)
    assert mine == own - silu
