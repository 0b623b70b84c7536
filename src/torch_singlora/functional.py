"""The SingLoRA math, in one place.

A SingLoRA adapter on a weight whose matrix view is ``(d_out, d_in)`` is a single matrix ``A`` of shape
``(n, r)`` with ``n = max(d_out, d_in)``. Its update is the top-left ``(d_out, d_in)`` block of ``A @ A.T``::

    dW = c * A[:d_out] @ A[:d_in].T          c = s * u,  s = alpha / r (or alpha / sqrt(r)),  u = min(t / T, 1)

         d_in                      r              d_in
      +-------+                 +-----+         +-------+
      |       |                 |     |       r | A_in^T|
 d_out|  dW   |  =  c *   d_out |A_out|   @     +-------+
      |       |                 |     |
      +-------+                 +-----+

The ramp's names, everywhere in the library: ``t`` = ``ramp_step`` (optimizer steps taken), ``T`` =
``ramp_up_steps`` (ramp length in optimizer steps, 0 = no ramp), ``u`` = ``ramp_value(t, T)``.

Every other place (layer forward, merge, export, tests) derives from the functions below. The forward never
builds ``dW``: it computes ``((x @ A_in) * c) @ A_out.T`` at O(tokens * n * r) (``factored_update``,
``embedding_update``, ``conv_update``, one per layer kind).

Mixed-adapter batches (each example its own adapter, ``mixed_*``) read a *pool*: rows of the adapters' ``A``
transposed, ``(P, n)``, and per example the list of its adapter's rows, ``rows[b]`` (``W`` of them: an adapter of
rank ``r < W`` lists a zero row ``W - r`` times), with one coefficient ``c_b`` each. Example ``b`` uses
``pool[rows[b]]`` (``(W, n)``, its ``A.T`` plus zero rows); one gather and two batched products (``bmm``, the S-LoRA /
Punica idea) serve every adapter and rank of the batch exactly, since zero columns of ``A`` add nothing to ``A A^T``.

Layer kinds and how their weight is viewed as a ``(d_out, d_in)`` matrix:

============  =====================  ====================================
kind          stored weight shape    matrix view (d_out, d_in)
============  =====================  ====================================
``linear``    (out, in)              (out, in)
``conv1d_t``  (in, out)              (out, in)       transformers Conv1D, stored transposed
``conv``      (out, in, *kernel)     (out, in * prod(kernel))
``embedding`` (num, dim)             (num, dim)
============  =====================  ====================================
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import SingLoRAError

LayerKind = Literal["linear", "conv1d_t", "conv", "embedding"]
LAYER_KINDS: tuple[str, ...] = ("linear", "conv1d_t", "conv", "embedding")


def matrix_dims(kind: LayerKind, weight_shape: tuple[int, ...] | torch.Size) -> tuple[int, int]:
    """``(d_out, d_in)`` of the matrix view of a weight of ``weight_shape`` for a layer ``kind``."""
    shape = tuple(weight_shape)
    if kind in ("linear", "embedding"):
        return shape[0], shape[1]
    if kind == "conv1d_t":
        return shape[1], shape[0]
    if kind == "conv":
        return shape[0], math.prod(shape[1:])
    raise ValueError(f"kind={kind!r} is not one of {LAYER_KINDS}")


def adapter_rows(d_out: int, d_in: int, r: int) -> int:
    """``n = max(d_out, d_in)``, the rows of ``A``, after checking ``r <= n`` (the one place this rule lives)."""
    n = max(d_out, d_in)
    if r > n:
        raise SingLoRAError(f"r={r} exceeds n=max(d_out={d_out}, d_in={d_in})={n}")
    return n


def scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """``s = alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA-style scaling."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def ramp_value(ramp_step: Tensor, ramp_up_steps: int | None, dtype: torch.dtype = torch.float32) -> Tensor:
    """``u = min(t / T, 1)`` as a 0-dim ``dtype`` tensor (no host sync); ``T = 0`` means no ramp (``u = 1``).

    ``ramp_step`` (t) is a 0-dim integer tensor counting optimizer steps; ``ramp_up_steps`` (T) an int >= 0, or
    ``None`` while T is a fraction of a run whose length is not known yet: the ramp has not started (``u = 0``).
    """
    if ramp_up_steps is None:
        return torch.zeros((), dtype=dtype, device=ramp_step.device)
    if ramp_up_steps == 0:
        return torch.ones((), dtype=dtype, device=ramp_step.device)
    return (ramp_step.to(dtype) / ramp_up_steps).clamp(max=1.0)


