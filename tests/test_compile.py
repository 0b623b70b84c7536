"""torch.compile: an adapted model traces as one graph (fullgraph=True) and does not recompile as the ramp moves."""

from __future__ import annotations

import torch
from torch import nn

from conftest import assert_close
from torch_singlora import SingLoRAConfig, get_singlora_model


class Net(nn.Module):
    """Embedding, Conv1d and Linear (square and rectangular) targets: every factored forward path."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.up = nn.Linear(8, 12)
        self.down = nn.Linear(12, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2)
        return self.down(torch.relu(self.up(h)))


def test_compile_fullgraph_and_no_recompile_as_ramp_advances() -> None:
    torch._dynamo.reset()
    model = get_singlora_model(Net(), SingLoRAConfig(r=2, target_modules=["emb", "conv", "up", "down"],
                                                     ramp_up_steps=3, dropout=0.1))
    graphs: list[torch.fx.GraphModule] = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=counting_backend, fullgraph=True)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.bind_optimizer(optimizer)
    ids = torch.randint(0, 20, (2, 5))
    for _ in range(5):  # u goes 0, 1/3, 2/3, 1, 1
        compiled(ids).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert model.get_ramp_step() == 5
    assert len(graphs) == 1, f"{len(graphs)} graphs were compiled"
    model.eval()
    model.set_ramp_step(1)
    eager = model(ids)
    assert_close(compiled(ids), eager)
    assert len(graphs) == 2  # train -> eval changes the dropout: one more graph, and only one
