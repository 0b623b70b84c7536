"""The hand-written forward and backward of an adapted Linear / Conv1D (``fused_linear``), against autograd on
the dense float64 update written out in the test: values and the gradients of every input (``x``, ``A`` with the
rows only one side of a rectangular weight reads, ``c``, the weight, the bias, the base input or output), first
and second derivatives; and the layers that train through it, with dropout, gradient checkpointing and
``torch.compile``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, dense_update
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.pytorch_utils import Conv1D

from torch_singlora import SingLoRAConfig, SingLoRALayer, fused_linear, get_singlora_model
from torch_singlora.fused_linear import add_linear_update, linear_with_update

SHAPES = [(8, 8), (12, 5), (5, 12)]  # (d_out, d_in): square, tall (out > in), wide (in > out)
f64 = torch.float64


@pytest.fixture(autouse=True, params=["gx_written", "gx_merged"])
def _every_size_by_hand(monkeypatch, request) -> None:
    """The layers train these few-token inputs by the hand-written function too (``MIN_TOKENS`` is a speed rule;
    ``test_few_tokens_train_by_autograd`` checks it); every test runs with either backward for the gradient of
    ``x`` (``merges_for_grad_x``, a speed rule: ``MERGE_RATIO`` 0 merges at every size, infinity never)."""
    monkeypatch.setattr(fused_linear, "MIN_TOKENS", 0)
    monkeypatch.setattr(fused_linear, "MERGE_RATIO", 0.0 if request.param == "gx_merged" else float("inf"))


def test_merge_rule_follows_tokens_rows_and_dtype(monkeypatch) -> None:
    """``gx`` from the merged weight only from ``MERGE_RATIO * d_out`` tokens on, and never in 16-bit floats."""
    monkeypatch.setattr(fused_linear, "MERGE_RATIO", 2.0)  # the module's value
    assert fused_linear.merges_for_grad_x(torch.float32, 2048, 384)
    assert fused_linear.merges_for_grad_x(torch.float64, 768, 384)
    assert not fused_linear.merges_for_grad_x(torch.float32, 767, 384)
    assert not fused_linear.merges_for_grad_x(torch.bfloat16, 2048, 384)
    assert not fused_linear.merges_for_grad_x(torch.float16, 2048, 384)


def leaf(*shape: int) -> torch.Tensor:
    return torch.randn(shape, dtype=f64, requires_grad=True)


def dense_reference(x, A, c, W, b, base_x, d_out, d_in, transposed):
    """``base_x @ W0.T + b + x @ (c * A[:d_out] @ A[:d_in].T).T`` by plain autograd, the update built densely."""
    W0 = W.T if transposed else W  # (d_out, d_in)
    full = A @ A.T  # (n, n): the definition, not the factored products
    return F.linear(x if base_x is None else base_x, W0, b) + F.linear(x, c * full[:d_out, :d_in])


def grads(out: torch.Tensor, inputs: list, grad_out: torch.Tensor) -> list:
    return torch.autograd.grad(out, [t for t in inputs if t is not None], grad_out)


@pytest.mark.parametrize("d_out,d_in", SHAPES)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("separate", [False, True])
@pytest.mark.parametrize("fold", [False, True])
def test_linear_with_update_values_and_every_gradient_match_dense_float64(monkeypatch, d_out, d_in, transposed, bias,
                                                                          separate, fold):
    """``fold``: the bias enters as a column of ones beside ``h`` (large outputs), else through ``addmm``."""
    monkeypatch.setattr(fused_linear, "FOLD_BIAS_MIN", 0 if fold else 1 << 30)
    n, r = max(d_out, d_in), 3
    x, A, c = leaf(2, 4, d_in), leaf(n, r), torch.tensor(0.7, dtype=f64, requires_grad=True)
    W = leaf(d_in, d_out) if transposed else leaf(d_out, d_in)
    b = leaf(d_out) if bias else None
    base_x = leaf(2, 4, d_in) if separate else None  # the adapter's input after dropout, the base's before
    grad_out = torch.randn(2, 4, d_out, dtype=f64)
    inputs = [x, A, c, W, b, base_x]
    out = linear_with_update(x, A, c, W, b, d_out=d_out, d_in=d_in, transposed=transposed, base_x=base_x)
    expected = dense_reference(x, A, c, W, b, base_x, d_out, d_in, transposed)
    assert out.shape == (2, 4, d_out)
    assert_close(out, expected)
    got = grads(out, inputs, grad_out)
    for g, want in zip(got, grads(expected, inputs, grad_out)):
        assert_close(g, want)
    if d_out != d_in:  # rows beyond min(d_out, d_in) are read by one side only: a gradient, and not zero
        assert got[1][min(d_out, d_in):].abs().sum() > 0


@pytest.mark.parametrize("d_out,d_in", SHAPES)
def test_add_linear_update_values_and_gradients_match_dense_float64(d_out, d_in) -> None:
    n, r = max(d_out, d_in), 2
    x, A, c = leaf(3, d_in), leaf(n, r), torch.tensor(1.3, dtype=f64, requires_grad=True)
    base_out = leaf(3, d_out)  # the output of any base layer
    grad_out = torch.randn(3, d_out, dtype=f64)
    out = add_linear_update(base_out, x, A, c, d_out=d_out, d_in=d_in)
    expected = base_out + F.linear(x, c * (A @ A.T)[:d_out, :d_in])
    assert_close(out, expected)
    for got, want in zip(grads(out, [x, A, c, base_out], grad_out), grads(expected, [x, A, c, base_out], grad_out)):
        assert_close(got, want)


def test_first_and_second_derivatives_gradcheck() -> None:
    """gradcheck / gradgradcheck (finite differences) of both entry points, on a wide and a tall weight."""
    x, A, c, W, b, base_x = leaf(3, 4), leaf(6, 2), leaf(), leaf(6, 4), leaf(6), leaf(3, 4)
    fused = lambda x, A, c, W, b, base_x: linear_with_update(x, A, c, W, b, d_out=6, d_in=4, base_x=base_x)  # noqa: E731
    added = lambda y, x, A, c: add_linear_update(y, x, A, c, d_out=3, d_in=4)  # noqa: E731
    for fn, args in ((fused, (x, A, c, W, b, base_x)), (added, (leaf(3, 3), x, leaf(4, 2), c))):
        assert torch.autograd.gradcheck(fn, args)
        assert torch.autograd.gradgradcheck(fn, args)


class SubclassLinear(nn.Linear):
    """A Linear subclass (as quantized layers are): the layer must call it, not compute its output itself."""

    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(x)


def make_layer(base: nn.Module, dropout: float = 0.0, names=("default",)) -> SingLoRALayer:
    layer = SingLoRALayer(base)
    for name in names:
        layer.add_adapter(name, 3, scale=2.0, ramp_up_steps=4, dropout=dropout, init="normal", init_std=None)
        layer.singlora[name].ramp_step.fill_(3)  # u = 0.75: the coefficient is a tensor, not 1
        with torch.no_grad():
            layer.singlora[name].A.mul_(3.0)
    layer.active_adapters = list(names)
    return layer


def make_base(kind: str, d_out: int, d_in: int) -> nn.Module:
    """A base layer of ``kind``; ``subclass`` and ``hooked`` count the calls the adapter layer must make."""
    base = {"linear": nn.Linear, "conv1d": lambda i, o: Conv1D(o, i), "subclass": SubclassLinear,
            "hooked": nn.Linear}[kind](d_in, d_out).double()
    if kind == "hooked":
        base.calls = 0
        base.register_forward_hook(lambda m, args, out: setattr(m, "calls", m.calls + 1))
    return base


def base_matrix(base: nn.Module) -> torch.Tensor:
    """The base weight as a ``(d_out, d_in)`` matrix."""
    return base.weight.T if isinstance(base, Conv1D) else base.weight


@pytest.mark.parametrize("d_out,d_in", SHAPES)
@pytest.mark.parametrize("kind", ["linear", "conv1d", "subclass", "hooked"])
@pytest.mark.parametrize("fused", [True, False])
def test_training_layer_matches_dense_float64_by_either_path(monkeypatch, d_out, d_in, kind, fused) -> None:
    """Two adapters on one layer (the first computed with the base when the base is a plain Linear / Conv1D, the
    second added to it), by the hand-written backward and by autograd's composition (``fused_linear.ENABLED``)."""
    monkeypatch.setattr(fused_linear, "ENABLED", fused)
    base = make_base(kind, d_out, d_in)
    layer = make_layer(base, names=("a", "b"))
    x = leaf(2, 5, d_in)
    out = layer(x)
    assert (out.grad_fn.name() == "_AdaptedLinearBackward") == fused
    assert getattr(base, "calls", 1) == 1  # a subclass or a hooked module is called, never bypassed
    A = [layer.singlora[name].A for name in ("a", "b")]
    update = sum(dense_update(a, d_out, d_in, 2.0 * 0.75) for a in A)  # builds from A with autograd
    expected = F.linear(x, base_matrix(base) + update, base.bias)
    assert_close(out, expected)
    grad_out = torch.randn_like(out)
    for got, want in zip(grads(out, [x, *A], grad_out), grads(expected, [x, *A], grad_out)):
        assert_close(got, want)


