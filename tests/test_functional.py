"""The optimized factored forward (``functional.factored_update``, used by ``SingLoRALayer`` for Linear and
Conv1D) and the benchmark's dense-update reference, against a dense float64 reference: values, gradients of
``A`` and ``x``, second derivatives, float32 tolerance, and ``torch.compile`` without recompiles as ``u`` moves."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, dense_update
from torch import nn

from torch_singlora import SingLoRAConfig, SingLoRALayer, get_singlora_model
from torch_singlora.functional import factored_update

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds benchmarks/
from benchmarks.methods import RAMP_STEPS, DenseUpdateLinear  # noqa: E402

SHAPES = [(8, 8), (12, 5), (5, 12)]  # (d_out, d_in): square, tall (out > in), wide (in > out)


def reference(x: torch.Tensor, A: torch.Tensor, d_out: int, d_in: int, c: float) -> torch.Tensor:
    """``x @ dW.T`` with ``dW`` written out densely in float64, from the definition."""
    return x.double() @ dense_update(A, d_out, d_in, c).T


@pytest.mark.parametrize("d_out,d_in", SHAPES)
def test_factored_update_values_and_gradients_match_dense_float64(d_out: int, d_in: int) -> None:
    n, r, c = max(d_out, d_in), 3, 0.7
    A = torch.randn(n, r, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 4, d_in, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(2, 4, d_out, dtype=torch.float64)
    y = factored_update(x, A, d_out, d_in, torch.tensor(c, dtype=torch.float64))
    gx, gA = torch.autograd.grad(y, (x, A), grad_out)
    A_ref, x_ref = A.detach().clone().requires_grad_(True), x.detach().clone().requires_grad_(True)
    y_ref = reference(x_ref, A_ref, d_out, d_in, c)
    gx_ref, gA_ref = torch.autograd.grad(y_ref, (x_ref, A_ref), grad_out)
    assert y.shape == (2, 4, d_out)
    assert_close(y, y_ref)
    assert_close(gx, gx_ref)
    assert_close(gA, gA_ref)
    if d_out != d_in:  # rows of A beyond min(d_out, d_in) get gradient from one side only, and not zero
        assert gA[min(d_out, d_in):].abs().sum() > 0


@pytest.mark.parametrize("d_out,d_in", SHAPES)
def test_factored_update_float32_within_tolerance(d_out: int, d_in: int) -> None:
    A = torch.randn(max(d_out, d_in), 4)
    x = torch.randn(6, d_in)
    assert_close(factored_update(x, A, d_out, d_in, torch.tensor(1.3)), reference(x, A, d_out, d_in, 1.3),
                 dtype=torch.float32)


def test_factored_update_first_and_second_derivatives_gradcheck() -> None:
    A = torch.randn(7, 2, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    c = torch.tensor(0.9, dtype=torch.float64)
    fn = lambda x, A: factored_update(x, A, 7, 4, c)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, A))
    assert torch.autograd.gradgradcheck(fn, (x, A))  # e.g. gradient penalties keep working


@pytest.mark.parametrize("d_out,d_in", SHAPES)
def test_conv1d_layer_uses_the_same_path(d_out: int, d_in: int) -> None:
    from transformers.pytorch_utils import Conv1D

    base = Conv1D(d_out, d_in).double()  # weight stored (in, out)
    layer = SingLoRALayer(base)
    layer.add_adapter("default", 3, scale=2.0, ramp_up_steps=0, dropout=0.0, init="normal", init_std=None)
    layer.active_adapters = ["default"]
    A = layer.singlora["default"].A
    x = torch.randn(2, 5, d_in, dtype=torch.float64)
    expected = x @ base.weight.detach() + base.bias.detach() + reference(x, A.detach(), d_out, d_in, 2.0)
    assert_close(layer(x), expected)
    layer(x).square().sum().backward()
    A_ref = A.detach().clone().requires_grad_(True)
    (x @ base.weight.detach() + base.bias.detach() + reference(x, A_ref, d_out, d_in, 2.0)).square().sum().backward()
    assert_close(A.grad, A_ref.grad)


@pytest.mark.parametrize("d_out,d_in", SHAPES)
def test_benchmark_dense_reference_computes_the_same_function(d_out: int, d_in: int) -> None:
    base = nn.Linear(d_in, d_out).double()
    dense = DenseUpdateLinear(base, r=3, alpha=6.0).double()
    dense.step.fill_(RAMP_STEPS // 2)  # u = 0.5, c = 6 / 3 * 0.5
    x = torch.randn(4, d_in, dtype=torch.float64)
    expected = F.linear(x, base.weight) + base.bias + reference(x, dense.A.detach(), d_out, d_in, 1.0)
    assert_close(dense(x), expected.detach())


def test_compiled_model_matches_eager_and_does_not_recompile_as_the_ramp_moves() -> None:
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    base = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4))
    model = get_singlora_model(base, SingLoRAConfig(r=2, alpha=2, target_modules=["0", "2"], ramp_up_steps=4))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    x = torch.randn(3, 6)
    for step in range(6):  # u = 0, 0.25, ..., 1, 1
        model.set_ramp_step(step)
        eager_out = model(x)
        compiled_out = compiled(x)
        assert_close(compiled_out, eager_out)
        compiled_out.sum().backward()
    assert counter.frame_count == 1
