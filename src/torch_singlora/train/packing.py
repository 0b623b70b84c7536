"""Batches without padding: examples packed into rows (``--packing``), and the length-grouped order
(``--group-by-length``), the cheap alternative.

Packing (TRL's ``packing`` with ``padding_free``): the examples of a micro-batch are placed into rows by best-fit
decreasing (BFD, TRL's strategy: longest first, each into the fullest row that still has room), each row at most as
long as the batch's longest example (so at most ``--max-length``), then padded only to the longest row:

    examples  [a a a a a] [b b b] [c c] [d d]                rows of 5 (the longest example)
    input_ids  a a a a a      position_ids  0 1 2 3 4
               b b b c c                    0 1 2 0 1
               d d p p p                    0 1 0 1 2       (p: padding, a sequence of its own)
    labels     the examples' labels, the first of each example -100 (nothing is predicted across examples)

Why rows no longer than the longest example: attention kernels without variable-length support (SDPA and eager on
CPU) compute every pair of a row under the block-diagonal mask, so a row of 3 x 170 tokens costs 9 times the
attention of one example of 170 (measured: rows of ``--max-length`` 512 made the BBC benchmark 17% slower than
padding). With rows of the padded batch's own width, the attention never costs more than padding does, and the
padding the linear layers would compute is gone.

No attention mask is given: transformers reads the restarts of ``position_ids`` and confines attention to each
example (a block-diagonal causal mask under SDPA / eager / flex attention, variable-length kernels under flash
attention), provided the model builds no cache (``lm_loss`` passes ``use_cache=False``). ``check_confined`` verifies
it on the model before a run. The micro-batch holds the same examples as without packing and its loss is the same
mean over the same answer tokens (``lm_loss``), so packing changes speed and memory, not the result.
``example_index`` (rows, width) says which of the collated examples each token came from (-1: padding).

Length grouping (transformers' ``group_by_length``): the epoch's random order, cut into mega-batches of 50 batches,
each sorted longest first, so a batch holds examples of similar lengths (little padding); the longest batch goes
first, so a run that would run out of memory does so at once.
"""

from __future__ import annotations

import bisect
from typing import Any, Sequence

import torch

from ..errors import SingLoRAError
from ..hf import eval_mode
from .lm_loss import IGNORE_INDEX

MEGA_BATCHES = 50  # batches per length-sorted group (transformers' LengthGroupedSampler)


def bfd_bins(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: the indices of ``lengths`` in bins of total length <= ``capacity``, longest first,
    each into the bin with the least room that still fits it (ties: the earliest bin); ``ValueError`` for an item
    longer than ``capacity``."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin number), sorted
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        if length > capacity:
            raise ValueError(f"an item of length {length} does not fit in bins of {capacity}")
        at = bisect.bisect_left(free, (length, -1))
        if at == len(free):
            bins.append([index])
            bisect.insort(free, (capacity - length, len(bins) - 1))
        else:
            room, number = free.pop(at)
            bins[number].append(index)
            bisect.insort(free, (room - length, number))
    return bins


class PackingCollator:
    """Examples (``input_ids``, ``labels``) -> packed rows (see the module docstring): ``input_ids``, ``labels``,
    ``position_ids``, ``example_index`` (R, W), R <= examples rows of at most W = the longest example's length."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        lengths = [len(item["input_ids"]) for item in items]
        bins = bfd_bins(lengths, max(lengths))
        width = max(sum(lengths[i] for i in members) for members in bins)
        shape = (len(bins), width)
        ids = torch.full(shape, self.pad_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros(shape, dtype=torch.long)
        example = torch.full(shape, -1, dtype=torch.long)
        for row, members in enumerate(bins):
            at = 0
            for index in members:
                end = at + lengths[index]
                ids[row, at:end] = torch.tensor(items[index]["input_ids"])
                labels[row, at + 1:end] = torch.tensor(items[index]["labels"][1:])
                positions[row, at:end] = torch.arange(end - at)
                example[row, at:end] = index
                at = end
            positions[row, at:] = torch.arange(width - at)  # the padding: a sequence of its own
        return {"input_ids": ids, "labels": labels, "position_ids": positions, "example_index": example}


def check_confined(model: Any, *, vocab: int, where: str = "--packing") -> None:
    """Refuse (``SingLoRAError``) a model whose attention crosses packed examples: the logits of an example packed
    after another must not change when the other one does (two rows of random tokens, compared exactly up to
    rounding). Runs the model twice on 16 tokens, in eval mode without gradients."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, min(vocab, 1000), (3, 8), generator=generator)
    rows = torch.stack([torch.cat([tokens[0], tokens[2]]), torch.cat([tokens[1], tokens[2]])])  # (2, 16)
    positions = torch.arange(8).repeat(2).expand(2, -1)
    device = next(model.parameters()).device
    with eval_mode(model):
        logits = model(input_ids=rows.to(device), position_ids=positions.to(device), use_cache=False).logits
    second = logits[:, 8:].float()
    if not torch.allclose(second[0], second[1], rtol=1e-4, atol=1e-4 * float(second.abs().max())):
        raise SingLoRAError(f"{where}: this model ({type(model).__name__}) attends across packed examples (it "
                            "ignores the position_ids that separate them); train it without --packing "
                            "(--group-by-length also cuts padding)")


def example_length(item: dict[str, Any]) -> int:
    """The tokens of a dataset item: its ``input_ids`` (a DPO pair: its ``chosen_`` and ``rejected_input_ids``)."""
    return sum(len(value) for key, value in item.items() if key.endswith("input_ids"))


def length_grouped_order(order: Sequence[int], lengths: Sequence[int], batch_size: int) -> list[int]:
    """``order`` (a random permutation) regrouped: mega-batches of ``MEGA_BATCHES * batch_size`` examples (fewer
    for small data: at least 4 mega-batches), each sorted by length, longest first; the mega-batch holding the
    longest example first."""
    per_group = max(min(len(order) // (batch_size * 4), MEGA_BATCHES), 1) * batch_size
    groups = [sorted(order[i:i + per_group], key=lambda index: -lengths[index])
              for i in range(0, len(order), per_group)]
    longest = max(range(len(groups)), key=lambda g: lengths[groups[g][0]])
    groups[0], groups[longest] = groups[longest], groups[0]
    return [index for group in groups for index in group]

