"""bitsandbytes 4-bit / 8-bit bases: the adapter trains on top, merging is refused, dequantize_and_merge is exact."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import assert_close, dense_update, expected_coefficient
from singlora import SingLoRAConfig, SingLoRAError, get_singlora_model

bnb = pytest.importorskip("bitsandbytes")
from singlora.integrations.quantized import dequantize_and_merge, dequantize_weight, is_quantized  # noqa: E402


def _quantized(bits: int) -> nn.Module:
    """A (out 24 > in 16) Linear and a (in 24 > out 8) Linear, quantized to ``bits`` on this machine's device."""
    dense = nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 8))
    layers = []
    for linear in dense:
        if bits == 4:
            q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, compute_dtype=torch.float32,
                                  quant_type="nf4")
        else:
            q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, has_fp16_weights=False)
        q.load_state_dict(linear.state_dict())
        layers.append(q.to("cpu"))  # quantizes
    return nn.Sequential(*layers)


@pytest.mark.parametrize("bits", [4, 8])
def test_adapter_on_quantized_base(bits: int) -> None:
    base = _quantized(bits)
    assert all(is_quantized(m) for m in base)
    frozen = copy.deepcopy(base)
    model = get_singlora_model(base, SingLoRAConfig(r=3, alpha=6.0, target_modules=["0", "1"], ramp_up_steps=2))
    model.set_step(1)
    with torch.no_grad():
        for _, layer in model.singlora_layers():
            layer.singlora["default"].A.normal_(0, 0.3)
    x = torch.randn(5, 16)
    # the adapter adds exactly its dense update on top of each quantized layer
    h = x
    expected = x
    for i, (name, layer) in enumerate(model.singlora_layers()):
        A = layer.singlora["default"].A
        delta = dense_update(A, layer.d_out, layer.d_in, expected_coefficient(3, 6.0, 1, 2))
        expected = frozen[i](expected) + (expected.double() @ delta.T).float()
        h = layer(h)
        assert_close(h, expected, torch.bfloat16)  # the quantized kernels are not float32-exact
    # training touches only A; the quantized weights stay as they are
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.bind_optimizer(optimizer)
    model(x).square().mean().backward()
    optimizer.step()
    assert model.get_step() == 2
    for (_, layer), original in zip(model.singlora_layers(), frozen):
        assert torch.equal(layer.base_layer.weight.data, original.weight.data)
    with pytest.raises(SingLoRAError, match="quantized"):
        model.merge()


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantize_and_merge_is_exact(bits: int) -> None:
    config = SingLoRAConfig(r=2, alpha=2.0, target_modules=["0", "1"], ramp_up_steps=0)
    model = get_singlora_model(_quantized(bits), config)
    expected = {}
    for name, layer in model.singlora_layers():
        A = layer.singlora["default"].A
        expected[name] = dequantize_weight(layer.base_layer).double() + dense_update(A, layer.d_out, layer.d_in, 1.0)
    plain = dequantize_and_merge(model)
    for name, module in plain.named_children():
        assert type(module) is nn.Linear and module.weight.dtype == torch.float32
        assert_close(module.weight, expected[name], torch.float32)
