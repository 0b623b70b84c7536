"""Test fixtures shared by the tests and the fuzzing harness (``fuzzing/``): a small model holding every layer
kind, a valid adapter to corrupt, and a snapshot of everything a refused load must leave unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from torch_singlora import SingLoRAConfig, SingLoRAModel, get_singlora_model


class FuzzModel(nn.Module):
    """The model every fuzz input is loaded into: Embedding, Linear, Conv1d, and a head for ``modules_to_save``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.proj = nn.Linear(6, 5)
        self.conv = nn.Conv1d(5, 4, 3)
        self.head = nn.Linear(4, 3)
        self.other = nn.Linear(6, 6)


def fresh_model() -> SingLoRAModel:
    """A deterministic wrapped ``FuzzModel`` that already holds an adapter named ``keep``."""
    torch.manual_seed(0)
    return get_singlora_model(FuzzModel(), SingLoRAConfig(r=1, target_modules=["other"], ramp_up_steps=0), "keep")


def snapshot(model: nn.Module) -> tuple[Any, ...]:
    """Everything a failed load must leave unchanged: module tree, tensors, requires_grad flags, adapters."""
    return (
        [(name, type(m).__name__) for name, m in model.named_modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
        [(name, p.requires_grad) for name, p in model.named_parameters()],
        sorted(getattr(model, "configs", {})),
    )


def same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return a[0] == b[0] and a[2] == b[2] and a[3] == b[3] and a[1].keys() == b[1].keys() and all(
        torch.equal(a[1][k], b[1][k]) for k in a[1]
    )


def valid_adapter(directory: Path) -> None:
    """Write the seed adapter (every layer kind, ``modules_to_save``, a ramp step) into ``directory``."""
    torch.manual_seed(1)
    config = SingLoRAConfig(r=2, alpha=4.0, target_modules=["proj", "conv", "emb"], modules_to_save=["head"],
                            ramp_up_steps=10)
    model = get_singlora_model(FuzzModel(), config)
    model.advance_ramp(4)
    model.save_adapter(directory)
