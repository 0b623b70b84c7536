"""The per-module plan of one adapter on one model, derived once from the config and the model's modules.

``plan_adapter(model, config)`` answers, without changing the model: which modules get an ``A`` and of what shape,
with which scale; which modules train fully (``modules_to_save``) and which tensors they hold; and the ramp length
``T``. Injection (``SingLoRAModel.add_adapter``), the adapter file's expected keys and shapes, and the exact
export all read this one plan, so ``r <= n`` and the other per-module rules live here only.

    plan = plan_adapter(base_model, config)
    plan.modules["encoder.layer.0.attention.self.query"]
    # ModulePlan(kind='linear', weight_shape=(384, 384), d_out=384, d_in=384, r=8, scale=1.0), .n == 384

Expert parameters named by ``target_parameters`` (``experts.py``) are planned too, under ``<module>.<parameter>``,
with kind ``"experts"`` and ``A`` of shape ``(experts, n, r)`` (``ModulePlan.a_shape``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import SingLoRAConfig
from .errors import SingLoRAError
from .experts import expert_layout, owner_of
from .functional import LayerKind, adapter_rows, matrix_dims
from .layers import adaptable_kind, weight_shape
from .names import resolve

TensorSpec = tuple[tuple[int, ...], torch.dtype]  # (shape, dtype)


@dataclass(frozen=True)
class ModulePlan:
    """One adapted module: its kind, the base weight's logical shape and matrix view, and its adapter's constants.

    Attributes:
        kind: Layer kind (``functional.LAYER_KINDS``). weight_shape: logical shape of the base weight.
        d_out, d_in: The matrix view of the weight (``functional.matrix_dims``). r: rank. scale: ``s``.
    """

    kind: LayerKind
    weight_shape: tuple[int, ...]
    d_out: int
    d_in: int
    r: int
    scale: float
    experts: int = 0  # kind "experts" (a 3-D expert parameter, ``experts.py``): the number of experts

    @property
    def n(self) -> int:
        """Rows of ``A``: ``max(d_out, d_in)``."""
        return max(self.d_out, self.d_in)

    @property
    def a_shape(self) -> tuple[int, ...]:
        """Shape of ``A``: ``(n, r)``, or ``(experts, n, r)`` for an expert parameter."""
        return (self.experts, self.n, self.r) if self.experts else (self.n, self.r)


@dataclass(frozen=True)
class AdapterPlan:
    """Everything one adapter needs from the model it goes on.

    Attributes:
        modules: ``{module name: ModulePlan}`` of the adapted modules, in the model's module order.
        saved_modules: Names of the ``modules_to_save`` modules.
        saved_tensors: ``{"<module>.<tensor>": (shape, dtype)}``: the state of each ``modules_to_save`` module.
        ramp_up_steps: ``T`` in optimizer steps; ``None`` while a fractional ``ramp_up_steps`` waits for the
            run's ``total_steps``.
    """

    modules: dict[str, ModulePlan]
    saved_modules: tuple[str, ...]
    saved_tensors: dict[str, TensorSpec]
    ramp_up_steps: int | None


def module_plan(name: str, module: nn.Module, r: int, scale: float) -> ModulePlan:
    """The plan of one module (a plain layer, or a ``SingLoRALayer`` already holding other adapters): its kind and
    dims, with ``1 <= r <= n`` checked; ``SingLoRAError`` naming the module otherwise."""
    base = getattr(module, "base_layer", module)
    try:
        kind = adaptable_kind(base)
        shape = weight_shape(base)
        d_out, d_in = matrix_dims(kind, shape)
        adapter_rows(d_out, d_in, r)
    except SingLoRAError as exc:
        raise SingLoRAError(f"module {name!r}: {exc}") from None
    return ModulePlan(kind, shape, d_out, d_in, r, scale)


def expert_plan(name: str, model: nn.Module, r: int, scale: float) -> ModulePlan:
    """The plan of expert parameter ``name`` (``<module>.<parameter>``, see ``experts.py``): ``A`` is
    ``(experts, n, r)``; ``weight_shape`` is the stored ``(E, d_out, d_in)`` or ``(E, d_in, d_out)``."""
    owner, parameter_name = owner_of(model, name)
    experts, d_out, d_in, _ = expert_layout(owner, parameter_name)
    try:
        adapter_rows(d_out, d_in, r)
    except SingLoRAError as exc:
        raise SingLoRAError(f"expert parameter {name!r}: {exc}") from None
    return ModulePlan("experts", tuple(getattr(owner, parameter_name).shape), d_out, d_in, r, scale, experts)


def plan_adapter(model: nn.Module, config: SingLoRAConfig, modules: list[str] | None = None) -> AdapterPlan:
    """The plan of ``config`` on ``model`` (a base model, or one already holding SingLoRA adapters); changes
    nothing. Raises ``SingLoRAError`` for any pattern that matches nothing, an unadaptable module or ``r > n``.

    Which modules: ``names.resolve(model, config, modules)``, once. ``modules``: adapt exactly these names
    (modules, or ``<module>.<parameter>`` expert parameters), not those ``config.target_modules`` /
    ``target_parameters`` select (an adapter file's keys name them; its patterns are then metadata, never matched).
    Each must be a module or expert parameter of ``model`` outside ``modules_to_save``."""
    config.validate()
    selected = resolve(model, config, modules)
    targets, parameters, saved = selected.modules, selected.parameters, selected.saved
    if parameters and config.dropout:  # also for expert parameters named by a file's keys, not only the config's
        raise SingLoRAError(f"dropout={config.dropout!r} cannot apply to expert parameters ({parameters[0]!r}: the "
                            "update is folded into the expert weights for the module's own forward); use dropout=0")
    modules_plan = {
        name: module_plan(name, model.get_submodule(name), config.rank_for(name), config.scale_for(name))
        for name in targets
    }
    for name in parameters:
        modules_plan[name] = expert_plan(name, model, config.rank_for(name), config.scale_for(name))
    tensors: dict[str, TensorSpec] = {}
    for name in saved:
        module = model.get_submodule(name)
        original = getattr(module, "original_module", module)
        for key, value in original.state_dict().items():
            tensors[f"{name}.{key}"] = (tuple(value.shape), value.dtype)
    return AdapterPlan(modules_plan, tuple(saved), tensors, config.resolve_ramp_up_steps())
