"""Evaluate: loss, generation, before/after report, adapter save/reload and merge (tiny model)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from lora_nb.data import load_examples, tokenize_examples
from lora_nb.demo_task import demo_data_paths
from lora_nb.errors import RunFolderError
from lora_nb.adapters import load_adapter, merge_adapter, save_adapter
from lora_nb.evaluate import (
    Table, compare_generations, evaluate_run, generate, heldout_loss, max_logit_difference, prompts_and_references,
)
from lora_nb.loading import load_model


@pytest.fixture(scope="module")
def heldout():
    return load_examples(demo_data_paths()[1]).select(range(6))


def _with_lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, config)


@pytest.fixture
def tuned(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir, "none")
    return _with_lora(model), tokenizer


def test_heldout_loss_is_the_token_mean_over_answers(tiny_model_dir, heldout):
    model, tokenizer = load_model(tiny_model_dir, "none")
    tokenized = tokenize_examples(heldout, tokenizer, max_length=256)
    loss, perplexity = heldout_loss(model, tokenizer, tokenized, batch_size=4)
    assert perplexity == pytest.approx(torch.tensor(loss).exp().item())
    # The same number from the model's own loss, example by example, weighted by answer tokens.
    total = count = 0
    with torch.no_grad():
        for row in tokenized:
            labels = torch.tensor([row["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            total += model(input_ids=torch.tensor([row["input_ids"]]), labels=labels).loss.item() * n
            count += n
    assert loss == pytest.approx(total / count, rel=1e-4)
    assert heldout_loss(model, tokenizer, heldout, batch_size=1).loss == pytest.approx(loss, rel=1e-4)
    model.train()
    heldout_loss(model, tokenizer, tokenized)
    assert model.training  # the earlier mode is restored


def test_generate_batched_equals_one_by_one_and_restores_padding(tuned, heldout):
    model, tokenizer = tuned
    prompts, _ = prompts_and_references(heldout, limit=4)
    batched = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=4)
    single = [generate(model, tokenizer, p, max_new_tokens=8)[0] for p in prompts]
    assert batched == single and len(batched) == 4
    assert tokenizer.padding_side == "right"
    assert generate(model, tokenizer, "Hello", max_new_tokens=3) == generate(
        model, tokenizer, [[{"role": "user", "content": "Hello"}]], max_new_tokens=3)


def test_adapter_switch_changes_answers(tuned, heldout):
    model, tokenizer = tuned
    prompts, references = prompts_and_references(heldout, limit=3)
    table = compare_generations(None, model, tokenizer, prompts, references, max_new_tokens=6)
    assert isinstance(table, Table) and len(table) == 3
    assert table.columns() == ["prompt", "reference", "before", "after"]
    base_answers = generate(model, tokenizer, prompts, max_new_tokens=6, adapter=False)
    assert [row["before"] for row in table] == base_answers
    assert heldout_loss(model, tokenizer, heldout, adapter=False) != heldout_loss(model, tokenizer, heldout)
    assert "<table>" in table._repr_html_() and table.to_markdown().startswith("| prompt | reference |")


def test_evaluate_run_writes_metrics_and_generations(tuned, heldout, tmp_path, capsys):
    model, tokenizer = tuned
    report = evaluate_run(model, tokenizer, heldout, run_dir=tmp_path, limit=3, max_new_tokens=6)
    err = capsys.readouterr().err  # a progress bar while it generates: 3 examples x (loss, answers) x 2 sides
    assert "evaluating before/after: 100%" in err and "12/12" in err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["n_examples"] == 3
    for side in ("before", "after"):
        assert set(metrics[side]) >= {"heldout_loss", "perplexity", "exact_match", "valid_json", "keys_correct"}
    assert metrics["after"]["heldout_loss"] == pytest.approx(heldout_loss(model, tokenizer, heldout.select(range(3))).loss)
    text = (tmp_path / "generations.md").read_text()
    assert text.count("\n| ") == 4  # header + 3 rows
    assert [row["metric"] for row in report.summary()][:2] == ["heldout_loss", "perplexity"]


def test_saved_adapter_reloads_with_identical_logits(tuned, tiny_model_dir, tmp_path):
    model, tokenizer = tuned
    ids = tokenizer(["Extract JSON with the keys name, age."], return_tensors="pt")
    with torch.no_grad():
        expected = model(**ids).logits
    save_adapter(model, tmp_path / "adapter")
    base, _ = load_model(tiny_model_dir, "none")
    reloaded = load_adapter(base, tmp_path)  # a run folder holding adapter/ works too
    with torch.no_grad():
        assert torch.equal(reloaded(**ids).logits, expected)


def test_merge_gives_a_standalone_model_with_the_same_logits(tuned, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = tuned
    save_adapter(model, tmp_path / "adapter")
    out = merge_adapter(tmp_path / "adapter", tmp_path / "merged", base=tiny_model_dir)
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert max_logit_difference(merged, model, tokenizer, ["Name a colour.", "Extract JSON"]) < 1e-4
    ids = tokenizer(["Extract JSON with the keys name, age."], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**ids).logits, model(**ids).logits, rtol=1e-4, atol=1e-4)


def test_merge_of_a_4bit_run_reloads_the_base_unquantized(tiny_model_dir, tmp_path):
    quantized, tokenizer = load_model(tiny_model_dir, "4bit")
    save_adapter(_with_lora(quantized), tmp_path / "run" / "adapter")
    (tmp_path / "run" / "run.json").write_text(json.dumps({"model_name_or_path": tiny_model_dir}))
    out = merge_adapter(tmp_path / "run", tmp_path / "merged")  # base found in run.json
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.config.to_dict().get("quantization_config") is None
    reference = load_adapter(load_model(tiny_model_dir, "none").model, tmp_path / "run")
    ids = tokenizer(["Name a colour."], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**ids).logits, reference(**ids).logits, rtol=1e-4, atol=1e-4)


def test_missing_adapter_is_a_run_folder_error(tmp_path):
    with pytest.raises(RunFolderError, match="holds adapter_config.json"):
        merge_adapter(tmp_path, tmp_path / "merged")


@pytest.mark.slow
def test_demo_model_answers_a_simple_question(demo_model_dir):
    model, tokenizer = load_model(demo_model_dir, "none")
    (answer,) = generate(model, tokenizer, ["What is the capital of France? Answer in one word."], max_new_tokens=8)
    assert "Paris" in answer