def saved_coefficient(scale: float, ramp_step: int, ramp_up_steps: int | None) -> float:
    """``c = s * u(t)`` of a saved adapter (its file's ``ramp_step`` and ``T``), in float64, as a Python number:
    what the bank, the export and the inspection of a file compute (``ramp_value``'s rules)."""
    return scale * float(ramp_value(torch.tensor(ramp_step), ramp_up_steps, torch.float64))


def delta_matrix(A: Tensor, d_out: int, d_in: int, coefficient: Tensor | float = 1.0) -> Tensor:
    """``c * A[:d_out] @ A[:d_in].T``: the update as a ``(d_out, d_in)`` matrix. ``A``: ``(n, r)``, n >= both;
    a stack ``(..., n, r)`` (one ``A`` per expert) gives ``(..., d_out, d_in)``."""
    n = A.shape[-2]
    if n < max(d_out, d_in):
        raise ValueError(f"A has {n} rows, needs max(d_out={d_out}, d_in={d_in})")
    return (A[..., :d_out, :] * coefficient) @ A[..., :d_in, :].mT


def factored_update(x: Tensor, A: Tensor, d_out: int, d_in: int, coefficient: Tensor | float = 1.0) -> Tensor:
    """``x @ delta_matrix(A, d_out, d_in, c).T`` without building the update: ``(c * x @ A[:d_in]) @ A[:d_out].T``.

    ``x``: ``(..., d_in)`` -> ``(..., d_out)``; cost O(tokens * (d_in + d_out) * r).
    ``A`` is first copied to a contiguous ``(r, n)`` (``n * r`` elements, and one small copy of its gradient),
    so that the two forward and four backward matrix products all read their ``r``-sized operand with unit
    stride and produce outputs in the layout BLAS is fastest at; slicing ``(n, r)`` ``A`` directly ran the
    adapter's forward + backward about 2x slower on CPU (see ``benchmarks/README.md``).
    """
    At = A.T.contiguous()  # (r, n)
    h = F.linear(x, At[:, :d_in]) * coefficient  # (..., d_in) -> (..., r)
    return F.linear(h, At[:, :d_out].T)  # (..., r) -> (..., d_out)


def add_factored_update_(
    out: Tensor, x: Tensor, A: Tensor, d_out: int, d_in: int, coefficient: Tensor | float = 1.0
) -> Tensor:
    """``out += factored_update(x, A, d_out, d_in, c)`` in place, for inference: the second product accumulates
    into ``out`` (``addmm_``), saving a pass over the output and its allocation; same products, so exact up to
    float rounding. ``out``: contiguous ``(..., d_out)``, same dtype as ``A``; nothing may need its gradient."""
    At = A.T.contiguous()  # (r, n)
    return add_update_(out, x, At[:, :d_in].T, At[:, :d_out], coefficient)


def add_update_(out: Tensor, x: Tensor, A_in: Tensor, A_out: Tensor, coefficient: Tensor | float = 1.0) -> Tensor:
    """``out += c * (x @ A_in) @ A_out`` in place (``add_factored_update_`` with ``A_in = A[:d_in]`` ``(d_in, r)``
    and ``A_out = A[:d_out].T`` ``(r, d_out)`` given, e.g. views of a bank's rows). ``x``: ``(..., d_in)``."""
    h = torch.mm(x.reshape(-1, A_in.shape[0]), A_in)  # (tokens, r)
    if isinstance(coefficient, Tensor):
        out.view(-1, A_out.shape[1]).addmm_(h * coefficient, A_out)
    else:  # a Python number: folded into addmm's alpha, one op fewer
        out.view(-1, A_out.shape[1]).addmm_(h, A_out, alpha=coefficient)
    return out


