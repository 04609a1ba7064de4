"""Smoke test of benchmarks/throughput.py: tiny model, a few steps, every report field checked."""

from __future__ import annotations

import csv
import math
import threading

import pytest

from benchmarks import throughput as bench


@pytest.fixture(scope="module")
def report(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = bench.run_benchmark(model=tiny_model_dir, steps=2, fixed_steps=1, batch_size=4, min_len=20,
                                 max_len=120, heldout=2, memory_shapes=[], out_dir=out)
    result["_out"] = out
    return result


def test_ratio_and_losses(report):
    assert set(report["arms"]) == {"plain_dynamic", "kit", "plain_fixed"}
    assert math.isfinite(report["ratio"]) and report["ratio"] > 0
    assert report["ratio"] == pytest.approx(report["arms"]["kit"]["ratio_vs_plain_dynamic"])
    for arm in report["arms"].values():
        assert len(arm["losses"]) == arm["steps"] == len(arm["step_seconds"])
        assert all(math.isfinite(x) for x in arm["losses"]) and math.isfinite(arm["final_loss"])
        assert arm["seconds"] > 0 and arm["peak_rss_mb"] > 0
    check = report["loss_check"]
    assert report["identical_start"] and check["padding_equal"]
    assert math.isfinite(check["heldout_plain"]) and math.isfinite(check["heldout_kit"])


def test_real_tokens_match_a_hand_count(report, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    chats = bench.make_examples(tok, 2 * 4, 20, 120, seed=0)
    by_hand = [len(tok(tok.apply_chat_template(c, tokenize=False))["input_ids"]) for c in chats]
    arms = report["arms"]
    assert arms["plain_dynamic"]["real_tokens"] == sum(by_hand)  # one epoch: every example once
    assert arms["plain_fixed"]["real_tokens"] == sum(by_hand[:4])
    assert arms["plain_fixed"]["padded_tokens"] == 4 * report["max_length"]
    # The kit keeps everything up to the answer's end-of-turn token: the template's final newline goes.
    assert arms["kit"]["real_tokens"] == sum(report["kit_lengths"]) == sum(by_hand) - len(by_hand)
    assert arms["kit"]["padded_tokens"] <= arms["plain_dynamic"]["padded_tokens"]


def test_files_written(report):
    out = report["_out"]
    text = (out / "report.md").read_text()
    assert "Kit / plain (dynamic padding) real-token throughput" in text and "throughput.png" in text
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["arm"] for r in rows] == ["plain_dynamic", "kit", "plain_fixed"]
    assert float(rows[1]["ratio_vs_plain_dynamic"]) == pytest.approx(report["ratio"], rel=1e-3)
    assert (out / "throughput.png").stat().st_size > 1000


def test_turns_alternate():
    turns, seen = bench.TurnTaker(["a", "b", "c"]), []
    steps = {"a": 3, "b": 1, "c": 2}

    def arm(name):
        for _ in range(steps[name]):
            turns.wait(name)
            seen.append(name)
            turns.done_step(name)
        turns.leave(name)

    threads = [threading.Thread(target=arm, args=(n,)) for n in reversed(list(steps))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert seen == ["a", "b", "c", "a", "c", "a"]
