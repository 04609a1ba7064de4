"""Property tests: whatever comes in (settings text, data files, command-line arguments), the kit ends
in one of its own errors, a warning, or a correct result, within 10 seconds, never a raw traceback."""

from __future__ import annotations

import csv
import io
import json
import time

import pytest
from hypothesis import HealthCheck, given, settings as hyp_settings, strategies as st

import datasets  # noqa: F401 - imported once here, so the 10 s limit measures the kit, not first imports
import lora_nb.evaluate  # noqa: F401
import lora_nb.loading
import lora_nb.pipeline
import lora_nb.plots  # noqa: F401
import lora_nb.train  # noqa: F401
from lora_nb.__main__ import main
from lora_nb.data import ROLES, load_examples
from lora_nb.errors import LoraNbError
from lora_nb.formats import load_settings

LIMIT_S = 10
EXAMPLES = hyp_settings(max_examples=60, deadline=None,
                        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# --------------------------------------------------------------------------------------------- settings text
KEYS = ["adapter", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_linear",
        "lora_modules_to_save", "peft_layers_to_transform", "peft_layers_pattern", "load_in_4bit", "load_in_8bit",
        "bf16", "fp16", "batch_size", "micro_batch_size", "gradient_accumulation_steps", "learning_rate",
        "max_steps", "warmup_steps", "warmup_ratio", "lr_scheduler", "peft_init_lora_weights", "base_model",
        "lora", "quant", "train", "r", "target_modules", "layers_to_transform", "model_name_or_path", "peft_type",
        "load_in", "precision", "num_train_epochs", "logging_steps", "x"]
SCALARS = st.one_of(
    st.sampled_from(["null", "true", "false", "0", "1", "-1", "8", "1.0", "0.05", "2e-4", "nan", ".inf", "''",
                     "lora", "qlora", "auto", "all-linear", "q_proj", "lm_head", "LORA", "constant", "4bit",
                     "'/etc/passwd'", "\"\""]),
    st.integers(-3, 5000).map(str))


def _value(depth: int):
    if depth == 0:
        return SCALARS
    inner = _value(depth - 1)
    return st.one_of(SCALARS, st.lists(inner, max_size=4).map(lambda v: "[" + ", ".join(v) + "]"),
                     st.dictionaries(st.sampled_from(KEYS), inner, max_size=3).map(
                         lambda d: "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}"))


@st.composite
def settings_texts(draw):
    """YAML documents over the keys the readers know, with anchors and aliases (up to a billion laughs)."""
    lines = [f"{k}: {draw(_value(2))}" for k in draw(st.lists(st.sampled_from(KEYS), max_size=8, unique=True))]
    if draw(st.booleans()):  # anchors that alias each other, width and depth drawn
        width, depth = draw(st.integers(1, 12)), draw(st.integers(1, 9))
        lines.append("a0: &a0 [" + ", ".join(["lol"] * width) + "]")
        lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, depth)]
        if draw(st.booleans()):
            lines.append(f"lora_target_modules: *a{depth - 1}")
    return "\n".join(draw(st.permutations(lines))) + "\n"


@EXAMPLES
@given(settings_texts())
def test_settings_reader_answers_every_text(text):
    started = time.perf_counter()
    try:
        result = load_settings(text)
    except LoraNbError as err:
        assert len(str(err)) < 3000  # messages quote values short
    else:
        assert result.settings.problems(check_environment=False) == []
    assert time.perf_counter() - started < LIMIT_S


# --------------------------------------------------------------------------------------------------- data
TEXT = st.one_of(st.text(max_size=12), st.sampled_from(["", " ", "Q?", "A.", "human", "gpt", "assistant", "user"]))
JSON_VALUES = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), TEXT),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.sampled_from(["role", "content", "from", "value"]),
                                                                   inner, max_size=3)),
                           max_leaves=6)
RECORD_KEYS = st.sampled_from(["instruction", "prompt", "question", "input", "context", "output", "response",
                               "answer", "messages", "conversations", "x"])
RECORDS = st.one_of(st.dictionaries(RECORD_KEYS, JSON_VALUES, max_size=4), JSON_VALUES)


