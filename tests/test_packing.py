"""Padding-free packing (``train.packing``): best-fit decreasing against a plain reference; a packed batch gives each
example the loss it has alone, and the batch the loss and gradient of the padded batch (1e-5, float32); changing an
example leaves its neighbours' log-probabilities exactly as they were; a model that attends across examples is
refused; the length-grouped order."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import assert_close, tiny_singlora_llama
from torch_singlora.errors import SingLoRAError
from torch_singlora.llm.tokenization import SFTCollator
from torch_singlora.train.lm_loss import IGNORE_INDEX, lm_loss, token_logprobs
from torch_singlora.train.packing import PackingCollator, bfd_bins, check_confined, length_grouped_order

pytest.importorskip("transformers")
VOCAB = 97


def reference_bfd(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing written plainly: longest first (ties by index), into the bin with the least room left
    that still fits (ties: the earliest bin), else a new bin."""
    bins: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        rooms = [(capacity - sum(lengths[j] for j in b), number) for number, b in enumerate(bins)]
        fitting = [(room, number) for room, number in rooms if room >= lengths[index]]
        if fitting:
            bins[min(fitting)[1]].append(index)
        else:
            bins.append([index])
    return bins


def test_bfd_bins_equal_the_plain_best_fit_decreasing() -> None:
    assert bfd_bins([5, 3, 4, 2], 8) == [[0, 1], [2, 3]]
    assert bfd_bins([8, 1], 8) == [[0], [1]]
    rng = random.Random(0)
    for _ in range(200):
        capacity = rng.randint(1, 40)
        lengths = [rng.randint(1, capacity) for _ in range(rng.randint(1, 30))]
        bins = bfd_bins(lengths, capacity)
        assert bins == reference_bfd(lengths, capacity)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    with pytest.raises(ValueError, match="length 9 does not fit in bins of 8"):
        bfd_bins([9], 8)


def examples(lengths: list[int], answer_only: bool, seed: int = 0) -> list[dict[str, list[int]]]:
    """Random examples; with ``answer_only`` the labels cover a trailing answer (as the chat template's), else every
    token (``--no-assistant-only-loss``)."""
    generator = torch.Generator().manual_seed(seed)
    items = []
    for n in lengths:
        ids = torch.randint(1, VOCAB, (n,), generator=generator).tolist()
        labels = [IGNORE_INDEX] * (n - n // 3) + ids[n - n // 3:] if answer_only else list(ids)
        items.append({"input_ids": ids, "labels": labels})
    return items


def grads(model: torch.nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    return torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])


def per_example(model: torch.nn.Module, batch: dict, count: int) -> torch.Tensor:
    logprobs, example = token_logprobs(model, batch)
    return torch.zeros(count, dtype=logprobs.dtype).index_add_(0, example, logprobs)


@pytest.mark.parametrize("answer_only", [True, False])
def test_packed_batch_equals_unpacked(answer_only: bool) -> None:
    model = tiny_singlora_llama(torch.float32, vocab=VOCAB)
    items = examples([7, 12, 3, 9, 5, 11], answer_only)
    packed = PackingCollator(0)(items)
    padded = SFTCollator(0)(items)
    assert packed["input_ids"].shape == (4, 12)  # rows of the longest example: 12 | 11 | 9 3 | 7 5 (padded: 6 x 12)
    assert int((packed["example_index"] >= 0).sum()) == sum(len(i["input_ids"]) for i in items)
    alone = torch.stack([per_example(model, SFTCollator(0)([item]), 1)[0] for item in items])
    assert_close(per_example(model, packed, len(items)), alone)
    loss_packed, loss_padded = lm_loss(model, packed), lm_loss(model, padded)
    assert_close(loss_packed, loss_padded)
    for ours, reference in zip(grads(model, loss_packed), grads(model, loss_padded)):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_changing_one_example_leaves_its_neighbours_unchanged() -> None:
    model = tiny_singlora_llama(torch.float32, vocab=VOCAB)
    items = examples([6, 6, 6, 18], answer_only=False)
    collate = PackingCollator(0)
    before = per_example(model, collate(items), 4)
    for changed in range(3):
        other = [dict(item) for item in items]
        other[changed] = examples([6], answer_only=False, seed=changed + 1)[0]
        after = per_example(model, collate(other), 4)
        assert collate(other)["input_ids"].shape == (2, 18)  # the three short ones share a row
        assert after[changed] != before[changed]
        unchanged = [i for i in range(4) if i != changed]
        assert torch.equal(after[unchanged], before[unchanged])


def test_a_model_that_attends_across_examples_is_refused() -> None:
    model = tiny_singlora_llama(torch.float32, vocab=VOCAB)
    check_confined(model, vocab=VOCAB)

    class Leaky(torch.nn.Module):  # an architecture that ignores position_ids when masking
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, input_ids, position_ids=None, use_cache=None):
            return self.inner(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=use_cache)

    with pytest.raises(SingLoRAError, match="attends across packed examples"):
        check_confined(Leaky(), vocab=VOCAB)


def test_length_grouped_order() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(1, 500) for _ in range(1000)]
    order = list(range(1000))
    rng.shuffle(order)
    grouped = length_grouped_order(order, lengths, batch_size=4)
    assert sorted(grouped) == list(range(1000))
    assert lengths[grouped[0]] == max(lengths)  # the longest batch first
    group = 50 * 4
    for start in range(0, 1000, group):
        chunk = [lengths[i] for i in grouped[start:start + group]]
        assert chunk == sorted(chunk, reverse=True)

    def padding(sequence: list[int]) -> int:
        return sum(max(lengths[i] for i in sequence[s:s + 4]) * 4 - sum(lengths[i] for i in sequence[s:s + 4])
                   for s in range(0, 1000, 4))

    assert padding(grouped) < padding(order) / 10
    assert length_grouped_order([2, 0, 1], [1, 3, 2], batch_size=4) == [1, 2, 0]


def test_group_by_length_batches_examples_of_similar_lengths() -> None:
    """``--group-by-length`` reorders each epoch's permutation (same seed, same examples): 40 examples in batches
    of 4 make groups of 2 batches (at least 4 groups), each sorted longest first, the longest batch first."""
    from accelerate import Accelerator

    from torch_singlora.train.config import TrainConfig
    from torch_singlora.train.loop import epoch_loader
    from torch_singlora.train.tasks import TaskData

    rng = random.Random(0)
    items = examples([rng.randint(2, 60) for _ in range(40)], answer_only=True)
    data = TaskData(items, None, {})
    widths, seen = {}, {}
    for grouped in (False, True):
        config = TrainConfig(batch_size=4, group_by_length=grouped)
        batches = list(epoch_loader(config, Accelerator(cpu=True), data, SFTCollator(0), epoch=1))
        widths[grouped] = [batch["input_ids"].shape[1] for batch in batches]
        seen[grouped] = sorted(tuple(row[row != 0].tolist()) for batch in batches for row in batch["input_ids"])
    assert seen[True] == seen[False]
    assert widths[True][0] == max(widths[True]) and widths[True] != widths[False]
    assert all(widths[True][i] >= widths[True][i + 1] for i in range(0, 10, 2))
    assert sum(widths[True]) < 0.9 * sum(widths[False])
