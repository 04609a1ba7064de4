"""Batching: spend no compute on padding, and weigh every token the same in an update.

A batch of mixed-length examples padded to its longest is mostly padding: on chats of 20 to 400
tokens, random batches are about 55% real tokens, and on a CPU a padded position costs as much as a
real one. Two ways out, both here:

Padding-free rows (the default, `TrainSettings.padding_free`). The examples of a batch are
concatenated into ONE row, with `position_ids` restarting at 0 for each example and no attention
mask; transformers (5.x, sdpa and eager attention) then builds a block-diagonal causal mask from the
restarts, so no token sees another example, and flash-attention on a GPU takes its varlen path:

    examples    [a1 a2 a3] [b1 b2] [c1 c2 c3 c4]
    row         a1 a2 a3 b1 b2 c1 c2 c3 c4          no padding at all
    position    0  1  2  0  1  0  1  2  3           restarts mark the example boundaries
    labels      -  a2 a3 -  b2 -  c2 c3 c4          (-: no loss; c1 is not predicted from b2)

Trap: with a key/value cache in play (the config's default `use_cache=True`), transformers skips
that detection and examples attend to each other, silently; the loss here always passes
`use_cache=False`. Models whose attention does not separate examples this way (ALiBi, recurrent or
state-space layers, an older attention code path) are found by `check_padding_free`, which compares
a packed row with the same examples run alone, and they fall back to padded batches with a warning.

Length-grouped padded batches (the fallback, `group_by_length`). transformers' own
`group_by_length` (`LengthGroupedSampler`) sorts only inside "megabatches" of
`min(n // (4 * batch_size), 50)` batches. On the small data sets a notebook fine-tune uses, that is
1 to 3 batches: with 64 examples of 20-400 tokens its batches are 74% real tokens, barely better
than random (61%); with 48 or fewer examples it sorts nothing at all. The sampler here sorts in
megabatches of up to `megabatch_batches` batches (default 50, so globally for up to 400 examples at
batch size 8) and then shuffles the order of the batches:

    lengths   37 390 122 250 61 300 ...        (random order)
    sorted    37 61 ... | 122 ... | 250 300 ... | ... 390   (batches of similar length)
    batches shuffled, the longest first         (an out-of-memory error shows at step 1, not later)

Loss weighting (`KitTrainer`). The loss of a step is the SUM of its token losses divided by the
label tokens of the whole optimizer step (`num_items_in_batch`, counted by `Trainer` over every
micro-batch of a gradient-accumulation step): a token in a short example weighs what a token in a
long one does, whether the examples share a row, a batch, or an accumulation step. The sum goes
through the output head in chunks (`loss.head_cross_entropy`), so the [tokens x vocabulary] float32
scores of the whole batch are never held at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import warnings
from typing import Any, Sequence

import torch
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface, AttentionMaskInterface, Trainer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from .data import IGNORE_INDEX, PadCollator
from .lean_layers import PROBE_TOLERANCE, lean_layers
from .loading import disable_cpu_weight_repacking
from .loss import head_cross_entropy, shift_labels

PACKED_SDPA = "lora_nb_packed_sdpa"  # attention implementation name registered below
PROBE_LENGTHS = (5, 9, 3)  # the examples `check_padding_free` packs into one row
PROBE_NOISE_FACTOR = 4  # a packed example may differ by this many times the rounding noise of the first
PROBE_SCORE_SCALE = 100.0  # `check_head_loss` also compares scores this large (soft-capping shows there)


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


# ------------------------------------------------------------------------------------ padding-free rows
class PackedCollator:
    """Concatenate a batch's examples into one row: no padding, `position_ids` restarting per example.

    Returns `input_ids`, `position_ids`, `labels` (each example's first label is -100: it is not
    predicted from the previous example) and `shift_labels` (what each position predicts; `Trainer`
    counts the step's label tokens from it). There is no `attention_mask`: transformers separates
    the examples by the restarts of `position_ids` (see the module docstring).
    """

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        ids: list[int] = []
        positions: list[int] = []
        labels: list[int] = []
        for f in features:
            tokens = list(f["input_ids"])
            own = list(f["labels"]) if "labels" in f else list(tokens)
            ids += tokens
            positions += range(len(tokens))
            labels += [IGNORE_INDEX] + own[1:]
        label_row = torch.tensor([labels], dtype=torch.long)
        return {"input_ids": torch.tensor([ids], dtype=torch.long),
                "position_ids": torch.tensor([positions], dtype=torch.long),
                "labels": label_row, "shift_labels": shift_labels(label_row)}


class ShiftedPadCollator(PadCollator):
    """`data.PadCollator` (padded to the longest example) that also returns `shift_labels`."""

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = super().__call__(features)
        batch["shift_labels"] = shift_labels(batch["labels"])
        return batch


def loss_sum(model, inputs: dict[str, Any], head: torch.nn.Module | None = None,
             dtype: torch.dtype | None = None) -> tuple[torch.Tensor, Any]:
    """Summed next-token loss of a batch (padded or packed), and the model's outputs.

    Args:
        model: a causal LM (a `PeftModel`, possibly wrapped by accelerate).
        inputs: a batch with `labels` (and optionally `shift_labels`, `position_ids`, `attention_mask`).
        head: the model's output head: the loss goes through it in chunks (`loss.head_cross_entropy`)
            and the model computes no logits; None = take the model's logits and sum their loss.
        dtype: the head's matrix products' dtype under mixed precision (see `loss.head_cross_entropy`).

    Returns:
        The float32 loss sum over the labelled tokens, and the model's outputs.
    """
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    targets = inputs.pop("shift_labels", None)
    targets = shift_labels(labels) if targets is None else targets
    inputs["use_cache"] = False  # with a cache in play, transformers does not separate packed examples
    if head is None:
        outputs = model(**inputs)
        logits = outputs.logits.float()
        return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"), outputs
    captured: list[torch.Tensor] = []

    def take_hidden(module, args):
        captured.append(args[0])
        return (args[0][..., :0, :], *args[1:])  # the head runs on no rows; the chunks below do its work

    handle = head.register_forward_pre_hook(take_hidden)
    try:
        outputs = model(**inputs)
    finally:
        handle.remove()
    if len(captured) != 1 or captured[0].shape[:-1] != targets.shape:
        raise RuntimeError(f"the output head was called {len(captured)} times, with shapes "
                           f"{[tuple(c.shape) for c in captured]}, not once on [batch, length, hidden]")
    return head_cross_entropy(captured[0], head, targets, dtype=dtype), outputs


# The last row's bounds: every layer of a forward asks with the same `position_ids` tensor, and
# reading the restarts off a GPU tensor waits for the GPU (once per forward instead of per layer).
_last_bounds: list[Any] = [None, None]


def _example_bounds(position_ids: torch.Tensor | None, length: int) -> list[tuple[int, int]] | None:
    """`(start, end)` of each example in a packed row (where `position_ids` restarts), or None."""
    if position_ids is None or position_ids.shape[-1] != length or position_ids.reshape(-1, length).shape[0] != 1:
        return None
    if _last_bounds[0] is position_ids:
        return _last_bounds[1]
    row = position_ids.reshape(-1)
    starts = [0, *(torch.diff(row) != 1).nonzero().flatten().add(1).tolist()]
    bounds = None if len(starts) < 2 else list(zip(starts, [*starts[1:], length]))
    _last_bounds[:] = [position_ids, bounds]
    return bounds


def packed_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """sdpa attention that runs a packed row one example at a time (causal, no mask).

    transformers' own path for a packed row gives sdpa a [length x length] block-diagonal mask:
    correct, but the attention then costs (sum of lengths)^2 instead of the sum of length^2, which
    on a CPU eats most of the gain of dropping padding. Anything that is not a plain packed row
    (padding, a cache, sliding windows longer than an example, attention sinks, soft-capping) goes to
    transformers' `sdpa_attention_forward` with the mask it built, unchanged.
    """
    bounds = _example_bounds(kwargs.get("position_ids"), query.shape[2])
    window = kwargs.get("sliding_window")
    special = any(kwargs.get(k) is not None for k in ("s_aux", "softcap", "position_bias"))
    if (bounds is None or special or key.shape[2] != query.shape[2] or query.shape[0] != 1
            or (window is not None and max(b - a for a, b in bounds) > window)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    # One split per tensor, not a slice per example: the backward of a slice builds a zero tensor of
    # the whole row and adds into it (examples x row length per layer, 20% of a CPU step at batch 8);
    # the backward of a split is one concatenation.
    sizes = [b - a for a, b in bounds]
    parts = [sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kwargs)[0]
             for q, k, v in zip(query.split(sizes, dim=2), key.split(sizes, dim=2), value.split(sizes, dim=2))]
    return torch.cat(parts, dim=1), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)


# sdpa kernels training may use: all but cuDNN's. cuDNN attention (PyTorch's first choice on Hopper
# GPUs for bf16 causal attention) builds an execution plan for every new sequence length, about 25 ms
# of CPU per layer and pass; batches of varying lengths (padding-free rows, length-grouped batches)
# meet a new length at most steps. Measured on an H200 (Llama-3.2-1B shape, 4-bit, batch 4): steps of
# 0.4-2.9 s against 0.08 s of GPU work. Flash and memory-efficient attention need no plan.
TRAINING_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@contextlib.contextmanager
def packed_attention(model, plan: "BatchPlan"):
    """While training: run an sdpa model's attention one example at a time, and keep less for backward.

    Only models that use transformers' "sdpa" attention switch (to `packed_sdpa_attention`), and only
    with padding-free rows; eager keeps transformers' block-diagonal mask and flash-attention its own
    varlen path. sdpa avoids cuDNN's kernel (`TRAINING_SDPA_BACKENDS`). Gated-SiLU MLPs and LoRA
    linears run their lean forms (`lean_layers`: same values and gradients, fewer passes over
    memory). Everything is restored on exit, so generation afterwards runs as before.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = getattr(base.config, "_attn_implementation", None)
    # Models whose attention does not go through transformers' AttentionInterface (Falcon) keep their own
    # sdpa code with the block-diagonal mask; asking them to switch only logs a warning
    can_switch = getattr(type(base), "_can_set_attn_implementation", lambda: True)()
    switch = plan.padding_free and before == "sdpa" and can_switch
    if switch:
        base.set_attn_implementation(PACKED_SDPA)
    try:
        with lean_layers(base), sdpa_kernel(TRAINING_SDPA_BACKENDS):
            yield
    finally:
        if switch:
            base.set_attn_implementation(before)


@contextlib.contextmanager
def _probing(model):
    """Eval mode (no dropout) for a probe forward, then the previous mode again."""
    disable_cpu_weight_repacking(model)  # an eval forward must not repack 4-bit weights (see loading.py)
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _probe_examples(model) -> list[torch.Tensor]:
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    device = model.get_input_embeddings().weight.device
    return [torch.randint(3, min(vocab, 1000), (n,), generator=generator).to(device) for n in PROBE_LENGTHS]


@torch.no_grad()
def check_padding_free(model) -> str | None:
    """Whether packed rows give each example exactly what it gets alone, measured on the model itself.

    Packs three short random examples into one row (as `PackedCollator` does) and compares each
    example's logits with those of the example run alone, in eval mode. This catches every kind of
    model whose attention does not separate examples by `position_ids` (ALiBi, recurrent layers,
    attention code that ignores the packed mask) without a list of architectures.

    The allowed difference is the larger of the compute dtype's `PROBE_TOLERANCE` and 4 times the
    rounding noise, measured on the first example: it sees the same tokens at the same positions
    packed or alone, so whatever differs there is rounding from the other matrix shapes (in bf16 on
    a GPU, through 16 layers: 0.02 relative). A leak moves the later examples' logits far more.

    Args:
        model: the model (base or `PeftModel`) as it will be trained.

    Returns:
        None when the logits agree, else the reason.
    """
    examples = _probe_examples(model)
    try:
        with _probing(model):
            alone = [model(input_ids=x[None], use_cache=False).logits[0].float() for x in examples]
            row = torch.cat(examples)[None]
            positions = torch.cat([torch.arange(len(x), device=row.device) for x in examples])[None]
            packed = model(input_ids=row, position_ids=positions, use_cache=False).logits[0].float()
    except (TypeError, ValueError, RuntimeError) as err:
        return f"the model does not take packed rows with position_ids ({type(err).__name__}: {err})"
    scale = max(1.0, torch.cat(alone).abs().max().item())
    first = len(examples[0])
    noise = (packed[:first] - alone[0]).abs().max().item() / scale
    diff = (packed[first:] - torch.cat(alone[1:])).abs().max().item() / scale
    allowed = max(PROBE_TOLERANCE.get(_compute_dtype(model), 2e-2), PROBE_NOISE_FACTOR * noise)
    if diff > allowed:
        return (f"in a packed row its examples see each other (logits differ by {diff:.2g} relative from the "
                f"same examples alone; allowed {allowed:.2g}, rounding noise {noise:.2g}): its attention ignores "
                "the example boundaries in position_ids")
    return None


@torch.no_grad()
def check_head_loss(model) -> str | None:
    """Whether the chunked loss through the output head equals the model's own loss.

    Models that change the scores after the head (Gemma 2's soft-capping, Cohere's logit scale) or
    call it more than once fail this and keep the model's own logits. Soft-capping barely changes
    small scores (a fresh or tiny model's), so the scores are also compared with the head's output
    scaled up to `PROBE_SCORE_SCALE`, where any change after the head shows.

    Returns:
        None when the losses agree, else the reason.
    """
    head = model.get_output_embeddings()
    if head is None:
        return "the model has no output head (get_output_embeddings() is None)"
    x = torch.cat(_probe_examples(model))[None]
    tolerance = PROBE_TOLERANCE.get(_compute_dtype(model), 2e-2)
    try:
        with _probing(model):
            own = model(input_ids=x, labels=x, use_cache=False).loss.float().item()
            chunked, _ = loss_sum(model, {"input_ids": x, "labels": x}, head=head)
            changed = _scores_change_after_head(model, head, x, tolerance)
    except (TypeError, ValueError, RuntimeError, AttributeError) as err:
        return f"the loss through the head in chunks failed ({type(err).__name__}: {err})"
    ours = chunked.item() / (x.shape[1] - 1)
    if abs(ours - own) > tolerance * max(1.0, abs(own)):
        return f"its loss differs from the loss through its output head ({own:.6g} vs {ours:.6g})"
    return changed


def _scores_change_after_head(model, head: torch.nn.Module, x: torch.Tensor, tolerance: float) -> str | None:
    """Whether the model's scores differ from its head's output once that output is scaled to
    `PROBE_SCORE_SCALE` (a hook on the head scales it; the model's forward runs on as usual)."""
    outputs: list[torch.Tensor] = []

    def scale_up(module, args, output):
        factor = PROBE_SCORE_SCALE / output.float().abs().max().clamp(min=1e-6)
        outputs.append((output.float() * factor).to(output.dtype))
        return outputs[-1]

    handle = head.register_forward_hook(scale_up)
    try:
        scores = model(input_ids=x, use_cache=False).logits.float()
    finally:
        handle.remove()
    if len(outputs) != 1:
        return f"its output head was called {len(outputs)} times in one forward pass, not once"
    diff = (scores - outputs[0].float()).abs().max().item() / PROBE_SCORE_SCALE
    if diff > tolerance:
        return (f"it changes the scores after its output head (soft-capping or scaling: they differ by {diff:.2g} "
                f"relative at scores of {PROBE_SCORE_SCALE:g}; allowed {tolerance:.2g})")
    return None


def _compute_dtype(model) -> torch.dtype:
    """The least precise dtype the model computes in: its embeddings', or a quantized layer's
    `compute_dtype` (bitsandbytes' 4-bit layers compute in bf16 next to fp32 embeddings)."""
    dtypes = [model.get_input_embeddings().weight.dtype]
    dtypes += {m.compute_dtype for m in model.modules() if isinstance(getattr(m, "compute_dtype", None), torch.dtype)}
    return min(dtypes, key=lambda dtype: torch.finfo(dtype).bits if dtype.is_floating_point else 64)


@dataclasses.dataclass
class BatchPlan:
    """How batches are built and the loss computed for one model, after checking the model.

    Attributes:
        padding_free: one row per batch (`PackedCollator`); False = padded batches.
        chunked_loss: the loss goes through the output head in chunks (`loss.head_cross_entropy`).
        notes: why a faster path was not taken (empty when both are).
    """

    padding_free: bool
    chunked_loss: bool
    notes: list[str] = dataclasses.field(default_factory=list)

    def collator(self, tokenizer) -> PackedCollator | ShiftedPadCollator:
        """The data collator for this plan."""
        return PackedCollator() if self.padding_free else ShiftedPadCollator(tokenizer)


def plan_batches(model, padding_free: bool = True) -> BatchPlan:
    """Check the model once and choose the batches and loss it will be trained with.

    Each path that the model fails falls back (padded batches; the model's own logits) and the
    reason is kept in `notes` and shown as a warning: training still runs, only slower.

    Args:
        model: the model as it will be trained (after `get_peft_model`).
        padding_free: the `TrainSettings.padding_free` setting.

    Returns:
        The `BatchPlan`.
    """
    notes = []
    packed = padding_free
    if padding_free:
        with packed_attention(model, BatchPlan(padding_free=True, chunked_loss=False)):
            problem = check_padding_free(model)  # with the attention training will use
        if problem:
            packed = False
            notes.append(f"Padding-free batches are off for this model: {problem}. Training uses padded, "
                         "length-grouped batches instead (same result, slower).")
    problem = check_head_loss(model)
    if problem:
        notes.append(f"The chunked loss is off for this model: {problem}. Training computes the whole "
                     "logits tensor instead (same result, more memory).")
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return BatchPlan(padding_free=packed, chunked_loss=problem is None, notes=notes)


class KitTrainer(LengthGroupedTrainer):
    """`Trainer` that sums the token losses and divides by the label tokens of the whole optimizer step.

    `Trainer` counts the label tokens of every micro-batch of a step (`num_items_in_batch`,
    from `shift_labels`) and passes the count here; the loss of a micro-batch is its token-loss sum
    over that count, so the accumulated gradient is the mean over all the step's tokens, however
    the examples were grouped. With `plan.chunked_loss` the sum goes through the output head in
    chunks; with `plan.padding_free` the batches are packed rows (`PackedCollator`).
    """

    loss_is_scaled_for_ga = True  # compute_loss already divides by the step's token count

    def __init__(self, *args, plan: BatchPlan | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.plan = plan or BatchPlan(padding_free=False, chunked_loss=False)
        # Trainer counts a step's label tokens only for models whose forward takes loss keywords;
        # this compute_loss takes the count for every model.
        self.model_accepts_loss_kwargs = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Token-loss sum of the batch divided by `num_items_in_batch` (see the class docstring)."""
        head = self.accelerator.unwrap_model(model).get_output_embeddings() if self.plan.chunked_loss else None
        half = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
        total, outputs = loss_sum(model, inputs, head=head, dtype=half)
        if num_items_in_batch is None:  # called outside Trainer's loop, which always counts: this batch's tokens
            targets = inputs.get("shift_labels")
            targets = shift_labels(inputs["labels"]) if targets is None else targets
            loss = total / (targets != IGNORE_INDEX).sum().clamp(min=1)
        else:
            loss = total / num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes  # the count spans all processes; DDP averages
        return (loss, outputs) if return_outputs else loss