def _check_examples(path):
    started = time.perf_counter()
    try:
        examples = load_examples(path)
    except LoraNbError as err:
        assert str(path) in str(err) or "data" in str(err).lower()
    else:
        for chat in examples["messages"]:
            assert chat[-1]["role"] == "assistant" and chat[-1]["content"].strip()
            assert all(m["role"] in ROLES and isinstance(m["content"], str) for m in chat)
    assert time.perf_counter() - started < LIMIT_S


@EXAMPLES
@given(records=st.lists(RECORDS, max_size=5), suffix=st.sampled_from([".jsonl", ".json"]))
def test_data_reader_answers_every_json_file(tmp_path_factory, records, suffix):
    path = tmp_path_factory.mktemp("data") / f"d{suffix}"
    text = "\n".join(json.dumps(r) for r in records) if suffix == ".jsonl" else json.dumps(records)
    path.write_text(text, encoding="utf-8")
    _check_examples(path)


@EXAMPLES
@given(header=st.lists(RECORD_KEYS, min_size=1, max_size=4),
       rows=st.lists(st.lists(TEXT, max_size=6), max_size=4), raw=st.binary(max_size=40))
def test_data_reader_answers_every_csv_file(tmp_path_factory, header, rows, raw):
    folder = tmp_path_factory.mktemp("csv")
    buffer = io.StringIO()
    csv.writer(buffer).writerows([header, *rows])
    (folder / "d.csv").write_text(buffer.getvalue(), encoding="utf-8")
    _check_examples(folder / "d.csv")
    (folder / "raw.jsonl").write_bytes(raw)
    _check_examples(folder / "raw.jsonl")


# ------------------------------------------------------------------------------------ command-line arguments
class LongWorkStarted(Exception):
    """Raised instead of loading a model: the arguments got past every check."""


OPTION_VALUES = {
    "--config": ["", " ", "missing.yaml", "bomb.yaml", "ok.yaml", "notes.txt", "."],
    "--preset": ["", "demo-cpu", "qlora-walkthrough", "nope"],
    "--model": ["", "  ", "tiny"],
    "--data": ["", "missing.jsonl", "notes.txt", "train.jsonl"],
    "--heldout": ["", "missing.jsonl", "train.jsonl"],
    "--out": ["", "notes.txt", "notes.txt/run", "new-run"],
    "--quant": ["none", "4bit", "3bit", ""],
    "--r": ["0", "8", "-1", "x", "1025", ""],
    "--alpha": ["16", "0", "1e3"],
    "--lr": ["5e-4", "nan", "inf", "-1", "2"],
    "--steps": ["0", "-1", "3", "-2", "1.5"],
    "--limit": ["0", "1", "-5", ""],
    "--max-new-tokens": ["0", "-1", "40", "9000", "abc"],
}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A current folder holding the files the drawn arguments name, and no model loading."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("the user's own file")
    (tmp_path / "ok.yaml").write_text("adapter: lora\nlora_target_linear: true\nlora_r: 4\n")
    (tmp_path / "bomb.yaml").write_text("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi")))
    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "response": "b"}\n')

    def refuse(*args, **kwargs):
        raise LongWorkStarted
    monkeypatch.setattr(lora_nb.loading, "load_model", refuse)
    monkeypatch.setattr(lora_nb.pipeline, "load_model", refuse)  # the pipeline's own name for it
    return tmp_path


@EXAMPLES
@given(options=st.dictionaries(st.sampled_from(sorted(OPTION_VALUES)), st.just(None), max_size=5),
       data=st.data())
def test_command_line_answers_every_argument_list(workdir, capsys, options, data):
    argv = ["run"]
    for option in options:
        argv += [option, data.draw(st.sampled_from(OPTION_VALUES[option]), label=option)]
    started = time.perf_counter()
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse's own answer to a malformed option: usage and one line, status 2
        assert exit_.code == 2 and "error:" in capsys.readouterr().err
    except LongWorkStarted:  # every check passed: the arguments are valid
        assert "" not in argv[1:] and (workdir / "notes.txt").read_text() == "the user's own file"
    else:
        err = capsys.readouterr().err
        assert status == 1 and err.startswith("lora-nb: ") and "Traceback" not in err
    assert time.perf_counter() - started < LIMIT_S
    assert (workdir / "notes.txt").read_text() == "the user's own file"
