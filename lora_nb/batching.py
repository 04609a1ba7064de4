"""Batching: put examples of similar length in the same batch, so that little compute goes to padding.

A batch is padded to its longest example. On mixed-length data (say 20 to 400 tokens) batches
of randomly drawn examples are about 60% real tokens and 40% padding; sorted into batches by
length they are over 90% real tokens, and the step time follows the padded size
(see `benchmarks/results/report.md`).

transformers' own `group_by_length` (`LengthGroupedSampler`) sorts only inside "megabatches" of
`min(n // (4 * batch_size), 50)` batches. On the small data sets a notebook fine-tune uses, that is
1 to 3 batches: with 64 examples of 20-400 tokens its batches are 74% real tokens, barely better
than random (61%); with 48 or fewer examples it sorts nothing at all. The sampler here sorts in
megabatches of up to `megabatch_batches` batches (default 50, so globally for up to 400 examples at
batch size 8) and then shuffles the order of the batches:

    lengths   37 390 122 250 61 300 ...        (random order)
    sorted    37 61 ... | 122 ... | 250 300 ... | ... 390   (batches of similar length)
    batches shuffled, the longest first         (an out-of-memory error shows at step 1, not later)

Which examples share a batch is then the same every epoch (up to ties); the batch order changes
with the seed and the epoch. Same examples, same loss per example: only the padding differs.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch
from transformers import Trainer


def length_grouped_indices(lengths: Sequence[int], batch_size: int, seed: int = 0,
                           megabatch_batches: int = 50) -> list[int]:
    """Order example indices so that each run of `batch_size` holds examples of similar length.

    Args:
        lengths: tokens per example.
        batch_size: examples per batch (per forward pass, i.e. per device and micro-batch).
        seed: seed of the shuffles (ties, megabatches, batch order).
        megabatch_batches: sort within groups of this many batches; more = less padding, less
            randomness in which examples meet.

    Returns:
        A permutation of `range(len(lengths))`; batches are consecutive slices, the longest first.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size is {batch_size}; it must be at least 1.")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)  # random megabatches, and random tie-breaking inside the stable sort below
    size = max(1, megabatch_batches) * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), size):
        mega = sorted(order[start:start + size], key=lambda i: lengths[i])
        batches += [mega[k:k + batch_size] for k in range(0, len(mega), batch_size)]
    # A short last batch stays last (the DataLoader keeps it); full batches are shuffled.
    tail = [batches.pop()] if batches and len(batches[-1]) < batch_size else []
    rng.shuffle(batches)
    if batches:
        longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
        batches[0], batches[longest] = batches[longest], batches[0]
    return [i for batch in batches + tail for i in batch]


class LengthGroupedSampler(torch.utils.data.Sampler):
    """A `Sampler` yielding `length_grouped_indices`, reshuffled each epoch (`set_epoch`)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, megabatch_batches: int = 50):
        self.lengths = [int(n) for n in lengths]
        self.batch_size = batch_size
        self.seed = seed
        self.megabatch_batches = megabatch_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use another batch order in the next epoch (the DataLoader wrappers call this)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        return iter(length_grouped_indices(self.lengths, self.batch_size, self.seed + self.epoch,
                                           self.megabatch_batches))


class LengthGroupedTrainer(Trainer):
    """`transformers.Trainer` whose `train_sampling_strategy="group_by_length"` uses `LengthGroupedSampler`.

    Lengths come from the data set's `length` column (`data.tokenize_examples` writes it) or from
    `input_ids`. Everything else, other strategies included, is `Trainer`'s own behaviour.
    """

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy != "group_by_length" or dataset is None or not hasattr(dataset, "__len__"):
            return super()._get_train_sampler(train_dataset)
        column = self.args.length_column_name
        names = getattr(dataset, "column_names", None) or []
        lengths = dataset[column] if column in names else [len(example["input_ids"]) for example in dataset]
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        # Group by the examples of one optimizer step (all processes, all accumulated passes): then N
        # processes with batch b train on the same examples per step as one process with batch N x b.
        step = self.args.train_batch_size * self.args.world_size * self.args.gradient_accumulation_steps
        return LengthGroupedSampler(lengths, step, seed=seed)
