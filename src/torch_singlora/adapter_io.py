"""A ``SingLoRAModel``'s adapters to and from files: saving one, and loading one all or nothing. The files' format
is ``adapter_file.py``'s; this is the transaction around it (what the model holds, what it expects, the roll-back).
``SingLoRAModel.save_adapter`` / ``load_adapter`` / ``load_adapter_in_place`` / ``adapter_state_dict`` are these
functions (``model`` is the ``SingLoRAModel``; it is not imported here, which imports this module).

    model.save_adapter("out/")                        # adapter_config.json + adapter_model.safetensors
    model.load_adapter("out/", "other")               # checked against the model first; on error, nothing changed
    model.load_adapter_in_place("ckpt/", "default")   # same parameter objects (an optimizer holding them stays valid)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .adapter_file import A_SUFFIX, WEIGHTS_FILE, as_directory, read_adapter_config, read_adapter_for
from .adapter_file import read_adapter_tensors, write_adapter
from .errors import SingLoRAError
from .layers import SingLoRAAdapter
from .names import check_adapter_name
from .untrusted import check_finite


def adapter_state_dict(model: Any, adapter_name: str) -> dict[str, torch.Tensor]:
    """The tensors of one adapter under the documented file keys (the live parameters, not copies)."""
    tensors: dict[str, torch.Tensor] = {}
    for module_name, module in model.adapter_modules(adapter_name).items():
        if isinstance(module, SingLoRAAdapter):
            tensors[f"{module_name}.{A_SUFFIX}"] = module.A
        else:
            tensors.update({f"{module_name}.{key}": value for key, value in module.state_dict().items()})
    return tensors


def save_adapter(model: Any, directory: str | os.PathLike, adapter_name: str | None = None,
                 dtype: str | torch.dtype | None = None) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` of one adapter (default: ``default_adapter()``).

    ``dtype``: ``"float32"``, ``"bfloat16"`` or ``"float16"`` to store the tensors in (smaller files; loading
    casts back); ``None`` keeps the training dtype. Values beyond the dtype's range are refused.
    """
    name = model.default_adapter() if adapter_name is None else adapter_name
    check_adapter_name(name)
    as_directory(directory)
    model.require_adapters([name])
    base_name = getattr(getattr(model.model, "config", None), "name_or_path", None) or None
    write_adapter(directory, model.adapter_state_dict(name), model.configs[name], model.get_ramp_step(name), base_name,
                  dtype)


def load_adapter(model: Any, directory: str | os.PathLike, adapter_name: str = "default",
                 is_trainable: bool = True) -> None:
    """Add adapter ``adapter_name`` from files written by ``save_adapter`` and make it active.

    Everything is validated first (config, keys, shapes, dtypes, values against this model); on any error the
    model is left exactly as it was (modules, tensors, ``requires_grad`` flags).
    """
    if not isinstance(is_trainable, bool):
        raise SingLoRAError(f"is_trainable={is_trainable!r} must be a bool")
    check_adapter_name(adapter_name)
    directory = as_directory(directory)
    config, meta = read_adapter_config(directory)
    if adapter_name in model.configs:
        raise SingLoRAError(f"adapter {adapter_name!r} already exists; delete_adapter() it first")
    plan, tensors = read_adapter_for(model.model, directory, config)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.add_adapter(adapter_name, config, modules=list(plan.modules))
        _copy_in(model, adapter_name, tensors, meta["ramp_step"], directory / WEIGHTS_FILE)
    except BaseException:  # roll back: the model is as it was
        if adapter_name in model.configs:
            model.delete_adapter(adapter_name)
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        raise
    model.set_adapter(adapter_name)
    if not is_trainable:
        for module in model.adapter_modules(adapter_name).values():
            module.requires_grad_(False)


def load_adapter_in_place(model: Any, directory: str | os.PathLike, adapter_name: str) -> None:
    """Copy a saved adapter's tensors and ramp step into the existing adapter ``adapter_name`` (same parameter
    objects, so an optimizer holding them stays valid: resuming). The files must fit that adapter exactly (keys,
    shapes, dtypes, as its own config gives them); everything is checked before anything is copied."""
    check_adapter_name(adapter_name)
    directory = as_directory(directory)
    model.require_adapters([adapter_name])
    saved_config, meta = read_adapter_config(directory)
    own = {key: (tuple(value.shape), value.dtype) for key, value in model.adapter_state_dict(adapter_name).items()}
    tensors = read_adapter_tensors(directory / WEIGHTS_FILE, own)
    if model.get_ramp_up_steps(adapter_name) is None and saved_config.total_steps is not None:
        model.set_total_steps(saved_config.total_steps, adapter_name)  # the run's length, known when it was saved
    _copy_in(model, adapter_name, tensors, meta["ramp_step"], directory / WEIGHTS_FILE)


def _copy_in(model: Any, adapter_name: str, tensors: dict[str, torch.Tensor], ramp_step: int, path: Path) -> None:
    """Copy checked ``tensors`` into the adapter's parameters (same objects), cast to their dtypes, and set its
    ramp step. Values that do not fit a parameter's dtype are refused before anything is copied."""
    targets = model.adapter_state_dict(adapter_name)
    check_finite(path, tensors, {key: target.dtype for key, target in targets.items()})
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(tensors[key].to(target.dtype))
    model.set_ramp_step(ramp_step, adapter_name)