def embedding_update(
    ids: Tensor, A: Tensor, d_out: int, d_in: int, coefficient: Tensor | float = 1.0, *,
    scale_grad_by_freq: bool = False, sparse: bool = False,
) -> Tensor:
    """Update of an embedding (``num = d_out`` rows of ``dim = d_in``): ``(c * A[ids]) @ A[:d_in].T``.

    ``ids``: integer tensor of any shape ``(...)`` -> ``(..., d_in)``; the two flags mirror ``nn.Embedding``'s.
    """
    h = F.embedding(ids, A[:d_out], scale_grad_by_freq=scale_grad_by_freq, sparse=sparse)  # (..., r)
    return F.linear(h * coefficient, A[:d_in])  # (..., r) -> (..., d_in)


def convolve(x: Tensor, kernel: Tensor, geometry: nn.Module, groups: int = 1) -> Tensor:
    """``x`` convolved with ``kernel`` under the stride, padding (and padding mode) and dilation of ``geometry``
    (an ``nn.Conv1d`` / ``nn.Conv2d``), with ``groups`` groups and no bias: what ``geometry`` computes, any kernel."""
    conv = F.conv1d if kernel.dim() == 3 else F.conv2d
    padding = geometry.padding
    if geometry.padding_mode != "zeros":
        x = F.pad(x, geometry._reversed_padding_repeated_twice, mode=geometry.padding_mode)
        padding = 0
    return conv(x, kernel, None, geometry.stride, padding, geometry.dilation, groups)


def conv_update(x: Tensor, A: Tensor, geometry: nn.Module, coefficient: Tensor | float = 1.0) -> Tensor:
    """Update of a convolution ``geometry`` (weight ``(out, in, *k)``, matrix view ``(out, in * prod(k))``).

    ``x``: ``(N, in, *S)`` -> conv with the ``r`` filters ``A[:d_in].T`` -> ``(N, r, *S')`` -> 1x1 conv with
    ``A[:out]`` -> ``(N, out, *S')``.
    """
    out_channels, *kernel_shape = geometry.weight.shape
    d_in, r = math.prod(kernel_shape), A.shape[1]
    h = convolve(x, A[:d_in].T.reshape(r, *kernel_shape), geometry) * coefficient  # (N, r, *S')
    pointwise = A[:out_channels].reshape(out_channels, r, *([1] * (h.dim() - 2)))
    return F.conv1d(h, pointwise) if h.dim() == 3 else F.conv2d(h, pointwise)


def gather_rows(pool: Tensor, rows: Tensor) -> Tensor:
    """``pool[rows]`` for a ``(B, W)`` index: ``(B, W, n)``, each example's ``A.T`` (see the module docstring)."""
    return pool.index_select(0, rows.reshape(-1)).view(*rows.shape, pool.shape[1])


def mixed_factored_update(
    x: Tensor, pool: Tensor, rows: Tensor, coefficients: Tensor, d_out: int, d_in: int, out: Tensor | None = None
) -> Tensor:
    """``factored_update`` with example ``b`` of ``x`` using the adapter whose ``A.T`` is ``pool[rows[b]]``.

    ``x``: ``(B, ..., d_in)``; ``pool``: ``(P, n)``; ``rows``: ``(B, W)`` int64; ``coefficients``: ``(B,)``.
    Returns ``(B, ..., d_out)``. Two ``bmm``s over the gathered ``(B, W, n)``, cost O(tokens * (d_in + d_out) * W
    + B * n * W). With ``out`` (contiguous, same shape, dtype as ``pool``, no gradient needed), the update is added
    into it in place (``baddbmm_``) and ``out`` is returned.
    """
    batch = x.shape[0]
    At = gather_rows(pool, rows)  # (B, W, n)
    h = torch.bmm(x.reshape(batch, -1, d_in), At[:, :, :d_in].transpose(1, 2))  # (B, T, W)
    h = h * coefficients[:, None, None]
    if out is not None:
        out.view(batch, -1, d_out).baddbmm_(h, At[:, :, :d_out])
        return out
    return torch.bmm(h, At[:, :, :d_out]).reshape(*x.shape[:-1], d_out)  # (B, T, W) -> (B, ..., d_out)