def test_few_tokens_train_by_autograd(monkeypatch) -> None:
    """Under ``MIN_TOKENS`` rows the layer trains by autograd's composition, from it by hand; the same values."""
    monkeypatch.setattr(fused_linear, "MIN_TOKENS", 6)
    layer = make_layer(nn.Linear(5, 12).double())
    A, few, enough = layer.singlora["default"].A, leaf(5, 5), leaf(2, 3, 5)
    assert layer(enough).grad_fn.name() == "_AdaptedLinearBackward"
    by_autograd = layer(few)
    assert by_autograd.grad_fn.name() == "AddBackward0"
    monkeypatch.setattr(fused_linear, "MIN_TOKENS", 5)
    by_hand = layer(few)
    assert by_hand.grad_fn.name() == "_AdaptedLinearBackward"
    assert_close(by_hand, by_autograd)
    grad_out = torch.randn_like(by_hand)
    for got, want in zip(grads(by_hand, [few, A], grad_out), grads(by_autograd, [few, A], grad_out)):
        assert_close(got, want)


@pytest.mark.parametrize("d_out,d_in", [(12, 5), (5, 12)])
def test_dropout_gradients_match_dense_float64(d_out: int, d_in: int) -> None:
    """The adapter sees dropout(x), the base x: the same mask (same seed) applied in the reference."""
    base = nn.Linear(d_in, d_out).double()
    layer = make_layer(base, dropout=0.4)
    A = layer.singlora["default"].A
    x = leaf(4, 6, d_in)
    torch.manual_seed(5)
    out = layer(x)
    assert out.grad_fn.name() == "_AdaptedLinearBackward"
    torch.manual_seed(5)
    dropped = F.dropout(x, 0.4, training=True)
    expected = F.linear(x, base.weight, base.bias) + F.linear(dropped, dense_update(A, d_out, d_in, 1.5))
    assert_close(out, expected)
    grad_out = torch.randn_like(out)
    for got, want in zip(grads(out, [x, A], grad_out), grads(expected, [x, A], grad_out)):
        assert_close(got, want)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_matches_dense_float64(reentrant: bool) -> None:
    base = nn.Linear(5, 12).double()
    layer = make_layer(base)
    A = layer.singlora["default"].A
    x = leaf(3, 5)
    out = checkpoint(layer, x, use_reentrant=reentrant)  # recomputed in backward (reentrant: first run no_grad)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)  # (reentrant checkpointing refuses autograd.grad)
    x_ref, A_ref = x.detach().clone().requires_grad_(True), A.detach().clone().requires_grad_(True)
    expected = F.linear(x_ref, base.weight + dense_update(A_ref, 12, 5, 1.5), base.bias)
    assert_close(out, expected)
    for got, want in zip((x.grad, A.grad), grads(expected, [x_ref, A_ref], grad_out)):
        assert_close(got, want)


