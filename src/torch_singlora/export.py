"""Exact export of a SingLoRA adapter to plain LoRA files that tools without this library load (SPEC section 4).

For every adapted module, ``dW = c * A[:d_out] @ A[:d_in].T`` (c = s * u(t), u folded in at the adapter's saved
step) is exactly a rank-r LoRA ``lora_B @ lora_A`` with ``lora_B = sqrt(c) A[:d_out]`` (d_out, r) and
``lora_A = sqrt(c) A[:d_in].T`` (r, d_in), written with ``lora_alpha = r`` so the loader's own scale is 1.
No SVD, no approximation (``functional.lora_factors``).

Formats (``export_lora(..., format=...)``):

``"peft"``
    ``adapter_config.json`` (``peft_type: LORA``) + ``adapter_model.safetensors`` with keys
    ``base_model.model.<module>.lora_A.weight`` (r, d_in) / ``lora_B.weight`` (d_out, r); Conv layers reshape
    them to ``(r, in, *k)`` / ``(out, r, 1, ...)``; Embedding layers use ``lora_embedding_A`` (r, num) and
    ``lora_embedding_B`` (dim, r); ``modules_to_save`` tensors as ``base_model.model.<module>.<tensor>``.
    Loads with ``peft.PeftModel.from_pretrained`` (and servers that read PEFT LoRA, e.g. vLLM).
``"diffusers"``
    ``pytorch_lora_weights.safetensors`` with keys ``<prefix>.<module>.lora_A.weight`` / ``lora_B.weight``
    (prefix ``unet`` by default), what ``pipe.save_lora_weights`` writes; loads with ``pipe.load_lora_weights``
    or ``unet.load_lora_adapter(..., prefix="unet")``.
``"kohya"``
    ``pytorch_lora_weights.safetensors`` with keys ``lora_unet_<module, dots as _>.lora_down.weight`` /
    ``.lora_up.weight`` / ``.alpha`` (= r): the layout of kohya-ss, ComfyUI and A1111, which diffusers' loader
    converts too. Module names go through the loaders' name heuristics, verified for SD UNet attention layers.
``"gguf"``
    ``adapter_model.gguf``: a GGUF LoRA adapter for llama.cpp / ollama / LM Studio on top of the base model's GGUF
    (Llama-family models; ``gguf_export``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

import torch
from torch import Tensor, nn

from .adapter_file import A_SUFFIX, CONFIG_FILE, WEIGHTS_FILE, read_adapter_config, read_adapter_for, save_safetensors
from .atomic import output_folder
from .config import rank_and_pattern
from .errors import SingLoRAError
from .experts import peft_module_name
from .functional import LayerKind, lora_factors, saved_coefficient
from .layers import SingLoRAAdapter, weight_shape
from .model import SingLoRAModel

ExportFormat = Literal["peft", "diffusers", "kohya", "gguf"]
EXPORT_FORMATS: tuple[str, ...] = ("peft", "diffusers", "kohya", "gguf")
DIFFUSERS_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass
class LoRAFactors:
    """Plain-LoRA factors of one adapted module: ``lora_B @ lora_A`` equals the SingLoRA update (matrix view).

    Attributes:
        kind: Layer kind (``functional.LAYER_KINDS``, or ``"experts"``). weight_shape: logical shape of the base
            weight. lora_A: ``(r, d_in)``. lora_B: ``(d_out, r)``; ``(E, r, d_in)`` / ``(E, d_out, r)`` for an
            expert parameter (one pair per expert).
        peft_module: Expert parameters only: the module path where PEFT's ``target_parameters`` LoRA keeps this
            pair (``experts.peft_module_name``).
    """

    kind: LayerKind
    weight_shape: tuple[int, ...]
    lora_A: Tensor
    lora_B: Tensor
    peft_module: str | None = None

    @property
    def rank(self) -> int:
        return self.lora_A.shape[-2]


@dataclass
class ExportedAdapter:
    """Everything an export writes: ``{module name: LoRAFactors}``, ``modules_to_save`` tensors
    (``{"<module>.<tensor>": tensor}``) and the base model's name, if known."""

    factors: dict[str, LoRAFactors]
    saved: dict[str, Tensor]
    base_model_name_or_path: str | None


def _factors(A: Tensor, kind: LayerKind, shape: tuple[int, ...], dims: tuple[int, int], coefficient: float,
             peft_module: str | None = None) -> LoRAFactors:
    """``dims``: ``(d_out, d_in)`` of the weight's matrix view (per expert for an expert parameter)."""
    lora_A, lora_B = lora_factors(A.detach().to(torch.promote_types(A.dtype, torch.float32)), *dims, coefficient)
    return LoRAFactors(kind, shape, lora_A, lora_B, peft_module)


