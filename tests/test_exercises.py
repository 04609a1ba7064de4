"""Exercises answer from the real objects, reply kindly to right, close, wrong and missing guesses, and
show answers in solution mode; the notebooks carry at least one each."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import peft
import pytest
from transformers import AutoModelForCausalLM

from lora_nb.exercises import (SOLUTIONS, Exercise, adapter_size_exercise, alpha_exercise, solution_mode, steps_exercise,
                               trainable_exercise, weights_memory_exercise)
from lora_nb.presets import get_preset

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("0[0-4]_*.ipynb"))


@pytest.fixture(autouse=True)
def no_solutions(monkeypatch):
    monkeypatch.delenv(SOLUTIONS, raising=False)


def test_trainable_exercise_answers_what_peft_counts(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    exercise = trainable_exercise(model, r=8, targets=["q_proj", "v_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    assert exercise.answer == wrapped.get_nb_trainable_parameters()[0]
    assert exercise.check(exercise.answer).correct is True
    assert "Spot on" in str(exercise.check(exercise.answer))
    assert exercise.check(exercise.answer * 4).correct is False
    assert "too high, by about 4.0x" in str(exercise.check(exercise.answer * 4))


def test_no_guess_asks_and_hints_without_blocking():
    exercise = weights_memory_exercise(7, 4)
    reply = exercise.check(None)
    assert reply.correct is None and "Write your prediction" in reply.text and "Hint:" in reply.text
    assert "3.5" not in reply.text  # the answer is not given away
    assert exercise.check(3.3).correct is True and "Close enough" in exercise.check(3.3).text
    assert exercise.check("lots").correct is False and "not a number" in exercise.check("lots").text


def test_choices_and_solution_mode():
    exercise = alpha_exercise()
    assert exercise.check("Halves").correct is True
    assert exercise.check("doubles").correct is False
    assert "not one of the choices" in exercise.check("triples").text
    assert solution_mode() is False
    solution_mode(True)
    assert "Answer: halves" in exercise.check(None).text
    solution_mode(False)
    assert "Answer" not in exercise.check(None).text


def test_steps_exercise_from_settings():
    exercise = steps_exercise(get_preset("demo-cpu"), 96)
    assert exercise.answer == 12
    assert exercise.check(12).correct and not exercise.check(11).correct


def test_every_notebook_has_a_checked_exercise():
    for notebook in NOTEBOOKS:
        cells = json.loads(notebook.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        assert "_exercise(" in code and ".check(" in code, notebook.name
        assert "input(" not in code, notebook.name  # nothing waits for a keyboard under nbval


def test_exercise_without_answer_is_a_plain_number():
    assert Exercise("q?", 10, "because").check(10).correct


def test_adapter_size_exercise_reads_the_saved_adapter(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(100, 8), "b": torch.zeros(8, 50)}, str(tmp_path / "adapter_model.safetensors"))
    exercise = adapter_size_exercise(tmp_path)
    assert "1,200 parameters" in exercise.question
    assert exercise.answer == round((tmp_path / "adapter_model.safetensors").stat().st_size / 1e6, 1)
