"""Loading: quantized and full-precision loads, fallbacks, the AVX512-BF16 trap, reports."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from lora_nb import loading
from lora_nb.errors import ModelLoadError, QuantizationUnavailable
from lora_nb.loading import compare_precisions, describe_model, load_model, load_tokenizer
from lora_nb.settings import QuantSettings

FP32_4BIT = QuantSettings(load_in="4bit", bnb_4bit_compute_dtype="float32")


def test_4bit_load_quantizes_decoder_linears_and_pads_right(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir, "4bit")
    report = describe_model(model)
    assert report.layers == {"Linear4bit": 14, "Linear": 1}  # 2 blocks x 7 projections; lm_head stays
    assert report.quantization == "4bit (nf4, double quant, compute bfloat16)"
    assert report.device == "cpu"
    assert report.trainable == 0  # prepare_model_for_kbit_training froze the base
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "right"
    assert all(not m.support_avx512bf16_for_cpu for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu"))


def test_quant_settings_choose_format(tiny_model_dir):
    loaded = load_model(tiny_model_dir, QuantSettings(load_in="4bit", bnb_4bit_quant_type="fp4",
                                                      bnb_4bit_use_double_quant=False))
    assert loaded.load_in == "4bit" and loaded.note == ""
    assert describe_model(loaded.model).quantization == "4bit (fp4, compute bfloat16)"


def test_full_precision_uses_dtype(tiny_model_dir):
    loaded = load_model(tiny_model_dir, "none", dtype="bfloat16")
    report = loaded.report()
    assert report.layers == {"Linear": 15}
    assert set(report.dtypes) == {"bfloat16"}
    assert report.quantization == "none"
    assert report.trainable == report.parameters  # nothing frozen without quantization


def test_8bit_loads_on_cpu(tiny_model_dir):
    model, _ = load_model(tiny_model_dir, "8bit")
    assert describe_model(model).layers == {"Linear8bitLt": 14, "Linear": 1}
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def test_unavailable_quantization_falls_back_with_one_sentence(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(loading, "quantization_available", lambda load_in: (False, "bitsandbytes cannot be imported"))
    with pytest.warns(UserWarning) as record:
        loaded = load_model(tiny_model_dir, "4bit")
    assert loaded.load_in == "none" and loaded.requested == "4bit"
    message = str(record[0].message)
    assert message == loaded.note
    assert message.count(". ") == 0 and message.endswith("instead (more memory, same results).")
    assert describe_model(loaded.model).layers == {"Linear": 15}


def test_unavailable_quantization_raises_when_strict(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(loading, "quantization_available", lambda load_in: (False, "no backend on mps"))
    with pytest.raises(QuantizationUnavailable, match="4bit loading is not available here: no backend on mps"):
        load_model(tiny_model_dir, "4bit", strict=True)


def test_missing_model_is_a_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not a local folder"):
        load_model("no-such-owner/no-such-model-xyz", "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path / "empty"), "none")


def test_bad_quant_string_is_refused(tiny_model_dir):
    with pytest.raises(ModelLoadError, match="'4bit', '8bit', 'none'"):
        load_model(tiny_model_dir, "3bit")


def test_tokenizer_without_pad_gets_eos(tiny_model_dir, tmp_path):
    tokenizer = load_tokenizer(tiny_model_dir)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    reloaded = load_tokenizer(str(tmp_path), padding_side="left")
    assert reloaded.pad_token == reloaded.eos_token and reloaded.padding_side == "left"


def test_kernels_message_is_filtered_and_others_pass(caplog):
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        logger.warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
            "`pip install kernels` and the kernels >= 0.11.1", ModuleNotFoundError("No module named 'kernels'"))
        logger.warning("some other bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["some other bitsandbytes warning"]


# ---------------------------------------------------------------------------------------------------------------
# The AVX512-BF16 trap: evaluate first, then train, and the gradients must still be right
# ---------------------------------------------------------------------------------------------------------------


def _lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, config)


def _dequantized_reference(quantized, model_dir):
    """A full-precision model whose Linear weights are the 4-bit model's dequantized weights."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                modules[name].weight.copy_(weight.float())
    return reference


def _lora_grads(model, batch):
    model.zero_grad()
    model.train()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    return {n.replace(".base_layer", ""): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _eval_then_train_grads(tiny_model_dir, monkeypatch, keep_repacking: bool):
    import bitsandbytes.nn.modules as bnb_modules
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    # Simulate a CPU with AVX512-BF16 (this one may lack it): Linear4bit reads the probe when built.
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    model, tokenizer = load_model(tiny_model_dir, FP32_4BIT)
    if keep_repacking:  # undo the kit's fix, to show the test catches the trap
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = True
    reference = _dequantized_reference(model, tiny_model_dir)
    model, reference = _lora(model), _lora(reference)
    set_peft_model_state_dict(reference, get_peft_model_state_dict(model))
    batch = tokenizer(["<|im_start|>user\nName a colour.<|im_end|>", "The quick brown fox"],
                      return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        model(**batch)  # the evaluation pass that repacks weights on AVX512-BF16 CPUs
    return _lora_grads(model, batch), _lora_grads(reference, batch)


def test_lora_gradients_after_eval_match_dequantized_reference(tiny_model_dir, monkeypatch):
    grads, reference = _eval_then_train_grads(tiny_model_dir, monkeypatch, keep_repacking=False)
    assert set(grads) == set(reference) and len(grads) == 28  # A and B of 14 layers
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.filterwarnings("ignore:.*an autograd kernel was not registered:UserWarning")
def test_without_the_fix_gradients_after_eval_are_wrong(tiny_model_dir, monkeypatch):
    grads, reference = _eval_then_train_grads(tiny_model_dir, monkeypatch, keep_repacking=True)
    worst = max(((grads[n] - reference[n]).norm() / reference[n].norm()).item() for n in grads)
    assert worst > 0.05


# ---------------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------------


def test_describe_model_leaves_lora_matrices_out(tiny_model_dir):
    model, _ = load_model(tiny_model_dir, "4bit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = _lora(model)
    report = describe_model(peft_model)
    assert report.layers == {"Linear4bit": 14, "Linear": 1}
    assert report.trainable == sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert "trainable" in str(report) and "Linear4bit" in str(report)


def test_compare_precisions_orders_footprints(tiny_model_dir):
    results = {f.label: f for f in compare_precisions(tiny_model_dir)}
    assert list(results) == ["fp32", "bf16", "8bit", "4bit"]
    assert all(f.available and f.bytes for f in results.values())
    assert results["bf16"].bytes < results["fp32"].bytes
    assert results["4bit"].bytes < results["8bit"].bytes < results["fp32"].bytes


def test_compare_precisions_reports_unavailable(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(loading, "quantization_available",
                        lambda load_in: (load_in != "8bit", "no int8 backend on this device"))
    results = {f.label: f for f in compare_precisions(tiny_model_dir, ("fp32", "8bit"))}
    assert results["fp32"].available
    assert not results["8bit"].available and results["8bit"].bytes is None
    assert results["8bit"].reason == "8bit cannot load here: no int8 backend on this device."
