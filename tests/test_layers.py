"""Every layer kind, square and both rectangular orientations, against a dense float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, dense_update
from torch import nn
from transformers.pytorch_utils import Conv1D

from torch_singlora import SingLoRAError, SingLoRALayer, delta_matrix, lora_factors
from torch_singlora.functional import delta_weight, matrix_dims, ramp_value

SHAPES = [(8, 8), (12, 5), (5, 12)]  # (d_out, d_in): square, tall (out > in), wide (in > out)


def make_layer(base: nn.Module, r: int = 3, scale: float = 2.0, ramp_up_steps: int = 0, step: int = 0) -> SingLoRALayer:
    layer = SingLoRALayer(base)
    layer.add_adapter("default", r, scale=scale, ramp_up_steps=ramp_up_steps, dropout=0.0, init="normal", init_std=None)
    layer.active_adapters = ["default"]
    layer.singlora["default"].ramp_step.fill_(step)
    with torch.no_grad():  # a large A so the update is far from negligible
        layer.singlora["default"].A.mul_(3.0)
    return layer


def test_delta_matrix_is_top_left_block_both_orientations() -> None:
    A = torch.randn(12, 3, dtype=torch.float64)
    for d_out, d_in in SHAPES:
        assert_close(delta_matrix(A[: max(d_out, d_in)], d_out, d_in, 0.7), dense_update(A[: max(d_out, d_in)], d_out, d_in, 0.7))


def test_delta_matrix_rejects_short_A() -> None:
    with pytest.raises(ValueError, match="needs max"):
        delta_matrix(torch.randn(4, 2), 5, 3)


def test_lora_factors_are_exact() -> None:
    A = torch.randn(12, 4, dtype=torch.float64)
    for d_out, d_in in SHAPES:
        lora_A, lora_B = lora_factors(A[: max(d_out, d_in)], d_out, d_in, 1.7)
        assert lora_A.shape == (4, d_in) and lora_B.shape == (d_out, 4)
        assert_close(lora_B @ lora_A, dense_update(A[: max(d_out, d_in)], d_out, d_in, 1.7))


def test_ramp_counts_to_one() -> None:
    steps = torch.tensor([0, 1, 5, 10, 50])
    assert [float(ramp_value(s, 10)) for s in steps] == pytest.approx([0.0, 0.1, 0.5, 1.0, 1.0], abs=1e-7)
    assert float(ramp_value(torch.tensor(0), 0)) == 1.0


@pytest.mark.parametrize("d_out,d_in", SHAPES)
def test_linear_matches_dense_reference(d_out: int, d_in: int) -> None:
    base = nn.Linear(d_in, d_out).double()
    layer = make_layer(base)
    x = torch.randn(4, 3, d_in, dtype=torch.float64)
    A = layer.singlora["default"].A.detach()
    W = base.weight.detach() + dense_update(A, d_out, d_in, 2.0)
    assert_close(layer(x), F.linear(x, W, base.bias))
    assert A.shape == (max(d_out, d_in), 3)


@pytest.mark.parametrize("d_out,d_in", SHAPES)
def test_transformers_conv1d_matches_dense_reference(d_out: int, d_in: int) -> None:
    base = Conv1D(d_out, d_in).double()  # weight stored (in, out): y = x @ W + b
    torch.nn.init.normal_(base.weight)
    layer = make_layer(base)
    assert layer.kind == "conv1d_t" and (layer.d_out, layer.d_in) == (d_out, d_in)
    x = torch.randn(2, 5, d_in, dtype=torch.float64)
    A = layer.singlora["default"].A.detach()
    W = base.weight.detach().T + dense_update(A, d_out, d_in, 2.0)  # (out, in)
    assert_close(layer(x), x @ W.T + base.bias)


@pytest.mark.parametrize("out_ch,in_ch", [(4, 4), (6, 2), (2, 6)])
@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), (2, 1, 1), (1, 2, 2)])
def test_conv2d_matches_dense_reference(out_ch: int, in_ch: int, stride: int, padding: int, dilation: int) -> None:
    base = nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=padding, dilation=dilation).double()
    layer = make_layer(base, r=4)
    x = torch.randn(2, in_ch, 9, 9, dtype=torch.float64)
    A = layer.singlora["default"].A.detach()
    d_in = in_ch * 9
    W = base.weight.detach() + dense_update(A, out_ch, d_in, 2.0).reshape(base.weight.shape)
    expected = F.conv2d(x, W, base.bias, stride=stride, padding=padding, dilation=dilation)
    assert_close(layer(x), expected)


@pytest.mark.parametrize("out_ch,in_ch", [(4, 4), (7, 2), (2, 7)])
def test_conv1d_matches_dense_reference(out_ch: int, in_ch: int) -> None:
    base = nn.Conv1d(in_ch, out_ch, kernel_size=2, padding=1, padding_mode="circular").double()
    layer = make_layer(base, r=2)
    x = torch.randn(3, in_ch, 11, dtype=torch.float64)
    A = layer.singlora["default"].A.detach()
    W = base.weight.detach() + dense_update(A, out_ch, in_ch * 2, 2.0).reshape(base.weight.shape)
    assert_close(layer(x), base._conv_forward(x, W, base.bias))


def test_conv_groups_refused() -> None:
    with pytest.raises(SingLoRAError, match="groups=2"):
        SingLoRALayer(nn.Conv2d(4, 4, 3, groups=2))


@pytest.mark.parametrize("num,dim", [(9, 9), (20, 6), (6, 20)])
def test_embedding_matches_dense_reference(num: int, dim: int) -> None:
    base = nn.Embedding(num, dim, padding_idx=0).double()
    layer = make_layer(base)
    ids = torch.randint(0, num, (3, 7))
    A = layer.singlora["default"].A.detach()
    E = base.weight.detach() + dense_update(A, num, dim, 2.0)
    assert_close(layer(ids), E[ids])


def test_delta_weight_layouts_match_forward() -> None:
    """The merged weight (delta_weight in each stored layout) reproduces every kind's factored forward."""
    cases = [
        (nn.Linear(5, 12), torch.randn(2, 5)),
        (Conv1D(12, 5), torch.randn(2, 5)),
        (nn.Conv2d(2, 6, 3), torch.randn(1, 2, 6, 6)),
        (nn.Embedding(12, 5), torch.randint(0, 12, (2, 4))),
    ]
    for base, x in cases:
        base = base.double()
        x = x.double() if x.is_floating_point() else x
        layer = make_layer(base)
        unmerged = layer(x)
        layer.merge()
        assert layer.merged_adapters == ["default"]
        assert_close(layer(x), unmerged)
        d_out, d_in = matrix_dims(layer.kind, base.weight.shape)
        assert delta_weight(layer.singlora["default"].A, layer.kind, base.weight.shape).shape == base.weight.shape
        assert (layer.d_out, layer.d_in) == (d_out, d_in)


