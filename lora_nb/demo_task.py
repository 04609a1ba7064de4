"""The demo task: turn a sentence into strict JSON with the keys the prompt names.

The demo data set ships with the kit (`lora_nb/demo_data/`, written by `scripts/make_demo_data.py`)
so that every notebook runs offline and shows a measurable effect of LoRA on the small demo model
within a couple of CPU minutes. `score_predictions` is the task's own metric.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

TASK_DESCRIPTION = (
    "Each example gives a short sentence about an order, a trip or a person, and the keys to "
    "extract; the answer is one line of JSON with exactly those keys. The conventions are what "
    "LoRA has to teach: numbers written as words become integers (\"thirty-four\" -> 34), common "
    "nouns are lower-case and singular (\"scarves\" -> \"scarf\"), names stay as written. The "
    "held-out split uses people never seen in training and a phrasing never seen in training, so "
    "its score measures whether the rule was learned rather than the examples memorised. Eight "
    "general questions are mixed into the training split so that the model keeps answering them "
    "in plain words."
)


def demo_data_paths() -> tuple[Path, Path]:
    """The shipped demo data files.

    Returns:
        `(train, heldout)`: JSONL files of `{"messages": [user, assistant]}` chat examples
        (96 training examples, 30 held-out examples).
    """
    folder = Path(__file__).resolve().parent / "demo_data"
    return folder / "train.jsonl", folder / "heldout.jsonl"


def parse_json(text: str) -> Any | None:
    """The JSON value of `text` (surrounding whitespace allowed), or None when it is not valid JSON.

    Strict on purpose: text around the JSON (a code fence, an explanation) makes it invalid,
    because the task asks for the JSON only.
    """
    try:
        return json.loads(text.strip())
    except (json.JSONDecodeError, TypeError):
        return None


def score_predictions(predictions: Sequence[str], references: Sequence[str | dict]) -> dict[str, float]:
    """Score generated answers against the reference answers of the demo task.

    Args:
        predictions: generated answer texts, one per example.
        references: the reference answers, as JSON text or already-parsed dicts.

    Returns:
        `{"exact_match", "valid_json", "keys_correct", "n"}`: the share of predictions whose parsed
        JSON equals the reference (key order and spacing do not matter), the share that is valid
        JSON, the share that is a JSON object with exactly the reference's keys, and the count.

    Raises:
        ValueError: the two lists differ in length or are empty.
    """
    if len(predictions) != len(references):
        raise ValueError(
            f"Got {len(predictions)} predictions but {len(references)} references; pass one "
            "prediction per reference, in the same order."
        )
    if not predictions:
        raise ValueError("Got no predictions to score; generate answers for at least one example.")
    exact = valid = keys = 0
    for prediction, reference in zip(predictions, references):
        expected = parse_json(reference) if isinstance(reference, str) else reference
        got = parse_json(prediction)
        if got is None:
            continue
        valid += 1
        if isinstance(got, dict) and isinstance(expected, dict) and set(got) == set(expected):
            keys += 1
        exact += int(got == expected)
    n = len(predictions)
    return {"exact_match": exact / n, "valid_json": valid / n, "keys_correct": keys / n, "n": n}
