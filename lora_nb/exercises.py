"""Exercises: predict, then reveal. The kit checks a learner's guess and answers kindly.

Each notebook has at least one. The learner writes a guess into a variable and runs the cell;
nothing waits for input, so the notebooks still run headless (nbval, "Run All"): a cell run with
no guess says what to do and gives a hint. The right answer comes from the real objects (the
model, the settings), never from a hard-coded number::

    guess = None                                   # your prediction, e.g. 100_000
    exercise = trainable_exercise(model, r=8, targets=["q_proj", "v_proj"])
    exercise.check(guess)

Solution mode, for teachers: ``LORA_NB_SOLUTIONS=1`` in the environment (before starting Jupyter)
or ``solution_mode(True)`` in a cell; every exercise then shows its answer and explanation.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from safetensors import safe_open

from .estimate import count_trainable
from .nf4 import count_parameters
from .run_folder import ADAPTER_WEIGHTS_FILE
from .settings import KitSettings, LoraSettings
from .targets import find_targets

if TYPE_CHECKING:
    import torch.nn

SOLUTIONS = "LORA_NB_SOLUTIONS"  # "1": exercises show their answers


def solution_mode(on: bool | None = None) -> bool:
    """Turns solution mode on or off (``on``), or just tells whether it is on (``on=None``).

    Returns:
        Whether exercises show their answers.
    """
    if on is not None:
        os.environ[SOLUTIONS] = "1" if on else "0"
    return os.environ.get(SOLUTIONS, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class Reply:
    """What the kit answers to a guess; shows as plain text in a notebook.

    Attributes:
        correct: True when the guess counts as right; None when there was no guess.
        text: The reply.
    """

    correct: bool | None
    text: str

    def __repr__(self) -> str:
        return self.text

    def __str__(self) -> str:
        return self.text


@dataclass
class Exercise:
    """One "predict, then reveal" question.

    Attributes:
        question: What to predict.
        answer: The right answer: a number, or one of ``choices``.
        explanation: Why that is the answer (shown on a right guess and on reveal).
        hint: A nudge, shown before a guess and after a wrong one.
        tolerance: For numbers, the relative error still counted as right (0.1 = within 10%).
        choices: For multiple choice, the allowed answers (a guess is matched case-insensitively).
        unit: Printed after numbers.
    """

    question: str
    answer: Any
    explanation: str
    hint: str = ""
    tolerance: float = 0.1
    choices: Sequence[str] = field(default_factory=tuple)
    unit: str = ""

    def check(self, guess: Any = None) -> Reply:
        """Compares a guess with the answer and replies kindly; with no guess, says what to do.

        Args:
            guess: The learner's prediction (None: not made yet).

        Returns:
            A :class:`Reply` (the notebook shows its text).
        """
        if guess is None or guess == "":
            if solution_mode():
                return Reply(None, f"{self.question}\n(solution mode) {self._reveal_text()}")
            ask = f" Choose one of: {', '.join(self.choices)}." if self.choices else ""
            return Reply(None, f"{self.question}{ask}\nWrite your prediction in the cell and run it again."
                               + (f" Hint: {self.hint}" if self.hint else ""))
        if self.choices:
            return self._check_choice(guess)
        return self._check_number(guess)

    def reveal(self) -> Reply:
        """The answer and the explanation."""
        return Reply(None, self._reveal_text())

    def _reveal_text(self) -> str:
        return f"Answer: {self._show(self.answer)}. {self.explanation}"

    def _check_choice(self, guess: Any) -> Reply:
        wanted = str(self.answer).strip().lower()
        given = str(guess).strip().lower()
        known = [c.strip().lower() for c in self.choices]
        if given not in known:
            return Reply(False, f"{guess!r} is not one of the choices ({', '.join(self.choices)}); pick one of them.")
        if given == wanted:
            return Reply(True, f"Right: {self.answer}. {self.explanation}")
        return Reply(False, f"Not this time: it is not {guess!r}. {self.hint} Try again, or call .reveal().")

    def _check_number(self, guess: Any) -> Reply:
        try:
            value = float(guess)
        except (TypeError, ValueError):
            return Reply(False, f"{guess!r} is not a number; write a number such as 1000 or 2.5e6.")
        answer = float(self.answer)
        error = abs(value - answer) / abs(answer) if answer else abs(value)
        if error <= self.tolerance / 10:
            return Reply(True, f"Spot on: {self._show(self.answer)}. {self.explanation}")
        if error <= self.tolerance:
            return Reply(True, f"Close enough (within {error:.0%}): it is {self._show(self.answer)}. "
                               f"{self.explanation}")
        direction = "too high" if value > answer else "too low"
        factor = max(value, answer) / min(value, answer) if value > 0 and answer > 0 else None
        size = f", by about {factor:.1f}x" if factor and factor < 100 else ""
        return Reply(False, f"Good try, but {self._show(value)} is {direction}{size}. "
                            + (f"Hint: {self.hint} " if self.hint else "") + "Try again, or call .reveal().")

    def _show(self, value: Any) -> str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            text = f"{value:,}" if float(value).is_integer() else f"{value:,.3g}"
            return f"{text} {self.unit}".strip()
        return str(value)


# -------------------------------------------------------------------------------------------------
# The notebooks' exercises: answers computed from the real objects
# -------------------------------------------------------------------------------------------------


def weights_memory_exercise(billions: float = 7.0, bits: int = 4) -> Exercise:
    """Notebook 00: how many GB do the weights of a ``billions``-parameter model take in ``bits`` bits?"""
    gb = billions * 1e9 * bits / 8 / 1e9
    return Exercise(
        question=f"How many GB do the weights of a {billions:g}B-parameter model take when stored in {bits}-bit?",
        answer=gb, unit="GB", tolerance=0.15,
        hint=f"{bits} bits are {bits / 8:g} byte per weight.",
        explanation=(f"{billions:g} billion weights x {bits / 8:g} byte = {gb:g} GB, before the small overhead of "
                     "the scales (about 0.5 bit per weight for NF4) and the layers kept in higher precision."))


def stored_parameters_exercise(model: torch.nn.Module, full_count: int) -> Exercise:
    """Notebook 01: what ``sum(p.numel())`` reports for a 4-bit model whose full count is ``full_count``."""
    counts = count_parameters(model)
    return Exercise(
        question=(f"The demo model has {full_count:,} weights. Loaded in 4-bit, what does "
                  "sum(p.numel() for p in model.parameters()) report?"),
        answer=counts.stored, tolerance=0.05,
        hint="bitsandbytes stores two 4-bit weights in one byte, and numel() counts bytes for those layers.",
        explanation=(f"{counts.packed:,} quantized weights are packed two per byte, so they count as "
                     f"{counts.packed // 2:,} elements; with the {counts.unquantized:,} weights that stay in "
                     f"full precision (embeddings, norms) that makes {counts.stored:,}."))


def trainable_exercise(model: torch.nn.Module, r: int = 8, targets: Sequence[str] | str = ("q_proj", "v_proj")
                       ) -> Exercise:
    """Notebook 02: how many parameters does LoRA train at rank ``r`` on ``targets``?"""
    target_list = targets if isinstance(targets, str) else list(targets)
    trainable, _ = count_trainable(model, LoraSettings(r=r, target_modules=target_list))
    found = find_targets(model)
    shapes = "; ".join(f"{n}: {i} -> {o}" for n in (target_list if isinstance(target_list, list) else [])
                       for i, o in found.shapes.get(n, [])[:1])
    return Exercise(
        question=f"How many parameters does LoRA train with r={r} on {target_list} in every block?",
        answer=trainable, tolerance=0.05,
        hint=(f"each adapted layer adds A (r x in) and B (out x r): r * (in + out) weights; {found.n_layers} blocks"
              + (f"; {shapes}" if shapes else "")),
        explanation=(f"r * (in + out) per adapted layer, summed over {found.n_layers} blocks: {trainable:,}. "
                     "Doubling r doubles it."))


def alpha_exercise() -> Exercise:
    """Notebook 02: what doubling r without touching lora_alpha does to the update."""
    return Exercise(
        question="You double r from 16 to 32 and leave lora_alpha at 32. What happens to the scale of the update?",
        answer="halves", choices=("doubles", "stays the same", "halves"),
        hint="The update B A x is multiplied by lora_alpha / r.",
        explanation=("The scale lora_alpha / r goes from 2 to 1, so the adapter's update is halved and it learns "
                     "more slowly at the same learning rate: raise lora_alpha with r to keep the ratio (or use "
                     "use_rslora, which scales by alpha / sqrt(r))."))


def steps_exercise(settings: KitSettings, n_examples: int) -> Exercise:
    """Notebook 03: how many optimizer steps make one pass over ``n_examples`` examples?"""
    train = settings.train
    per_step = train.per_device_train_batch_size * train.gradient_accumulation_steps
    steps = -(-n_examples // per_step)
    return Exercise(
        question=(f"The training split has {n_examples} examples, the batch is {train.per_device_train_batch_size} "
                  f"x {train.gradient_accumulation_steps} gradient accumulation. How many optimizer steps make one "
                  "pass over the data (one epoch)?"),
        answer=steps, tolerance=0.0,
        hint="one optimizer step uses batch size x gradient accumulation examples.",
        explanation=f"{n_examples} / ({train.per_device_train_batch_size} x {train.gradient_accumulation_steps}) "
                    f"rounded up = {steps}.")


def adapter_size_exercise(adapter_dir: str | Path) -> Exercise:
    """Notebook 04: how many MB does the saved adapter take, from its number of parameters?"""
    file = Path(adapter_dir) / ADAPTER_WEIGHTS_FILE
    with safe_open(str(file), "pt") as weights:
        parameters = sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys())
    size = file.stat().st_size
    return Exercise(
        question=f"The adapter has {parameters:,} parameters, saved in fp32. How many MB is its file?",
        answer=round(size / 1e6, 1), unit="MB", tolerance=0.1,
        hint="fp32 is 4 bytes per parameter; 1 MB = 1,000,000 bytes.",
        explanation=(f"{parameters:,} x 4 bytes = {parameters * 4 / 1e6:.1f} MB, plus a small header: the file is "
                     f"{size / 1e6:.1f} MB. The base model is not in it, so it is shared and loaded separately."))


__all__ = ["Exercise", "Reply", "adapter_size_exercise", "alpha_exercise", "solution_mode", "steps_exercise",
           "stored_parameters_exercise", "trainable_exercise", "weights_memory_exercise"]
