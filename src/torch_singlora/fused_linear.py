"""The training forward and backward of a SingLoRA adapter on a Linear or transformers Conv1D, written by hand.

One ``torch.autograd.Function`` (``_AdaptedLinear``) serves both layer kinds (their weights differ only by a
transposition) and both ways of getting the base output::

    out = base + c * (x @ A_in) @ A_out.T        A_in = A[:d_in], A_out = A[:d_out]  (A: (n, r)), c = s * u

- ``linear_with_update``: ``base = x_base @ W.T + b`` computed here, for a plain ``nn.Linear`` / ``Conv1D`` (the
  layer checks ``computes_base`` first); ``x_base`` is ``x`` unless the adapter's dropout gave ``x`` its own mask;
- ``add_linear_update``: ``base`` given (the output of any base layer: quantized, hooked, a subclass).

Why by hand (issue 27; per-op profile: ``python -m benchmarks.profile_adapter --ops``): the update's products
have r (8) columns, so each is bound by the passes over the activation it reads or writes, not by its
arithmetic, and autograd's composition of them made about twelve ``T x d`` passes per layer and step (the ``+``
of the update, the backward's add of the two gradients of ``x``, slices of ``A``'s gradient zero-filled and
summed, a product in a layout BLAS is slow at). Here six, ``T`` tokens, ``g = dL/d out``::

    forward   h   = x @ A_in                       (T, r)      reads x
              out = [h | 1] @ [c A_out | b].T        (T, d_out)  written once, the bias as a rank-one column
              out += x_base @ W.T                    the base's own product, accumulating (beta = 1: free for a
                                                     compute-bound GEMM); replaces F.linear's bias broadcast
    backward  gh  = g @ A_out                      (T, r)      reads g
              G[:, :d_out] = h.T @ g               (r, d_out)  reads g again while it is in cache
              gx  = gh @ (c A_in).T                (T, d_in)   written once
              gx += g @ W                            the base's backward product accumulates into it: no add
              G[:, :d_in] += gh.T @ x              (r, d_in)   both halves of A's gradient in one (r, n) buffer
              dA  = c * G.T

In float32 / float64, when the weight has at most half as many rows as the batch has tokens
(``merges_for_grad_x``), ``gx`` is instead one product on the merged weight, ``g @ (W + c A_out A_in.T)``: the
``(d_out, d_in)`` sum costs less than the first write of the ``(T, d_in)`` gradient it replaces.

Two reads of ``x``, two of ``g`` (one mostly from cache), and the first writes of ``out`` and ``gx`` (which the
base's products then accumulate into); ``c`` (a 0-dim tensor: no host sync, nothing for ``torch.compile`` to
recompile on) scales only ``(n, r)``-sized things. Layouts: ``A`` is read both as given ``(n, r)`` (the
products that write ``T`` rows, ``h @ A.T``) and as a contiguous ``(r, n)`` copy (the products that read ``T``
rows, ``x @ A.T.T``), and ``A``'s gradient is built ``(r, n)``: on MKL the other layouts of these skinny
products ran 1.5-3.5x slower.

Nothing is saved for backward beyond what ``F.linear`` saves (``x``, the weight) except ``h`` (``T x r``)
and two ``n x r`` copies of ``A``. Gradients of the weight, bias, ``c`` and the given base output are computed
when they are needed (``needs_input_grad``), so the function is exact for any inputs, second derivatives too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


# False: layers train by autograd's composition of ``functional.factored_update`` everywhere (for A/B measurements:
# ``benchmarks/profile_adapter.py --ab``; tests compare the two).
ENABLED = True
# Below this many tokens (rows of x) a layer trains by autograd's composition (``functional.factored_update``):
# there the fixed cost of a Python autograd.Function (about 40 us per layer and step) is more than the passes it
# saves; from 256 tokens on it was never slower at MiniLM's, the small Llama's and SmolLM2's shapes (issue 27).
MIN_TOKENS = 256
# Outputs of fewer elements take the bias from addmm (one op) rather than from a column of ones (three).
FOLD_BIAS_MIN = 1 << 16
# The gradient of x as one product on the merged weight when the weight has at most 1/MERGE_RATIO as many rows
# (d_out) as the batch has tokens (``merges_for_grad_x``).
MERGE_RATIO = 2.0


def merges_for_grad_x(dtype: torch.dtype, tokens: int, d_out: int) -> bool:
    """Whether the backward computes ``gx = g @ (W + c A_out A_in.T)`` rather than writing ``g @ A_out @ (c A_in).T``
    and accumulating ``g @ W`` into it: when building the ``(d_out, d_in)`` merged weight costs less than that
    ``(T, d_in)`` write (``d_out * MERGE_RATIO <= T``; 0.3-0.6 % of a benchmark step, paired, within the noise),
    and only in float32 / float64 (in 16-bit floats the sum would round ``c A_out A_in.T`` to ``W``'s precision)."""
    return dtype in (torch.float32, torch.float64) and d_out * MERGE_RATIO <= tokens


class _AdaptedLinear(torch.autograd.Function):
    """``out = base + c * (x @ A[:d_in]) @ A[:d_out].T`` (see the module docstring); ``base`` is ``base_out`` if
    given, else ``base_x @ W.T + bias`` (``W`` stored ``(d_in, d_out)`` when ``transposed``; ``base_x`` None
    means ``x``)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, A: Tensor, c: Tensor, base_out: Tensor | None, weight: Tensor | None,
                bias: Tensor | None, base_x: Tensor | None, d_out: int, d_in: int, transposed: bool) -> Tensor:
        x2 = x.reshape(-1, d_in)  # (T, d_in)
        At = A.T.contiguous()  # (r, n)
        cA = A * c  # (n, r)
        h = x2 @ At[:, :d_in].T  # (T, r)
        if base_out is not None:
            out = torch.addmm(base_out.reshape(-1, d_out), h, cA[:d_out].T)
        else:
            xb = x2 if base_x is None else base_x.reshape(-1, d_in)
            W = weight if transposed else weight.T  # (d_in, d_out)
            if bias is not None and h.shape[0] * d_out < FOLD_BIAS_MIN:  # small: fewer ops beat fewer passes
                out = torch.addmm(bias, xb, W).addmm_(h, cA[:d_out].T)
            else:
                if bias is None:
                    out = h @ cA[:d_out].T
                else:  # [h | 1] @ [c A_out | b].T: the bias in the same single write of out
                    ones = h.new_ones(h.shape[0], 1)
                    out = torch.cat([h, ones], 1) @ torch.cat([cA[:d_out], bias[:, None]], 1).T
                out.addmm_(xb, W)  # (T, d_in) @ (d_in, d_out)
        ctx.save_for_backward(x, A, c, weight, base_x, At, cA, h)
        ctx.spec = (d_out, d_in, transposed)
        return out.view(*x.shape[:-1], d_out)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, A, c, weight, base_x, At, cA, h = ctx.saved_tensors
        d_out, d_in, transposed = ctx.spec
        need_x, need_A, need_c, need_base, need_w, need_b, need_base_x = ctx.needs_input_grad[:7]
        g = grad_out.reshape(-1, d_out)  # (T, d_out)
        x2 = x.reshape(-1, d_in)
        if torch.is_grad_enabled():  # double backward (create_graph=True): rebuild what was saved from the
            At, cA, h = A.T, A * c, x2 @ A[:d_in]  # inputs, so that the second graph reaches them
        fused_x = weight is not None and base_x is None  # x is also the base's input: one gradient for both
        merged = need_x and fused_x and merges_for_grad_x(weight.dtype, g.shape[0], d_out)
        gh = g @ At[:, :d_out].T if need_A or need_c or (need_x and not merged) else None  # (T, r), = g @ A_out
        G = None
        if need_A:  # A's gradient, transposed: (r, n)
            G = At.new_zeros(At.shape)
            G[:, :d_out].addmm_(h.T, g)  # g is still in cache from gh
        gx = None  # (T, d_in)
        if merged:  # the base's product on the merged weight W + c A_out A_in.T, built in W's layout
            gx = (g @ torch.addmm(weight, cA[:d_in], At[:, :d_out]).T if transposed
                  else g @ torch.addmm(weight, cA[:d_out], At[:, :d_in]))
        elif need_x:
            gx = gh @ cA[:d_in].T
            if fused_x:
                gx.addmm_(g, weight.T if transposed else weight)
        if G is not None:
            G[:, :d_in].addmm_(gh.T, x2)
            G.mul_(c)
        grad_c = (h * gh).sum().reshape(c.shape) if need_c else None
        grad_base = grad_out if need_base else None
        grad_w = grad_b = grad_base_x = None
        if weight is not None:
            xb = x2 if base_x is None else base_x.reshape(-1, d_in)
            if need_w:
                grad_w = xb.T @ g if transposed else g.T @ xb
            if need_b:
                grad_b = g.sum(0)
            if base_x is not None and need_base_x:
                grad_base_x = (g @ (weight.T if transposed else weight)).view(base_x.shape)
        grad_x = gx.view(x.shape) if gx is not None else None
        return (grad_x, None if G is None else G.T, grad_c, grad_base, grad_w, grad_b, grad_base_x,
                None, None, None)


def _coefficient(c: Tensor | float, A: Tensor) -> Tensor:
    """``c`` as a 0-dim tensor of ``A``'s dtype and device (a no-op for the layers' own coefficient)."""
    return torch.as_tensor(c, dtype=A.dtype, device=A.device)


def linear_with_update(x: Tensor, A: Tensor, c: Tensor | float, weight: Tensor, bias: Tensor | None, *,
                       d_out: int, d_in: int, transposed: bool = False, base_x: Tensor | None = None) -> Tensor:
    """``base_x @ W.T + bias + c * (x @ A[:d_in]) @ A[:d_out].T`` in one autograd node (the module docstring).

    ``x``, ``base_x``: ``(..., d_in)`` (``base_x`` None: ``x``, the usual case; given, e.g. ``x`` after the
    adapter's dropout and ``base_x`` before it); ``weight``: ``(d_out, d_in)``, or ``(d_in, d_out)`` when
    ``transposed`` (transformers ``Conv1D``); ``A``: ``(n, r)``. Returns ``(..., d_out)``. All of one dtype.
    """
    return _AdaptedLinear.apply(x, A, _coefficient(c, A), None, weight, bias, base_x, d_out, d_in, transposed)


def add_linear_update(base_out: Tensor, x: Tensor, A: Tensor, c: Tensor | float, *, d_out: int,
                      d_in: int) -> Tensor:
    """``base_out + c * (x @ A[:d_in]) @ A[:d_out].T``: the update added to the output of any base layer, out of
    place, in one product that reads ``base_out`` (``addmm``). ``base_out``: ``(..., d_out)``, ``x``:
    ``(..., d_in)``, of ``A``'s dtype."""
    return _AdaptedLinear.apply(x, A, _coefficient(c, A), base_out, None, None, None, d_out, d_in, False)


def trains_by_hand(kind: str, x: Tensor, d_in: int) -> bool:
    """Whether a layer of ``kind`` trains on ``x`` (``(..., d_in)``) through this module: ``ENABLED``, a Linear /
    Conv1D, gradients on, and ``x`` has ``MIN_TOKENS`` rows or a graph is being compiled (no Python overhead
    there, and no guard on the batch size)."""
    return (ENABLED and kind in ("linear", "conv1d_t") and torch.is_grad_enabled()
            and (torch.compiler.is_compiling() or x.numel() >= MIN_TOKENS * d_in))


def _hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` would run hooks (its own or global ones) that computing its output here skips."""
    from torch.nn.modules import module as module_globals

    own = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks,
           module._backward_pre_hooks)
    shared = (module_globals._global_forward_hooks, module_globals._global_forward_pre_hooks,
              module_globals._global_backward_hooks, module_globals._global_backward_pre_hooks)
    return any(len(hooks) for hooks in own + shared)


def adds_to(base_out: Tensor, x: Tensor, A: Tensor) -> bool:
    """Whether ``add_linear_update`` may add ``A``'s update for ``x`` to ``base_out``: one dtype, outside autocast
    (elsewhere the layer adds the autograd composition, which casts)."""
    return base_out.dtype == x.dtype == A.dtype and not torch.is_autocast_enabled(x.device.type)


def computes_base(module: nn.Module, x: Tensor, A: Tensor) -> bool:
    """Whether ``linear_with_update`` may compute ``module``'s output itself: ``module`` is exactly an
    ``nn.Linear`` or transformers ``Conv1D`` (no subclass: quantized layers are), without hooks, whose weight and
    bias are plain tensors of ``x``'s and ``A``'s dtype on their device, outside autocast. Otherwise the layer calls
    the module and adds the update (``add_linear_update``)."""
    kind = type(module)
    if kind is not nn.Linear and (kind.__name__, kind.__module__) != ("Conv1D", "transformers.pytorch_utils"):
        return False
    weight, bias = module.weight, module.bias
    plain = (nn.Parameter, Tensor)
    return (type(weight) in plain and (bias is None or (type(bias) in plain and bias.dtype == x.dtype))
            and weight.dtype == x.dtype == A.dtype and weight.device == x.device == A.device
            and not torch.is_autocast_enabled(x.device.type) and not _hooked(module))
