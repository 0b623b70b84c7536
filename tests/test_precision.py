"""Mixed precision: bf16 autocast and bf16/fp16 base weights train (float32 adapters) and merge in float32."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import assert_close, dense_update, expected_coefficient
from torch_singlora import SingLoRAConfig, get_singlora_model


def _model(dtype: torch.dtype):
    base = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 8)).to(dtype)
    return get_singlora_model(base, SingLoRAConfig(r=4, alpha=4.0, target_modules=["0", "2"], ramp_up_steps=2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_base_trains_and_merges_in_float32(dtype: torch.dtype) -> None:
    model = _model(dtype)
    frozen = {name: layer.base_layer.weight.detach().clone() for name, layer in model.singlora_layers()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.bind_optimizer(optimizer)
    x = torch.randn(6, 16).to(dtype)
    for _ in range(3):
        out = model(x)
        assert out.dtype == dtype
        out.float().square().mean().backward()
        for _, layer in model.singlora_layers():
            A = layer.singlora["default"].A
            assert A.dtype == torch.float32 and A.grad is not None and torch.isfinite(A.grad).all()
        optimizer.step()
        optimizer.zero_grad()
    unmerged = model(x)
    expected = {}
    for name, layer in model.singlora_layers():
        assert torch.equal(layer.base_layer.weight, frozen[name])  # the frozen base never moves
        A = layer.singlora["default"].A
        delta = dense_update(A, layer.d_out, layer.d_in, expected_coefficient(4, 4.0, 3, 2))
        expected[name] = (frozen[name].double() + delta).to(dtype)  # one rounding, after a float32+ sum
    model.merge()
    for name, layer in model.singlora_layers():
        # merged in float32 then rounded once: equal to the rounded exact sum except for float32 ties
        mismatch = (layer.base_layer.weight != expected[name]).float().mean()
        assert mismatch < 0.01, f"{name}: {mismatch:.3%} of the merged weights differ from one rounding"
    assert_close(model(x), unmerged.float(), dtype)


def test_bf16_autocast_trains_like_float32() -> None:
    torch.manual_seed(0)
    model = _model(torch.float32)
    model.set_ramp_step(2)  # u = 1
    x = torch.randn(6, 16)
    model(x).square().mean().backward()
    reference = {name: layer.singlora["default"].A.grad.clone() for name, layer in model.singlora_layers()}
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        assert out.dtype == torch.bfloat16
        loss = out.float().square().mean()
    loss.backward()
    for name, layer in model.singlora_layers():
        grad = layer.singlora["default"].A.grad
        assert grad.dtype == torch.float32
        assert_close(grad, reference[name], torch.bfloat16)
    model.merge()  # a float32 model merges as usual after autocast training
    assert model.model[0].weight.dtype == torch.float32
