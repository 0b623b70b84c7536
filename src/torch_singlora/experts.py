"""SingLoRA on mixture-of-experts weights stored as 3-D parameters (``target_parameters``).

transformers 5 stores the experts of Qwen3-MoE, Mixtral, gpt-oss and others as one parameter per projection,
``(E, d_out, d_in)`` (``F.linear(x, W[e])``), or ``(E, d_in, d_out)`` (``x @ W[e]``) when the experts module is
``is_transposed`` (gpt-oss; the attribute ``transformers.integrations.moe.use_experts_implementation`` sets, which
PEFT reads too). They are not ``nn.Linear`` modules, so ``target_modules`` never reaches them; like PEFT's
``LoraConfig.target_parameters``, ``SingLoRAConfig.target_parameters`` names them (``"mlp.experts.gate_up_proj"``:
a full ``<module>.<parameter>`` name or a dotted suffix of one).

One ``A`` per expert: ``A`` is ``(E, n, r)``, ``n = max(d_out, d_in)``, and expert ``e`` gets

    W[e] = W0[e] + c * A[e, :d_out] @ A[e, :d_in].T          (c = s * u(t), the same for all experts)

(transposed for ``is_transposed`` stacks). Experts are separate functions that the router sends different tokens
to; a single ``A`` shared by all experts would give every expert the same update, and PEFT's ``target_parameters``
LoRA also has one pair of factors per expert, so this is the form its files can hold (exactly: see ``export``).
Parameters per adapted stack: ``E * n * r`` (PEFT LoRA: ``E * (d_in + d_out) * r``).

Forward: the experts module's own code runs (routing, activation, any ``experts_implementation``) with the adapted
parameter replaced, for that call only, by ``W0 + dW`` (``torch.func.functional_call``), built once per forward
with one batched product. That costs one stack-sized tensor per adapted parameter while the module runs, as PEFT's
``target_parameters`` does; a factored per-expert forward would need each architecture's routing code. Dropout on
the input cannot be expressed this way (as in PEFT): ``dropout > 0`` is refused for expert parameters.

Module layout (the model's ``mlp.experts`` becomes a ``SingLoRAExperts``)::

    mlp.experts                      SingLoRAExperts
    mlp.experts.base_layer           the original experts module (its parameters, unchanged keys below it)
    mlp.experts.gate_up_proj         SingLoRAExpertParameter: .singlora[<adapter>].A (E, n, r), .ramp_step
    mlp.experts.down_proj            SingLoRAExpertParameter

so adapter files key ``A`` as ``<module>.<parameter>.singlora_A``, e.g. ``model.layers.0.mlp.experts.gate_up_proj
.singlora_A``. A ``SingLoRAExpertParameter`` is a ``SingLoRALayer``: adapters, activation, the ramp, merging and
unmerging are the same code as for every other layer.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn

from .errors import SingLoRAError
from .functional import delta_matrix, init_A
from .layers import SingLoRAAdapter, SingLoRALayer, set_submodule


class ExpertAdapter(SingLoRAAdapter):
    """``SingLoRAAdapter`` of an expert stack: ``A`` is ``(E, n, r)``, each expert's slice initialised like a
    layer's ``A`` (``init``, e.g. ``N(0, 1/n)``)."""

    def __init__(self, num_experts: int, n: int, r: int, *, init: str, init_std: float | None,
                 device: torch.device | None = None, dtype: torch.dtype | None = None, **kwargs: Any) -> None:
        super().__init__(n, r, init=init, init_std=init_std, device=device, dtype=dtype, **kwargs)
        self.A = nn.Parameter(torch.empty(num_experts, n, r, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert's ``(n, r)`` slice of ``A`` initialised like a layer's ``A``, and t = 0 (FSDP2's
        meta-device recipe calls this too). ``SingLoRAAdapter.__init__`` calls it on its 2-D ``A`` first."""
        for expert in self.A.data.view(-1, *self.A.shape[-2:]):
            init_A(expert, self.init, self.init_std)
        with torch.no_grad():
            self.ramp_step.zero_()

    def extra_repr(self) -> str:
        return f"experts={self.A.shape[0]}, " + super().extra_repr()


class _ParameterView(nn.Module):
    """``.weight`` is the adapted parameter of the experts module, read at each access (so ``model.to()`` and
    loading keep working); the experts module is not registered here, so it appears once in the state dict."""

    def __init__(self, owner: nn.Module, parameter_name: str) -> None:
        super().__init__()
        object.__setattr__(self, "owner", owner)
        self.parameter_name = parameter_name

    @property
    def weight(self) -> Tensor:
        return getattr(self.owner, self.parameter_name)

    def extra_repr(self) -> str:
        return f"{type(self.owner).__name__}.{self.parameter_name}"


def expert_layout(module: nn.Module, parameter_name: str) -> tuple[int, int, int, bool]:
    """``(num_experts, d_out, d_in, transposed)`` of ``module.<parameter_name>``: ``(E, d_out, d_in)``, or
    ``(E, d_in, d_out)`` when the module is ``is_transposed``. Raises ``SingLoRAError`` for anything but a
    floating-point 3-D parameter."""
    parameter = getattr(module, parameter_name, None)
    if not isinstance(parameter, nn.Parameter) or parameter.dim() != 3 or not parameter.is_floating_point():
        got = tuple(parameter.shape) if isinstance(parameter, Tensor) else type(parameter).__name__
        raise SingLoRAError(f"target parameter {parameter_name!r} of {type(module).__name__} must be a floating-point "
                            f"3-D nn.Parameter (num_experts, d_out, d_in), got {got}")
    num_experts, first, second = parameter.shape
    transposed = bool(getattr(module, "is_transposed", False))
    return (num_experts, second, first, True) if transposed else (num_experts, first, second, False)


class SingLoRAExpertParameter(SingLoRALayer):
    """The SingLoRA adapters of one expert-stack parameter (a ``SingLoRALayer`` of kind ``"experts"``).

    ``base_layer.weight`` is the parameter; ``get_delta_weight`` gives the update in its layout, so merging and
    unmerging are ``SingLoRALayer``'s. The forward is ``SingLoRAExperts``'s (``effective_weight``)."""

    def __init__(self, owner: nn.Module, parameter_name: str) -> None:
        num_experts, d_out, d_in, transposed = expert_layout(owner, parameter_name)
        super().__init__(_ParameterView(owner, parameter_name), kind="experts", dims=(d_out, d_in))
        self.num_experts, self.transposed = num_experts, transposed

    @property
    def bias(self) -> None:
        return None

    def _new_adapter(self, n: int, r: int, **kwargs: Any) -> ExpertAdapter:
        """An adapter whose ``A`` is ``(E, n, r)`` (``SingLoRALayer.add_adapter`` checks ``r`` and picks the dtype)."""
        return ExpertAdapter(self.num_experts, n, r, **kwargs)

    def _delta(self, A: Tensor, coefficient: Tensor | float) -> Tensor:
        """``(E, d_out, d_in)`` updates (``(E, d_in, d_out)`` for a transposed stack) from ``A`` ``(E, n, r)``."""
        delta = delta_matrix(A, self.d_out, self.d_in, coefficient)
        return delta.mT if self.transposed else delta

    def get_delta_weight(self, name: str, coefficient: float | None = None) -> Tensor:
        """Dense update of adapter ``name`` in the parameter's layout, float32 (float64 for float64 stacks)."""
        adapter = self.singlora[name]
        dtype = self._merge_dtype()
        c = adapter.coefficient().to(dtype) if coefficient is None else coefficient
        return self._delta(adapter.A.detach().to(dtype), c)

    def effective_weight(self) -> Tensor | None:
        """``W0 + sum of the active, unmerged adapters' updates`` (differentiable in ``A``), in ``W0``'s dtype; None
        when nothing is to be added (disabled, or every active adapter merged)."""
        names = [] if self.disabled else [n for n in self.active_adapters if n not in self.merged_adapters]
        if not names:
            return None
        weight = self.base_layer.weight
        total = weight.to(self._merge_dtype())
        for name in names:
            adapter = self.singlora[name]
            c = adapter.coefficient(adapter.in_step_forward()).to(total.dtype)
            total = total + self._delta(adapter.A.to(total.dtype), c)
        return total.to(weight.dtype)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise SingLoRAError("an expert parameter's adapters run inside SingLoRAExperts.forward, not on their own")

    def extra_repr(self) -> str:
        return (f"kind=experts, experts={self.num_experts}, d_out={self.d_out}, d_in={self.d_in}, "
                f"transposed={self.transposed}, active={self.active_adapters}")


class SingLoRAExperts(nn.Module):
    """Wraps an experts module (``base_layer``); one ``SingLoRAExpertParameter`` child per adapted parameter,
    registered under the parameter's name. ``forward`` runs ``base_layer``'s own forward with the adapted
    parameters replaced by their effective weights."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer

    def parameter_layers(self) -> dict[str, SingLoRAExpertParameter]:
        """``{parameter name: its adapters}``."""
        return {name: m for name, m in self.named_children() if isinstance(m, SingLoRAExpertParameter)}

    def adapt(self, parameter_name: str) -> SingLoRAExpertParameter:
        """The adapters of ``base_layer.<parameter_name>`` (created on first use)."""
        layers = self.parameter_layers()
        if parameter_name not in layers:
            if parameter_name in dict(self.named_children()) or hasattr(nn.Module, parameter_name):
                raise SingLoRAError(f"cannot adapt expert parameter {parameter_name!r}: the name is taken")
            self.add_module(parameter_name, SingLoRAExpertParameter(self.base_layer, parameter_name))
        return self.parameter_layers()[parameter_name]

    def release(self, parameter_name: str) -> None:
        """Drop the (adapter-less) layer of ``parameter_name``."""
        delattr(self, parameter_name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        layers = self.parameter_layers()
        if any(layer.selection is not None and layer.selection.active for layer in layers.values()):
            raise SingLoRAError("mixed-adapter batches (adapter_names=) do not support adapted expert parameters "
                                "(target_parameters); run one adapter at a time")
        weights = {name: w for name, layer in layers.items() if (w := layer.effective_weight()) is not None}
        if not weights:
            return self.base_layer(*args, **kwargs)
        return torch.func.functional_call(self.base_layer, weights, args, kwargs, strict=False)


# ---- the plan, unwrapping and the PEFT layout (which parameters: ``names.resolve``) ------------------------


def owner_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """``(module holding the parameter, parameter name)`` for a full expert parameter name, looking through a
    ``SingLoRAExperts`` wrapper."""
    owner_name, _, parameter_name = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    return (owner.base_layer if isinstance(owner, SingLoRAExperts) else owner), parameter_name


def adapt_parameter(model: nn.Module, name: str) -> SingLoRAExpertParameter:
    """The adapters of expert parameter ``name`` (``<module>.<parameter>``), wrapping its module in a
    ``SingLoRAExperts`` first if needed."""
    owner_name, _, parameter_name = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if not isinstance(owner, SingLoRAExperts):
        owner = SingLoRAExperts(owner)
        set_submodule(model, owner_name, owner)
    return owner.adapt(parameter_name)


def release_parameter(model: nn.Module, name: str) -> None:
    """Remove the (adapter-less) adapters of expert parameter ``name``; the original experts module goes back in
    place once none of its parameters is adapted."""
    owner_name, _, parameter_name = name.rpartition(".")
    wrapper = model.get_submodule(owner_name)
    wrapper.release(parameter_name)
    if not wrapper.parameter_layers():
        set_submodule(model, owner_name, wrapper.base_layer)


def peft_module_name(model: nn.Module, name: str, adapted: Iterable[str]) -> str:
    """Where stock PEFT's ``target_parameters`` LoRA puts the ``lora_A``/``lora_B`` of expert parameter ``name``:
    PEFT wraps one parameter per ``ParamWrapper``, nesting them in the module's parameter order, so the parameter
    registered first is the innermost (``<module>.base_layer.base_layer...``), one ``base_layer`` per adapted
    parameter of the same module registered after it."""
    owner, parameter_name = owner_of(model, name)
    owner_name = name.rpartition(".")[0]
    siblings = {n.rpartition(".")[2] for n in adapted if n.rpartition(".")[0] == owner_name}
    order = [p for p, _ in owner.named_parameters(recurse=False) if p in siblings]
    return owner_name + ".base_layer" * (len(order) - 1 - order.index(parameter_name))
