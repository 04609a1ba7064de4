"""Batches: length grouping, padding-free rows equal to examples alone, loss weighting per token."""

from __future__ import annotations

import random
import warnings

import pytest
import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.testing_utils import CaptureLogger
from transformers.utils.logging import get_logger
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from lora_nb.batching import (
    PROBE_LENGTHS,
    BatchPlan,
    KitTrainer,
    LengthGroupedSampler,
    LengthGroupedTrainer,
    PackedCollator,
    ShiftedPadCollator,
    _compute_dtype,
    check_head_loss,
    check_padding_free,
    length_grouped_indices,
    loss_sum,
    packed_attention,
    packed_sdpa_attention,
    plan_batches,
)
from lora_nb.data import padding_efficiency
from tests.archs import ARCHS, PACKING_CONFIGS, tiny_model
from tests.archs import VOCAB


def _lengths(n, seed=0):
    rng = random.Random(seed)
    return [rng.randint(20, 400) for _ in range(n)]


@pytest.mark.parametrize("n", [1, 7, 8, 48, 64, 61, 500])
def test_indices_are_a_permutation(n):
    assert sorted(length_grouped_indices(_lengths(n), 8, seed=3)) == list(range(n))


@pytest.mark.parametrize("n", [48, 64, 96])
def test_small_data_sets_are_grouped(n):
    lengths = _lengths(n)
    grouped = padding_efficiency(lengths, 8, length_grouped_indices(lengths, 8, seed=1))
    assert grouped > 0.88  # random order: about 0.6
    assert grouped > padding_efficiency(lengths, 8) + 0.2


def test_longest_batch_first_and_order_depends_on_seed():
    lengths = _lengths(64)
    order = length_grouped_indices(lengths, 8, seed=1)
    assert max(lengths) in [lengths[i] for i in order[:8]]
    assert order != length_grouped_indices(lengths, 8, seed=2)
    assert order == length_grouped_indices(lengths, 8, seed=1)


def test_sampler_changes_order_per_epoch():
    sampler = LengthGroupedSampler(_lengths(64), 8, seed=0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert sorted(first) == sorted(sampler) and list(sampler) != first
    assert len(sampler) == 64


def test_trainer_uses_the_sampler_for_group_by_length(tiny_model_dir, tmp_path):
    import datasets
    from transformers import AutoModelForCausalLM

    from lora_nb.settings import TrainSettings

    data = datasets.Dataset.from_dict({"input_ids": [[1] * n for n in _lengths(16)], "length": _lengths(16)})
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for grouped, expected in ((True, LengthGroupedSampler), (False, None)):
        args = TrainSettings(per_device_train_batch_size=4, group_by_length=grouped).to_training_args(str(tmp_path))
        sampler = LengthGroupedTrainer(model=model, args=args, train_dataset=data)._get_train_sampler()
        assert isinstance(sampler, expected) if expected else not isinstance(sampler, LengthGroupedSampler)
    assert sampler is not None


# ------------------------------------------------------------------------------ padding-free rows
def _examples(lengths, vocab, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=generator) for n in lengths]


def _lora_model(tiny_model_dir, attn="sdpa", **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False, **lora)
    return get_peft_model(base, config)


def _token_losses(logits, ids):
    return torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[1:], reduction="none")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_row_gives_each_example_its_loss_alone(tiny_model_dir, attn):
    model = _lora_model(tiny_model_dir, attn).train()
    examples = _examples([7, 30, 12, 19], model.get_input_embeddings().weight.shape[0])
    alone = [_token_losses(model(input_ids=x[None], use_cache=False).logits, x).sum().item() for x in examples]
    batch = PackedCollator()([{"input_ids": x.tolist()} for x in examples])
    with packed_attention(model, BatchPlan(padding_free=True, chunked_loss=True)):
        expected = "lora_nb_packed_sdpa" if attn == "sdpa" else "eager"
        assert model.get_base_model().config._attn_implementation == expected
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        total, _ = loss_sum(model, batch, head=model.get_output_embeddings())
    assert model.get_base_model().config._attn_implementation == attn  # restored
    token_losses = torch.nn.functional.cross_entropy(logits[0].float(), batch["shift_labels"][0], reduction="none")
    starts = [0, 7, 37, 49, 68]
    packed = [token_losses[a:b - 1].sum().item() for a, b in zip(starts, starts[1:])]
    assert packed == pytest.approx(alone, rel=1e-5)
    assert total.item() == pytest.approx(sum(alone), rel=1e-5)
    assert int((batch["shift_labels"] != -100).sum()) == sum(len(x) - 1 for x in examples)


