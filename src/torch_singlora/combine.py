"""Weighted sum of SingLoRA adapters as one new adapter, exactly.

For adapters i on one layer, with current coefficients ``c_i = s_i * u_i`` and weights ``w_i >= 0``::

    sum_i w_i c_i A_i[:d_out] @ A_i[:d_in].T  ==  A[:d_out] @ A[:d_in].T
    A = [sqrt(w_1 c_1) A_1 | sqrt(w_2 c_2) A_2 | ...]

so the new adapter has ``A`` (n, sum of ranks), scale 1 (``alpha = r``) and no ramp (u = 1): the ramps of the
sources are folded in. Modules that only some sources adapt get only those columns (``rank_pattern``).

Negative weights cannot be exact: a square SingLoRA update ``c A A^T`` is positive semi-definite, and a weighted
sum with a negative weight is in general indefinite, which no single ``A A^T`` equals. ``combine_adapters``
refuses them. To subtract adapters, export each one to plain LoRA (``torch_singlora.export``), where the sign goes into
``lora_B`` exactly, and combine there (e.g. PEFT ``add_weighted_adapter(..., combination_type="cat")``).
"""

from __future__ import annotations

import math
import re

import torch

from .config import SingLoRAConfig, rank_and_pattern
from .errors import SingLoRAError
from .model import SingLoRAModel


def combine_adapters(model: SingLoRAModel, weights: dict[str, float], new_name: str) -> SingLoRAConfig:
    """Add adapter ``new_name`` whose update is ``sum_i weights[i] * update(adapter i)``, exactly; returns its config.

    Args:
        model: The model holding the source adapters (unchanged; the new adapter is added, not activated).
        weights: ``{adapter name: weight >= 0}``, at least one positive weight.
        new_name: Name of the new adapter.
    """
    if not isinstance(weights, dict) or not weights:
        raise SingLoRAError(f"weights={weights!r} must be a non-empty dict of {{adapter name: weight}}")
    model.require_adapters(list(weights))
    for name, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise SingLoRAError(f"weights[{name!r}]={weight!r} must be a finite number")
        if weight < 0:
            raise SingLoRAError(
                f"weights[{name!r}]={weight} < 0: a weighted sum with negative weights is indefinite and no single "
                "A @ A.T equals it; export the adapters to plain LoRA (torch_singlora.export) and combine them there"
            )
        if model.configs[name].modules_to_save:
            raise SingLoRAError(f"adapter {name!r} has modules_to_save; combining fully trained modules is not defined")
    if not any(weight > 0 for weight in weights.values()):
        raise SingLoRAError(f"weights={weights!r}: at least one weight must be > 0")

    columns: dict[str, torch.Tensor] = {}  # module name -> combined A (n, sum of ranks)
    for module_name, layer in model.singlora_layers():
        parts = []
        for name, weight in weights.items():
            if name in layer.singlora and weight > 0:
                adapter = layer.singlora[name]
                parts.append(adapter.A.detach() * torch.sqrt(adapter.coefficient().to(adapter.A.dtype) * weight))
        if parts:
            columns[module_name] = torch.cat(parts, dim=1)
    r, pattern = rank_and_pattern({name: A.shape[1] for name, A in columns.items()})
    config = SingLoRAConfig(
        r=r, alpha=float(r), target_modules="|".join(re.escape(name) for name in columns), ramp_up_steps=0,
        rank_pattern=pattern, alpha_pattern={key: float(rank) for key, rank in pattern.items()},
    )
    model.add_adapter(new_name, config)
    with torch.no_grad():
        for module_name, A in columns.items():
            model.model.get_submodule(module_name).singlora[new_name].A.copy_(A)
    return config
