"""A toy model of every layer orientation, shared by ``test_model``, ``test_adapter_file`` and ``test_names`` (test
modules never import each other; the mixed-batch models are in ``mixed_models.py``)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class Toy(nn.Module):
    """Linear layers of every orientation, a conv, an embedding and a head."""

    def __init__(self, checkpointing: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.up = nn.Linear(6, 10)
        self.down = nn.Linear(10, 6)
        self.square = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)
        self.checkpointing = checkpointing

    def body(self, h: torch.Tensor) -> torch.Tensor:
        return self.square(self.down(torch.tanh(self.up(h))))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = checkpoint(self.body, h, use_reentrant=False) if self.checkpointing else self.body(h)
        return self.head(h.mean(1))


def toy(**kwargs) -> Toy:
    return Toy(**kwargs).double()


IDS = torch.randint(0, 11, (4, 5))