def mixed_embedding_update(
    ids: Tensor, pool: Tensor, rows: Tensor, coefficients: Tensor, d_out: int, d_in: int
) -> Tensor:
    """``embedding_update`` with example ``b`` using the adapter at ``pool[rows[b]]`` (see
    ``mixed_factored_update``). ``ids``: ``(B, ...)`` -> ``(B, ..., d_in)``; only the looked-up columns of each
    example's ``A.T`` and its first ``d_in`` columns are read (not the whole ``(W, num)`` block per example)."""
    batch = ids.shape[0]
    flat = ids.reshape(batch, -1)  # (B, T)
    h = pool[rows[:, None, :], flat[:, :, None]]  # (B, T, W): row ids[b, t] of example b's A
    h = h * coefficients[:, None, None]
    out = torch.bmm(h, gather_rows(pool[:, :d_in], rows))  # (B, T, W) @ (B, W, d_in)
    return out.reshape(*ids.shape, d_in)


def mixed_conv_update(
    x: Tensor, pool: Tensor, rows: Tensor, coefficients: Tensor, geometry: nn.Module
) -> Tensor:
    """``conv_update`` with example ``b`` using the adapter at ``pool[rows[b]]`` (see ``mixed_factored_update``).

    One grouped convolution (``groups = B``: example ``b``'s ``W`` filters see only example ``b``), then a
    ``bmm`` with each example's ``A[:out]``. ``x``: ``(B, in, *S)`` -> ``(B, out, *S')``.
    """
    out_channels, *kernel_shape = geometry.weight.shape
    (batch, width), d_in = rows.shape, math.prod(kernel_shape)
    At = gather_rows(pool, rows)  # (B, W, n)
    kernels = At[:, :, :d_in].reshape(batch * width, *kernel_shape)  # (B * W, in, *k)
    h = convolve(x.reshape(1, batch * x.shape[1], *x.shape[2:]), kernels, geometry, groups=batch)  # (1, B*W, *S')
    spatial = h.shape[2:]
    h = h.reshape(batch, width, -1) * coefficients[:, None, None]  # (B, W, P)
    out = torch.bmm(At[:, :, :out_channels].transpose(1, 2), h)  # (B, out, W) @ (B, W, P) -> (B, out, P)
    return out.reshape(batch, out_channels, *spatial)


def delta_weight(
    A: Tensor, kind: LayerKind, weight_shape: tuple[int, ...] | torch.Size, coefficient: Tensor | float = 1.0
) -> Tensor:
    """The update in the layout of the stored weight (``weight_shape``), ready to add to it."""
    d_out, d_in = matrix_dims(kind, weight_shape)
    delta = delta_matrix(A, d_out, d_in, coefficient)
    if kind == "conv1d_t":
        return delta.T
    return delta.reshape(weight_shape)


def init_A(A: Tensor, method: str, std: float | None = None) -> None:
    """Initialise ``A`` (n, r) in place.

    - ``normal`` (default): ``N(0, 1/n)``, the Theta(n^-1/2) scale the paper analyses.
    - ``kaiming_uniform``: ``kaiming_uniform_(A, a=sqrt(5))`` as public implementations do (entries ~ 1/sqrt(r));
      only for compatibility with their checkpoints.
    - ``gaussian``: ``N(0, std^2)``.
    """
    with torch.no_grad():
        if method == "normal":
            A.normal_(0.0, 1.0 / math.sqrt(A.shape[0]))
        elif method == "kaiming_uniform":
            torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        elif method == "gaussian":
            if std is None:
                raise ValueError("init='gaussian' needs init_std")
            A.normal_(0.0, std)
        else:
            raise ValueError(f"init={method!r} is not one of 'normal', 'kaiming_uniform', 'gaussian'")


def lora_factors(A: Tensor, d_out: int, d_in: int, coefficient: float) -> tuple[Tensor, Tensor]:
    """Exact plain-LoRA factors of the update: ``lora_B @ lora_A == delta_matrix(A, d_out, d_in, c)``.

    Returns ``lora_A`` (r, d_in) and ``lora_B`` (d_out, r), both ``sqrt(c)``-scaled (for LoRA scale 1, i.e.
    ``lora_alpha = r``); for a stack ``A`` ``(..., n, r)``, ``(..., r, d_in)`` and ``(..., d_out, r)``. ``c`` must
    be >= 0.
    """
    if coefficient < 0:
        raise ValueError(f"coefficient={coefficient} < 0 has no real square root")
    root = math.sqrt(coefficient)
    return (A[..., :d_in, :].mT * root).contiguous(), (A[..., :d_out, :] * root).contiguous()
