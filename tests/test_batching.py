"""Length-grouped batches: a permutation, less padding than random order, longest batch first."""

from __future__ import annotations

import random

import pytest

from lora_nb.batching import LengthGroupedSampler, LengthGroupedTrainer, length_grouped_indices
from lora_nb.data import padding_efficiency


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
