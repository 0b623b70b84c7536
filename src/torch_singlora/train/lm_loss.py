"""The loss of a causal LM computed only where it counts: the vocabulary projection runs on the positions whose
next token is trained, never on the prompt, the padding or the last position of an example.

A position ``t`` of a row predicts token ``t + 1``; it counts when ``labels[t + 1] != IGNORE_INDEX``:

    keep = labels[:, 1:] != -100                  # (B, T-1) -> padded with False to (B, T)
    logits = model(..., logits_to_keep=keep)      # (N, V): transformers projects hidden[keep] only
    logp = log_softmax(logits)[targets]           # (N,) log-probabilities of the trained tokens

That is the model's own forward with transformers' ``logits_to_keep`` (a boolean (B, T) mask selects the positions
before the output layer), so DDP / FSDP, PEFT wrappers, tied or adapted output layers and logit soft-capping stay
the model's business; a model without ``logits_to_keep`` projects every position and the same rows are selected
after. With an assistant-only loss on short answers this skips nearly all of the (B, T, V) logits (the README chat
run: 8 x ~300 positions x 49,152 words, 0.5 GB of float32 and as much again for their gradient, down to ~24 rows).

The sums are those of transformers' own loss (``model(**batch).loss`` is ``loss_sum / count``), in float32 for
half-precision logits and in the logits' dtype otherwise (a float64 model gives a float64 loss).

Packed rows (``train.packing``) carry ``position_ids`` restarting at 0 for each example and no attention mask:
transformers then confines attention to each example, provided no cache is built (``use_cache=False``, always
passed here; a model called with its default ``use_cache`` attends across packed examples).

``token_logprobs`` is the reusable piece (DPO sums it per example); ``lm_loss_sum`` / ``lm_loss`` are the SFT and
causal-LM objective.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import nn

IGNORE_INDEX = -100  # label of tokens without loss (PyTorch's cross-entropy ``ignore_index``)
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")  # batch keys passed to the model; the rest are ours


def loss_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keep, targets)``: ``keep`` (B, T) bool, the positions whose next label counts; ``targets`` (N,) those
    labels, in ``keep``'s row-major order (N = keep.sum())."""
    following = labels[:, 1:]
    keep = torch.nn.functional.pad(following != IGNORE_INDEX, (0, 1), value=False)
    return keep, following[keep[:, :-1]]


@functools.lru_cache(maxsize=None)
def _takes_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def takes_logits_to_keep(model: nn.Module) -> bool:
    """Whether the transformers model inside ``model`` (the outermost ``PreTrainedModel``, under DDP, PEFT or
    SingLoRA wrappers) accepts ``logits_to_keep``: every causal LM of recent transformers does."""
    from transformers import PreTrainedModel

    inner = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), model)
    return _takes_logits_to_keep(type(inner))


def selected_logits(model: nn.Module, batch: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """(N, V) logits of the ``keep`` positions (B, T) of ``batch`` (only those are projected when the model takes
    ``logits_to_keep``)."""
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if takes_logits_to_keep(model):
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
        return logits.reshape(-1, logits.shape[-1])  # (N, V), already flat
    return model(**inputs, use_cache=False).logits[keep]


def token_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logprobs, example)``: (N,) log-probability of each trained token of ``batch`` (labels != -100; a row's
    first position predicts nothing) and (N,) the index of the example it belongs to: the row, or for packed rows
    the example's place in the list the collator packed (``batch["example_index"]``). Sum per example with
    ``torch.zeros(E).index_add_(0, example, logprobs)``. Half-precision logits are upcast to float32."""
    keep, targets = loss_positions(batch["labels"])
    logits = selected_logits(model, batch, keep)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logprobs = -torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    example = batch["example_index"][keep] if "example_index" in batch else keep.nonzero()[:, 0]
    return logprobs, example


def lm_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """``(summed cross-entropy, count)`` of the trained tokens of ``batch``."""
    logprobs, _ = token_logprobs(model, batch)
    return -logprobs.sum(), logprobs.numel()


def lm_loss(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The mean cross-entropy of the trained tokens (``model(**batch).loss`` without the full logits)."""
    total, count = lm_loss_sum(model, batch)
    return total / count
