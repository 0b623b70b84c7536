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
builds ``dW``: it computes ``((x @ A_in) * c) @ A_out.T`` at O(tokens * n * r).

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
from torch import Tensor

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


def scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """``s = alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA-style scaling."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def ramp_value(ramp_step: Tensor, ramp_up_steps: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """``u = min(t / T, 1)`` as a 0-dim ``dtype`` tensor (no host sync); ``T = 0`` means no ramp (``u = 1``).

    ``ramp_step`` (t) is a 0-dim integer tensor counting optimizer steps; ``ramp_up_steps`` (T) an int >= 0.
    """
    if ramp_up_steps == 0:
        return torch.ones((), dtype=dtype, device=ramp_step.device)
    return (ramp_step.to(dtype) / ramp_up_steps).clamp(max=1.0)


def ramp(step: Tensor, ramp_steps: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Deprecated name of ``ramp_value``."""
    from .errors import warn_deprecated

    warn_deprecated("torch_singlora.functional.ramp", "ramp_value")
    return ramp_value(step, ramp_steps, dtype)


def delta_matrix(A: Tensor, d_out: int, d_in: int, coefficient: Tensor | float = 1.0) -> Tensor:
    """``c * A[:d_out] @ A[:d_in].T``: the update as a ``(d_out, d_in)`` matrix. ``A``: ``(n, r)``, n >= both."""
    n = A.shape[0]
    if n < max(d_out, d_in):
        raise ValueError(f"A has {n} rows, needs max(d_out={d_out}, d_in={d_in})")
    return (A[:d_out] * coefficient) @ A[:d_in].T


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
    ``lora_alpha = r``). ``c`` must be >= 0.
    """
    if coefficient < 0:
        raise ValueError(f"coefficient={coefficient} < 0 has no real square root")
    root = math.sqrt(coefficient)
    return (A[:d_in].T * root).contiguous(), (A[:d_out] * root).contiguous()