def test_compiled_training_matches_dense_float64_without_recompiles() -> None:
    """Forward and backward traced through the hand-written function by AOTAutograd (one graph, fullgraph) as u
    moves. (Inductor compiles these same graphs; it takes 90 s here, so the benchmarks run it: ``*_compile``.)"""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    net = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4)).double()
    model = get_singlora_model(net, SingLoRAConfig(r=2, alpha=2, target_modules=["0", "2"], ramp_up_steps=3))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(4, 6, dtype=f64)
    for step in range(1, 5):  # u = 1/3, 2/3, 1, 1
        model.set_ramp_step(step)
        c = 2 / 2 * min(step / 3, 1.0)
        compiled(x).square().sum().backward()
        got = [net[i].singlora["default"].A.grad for i in (0, 2)]
        A = [net[i].singlora["default"].A.detach().clone().requires_grad_(True) for i in (0, 2)]
        hidden = torch.tanh(F.linear(x, net[0].base_layer.weight + dense_update(A[0], 10, 6, c), net[0].base_layer.bias))
        out = F.linear(hidden, net[2].base_layer.weight + dense_update(A[1], 4, 10, c), net[2].base_layer.bias)
        want = torch.autograd.grad(out.square().sum(), A)
        for g, w in zip(got, want):
            assert_close(g, w)
        model.zero_grad()
    assert counter.frame_count == 1