def _from_model(model: SingLoRAModel, adapter_name: str | None) -> ExportedAdapter:
    if not model.configs:
        raise SingLoRAError("the model has no SingLoRA adapter to export")
    name = adapter_name or model.default_adapter()
    factors: dict[str, LoRAFactors] = {}
    saved: dict[str, Tensor] = {}
    experts = [n for n, layer in model.singlora_layers() if layer.kind == "experts" and name in layer.singlora]
    for module_name, module in model.adapter_modules(name).items():
        if isinstance(module, SingLoRAAdapter):
            layer = model.model.get_submodule(module_name)
            if name in layer.merged_adapters:
                raise SingLoRAError(
                    f"adapter {name!r} is merged into {module_name!r}; unmerge() before exporting (the export "
                    "would apply it twice)"
                )
            coefficient = float(module.coefficient())
            peft_module = peft_module_name(model.model, module_name, experts) if layer.kind == "experts" else None
            factors[module_name] = _factors(module.A, layer.kind, weight_shape(layer.base_layer),
                                            (layer.d_out, layer.d_in), coefficient, peft_module)
        else:
            saved.update({f"{module_name}.{k}": v.detach() for k, v in module.state_dict().items()})
    base_name = getattr(getattr(model.model, "config", None), "name_or_path", None) or None
    return ExportedAdapter(factors, saved, base_name)


def _from_directory(directory: Path, base_model: nn.Module) -> ExportedAdapter:
    """Read a singlora adapter directory against ``base_model`` without changing the model."""
    config, meta = read_adapter_config(directory)
    plan, tensors = read_adapter_for(base_model, directory, config)  # exactly as loading reads it
    experts = [name for name, m in plan.modules.items() if m.kind == "experts"]
    factors = {name: _factors(tensors[f"{name}.{A_SUFFIX}"], m.kind, m.weight_shape, (m.d_out, m.d_in),
                              saved_coefficient(m.scale, meta["ramp_step"], plan.ramp_up_steps),
                              peft_module_name(base_model, name, experts) if m.kind == "experts" else None)
               for name, m in plan.modules.items()}
    saved = {key: tensors[key] for key in plan.saved_tensors}
    return ExportedAdapter(factors, saved, meta.get("base_model_name_or_path"))


def collect_lora_factors(
    source: Union[SingLoRAModel, str, os.PathLike], base_model: nn.Module | None = None,
    adapter_name: str | None = None,
) -> ExportedAdapter:
    """Plain-LoRA factors of an adapter: from a ``SingLoRAModel`` (``adapter_name``, default the first active) or
    from a singlora adapter directory read against ``base_model`` (the model it was trained on; not modified)."""
    if isinstance(source, SingLoRAModel):
        if base_model is not None:
            raise SingLoRAError("base_model is only for exporting an adapter directory; the SingLoRAModel has one")
        return _from_model(source, adapter_name)
    if isinstance(source, (str, os.PathLike)):
        if base_model is None:
            raise SingLoRAError(
                f"exporting the adapter directory {source}: pass base_model= (its shapes define d_out and d_in)"
            )
        if adapter_name is not None:
            raise SingLoRAError("adapter_name is only for a SingLoRAModel; a directory holds one adapter")
        return _from_directory(Path(source), base_model)
    raise SingLoRAError(f"source must be a SingLoRAModel or an adapter directory, got {type(source).__name__}")


def _layer_tensors(factors: LoRAFactors) -> tuple[Tensor, Tensor]:
    """``(down, up)`` in the LoRA module layout: Linear ``(r, in)``/``(out, r)``; Conv ``(r, in, *k)``/
    ``(out, r, 1, ...)``."""
    if factors.kind == "conv":
        shape = factors.weight_shape
        down = factors.lora_A.reshape(factors.rank, *shape[1:])
        up = factors.lora_B.reshape(shape[0], factors.rank, *([1] * (len(shape) - 2)))
        return down, up
    return factors.lora_A, factors.lora_B


def _peft_tensors(adapter: ExportedAdapter) -> dict[str, Tensor]:
    tensors: dict[str, Tensor] = {}
    for module, factors in adapter.factors.items():
        key = PEFT_PREFIX + module
        if factors.kind == "experts":  # one ParamWrapper: lora_A (E*r, d_in), row e*r+k; lora_B (d_out, r*E), col k*E+e
            key = PEFT_PREFIX + factors.peft_module
            tensors[f"{key}.lora_A.weight"] = factors.lora_A.reshape(-1, factors.lora_A.shape[-1])
            tensors[f"{key}.lora_B.weight"] = factors.lora_B.permute(1, 2, 0).reshape(factors.lora_B.shape[1], -1)
        elif factors.kind == "embedding":  # PEFT: delta E = lora_embedding_A.T @ lora_embedding_B.T
            tensors[f"{key}.lora_embedding_A"] = factors.lora_B.T
            tensors[f"{key}.lora_embedding_B"] = factors.lora_A.T
        else:
            down, up = _layer_tensors(factors)
            tensors[f"{key}.lora_A.weight"] = down
            tensors[f"{key}.lora_B.weight"] = up
    tensors.update({PEFT_PREFIX + key: value for key, value in adapter.saved.items()})
    return tensors


