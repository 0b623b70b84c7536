"""Adapter layers: a thin ``nn.Module`` around the original layer (``base_layer``) plus named SingLoRA adapters.

``SingLoRALayer.forward(x) = base_layer(x) + sum over active adapters of ((dropout(x) @ A_in) * c) @ A_out.T``
with ``c = s * u(t)``; the dense update is built only to merge (``functional.delta_weight``).

State-dict keys of an adapted module ``m``: ``m.base_layer.*`` (the original's) and ``m.singlora.<adapter>.A``,
``m.singlora.<adapter>.ramp_step`` (state dicts that call it ``step``, its former name, still load).

A layer may also hold banked storage for many frozen adapters selected per example (``create_bank``,
``set_banked``, ``reset_banked``: ``banked.LayerBank``, filled by ``bank.AdapterBank``), and holds the selection
of the model it belongs to (``mixed.Selection``, attached once), which mixed-adapter calls activate.

Long module: one class whose forward chooses among an adapted layer's paths (training by hand, inference in
place, mixed batches, banked storage); the math of each lives in its own module (``fused_linear``,
``functional``, ``mixed``, ``banked``).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn

from .banked import LayerBank
from .errors import SingLoRAError
from .functional import (
    LayerKind, adapter_rows, add_factored_update_, add_update_, conv_update, delta_weight, embedding_update,
    factored_update, init_A, matrix_dims, mixed_conv_update, mixed_embedding_update, mixed_factored_update, ramp_value,
)
from .fused_linear import add_linear_update, adds_to, computes_base, linear_with_update, trains_by_hand
from .mixed import Pooled, Selection, Shared


# Unmerged inference adds each Linear / Conv1D update into the base output in place (``functional.
# add_factored_update_``): exact, one pass over the output fewer. False restores the out-of-place sum everywhere
# (for A/B measurements: ``benchmarks/unmerged_overhead.py``; tests compare the two).
IN_PLACE_INFERENCE = True


def _transformers_conv1d() -> type | None:
    """transformers' ``Conv1D`` class if transformers is already imported (never imports it)."""
    import sys

    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None) if module is not None else None


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The SingLoRA layer kind of a module, or None if it cannot be adapted."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return "conv"
    if isinstance(module, nn.Embedding):
        return "embedding"
    conv1d = _transformers_conv1d()
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d_t"
    return None


def adaptable_kind(module: nn.Module) -> LayerKind:
    """``layer_kind(module)``, or ``SingLoRAError`` when SingLoRA cannot adapt it (unknown type, grouped conv)."""
    kind = layer_kind(module)
    if kind is None:
        raise SingLoRAError(f"{type(module).__name__} cannot be adapted (Linear, Conv1D, Conv1d/2d, Embedding)")
    if kind == "conv" and module.groups != 1:
        raise SingLoRAError(f"{module!r} has groups={module.groups}; SingLoRA supports groups=1 only")
    return kind


def weight_shape(module: nn.Module) -> tuple[int, ...]:
    """Logical shape of a module's weight. Linear layers report ``(out_features, in_features)``, which also holds
    for quantized ones whose stored weight is packed (bitsandbytes 4-bit stores ``(out * in / 2, 1)`` uint8)."""
    if isinstance(module, nn.Linear):
        return (module.out_features, module.in_features)
    return tuple(module.weight.shape)


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at dotted ``name`` under ``root`` (replacing what is there)."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def adapter_dtype(weight: Tensor) -> torch.dtype:
    """The dtype of an adapter on ``weight``: low-precision (fp16/bf16) or quantized bases get float32, as PEFT
    does; float32 and float64 stay as they are."""
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


