"""Data loading, tokenizing with prompt masking, collating, length grouping; and the demo task."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from transformers import AutoTokenizer

from lora_nb.data import (
    IGNORE_INDEX,
    MASK_CLOSE,
    MASK_OPEN,
    PadCollator,
    length_stats,
    load_examples,
    padding_efficiency,
    render_prompt,
    show_example,
    tokenize_examples,
)
from lora_nb.demo_task import demo_data_paths, score_predictions
from lora_nb.errors import DataError

CHAT = {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there."}]}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def write(path, text: str | bytes):
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------- loading
def test_load_jsonl_chat_skips_blank_lines(tmp_path):
    f = write(tmp_path / "d.jsonl", json.dumps(CHAT) + "\n\n  \n" + json.dumps(CHAT) + "\n")
    ds = load_examples(f)
    assert len(ds) == 2
    assert ds[0]["messages"] == CHAT["messages"]


@pytest.mark.parametrize(
    "record, user, answer",
    [
        ({"instruction": "Add", "input": "2 and 3", "output": "5"}, "Add\n\n2 and 3", "5"),
        ({"instruction": "Add 2 and 3", "input": "", "output": "5"}, "Add 2 and 3", "5"),
        ({"prompt": "Capital of France?", "response": "Paris"}, "Capital of France?", "Paris"),
        ({"question": "2+2?", "answer": "4"}, "2+2?", "4"),
        ({"prompt": "Hi", "completion": "Hello"}, "Hi", "Hello"),
        ({"input": "ping", "output": "pong"}, "ping", "pong"),
        ({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}, "Q", "A"),
    ],
)
def test_pair_formats_become_chats(tmp_path, record, user, answer):
    ds = load_examples(write(tmp_path / "d.jsonl", json.dumps(record) + "\n"))
    assert ds[0]["messages"] == [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def test_load_json_list_and_wrapped_list(tmp_path):
    rows = [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}]
    assert len(load_examples(write(tmp_path / "a.json", json.dumps(rows)))) == 2
    assert len(load_examples(write(tmp_path / "b.json", json.dumps({"train": rows})))) == 2


def test_load_csv(tmp_path):
    ds = load_examples(write(tmp_path / "d.csv", 'question,answer\nWhat is 1+1?,2\n"Hi, you",Hello\n'))
    assert [m[0]["content"] for m in ds["messages"]] == ["What is 1+1?", "Hi, you"]
    assert ds[1]["messages"][1]["content"] == "Hello"


def test_load_dataset_and_datasetdict():
    ds = datasets.Dataset.from_list([{"prompt": "p", "response": "r"}])
    assert load_examples(ds)[0]["messages"][1]["content"] == "r"
    dd = datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_list([{"prompt": "x", "response": "y"}])})
    assert load_examples(dd)[0]["messages"][0]["content"] == "p"
    assert load_examples(dd, split="test")[0]["messages"][0]["content"] == "x"
    with pytest.raises(DataError, match="splits"):
        load_examples(dd, split="validation")


def test_hub_id_offline_gives_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lora_nb import demo

    demo.hub_reachable.cache_clear()
    try:
        with pytest.raises(DataError, match="hub cannot be reached.*local"):
            load_examples("someone/some-dataset")
    finally:
        demo.hub_reachable.cache_clear()


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("empty.jsonl", "", r"empty\.jsonl is empty"),
        ("blank.jsonl", "\n \n", r"blank\.jsonl is empty"),
        ("badjson.jsonl", json.dumps(CHAT) + "\n{not json\n", r"badjson\.jsonl:2: not valid JSON"),
        ("latin1.jsonl", json.dumps(CHAT).encode() + b"\n" + '{"prompt": "caf\xe9"}'.encode("latin-1"), r"latin1\.jsonl:2: not UTF-8"),
        ("noanswer.jsonl", json.dumps({"prompt": "x"}) + "\n", r"noanswer\.jsonl:1: missing a response field"),
        ("noprompt.jsonl", json.dumps({"output": "x"}) + "\n", r"noprompt\.jsonl:1: missing a prompt field"),
        ("emptyanswer.jsonl", json.dumps({"prompt": "x", "response": " "}) + "\n", r":1: field `response` is empty"),
        ("badrole.jsonl", json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n", r"messages\[0\]\.role.*allowed"),
        ("lastuser.jsonl", json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n", r"last message must be the assistant"),
        ("notobject.jsonl", "[1, 2]\n", r":1: an example must be a JSON object"),
        ("header.csv", "prompt,response\n", r"header line but no rows"),
        ("cells.csv", "prompt,response\na,\n", r"cells\.csv:2: field `response` is empty"),
        ("scalar.json", "3", r"must hold a list"),
        ("data.txt", "hello", r"unknown file type '\.txt'"),
    ],
)
def test_malformed_files_name_file_line_and_field(tmp_path, name, content, match):
    with pytest.raises(DataError, match=match):
        load_examples(write(tmp_path / name, content))


def test_missing_file_and_wrong_type(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_examples(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="Cannot load examples from a int"):
        load_examples(3)


# ------------------------------------------------------------------------------------- tokenizing
def test_masking_prompt_is_ignored_and_answer_matches_ids(tokenizer):
    ds = load_examples(datasets.Dataset.from_list([CHAT]))
    tok = tokenize_examples(ds, tokenizer, max_length=256)
    ids, labels = tok[0]["input_ids"], tok[0]["labels"]
    prompt_len = len(tokenizer(render_prompt(CHAT["messages"][:1], tokenizer), add_special_tokens=False)["input_ids"])
    assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:]
    assert tokenizer.decode(ids[prompt_len:]) == "Hi there.<|im_end|>"  # answer + end of turn, no trailing newline
    assert ids[-1] == tokenizer.eos_token_id
    assert tok[0]["length"] == len(ids) and tok[0]["truncated"] is False


def test_train_on_everything_when_asked(tokenizer):
    tok = tokenize_examples(datasets.Dataset.from_list([CHAT]), tokenizer, 256, train_on_responses_only=False)
    assert tok[0]["labels"] == tok[0]["input_ids"]


def test_plain_format_without_chat_template(tokenizer):
    plain = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    tok = tokenize_examples(datasets.Dataset.from_list([CHAT]), plain, 256)
    text = show_example(tok, plain, 0)
    assert text == f"{MASK_OPEN}### Instruction:\nSay hi.\n\n### Response:\n{MASK_CLOSE}Hi there.<|im_end|>"


def test_truncation_is_counted_and_warned(tokenizer):
    long = {"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "word " * 50}]}
    ds = datasets.Dataset.from_list([CHAT, long])
    limit = tokenize_examples(ds.select([0]), tokenizer, 512)[0]["length"] + 5
    with pytest.warns(UserWarning, match=f"1 of 2 examples were longer than max_length={limit}"):
        tok = tokenize_examples(ds, tokenizer, max_length=limit)
    assert tok["truncated"] == [False, True]
    assert max(tok["length"]) == limit
    assert length_stats(tok)["truncated"] == 1


def test_examples_without_any_answer_left_are_dropped(tokenizer):
    long_prompt = {"messages": [{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "ok"}]}
    ds = datasets.Dataset.from_list([CHAT, long_prompt])
    limit = tokenize_examples(ds.select([0]), tokenizer, 512)[0]["length"] + 5
    with pytest.warns(UserWarning, match="1 of them lost their whole answer"):
        tok = tokenize_examples(ds, tokenizer, max_length=limit)
    assert len(tok) == 1
    with pytest.raises(DataError, match="Raise max_seq_length"), pytest.warns(UserWarning):
        tokenize_examples(datasets.Dataset.from_list([long_prompt]), tokenizer, max_length=limit)


def test_show_example_marks_the_masked_prompt(tokenizer):
    tok = tokenize_examples(datasets.Dataset.from_list([CHAT]), tokenizer, 256)
    text = show_example(tok, tokenizer, 0)
    assert text == f"{MASK_OPEN}<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n{MASK_CLOSE}Hi there.<|im_end|>"
    with pytest.raises(IndexError, match="has 1 examples"):
        show_example(tok, tokenizer, 5)


# --------------------------------------------------------------------------------------- batching
def test_collator_pads_to_longest_with_masked_labels(tokenizer):
    features = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = PadCollator(tokenizer)(features)
    pad = tokenizer.pad_token_id
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, pad, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["input_ids"].dtype == torch.long
    assert PadCollator(0, pad_to_multiple_of=4)(features)["input_ids"].shape == (2, 4)


def test_padding_efficiency_values():
    assert padding_efficiency([4, 4, 4, 4], 2) == 1.0
    assert padding_efficiency([1, 4, 1, 4], 2) == pytest.approx(10 / 16)
    assert padding_efficiency([1, 4, 1, 4], 2, order=[0, 2, 1, 3]) == 1.0


def test_trainer_length_grouping_reduces_padding(tokenizer, tiny_model_dir, tmp_path):
    """Trainer's group_by_length sampler, fed by the `length` column, batches similar lengths."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    rows = [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "word " * n}]}
            for n in [1, 40, 3, 25, 60, 2, 33, 8, 50, 5, 17, 44, 12, 29, 6, 55] * 4]
    tok = tokenize_examples(datasets.Dataset.from_list(rows), tokenizer, 512)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    efficiency = {}
    for strategy in ("random", "group_by_length"):
        args = TrainingArguments(str(tmp_path / strategy), per_device_train_batch_size=4, use_cpu=True,
                                 train_sampling_strategy=strategy, remove_unused_columns=False, report_to="none", seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=tok, data_collator=PadCollator(tokenizer))
        batches = list(trainer.get_train_dataloader())
        real = sum(int(b["attention_mask"].sum()) for b in batches)
        efficiency[strategy] = real / sum(b["input_ids"].numel() for b in batches)
    stats = length_stats(tok, batch_size=4)
    assert efficiency["group_by_length"] > 0.8 and efficiency["group_by_length"] > efficiency["random"] + 0.2
    assert stats["padding_efficiency_grouped"] > efficiency["random"]