def peft_config(adapter: ExportedAdapter) -> dict:
    """The ``adapter_config.json`` of a PEFT LoRA equal to ``adapter``: ``lora_alpha = r`` everywhere (scale 1);
    modules whose rank differs from the most common one go to ``rank_pattern``/``alpha_pattern`` (escaped full
    names, which PEFT matches as regexes)."""
    r, pattern = rank_and_pattern({module: factors.rank for module, factors in adapter.factors.items()})
    experts = sorted(m for m, f in adapter.factors.items() if f.kind == "experts")
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": adapter.base_model_name_or_path,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(set(adapter.factors) - set(experts)),
        "modules_to_save": sorted({key.rsplit(".", 1)[0] for key in adapter.saved}) or None,
        "fan_in_fan_out": any(f.kind == "conv1d_t" for f in adapter.factors.values()),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    if experts:  # PEFT >= 0.17: LoRA on nn.Parameters (3-D expert stacks)
        config["target_parameters"] = experts
    return config


def _diffusion_tensors(adapter: ExportedAdapter, format: str, prefix: str) -> dict[str, Tensor]:
    if adapter.saved:
        raise SingLoRAError(
            f"format={format!r} has no place for modules_to_save ({sorted(adapter.saved)[:3]}...); use format='peft'"
        )
    tensors: dict[str, Tensor] = {}
    for module, factors in adapter.factors.items():
        if factors.kind not in ("linear", "conv"):
            raise SingLoRAError(
                f"module {module!r} is a {factors.kind} layer; format={format!r} holds Linear and Conv layers only "
                "(use format='peft')"
            )
        down, up = _layer_tensors(factors)
        if format == "diffusers":
            tensors[f"{prefix}.{module}.lora_A.weight"] = down
            tensors[f"{prefix}.{module}.lora_B.weight"] = up
        else:
            key = f"lora_{prefix}_{module.replace('.', '_')}"
            tensors[f"{key}.lora_down.weight"] = down
            tensors[f"{key}.lora_up.weight"] = up
            tensors[f"{key}.alpha"] = torch.tensor(float(factors.rank))
    return tensors


def export_lora(
    source: Union[SingLoRAModel, str, os.PathLike],
    out_dir: str | os.PathLike,
    *,
    format: ExportFormat = "peft",
    base_model: nn.Module | None = None,
    adapter_name: str | None = None,
    dtype: torch.dtype | None = None,
    prefix: str = "unet",
    overwrite: bool = False,
) -> Path:
    """Write an adapter as an exact plain LoRA; returns the weights file written.

    Args:
        source: A ``SingLoRAModel`` (any wrapped model: transformers, a diffusers ``UNet2DConditionModel``, ...)
            or a singlora adapter directory (then ``base_model`` is required).
        out_dir: Output folder, written whole and atomically (``atomic.output_folder``): a folder that is neither
            new, empty nor an earlier export's is refused (naming what is there) unless ``overwrite=True``; a
            folder holding the source adapter never is.
        format: ``"peft"``, ``"diffusers"``, ``"kohya"`` or ``"gguf"`` (see the module docstring).
        base_model: The un-adapted model an adapter directory was trained on (read only).
        adapter_name: Which adapter of a ``SingLoRAModel`` (default: the first active).
        dtype: Storage dtype of the factors (default: float32, float64 for float64 adapters).
        prefix: Component name for ``diffusers``/``kohya`` keys: ``"unet"`` (SD/SDXL), ``"transformer"`` (SD3, Flux).
        overwrite: Replace a non-empty ``out_dir`` that is not an earlier export (everything in it goes).
    """
    if format not in EXPORT_FORMATS:
        raise SingLoRAError(f"format={format!r} must be one of {EXPORT_FORMATS}")
    adapter = collect_lora_factors(source, base_model, adapter_name)
    out = Path(out_dir)
    inputs = [source] if isinstance(source, (str, os.PathLike)) else []
    if format == "gguf":
        from .gguf_export import GGUF_FILE, write_gguf

        model = base_model if base_model is not None else source.model
        gguf_dtype = str(dtype or torch.float32).removeprefix("torch.")
        with output_folder(out, command="export", inputs=inputs, overwrite=overwrite) as tmp:
            write_gguf(adapter, tmp / GGUF_FILE, getattr(model, "config", None), dtype=gguf_dtype)
        return out / GGUF_FILE
    if format == "peft":
        tensors = _peft_tensors(adapter)
        weights_file = WEIGHTS_FILE
    else:
        tensors = _diffusion_tensors(adapter, format, prefix)
        weights_file = DIFFUSERS_WEIGHTS_FILE
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous().cpu()
               for k, v in tensors.items()}
    bad = sorted(k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if bad:  # e.g. an F64 adapter file beyond float32's range, or factors beyond float16's with dtype=float16
        raise SingLoRAError(f"export to {out_dir}: {bad[:5]} would hold NaN or Inf (values beyond the range of "
                            f"{tensors[bad[0]].dtype}); nothing was written")
    metadata = {"format": "pt", "exported_by": "singlora", "export_format": format}
    with output_folder(out, command="export", inputs=inputs, overwrite=overwrite) as tmp:
        save_safetensors(tensors, tmp / weights_file, metadata)
        if format == "peft":
            (tmp / CONFIG_FILE).write_text(json.dumps(peft_config(adapter), indent=2, sort_keys=True) + "\n")
    return out / weights_file
