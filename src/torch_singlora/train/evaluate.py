"""Evaluation passes shared by the tasks: class predictions, and the summed token loss of a language model.

Each runs the model in eval mode without gradients, then restores its mode. Under ``accelerate``, pass the
``accelerator``: results are gathered (predictions) or summed (losses) over every process.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..hf import eval_mode


def class_predictions(model: nn.Module, batches: Any, accelerator: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(argmax predictions, gold labels)`` (N,) over ``batches`` of a sequence classifier."""
    predictions, labels = [], []
    with eval_mode(model):
        for batch in batches:
            pred, gold = model(**batch).logits.argmax(-1), batch["labels"]
            if accelerator is not None:
                pred, gold = accelerator.gather_for_metrics((pred, gold))
            predictions.append(pred.cpu())
            labels.append(gold.cpu())
    return torch.cat(predictions), torch.cat(labels)


def token_loss(model: nn.Module, batches: Any, accelerator: Any = None) -> tuple[float, int]:
    """``(summed cross-entropy, number of predicted tokens)`` of a causal LM over ``batches`` (padded or packed).

    A token counts when its label is not -100 (the model shifts labels by one: the first position predicts
    nothing); only those positions are projected on the vocabulary (``lm_loss``).
    """
    from .lm_loss import lm_loss_sum

    total, count = 0.0, 0
    with eval_mode(model):
        for batch in batches:
            loss_sum, tokens = lm_loss_sum(model, batch)
            summed = torch.stack([loss_sum.detach().float(), loss_sum.new_tensor(float(tokens), dtype=torch.float32)])
            if accelerator is not None:
                summed = accelerator.reduce(summed, "sum")
            total += float(summed[0])
            count += int(summed[1])
    return total, count