class SingLoRAAdapter(nn.Module):
    """One named adapter on one layer: ``A`` (n, r), the ramp step ``t``, and its constants.

    Attributes:
        A: ``(n, r)`` trainable matrix, n = max(d_out, d_in).
        ramp_step: 0-dim int64 buffer, ``t``: optimizer steps taken.
        in_run: True during a training run (``SingLoRAModel.set_training_run``: ``bind_optimizer``, the Trainer
            integration, or a hand-written loop calling ``advance_ramp()`` after each step): a training-mode forward
            then computes optimizer step ``t + 1`` and runs at its ``u``, so step k runs at ``u = min(k / T, 1)`` and
            step 1 trains (at ``u = 0``, ``A``'s gradient is exactly 0). At rest (eval mode, merging, export, saved
            files) ``u`` is the last step's, ``min(t / T, 1)``: an untrained adapter is the base model (the paper's
            ``u(0) = 0``), and a trained one keeps the ``u`` its last step trained with.
        scale: ``s``. ramp_up_steps: ``T``, the ramp length in optimizer steps (0 = no ramp; ``None`` while it is
            a fraction of a run whose total is unknown: u = 0).
    """

    def __init__(
        self, n: int, r: int, *, scale: float, ramp_up_steps: int | None, dropout: float, init: str,
        init_std: float | None, device: torch.device | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(n, r, device=device, dtype=dtype))
        self.register_buffer("ramp_step", torch.zeros((), dtype=torch.long, device=device))
        self.scale = scale
        self.ramp_up_steps = ramp_up_steps
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.init, self.init_std = init, init_std
        self.reset_parameters()
        self.merged_coefficient: float | None = None  # c folded into the base weight, while merged
        self.in_run = False  # see the class docstring; not saved (a run sets it when it starts)

    def reset_parameters(self) -> None:
        """Initialise ``A`` (``init`` / ``init_std``) and restart the ramp (``t = 0``, so u = 0). Also what FSDP2's
        meta-device recipe calls after ``to_empty()``, which leaves both uninitialised."""
        init_A(self.A, self.init, self.init_std)
        with torch.no_grad():
            self.ramp_step.zero_()

    def ramp_value(self, in_step: bool = False) -> Tensor:
        """``u = min(t / T, 1)``: 0-dim tensor (float32, or float64 for a float64 ``A``), no host sync.

        ``in_step``: for a forward computing an optimizer step (``in_step_forward``): step ``t + 1`` (step 1 at
        ``u = 1 / T``; at 0 ``A`` gets no gradient). At rest (inference, merge, export): the last step's, ``t``."""
        step = self.ramp_step + 1 if in_step else self.ramp_step
        return ramp_value(step, self.ramp_up_steps, torch.promote_types(self.A.dtype, torch.float32))

    def in_step_forward(self) -> bool:
        """Whether a forward now computes an optimizer step: training mode, during a run (``in_run``)."""
        return self.training and self.in_run

    def coefficient(self, in_step: bool = False) -> Tensor:
        """``c = s * u``: 0-dim tensor, no host sync; ``in_step`` as in ``ramp_value``."""
        return self.ramp_value(in_step) * self.scale

    def extra_repr(self) -> str:
        return f"n={self.A.shape[0]}, r={self.A.shape[1]}, scale={self.scale:g}, ramp_up_steps={self.ramp_up_steps}"


def _inference_coefficient(adapter: SingLoRAAdapter) -> float:
    """``c = s * u(t)`` as a Python number for the in-place inference path, read from the device only when the
    ramp step, ``T`` or ``s`` changed since the last call (a decoding step runs each layer's adapter for a few
    tokens: the three small tensor ops of ``coefficient()`` were a visible share of it)."""
    step = adapter.ramp_step
    key = (step.data_ptr(), step._version, adapter.ramp_up_steps, adapter.scale)
    cached = adapter.__dict__.get("_inference_coefficient")
    if cached is None or cached[0] != key:
        cached = (key, float(adapter.coefficient()))
        adapter.__dict__["_inference_coefficient"] = cached
    return cached[1]


