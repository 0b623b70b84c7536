"""accelerate: bind_optimizer on an AcceleratedOptimizer counts only real optimizer steps under accumulation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torch_singlora import SingLoRAConfig, get_singlora_model

accelerate = pytest.importorskip("accelerate")


def test_bind_accelerated_optimizer_counts_synced_steps() -> None:
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = get_singlora_model(nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2)),
                               SingLoRAConfig(r=2, target_modules=["0", "1"], ramp_up_steps=0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    model.bind_optimizer(optimizer)
    seen = []
    for micro_batch in range(6):
        with accelerator.accumulate(prepared):
            seen.append(model.get_ramp_step())
            accelerator.backward(prepared(torch.randn(3, 4)).square().mean())
            optimizer.step()
            optimizer.zero_grad()
    assert seen == [0, 0, 1, 1, 2, 2] and model.get_ramp_step() == 3