def test_a_cache_in_play_lets_packed_examples_see_each_other(tiny_model_dir):
    """The transformers 5 trap the kit avoids by passing use_cache=False (FACTS.md)."""
    model = _lora_model(tiny_model_dir).train()
    examples = _examples([9, 14], model.get_input_embeddings().weight.shape[0])
    batch = PackedCollator()([{"input_ids": x.tolist()} for x in examples])
    second_alone = model(input_ids=examples[1][None], use_cache=False).logits[0]
    with_cache = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0, 9:]
    assert (with_cache - second_alone).abs().max() > 1e-3


def test_padded_and_packed_batches_give_the_same_loss_and_gradients(tiny_model_dir, tmp_path):
    from transformers import TrainingArguments

    from lora_nb.data import PadCollator

    model = _lora_model(tiny_model_dir)
    examples = _examples([5, 40, 17, 26], model.get_input_embeddings().weight.shape[0], seed=1)
    features = [{"input_ids": x.tolist(), "labels": [-100] * (len(x) // 2) + x.tolist()[len(x) // 2:]} for x in examples]
    args = TrainingArguments(str(tmp_path), report_to="none", use_cpu=True)
    results = {}
    for name, plan, collator in (
        ("padded_model_logits", BatchPlan(False, False), PadCollator(0)),
        ("padded_chunked", BatchPlan(False, True), ShiftedPadCollator(0)),
        ("packed_chunked", BatchPlan(True, True), PackedCollator()),
    ):
        trainer = KitTrainer(model=model, args=args, plan=plan)
        model.zero_grad()
        with packed_attention(model, plan):
            loss = trainer.compute_loss(model, collator(features), num_items_in_batch=None)
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[name] = (loss.item(), grads)
    reference_loss, reference_grads = results.pop("padded_model_logits")
    for loss, grads in results.values():
        assert loss == pytest.approx(reference_loss, rel=1e-5)
        for n, g in grads.items():
            torch.testing.assert_close(g, reference_grads[n], rtol=1e-4, atol=1e-6)


def _trained_lora(tiny_model_dir, tmp_path, features, batch_size, accumulation, padding_free):
    import datasets
    from transformers import TrainingArguments

    model = _lora_model(tiny_model_dir)
    plan = BatchPlan(padding_free=padding_free, chunked_loss=True)
    args = TrainingArguments(str(tmp_path / f"{batch_size}-{accumulation}-{padding_free}"), report_to="none",
                             use_cpu=True, per_device_train_batch_size=batch_size,
                             gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=0.5, optim="sgd",
                             lr_scheduler_type="constant", max_grad_norm=0.0, train_sampling_strategy="sequential",
                             remove_unused_columns=False, save_strategy="no", logging_steps=1, seed=0)
    trainer = KitTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(features),
                         data_collator=plan.collator(0), plan=plan)
    with packed_attention(model, plan):
        trainer.train()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return weights, trainer.state.log_history[0]["loss"]


def test_every_token_weighs_the_same_however_examples_are_grouped(tiny_model_dir, tmp_path):
    """One optimizer step over the same 4 examples (3 to 60 tokens): 4 x 1, 2 x 2 or 1 x 4 micro-batches,
    padded or packed, give the same update: the mean gradient over all the step's label tokens."""
    vocab = 500
    features = [{"input_ids": x.tolist()} for x in _examples([3, 60, 9, 31], vocab, seed=2)]
    reference, reference_loss = _trained_lora(tiny_model_dir, tmp_path, features, 4, 1, padding_free=False)
    start = {n: p.detach() for n, p in _lora_model(tiny_model_dir).named_parameters() if p.requires_grad}
    assert any((reference[n] - start[n]).abs().max() > 1e-3 for n in start)  # the step moved the adapter
    for batch_size, accumulation, packed in ((1, 4, False), (2, 2, True), (1, 4, True), (4, 1, True)):
        weights, loss = _trained_lora(tiny_model_dir, tmp_path, features, batch_size, accumulation, packed)
        assert loss == pytest.approx(reference_loss, rel=1e-5)
        for n, w in weights.items():
            torch.testing.assert_close(w, reference[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_tested_architecture_passes_the_packing_check(arch):
    model = tiny_model(arch)
    plan = plan_batches(model, padding_free=True)
    assert plan == BatchPlan(padding_free=True, chunked_loss=True, notes=[])


@pytest.mark.parametrize("arch", list(PACKING_CONFIGS))
def test_more_architectures_train_on_the_kits_batches_as_on_examples_alone(arch):
    """The batch plan each architecture must get, then the kit's loss and LoRA gradients of one batch
    (packed, or padded where the plan falls back) equal the sums over the examples run alone."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(arch), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                                        init_lora_weights=False))
    with warnings.catch_warnings(record=True) as caught, CaptureLogger(get_logger("transformers.modeling_utils")) as logged:
        warnings.simplefilter("always")
        plan = plan_batches(model, padding_free=True)
    assert "does not support setting its attention implementation" not in logged.out  # Falcon keeps its own attention
    assert (plan.padding_free, plan.chunked_loss) == PACKING_CONFIGS[arch][1], plan.notes
    assert len(plan.notes) == sum(not ok for ok in PACKING_CONFIGS[arch][1]) == sum("off for this model" in str(w.message) for w in caught)
    model.eval()  # no dropout (OPT's is 0.1): both sides compute the same thing; gradients still flow
    examples = _examples([7, 12, 5, 9], VOCAB)
    trained = [p for p in model.parameters() if p.requires_grad]
    expected = 0.0
    for x in examples:
        total, _ = loss_sum(model, {"input_ids": x[None], "labels": x[None]})
        total.backward()
        expected += total.item()
    alone = [p.grad.clone() for p in trained]
    model.zero_grad()
    batch = plan.collator(0)([{"input_ids": x.tolist()} for x in examples])
    with packed_attention(model, plan):
        total, _ = loss_sum(model, batch, head=model.get_output_embeddings() if plan.chunked_loss else None)
        total.backward()
    assert total.item() == pytest.approx(expected, rel=1e-5)
    for grad, reference in zip((p.grad for p in trained), alone):
        assert (grad - reference).abs().max() <= 1e-4 * reference.abs().max()


def test_soft_capping_is_found_where_the_scores_are_too_small_to_show_it():
    """A fresh Gemma 2's scores are below 1, where 30 tanh(s / 30) = s to 1e-4: the losses agree, the
    scaled-up probe does not."""
    model = tiny_model("gemma2")
    x = torch.cat(_examples([9, 6], VOCAB))[None]
    with torch.no_grad():
        own = model(input_ids=x, labels=x, use_cache=False).loss.item()
        chunked, _ = loss_sum(model, {"input_ids": x, "labels": x}, head=model.get_output_embeddings())
    assert model.config.final_logit_softcapping == 30.0
    assert chunked.item() / (x.shape[1] - 1) == pytest.approx(own, rel=1e-4)
    problem = check_head_loss(model)
    assert problem.startswith("it changes the scores after its output head (soft-capping or scaling")


def _attention_ignoring_boundaries(module, query, key, value, attention_mask, **kwargs):
    return sdpa_attention_forward(module, query, key, value, None, is_causal=True,
                                  **{k: v for k, v in kwargs.items() if k != "is_causal"})


def test_a_model_whose_attention_ignores_example_boundaries_falls_back_with_the_reason():
    AttentionInterface.register("test_whole_row", _attention_ignoring_boundaries)
    AttentionMaskInterface.register("test_whole_row", sdpa_mask)
    model = tiny_model("llama")
    model.set_attn_implementation("test_whole_row")
    assert "its examples see each other" in check_padding_free(model)
    with pytest.warns(UserWarning, match="Padding-free batches are off for this model"):
        plan = plan_batches(model, padding_free=True)
    assert not plan.padding_free and plan.chunked_loss
    assert isinstance(plan.collator(0), ShiftedPadCollator)


def _with_shape_rounding(attention):
    """`attention`, scaled by 1 + 1e-3 in a row longer than any probe example: the way a GPU's other
    kernels for other matrix shapes round a packed row differently from each example alone."""
    def attend(module, query, key, value, attention_mask, **kwargs):
        out, weights = attention(module, query, key, value, attention_mask, **kwargs)
        return (out * (1 + 1e-3) if query.shape[2] > max(PROBE_LENGTHS) else out), weights
    return attend


@pytest.mark.parametrize("leaks", [False, True])
def test_the_packing_check_tells_rounding_noise_from_a_leak(leaks):
    name = f"test_rounding_{leaks}"
    AttentionInterface.register(name, _with_shape_rounding(_attention_ignoring_boundaries if leaks else packed_sdpa_attention))
    AttentionMaskInterface.register(name, sdpa_mask)
    model = tiny_model("llama")
    model.set_attn_implementation(name)
    problem = check_padding_free(model)
    if leaks:  # noise on every example, and a leak far above it on the later ones
        assert "its examples see each other" in problem and "rounding noise" in problem
    else:  # above fp32's 1e-4, but no more than the first example's own noise
        assert problem is None


def test_the_probe_tolerance_follows_a_4bit_layers_compute_dtype(tiny_model_dir):
    from lora_nb.loading import load_model
    from lora_nb.settings import QuantSettings

    for compute, expected in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        base, _ = load_model(tiny_model_dir, QuantSettings(load_in="4bit", bnb_4bit_compute_dtype=compute))
        assert base.get_input_embeddings().weight.dtype == torch.float32
        assert _compute_dtype(base) == expected


def test_training_attention_leaves_cudnn_out_and_restores_it():
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with packed_attention(tiny_model("llama"), BatchPlan(padding_free=True, chunked_loss=True)):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before


def test_padding_free_off_keeps_padded_batches_without_probing():
    plan = plan_batches(tiny_model("llama"), padding_free=False)
    assert plan == BatchPlan(padding_free=False, chunked_loss=True, notes=[])


def test_a_4bit_qlora_model_takes_packed_rows_with_the_same_gradients(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    from lora_nb.loading import load_model
    from lora_nb.settings import QuantSettings

    base, _ = load_model(tiny_model_dir, QuantSettings(load_in="4bit", bnb_4bit_compute_dtype="float32"))
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    assert plan_batches(model) == BatchPlan(padding_free=True, chunked_loss=True, notes=[])
    features = [{"input_ids": x.tolist()} for x in _examples([6, 25, 14], 400, seed=4)]
    trainer_args = TrainingArguments(str(tmp_path), report_to="none", use_cpu=True)
    grads = []
    for plan in (BatchPlan(False, True), BatchPlan(True, True)):
        model.zero_grad()
        with packed_attention(model, plan):
            KitTrainer(model=model, args=trainer_args, plan=plan).compute_loss(model, plan.collator(0)(features)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for n, g in grads[1].items():
        torch.testing.assert_close(g, grads[0][n], rtol=1e-3, atol=1e-5)