def test_length_stats_values(tokenizer):
    tok = datasets.Dataset.from_dict({"input_ids": [[1] * n for n in (2, 4, 6, 8)], "length": [2, 4, 6, 8],
                                      "truncated": [False, False, False, True]})
    stats = length_stats(tok, batch_size=2)
    assert (stats["min"], stats["median"], stats["max"], stats["mean"], stats["truncated"]) == (2, 5, 8, 5, 1)
    assert stats["padding_efficiency"] == pytest.approx(20 / 24)
    # Printed (as notebook 03 does), floats show 3 decimals; the values stay exact.
    assert "'padding_efficiency': 0.833," in str(stats) and "0.8333" not in repr(stats)
    assert stats["padding_efficiency"] == 20 / 24


# ---------------------------------------------------------------------------------------- demo task
def test_demo_data_shape():
    train, heldout = demo_data_paths()
    tr, ho = load_examples(train), load_examples(heldout)
    assert len(tr) == 96 and 24 <= len(ho) <= 32
    train_names = {json.loads(m[1]["content"]).get("customer") or json.loads(m[1]["content"]).get("traveler")
                   or json.loads(m[1]["content"]).get("name") for m in tr["messages"] if m[1]["content"].startswith("{")}
    for m in ho["messages"]:
        answer = json.loads(m[1]["content"])
        assert next(iter(answer.values())) not in train_names  # held-out people are new
        assert m[0]["content"].split("\nSentence: ")[1] not in {x[0]["content"] for x in tr["messages"]}


def test_demo_answers_are_short(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    _, heldout = demo_data_paths()
    tok = tokenize_examples(load_examples(heldout), tokenizer, 512)
    assert max(sum(label != IGNORE_INDEX for label in labels) for labels in tok["labels"]) <= 60


def test_score_predictions():
    refs = ['{"a": 1, "b": "x"}', '{"a": 2, "b": "y"}', {"a": 3, "b": "z"}, '{"a": 4, "b": "w"}']
    preds = ['{"b": "x", "a": 1}', '{"a": 2, "b": "Y"}', '```json\n{"a": 3, "b": "z"}\n```', '{"a": 4}']
    assert score_predictions(preds, refs) == {"exact_match": 0.25, "valid_json": 0.75, "keys_correct": 0.5, "n": 4}
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        score_predictions(["a", "b"], ["a"])
