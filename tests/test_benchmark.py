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
    result = bench.run_benchmark(model=tiny_model_dir, steps=2, seeds=(0, 1), batch_size=4, min_len=20, max_len=120,
                                 heldout=2, long_tail=False, memory_steps=0, out_dir=out)
    result["_out"] = out
    return result


def test_ratio_and_losses(report):
    mixed = report["data_sets"]["mixed"]
    summary = mixed["summary"]
    assert [run["seed"] for run in mixed["runs"]] == [0, 1]
    assert math.isfinite(summary["ratio"]) and summary["ratio"] > 0
    for run, ratio in zip(mixed["runs"], summary["ratio_per_seed"]):
        arms = run["arms"]
        assert set(arms) == {"recipe", "kit"} and run["identical_start"]
        assert ratio == pytest.approx(arms["kit"]["real_tokens_per_s"] / arms["recipe"]["real_tokens_per_s"])
        for arm in arms.values():
            assert len(arm["losses"]) == arm["steps"] == len(arm["step_seconds"]) == 2
            assert all(math.isfinite(x) for x in arm["losses"]) and arm["seconds"] > 0
            assert math.isfinite(arm["heldout_loss"]) and math.isfinite(arm["heldout_loss_without_end"])
        assert run["checks"]["packed_rel"] <= bench.PADDING_TOLERANCE
        assert run["checks"]["padded_rel"] <= bench.PADDING_TOLERANCE
        assert run["plan"] == {"padding_free": True, "chunked_loss": True, "notes": []}
    assert summary["heldout_kit_above"] in (0, 1, 2)
    assert set(report["acceptance"]) == {"seeds_run", "speedup", "heldout_within", "heldout_above"}
    assert "of 2 seed(s) run" in (report["_out"] / "report.md").read_text()


def test_real_tokens_match_a_hand_count(report, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    run = report["data_sets"]["mixed"]["runs"][0]
    chats = bench.make_data_set(tok, 2 * 4, 20, 120, 0, seed=0)
    by_hand = [len(tok(tok.apply_chat_template(c, tokenize=False))["input_ids"]) for c in chats]
    arms = run["arms"]
    assert arms["recipe"]["real_tokens"] == sum(by_hand)  # one epoch: every example once
    # The kit keeps everything up to the answer's end-of-turn token: the template's final newline goes.
    assert arms["kit"]["real_tokens"] == sum(run["kit_lengths"]) == sum(by_hand) - len(by_hand)
    assert arms["kit"]["padded_tokens"] == arms["kit"]["real_tokens"]  # padding-free
    assert arms["recipe"]["padded_tokens"] > arms["recipe"]["real_tokens"]


def test_recipe_learns_every_token_and_ignores_padding(tiny_model_dir):
    """The recipe arm labels the end-of-turn token even where it is the pad token (the pad=eos trap)."""
    from transformers import AutoTokenizer

    from benchmarks.throughput_arms import recipe_collator, recipe_dataset

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token = tok.eos_token  # as the recipe does; the trap when eos ends each turn
    chats = bench.make_data_set(tok, 2, 20, 60, 0, seed=0)
    data = recipe_dataset(chats, tok)
    batch = recipe_collator(tok)([data[0], data[1]])
    real = batch["attention_mask"].bool()
    assert (batch["labels"][real] == batch["input_ids"][real]).all()  # every real token, eos included
    assert (batch["labels"] == tok.eos_token_id).sum() == (batch["input_ids"][real] == tok.eos_token_id).sum() > 0
    assert (batch["labels"][~real] == -100).all() and (~real).any()  # padding only is skipped


def test_files_written(report):
    out = report["_out"]
    text = (out / "report.md").read_text()
    assert "Kit / recipe real-token throughput on mixed" in text and "throughput.png" in text
    assert f"torch {report['threads']['torch_threads']} intra-op" in text
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["seed"], r["arm"]) for r in rows] == [("0", "recipe"), ("0", "kit"), ("1", "recipe"), ("1", "kit")]
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


def test_merge_parts_run_side_by_side(report, tmp_path):
    import copy

    from benchmarks.throughput_report import merge_reports, render_markdown

    parts = []
    for i, name in ((1, "part b"), (0, "part a")):  # out of order: the merge sorts by seed
        part = copy.deepcopy({k: v for k, v in report.items() if k != "_out"})
        part["data_sets"]["mixed"]["runs"] = [part["data_sets"]["mixed"]["runs"][i]]
        part["command"] = name
        parts.append(part)
    merged = merge_reports(parts, command="merge")
    assert [run["seed"] for run in merged["data_sets"]["mixed"]["runs"]] == [0, 1]
    assert merged["data_sets"]["mixed"]["summary"] == report["data_sets"]["mixed"]["summary"]
    assert merged["acceptance"]["seeds_run"] == 2
    text = render_markdown(merged)
    assert "- `part b`" in text and "then `merge`" in text and "**Partial:** 2 of the 3 seeds" in text
    assert "**Short runs:** 2 optimizer steps" in text
    one = merge_reports(parts[:1], notes=["The memory part ran on older code."])
    assert "of 1 seed(s) run" in render_markdown(one)
    assert "- The memory part ran on older code." in render_markdown(one)


def test_step_profile_splits_both_arms_by_kind_of_work(tiny_model_dir):
    """benchmarks/step_profile.py: the same chats in both arms, every kind of work found in each, the factors."""
    from benchmarks import step_profile

    result = step_profile.measure(tiny_model_dir, batches=1, seed=0)
    recipe, kit = result["arms"]["recipe"], result["arms"]["kit"]
    assert kit["positions"] == kit["real"] == recipe["real"] - 8  # the kit drops each chat's final newline
    assert recipe["positions"] > recipe["real"]  # padded to the longest of the 8
    for arm in (recipe, kit):
        assert set(arm["seconds"]) <= set(step_profile.KINDS)
        assert all(arm["seconds"].get(kind, 0) > 0 for kind in step_profile.KINDS)
        assert arm["layer_gflops"] > 0
    text = step_profile.render(result)
    share = recipe["real"] / recipe["positions"]
    assert f"{1 / share:.2f}x from the padding the kit drops" in text
    assert text.count("\n| ") == 2 + len(step_profile.KINDS) + 1  # header, rule, a row per kind, all
