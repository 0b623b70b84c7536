"""Metrics of a model on a dataset: accuracy / macro-F1 for classification, loss / perplexity for causal LM."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .metrics import classification_metrics, lm_metrics


@torch.no_grad()
def evaluate_model(
    model: nn.Module, batches: Any, task: str, num_labels: int = 0, accelerator: Any = None
) -> dict[str, float]:
    """Run ``model`` over ``batches`` (dicts of tensors from ``data.Collator``) in eval mode, then restore its mode.

    Under ``accelerate``, pass the ``accelerator``: predictions are gathered from every process.
    """
    was_training = model.training
    model.eval()
    predictions, labels = [], []
    total_loss, total_tokens = 0.0, 0
    try:
        for batch in batches:
            output = model(**batch)
            if task == "classification":
                pred, gold = output.logits.argmax(-1), batch["labels"]
                if accelerator is not None:
                    pred, gold = accelerator.gather_for_metrics((pred, gold))
                predictions.append(pred.cpu())
                labels.append(gold.cpu())
            else:
                tokens = (batch["labels"][:, 1:] != -100).sum()
                loss_sum = output.loss.float() * tokens
                if accelerator is not None:
                    loss_sum, tokens = accelerator.reduce(torch.stack([loss_sum, tokens.float()]), "sum")
                total_loss += float(loss_sum)
                total_tokens += int(tokens)
    finally:
        model.train(was_training)
    if task == "classification":
        return classification_metrics(torch.cat(predictions), torch.cat(labels), num_labels)
    metrics = lm_metrics(total_loss, total_tokens)
    return {"eval_loss": metrics["loss"], "perplexity": metrics["perplexity"]}