@pytest.mark.parametrize("step,ramp_up_steps", [(0, 10), (3, 10), (25, 10), (0, 0)])
def test_coefficient_follows_ramp(step: int, ramp_up_steps: int) -> None:
    base = nn.Linear(6, 6).double()
    layer = make_layer(base, scale=1.5, ramp_up_steps=ramp_up_steps, step=step)
    u = 1.0 if ramp_up_steps == 0 else min(step / ramp_up_steps, 1.0)
    x = torch.randn(3, 6, dtype=torch.float64)
    W = base.weight.detach() + dense_update(layer.singlora["default"].A.detach(), 6, 6, 1.5 * u)
    assert_close(layer(x), F.linear(x, W, base.bias))


def test_u_zero_equals_base_exactly() -> None:
    base = nn.Linear(7, 5)
    layer = make_layer(base, ramp_up_steps=100, step=0)
    x = torch.randn(4, 7)
    assert torch.equal(layer(x), base(x))


def test_low_precision_input_and_base() -> None:
    """bf16 activations on a bf16 base: the adapter runs in float32 (as PEFT) and the result is cast back."""
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = make_layer(base)
    assert layer.singlora["default"].A.dtype == torch.float32
    x = torch.randn(4, 16).to(torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    A = layer.singlora["default"].A.detach()
    W = base.weight.detach().double() + dense_update(A, 8, 16, 2.0)
    assert_close(out, F.linear(x.double(), W, base.bias.double()), dtype=torch.bfloat16)


@pytest.mark.parametrize("init,init_std,std", [("normal", None, 1 / 512**0.5), ("gaussian", 0.02, 0.02)])
def test_meta_device_recipe_initialises_A_and_the_ramp_step(init: str, init_std: float | None, std: float) -> None:
    """FSDP2's recipe: build on the meta device, ``to_empty()``, then ``reset_parameters()`` on every module that has
    one. Memory from ``to_empty`` is uninitialised: filled here with NaN / a bogus step so nothing passes by luck."""
    from torch_singlora import SingLoRAConfig, get_singlora_model

    config = SingLoRAConfig(r=16, target_modules=["0", "1"], ramp_up_steps=10, init=init, init_std=init_std)
    with torch.device("meta"):
        model = get_singlora_model(nn.Sequential(nn.Linear(512, 256), nn.Linear(128, 512)), config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))
        for buffer in model.buffers():
            buffer.fill_(12345)
    for module in model.modules():
        if callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()
    for _, layer in model.singlora_layers():
        adapter = layer.singlora["default"]
        assert adapter.A.shape == (512, 16) and adapter.A.requires_grad
        assert torch.isfinite(adapter.A).all()
        assert float(adapter.A.detach().std()) == pytest.approx(std, rel=0.05)  # 8,192 draws: sampling error ~1%
        assert abs(float(adapter.A.detach().mean())) < 4 * std / 8192**0.5
        assert int(adapter.ramp_step) == 0  # t restarts: u = 0, the base model
    x = torch.randn(2, 512)
    assert torch.equal(model.model[0](x), model.model[0].base_layer(x))