class SingLoRALayer(nn.Module):
    """Wraps ``base_layer`` (Linear, transformers Conv1D, Conv1d/2d, Embedding) with named SingLoRA adapters."""

    def __init__(self, base_layer: nn.Module, *, kind: str | None = None,
                 dims: tuple[int, int] | None = None) -> None:
        """``kind`` and ``dims`` (``(d_out, d_in)``) are for subclasses whose base is not a layer (an expert
        parameter: ``experts.py``); otherwise they come from ``base_layer``."""
        super().__init__()
        kind = kind or adaptable_kind(base_layer)
        self.base_layer = base_layer
        self.kind: LayerKind = kind
        self.d_out, self.d_in = dims or matrix_dims(kind, weight_shape(base_layer))
        self.singlora = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.selection: Selection | None = None  # the owner's mixed-batch selection (attached once)
        self.register_module("bank", None)  # banked storage (create_bank), for an AdapterBank
        self._shared_weight: list[nn.Parameter] = []  # a tied weight set aside while merged (``untie_weight``)

    @property
    def weight(self) -> Tensor:
        """The base weight (so code that reads ``module.weight`` keeps working)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def add_adapter(self, name: str, r: int, **kwargs) -> None:
        """Add adapter ``name`` with rank ``r``; kwargs go to ``SingLoRAAdapter``."""
        n = adapter_rows(self.d_out, self.d_in, r)
        weight = self.base_layer.weight
        self.singlora[name] = self._new_adapter(n, r, device=weight.device, dtype=adapter_dtype(weight), **kwargs)

    def _new_adapter(self, n: int, r: int, **kwargs: Any) -> SingLoRAAdapter:
        """The adapter object of this kind of layer (expert stacks override it)."""
        return SingLoRAAdapter(n, r, **kwargs)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge([name])
        del self.singlora[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    # ---- math -------------------------------------------------------------------------------------------------

    def _merge_dtype(self) -> torch.dtype:
        """float32, or float64 for a float64 base: merging never computes below float32."""
        return torch.promote_types(self.base_layer.weight.dtype, torch.float32)

    def get_delta_weight(self, name: str, coefficient: float | None = None) -> Tensor:
        """Dense update of adapter ``name`` in the base weight's layout, in float32 (float64 for float64 bases).

        ``coefficient`` defaults to the adapter's current ``c = s * u(t)``.
        """
        adapter = self.singlora[name]
        dtype = self._merge_dtype()
        c = adapter.coefficient().to(dtype) if coefficient is None else coefficient
        return delta_weight(adapter.A.detach().to(dtype), self.kind, weight_shape(self.base_layer), c)

    def _update(self, x: Tensor, A: Tensor, coefficient: Tensor | float, dropout: nn.Module | None) -> Tensor:
        """Factored update output of ``A`` (``(n, r)``) with ``c = coefficient`` for input ``x``; same shape as
        ``base_layer(x)``."""
        if self.kind == "embedding":  # (..., ) ids -> (..., dim)
            base = self.base_layer
            return embedding_update(x, A, self.d_out, self.d_in, coefficient,
                                    scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)
        x = x.to(A.dtype) if dropout is None else dropout(x.to(A.dtype))
        if self.kind == "conv":  # (N, in, *S) -> (N, out, *S')
            return conv_update(x, A, self.base_layer, coefficient)
        # linear / conv1d_t: (..., d_in) -> (..., r) -> (..., d_out)
        return factored_update(x, A, self.d_out, self.d_in, coefficient)

    def _add_update(self, result: Tensor, x: Tensor, A: Tensor, coefficient: Tensor | float,
                    dropout: nn.Module | None = None) -> Tensor:
        """``result`` plus the update of ``A`` for ``x``: in place when ``_accumulates``; or ``fused_linear``'s."""
        if isinstance(coefficient, Tensor):
            coefficient = coefficient.to(A.dtype)
        if self._accumulates(result, A.dtype, dropout):
            return add_factored_update_(result, x.to(A.dtype), A, self.d_out, self.d_in, coefficient)
        if trains_by_hand(self.kind, x, self.d_in) and adds_to(result, x, A):
            adapter_x = x if dropout is None else dropout(x)
            return add_linear_update(result, adapter_x, A, coefficient, d_out=self.d_out, d_in=self.d_in)
        return result + self._update(x, A, coefficient, dropout).to(result.dtype)

    def _add_shared(self, result: Tensor, x: Tensor, found: Shared) -> Tensor:
        """``result`` plus the update of the adapter every example uses (``mixed.Shared``)."""
        dtype = found.At.dtype
        if self._accumulates(result, dtype):
            return add_update_(result, x if x.dtype == dtype else x.to(dtype), found.A_in, found.A_out,
                               found.coefficient)
        return self._add_update(result, x, found.At.T, found.coefficient)

    def _add_pooled(self, result: Tensor, x: Tensor, pooled: Pooled) -> Tensor:
        """``result`` plus the update when example ``b`` uses the adapter at ``pooled.pool[pooled.rows[b]]``
        (``functional.mixed_factored_update``). An input whose first dimension is ``k`` times the number of
        examples (beam search, sequences flattened example-major) repeats each example's rows."""
        pool, rows, coefficients = pooled
        if x.shape[0] % rows.shape[0]:
            raise SingLoRAError(f"{self.kind} layer: an input of {x.shape[0]} rows (first dimension) does not split "
                                f"into the {rows.shape[0]} examples of adapter_names")
        if x.shape[0] != rows.shape[0]:
            repeat = x.shape[0] // rows.shape[0]
            rows, coefficients = rows.repeat_interleave(repeat, 0), coefficients.repeat_interleave(repeat)
        if self.kind == "embedding":
            update = mixed_embedding_update(x, pool, rows, coefficients, self.d_out, self.d_in)
        elif self.kind == "conv":
            update = mixed_conv_update(x.to(pool.dtype), pool, rows, coefficients, self.base_layer)
        elif self._accumulates(result, pool.dtype):
            return mixed_factored_update(x.to(pool.dtype), pool, rows, coefficients, self.d_out, self.d_in, out=result)
        else:
            update = mixed_factored_update(x.to(pool.dtype), pool, rows, coefficients, self.d_out, self.d_in)
        return result + update.to(result.dtype)

    def _accumulates(self, result: Tensor, dtype: torch.dtype, dropout: nn.Module | None = None) -> bool:
        """Whether the update may be added into ``result`` in place: a Linear / Conv1D output of the adapter's
        dtype, contiguous, with no gradient to keep and no active dropout, in eval mode (inference: ``u`` at rest,
        the same as a run's reentrant checkpointing recomputes); never while compiling (inductor fuses the add)."""
        return (IN_PLACE_INFERENCE and self.kind in ("linear", "conv1d_t") and not torch.is_grad_enabled()
                and not self.training
                and result.dtype == dtype and result.is_contiguous() and not torch.compiler.is_compiling()
                and (dropout is None or isinstance(dropout, nn.Identity) or not dropout.training))

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        selection = self.selection
        if selection is not None and selection.active and not self.disabled:  # a mixed-adapter call (mixed.py)
            return self._forward_selected(selection.for_layer(self), x, *args, **kwargs)
        pending = [] if self.disabled else [
            self.singlora[name] for name in self.active_adapters if name not in self.merged_adapters]
        if (pending and not args and not kwargs and trains_by_hand(self.kind, x, self.d_in)
                and computes_base(self.base_layer, x, pending[0].A)):  # training: base and update in one node
            adapter, base = pending.pop(0), self.base_layer
            adapter_x, c = adapter.dropout(x), adapter.coefficient(adapter.in_step_forward())
            result = linear_with_update(adapter_x, adapter.A, c, base.weight, base.bias, d_out=self.d_out,
                                        d_in=self.d_in, transposed=self.kind == "conv1d_t",
                                        base_x=None if adapter_x is x else x)
        else:
            result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            if self.merged_adapters:
                raise SingLoRAError("adapters are merged into the weights; unmerge() before disabling them")
            return result
        for adapter in pending:
            in_place = self._accumulates(result, adapter.A.dtype, adapter.dropout)
            coefficient = _inference_coefficient(adapter) if in_place else adapter.coefficient(
                adapter.in_step_forward())  # a run's training forward: the step being taken
            result = self._add_update(result, x, adapter.A, coefficient, adapter.dropout)
        return result

    def _forward_selected(self, found: Shared | Pooled | None, x: Tensor, *args, **kwargs) -> Tensor:
        """The forward of a mixed-adapter call: ``found`` is what its examples use here (``Selection.for_layer``).
        One adapter for all, on a fused bank (``banked.LayerBank.fuse``): one GEMM for the base and first product."""
        if (isinstance(found, Shared) and self.bank is not None and self.bank.fused is not None and not args
                and not kwargs and not isinstance(found.coefficient, Tensor) and x.dtype == found.At.dtype
                and IN_PLACE_INFERENCE and not torch.is_grad_enabled() and not torch.compiler.is_compiling()):
            fused = self.bank.fused_forward(self.base_layer, x, found)
            if fused is not None:
                return fused
        result = self.base_layer(x, *args, **kwargs)
        if found is None:  # no example of this batch uses an adapter of this layer
            return result
        if isinstance(found, Shared):
            return self._add_shared(result, x, found)
        return self._add_pooled(result, x, found)

    # ---- banked storage (bank.AdapterBank) -----------------------------------------------------------------------

    def create_bank(self, *, rows: int, width: int, ids: int, fuse: bool = False) -> None:
        """Allocate banked storage (``banked.LayerBank``: ``rows`` pool rows, ``width`` rows per adapter, ``ids``
        adapter ids) for frozen adapters of the ``adapter_dtype`` on this layer's device; ``fuse``: a plain
        ``nn.Linear`` of that dtype runs one-adapter steps as one GEMM (``LayerBank.fuse``)."""
        weight = self.base_layer.weight
        self.bank = LayerBank(max(self.d_out, self.d_in), rows=rows, width=width, ids=ids,
                              dtype=adapter_dtype(weight), device=weight.device)
        if fuse and type(self.base_layer) is nn.Linear and weight.dtype == self.bank.pool.dtype:
            self.bank.fuse(self.base_layer)

    def set_banked(self, adapter_id: int, A: Tensor, coefficient: float) -> None:
        """Hold the frozen adapter ``A`` (``(n, r)``) with ``c = coefficient`` under ``adapter_id`` in the bank."""
        self.bank.put(adapter_id, A.to(self.bank.pool), coefficient)

    def reset_banked(self, adapter_id: int) -> None:
        """Free what ``adapter_id`` holds in the bank (no-op if nothing)."""
        self.bank.remove(adapter_id)

    # ---- merging ----------------------------------------------------------------------------------------------

    def _to_merge(self, names: Iterable[str] | None) -> list[str]:
        """The adapters (default: active) not merged yet; refuses to merge into quantized (non-float) base weights."""
        todo = [n for n in (self.active_adapters if names is None else names) if n not in self.merged_adapters]
        if todo and not self.base_layer.weight.is_floating_point():
            raise SingLoRAError(
                f"cannot merge into a {self.base_layer.weight.dtype} (quantized) base weight; dequantize first "
                "(torch_singlora.integrations.quantized.dequantize_and_merge) or keep the adapter unmerged"
            )
        return todo

    def check_merge(self, names: Iterable[str] | None = None) -> None:
        """Raise ``SingLoRAError`` if merging ``names`` (default: active) would give NaN/Inf; changes nothing."""
        merged = self.base_layer.weight.detach().to(self._merge_dtype())
        for name in self._to_merge(names):
            merged = merged + self.get_delta_weight(name)
        if not torch.isfinite(merged).all():
            raise SingLoRAError("merging gives non-finite weights; nothing was merged")

    def merge(self, names: Iterable[str] | None = None, safe: bool = False) -> None:
        """Fold adapters (default: the active ones) into the base weight, in float32; already merged: no-op.

        ``safe=True`` first checks the result (``check_merge``) and refuses NaN/Inf, leaving the weight unchanged.
        """
        if safe:
            self.check_merge(names)
        weight = self.base_layer.weight
        for name in self._to_merge(names):
            adapter = self.singlora[name]
            coefficient = float(adapter.coefficient())
            merged = weight.data.to(self._merge_dtype()) + self.get_delta_weight(name, coefficient)
            weight.data.copy_(merged.to(weight.dtype))
            adapter.merged_coefficient = coefficient
            self.merged_adapters.append(name)

    def untie_weight(self) -> None:
        """Give ``base_layer`` a copy of its weight, which it shares with another module (tied embeddings), so that a
        merge changes this layer alone; ``unmerge()`` of the last merged adapter puts the shared weight back."""
        weight = self.base_layer.weight
        self._shared_weight = [weight]
        self.base_layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)

    @property
    def untied(self) -> bool:
        """Whether ``base_layer`` holds its own copy of a tied weight (``untie_weight``)."""
        return bool(self._shared_weight)

    def unmerge(self, names: Iterable[str] | None = None) -> None:
        """Subtract merged adapters (default: all merged) from the base weight, in float32; not merged: no-op."""
        weight = self.base_layer.weight
        for name in list(reversed(self.merged_adapters) if names is None else names):
            if name not in self.merged_adapters:
                continue
            adapter = self.singlora[name]
            delta = self.get_delta_weight(name, adapter.merged_coefficient)
            weight.data.copy_((weight.data.to(delta.dtype) - delta).to(weight.dtype))
            adapter.merged_coefficient = None
            self.merged_adapters.remove(name)
        if not self.merged_adapters and self._shared_weight:  # tied again, to the untouched shared weight
            self.base_layer.weight = self._shared_weight.pop()

    def extra_repr(self) -> str:
        return f"kind={self.kind}, d_out={self.d_out}, d_in={self.d_in}, active={self.active_adapters}"
