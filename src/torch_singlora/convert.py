"""Import checkpoints written by the two public SingLoRA implementations into this library's adapter format.

Both layouts are read from their documented structure; their code is not used. Pickled files are never opened:
load a ``.bin``/``.pt`` yourself (``torch.load(path, weights_only=True)``) and pass the state dict.

``kyegomez`` (PyPI ``singlora``, ``apply_singlora_to_model``): a whole-model state dict in which every adapted
    Linear ``<module>`` became a wrapper with ``<module>.original_layer.weight``/``.bias`` (the frozen base),
    ``<module>.A`` of shape ``(max(in, out), r)`` and ``<module>.training_step`` (float scalar). alpha and the
    ramp length T are not in the file: pass them.
``peft-singlora`` (a PEFT plug-in): a PEFT adapter (``adapter_config.json`` with ``r``, ``lora_alpha``,
    ``rank_pattern``, ``alpha_pattern``, ``use_rslora``...) whose weights hold
    ``base_model.model.<module>.lora_A[.<adapter>]`` of shape ``(max(in, out), r)`` and, optionally,
    ``base_model.model.<module>.training_step_<adapter>``. T (``ramp_up_steps``) is read from the config when present.

Their math maps onto ours exactly: ``dW = alpha/r * u * A[:out] @ A[:in].T`` (for ``out > in`` kyegomez computes
the transpose, which cannot run; the paper's orientation is used). What does not map: their step counted training
forward calls (micro-batches; twice per step under gradient checkpointing), not optimizer steps; it is carried over
as is and said so in the report. Non-Linear targets, shapes that do not fit the base model, missing modules,
unknown keys and steps that differ between layers are refused.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import torch
from torch import Tensor, nn

from .adapter_file import CONFIG_FILE, WEIGHTS_FILE
from .export import PEFT_PREFIX
from .untrusted import PICKLE_SUFFIXES, read_json, read_safetensors_file
from .config import SingLoRAConfig, rank_and_pattern
from .errors import AdapterFileError, SingLoRAError
from .layers import layer_kind, weight_shape
from .functional import matrix_dims
from .model import SingLoRAModel

StateDict = dict[str, Tensor]


@dataclass
class ConversionReport:
    """What a conversion did. ``mapped``: ``{module: (n, r)}``; ``notes``: semantics that changed or were assumed."""

    layout: str
    out_dir: Path
    mapped: dict[str, tuple[int, int]] = field(default_factory=dict)
    ramp_step: int = 0
    config: SingLoRAConfig | None = None
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"converted a {self.layout} checkpoint into {self.out_dir} ({len(self.mapped)} modules, "
                 f"ramp_step={self.ramp_step})"]
        lines += [f"  {module}: A {n}x{r} -> {module}.singlora_A" for module, (n, r) in sorted(self.mapped.items())]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _read_tensors(source: Union[StateDict, str, os.PathLike], what: str) -> StateDict:
    """A state dict given as a dict, a ``.safetensors`` file, or a directory holding ``adapter_model.safetensors``."""
    if isinstance(source, dict):
        return source
    path = Path(source)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if path.suffix in PICKLE_SUFFIXES:
        raise AdapterFileError(
            f"{path}: pickled {what} checkpoints are never opened here; load it yourself with "
            "torch.load(path, weights_only=True) and pass the state dict"
        )
    if not path.is_file():
        raise AdapterFileError(f"{path}: no such file ({what} checkpoint: a state dict, .safetensors file or folder)")
    return read_safetensors_file(path)[1]  # header checked before any data is read


def _single_step(steps: dict[str, Tensor], what: str) -> int:
    values = {module: float(value) for module, value in steps.items()}
    distinct = sorted(set(values.values()))
    if len(distinct) > 1:
        raise SingLoRAError(
            f"{what}: training steps differ between layers ({distinct[:5]}); this format keeps one ramp step per "
            "adapter: pass ramp_step= to choose one"
        )
    step = distinct[0]
    if step < 0 or step != int(step):
        raise SingLoRAError(f"{what}: training step {step} is not a non-negative integer")
    return int(step)


def _write(
    base_model: nn.Module, matrices: dict[str, Tensor], config_fields: dict, ramp_step: int,
    out_dir: str | os.PathLike, report: ConversionReport,
) -> ConversionReport:
    """Check every matrix against ``base_model``, then save it as a singlora adapter (base model left unchanged)."""
    if not matrices:
        raise SingLoRAError(f"no {report.layout} adapter matrices found in the checkpoint")
    ranks: dict[str, int] = {}
    for module_name, A in matrices.items():
        module = _find(base_model, module_name)
        if module is None:
            raise SingLoRAError(f"{report.layout}: module {module_name!r} is not in the base model")
        if layer_kind(module) != "linear":
            raise SingLoRAError(
                f"{report.layout}: module {module_name!r} is a {type(module).__name__}; these checkpoints only "
                "define Linear adapters"
            )
        d_out, d_in = matrix_dims("linear", weight_shape(module))
        if A.dim() != 2 or A.shape[0] != max(d_out, d_in) or not 1 <= A.shape[1] <= A.shape[0]:
            raise SingLoRAError(
                f"{report.layout}: {module_name!r} has A of shape {tuple(A.shape)}; the base layer "
                f"({d_out}x{d_in}) needs ({max(d_out, d_in)}, r)"
            )
        if not A.is_floating_point() or not torch.isfinite(A).all():
            raise SingLoRAError(f"{report.layout}: {module_name!r}: A must be finite floating point")
        ranks[module_name] = A.shape[1]
        report.mapped[module_name] = tuple(A.shape)
    config = SingLoRAConfig(
        target_modules="|".join(re.escape(name) for name in sorted(matrices)), init="kaiming_uniform", **config_fields
    )
    for module_name, r in ranks.items():
        if config.rank_for(module_name) != r:
            raise SingLoRAError(
                f"{report.layout}: {module_name!r} has rank {r} but the checkpoint's config gives "
                f"{config.rank_for(module_name)}"
            )
    trainable = {name: p.requires_grad for name, p in base_model.named_parameters()}
    model = SingLoRAModel(base_model, config)
    try:
        with torch.no_grad():
            for module_name, A in matrices.items():
                target = base_model.get_submodule(module_name).singlora["default"].A
                target.copy_(A.to(target.dtype))
        model.set_ramp_step(ramp_step)
        model.save_adapter(out_dir)
    finally:
        model.unload()
        for name, parameter in base_model.named_parameters():
            parameter.requires_grad_(trainable[name])
    report.config, report.ramp_step = config, ramp_step
    return report


def convert_kyegomez(
    checkpoint: Union[StateDict, str, os.PathLike], out_dir: str | os.PathLike, *, base_model: nn.Module,
    alpha: float, ramp_up_steps: int, ramp_step: int | None = None,
) -> ConversionReport:
    """Convert a kyegomez ``singlora`` whole-model state dict into a singlora adapter in ``out_dir``.

    Args:
        checkpoint: The state dict (or a ``.safetensors`` file of it).
        base_model: The un-adapted model (module names and shapes are checked against it; not modified).
        alpha, ramp_up_steps: The values the run used (not stored in the checkpoint).
        ramp_step: Overrides the saved ``training_step`` (required when layers disagree).
    """
    state = _read_tensors(checkpoint, "kyegomez")
    report = ConversionReport("kyegomez", Path(out_dir))
    matrices = {key[: -len(".A")]: value for key, value in state.items() if key.endswith(".A")}
    steps = {key[: -len(".training_step")]: v for key, v in state.items() if key.endswith(".training_step")}
    if set(steps) != set(matrices):
        raise SingLoRAError(
            f"kyegomez: modules with A {sorted(set(matrices) - set(steps))[:5]} and modules with training_step "
            f"{sorted(set(steps) - set(matrices))[:5]} do not pair up"
        )
    for module_name in matrices:
        saved = state.get(f"{module_name}.original_layer.weight")
        if saved is None:
            raise SingLoRAError(f"kyegomez: {module_name}.original_layer.weight is missing: not a kyegomez wrapper")
        base_weight = getattr(_find(base_model, module_name), "weight", None)
        same_shape = isinstance(base_weight, Tensor) and base_weight.shape == saved.shape
        if same_shape and not torch.equal(base_weight.cpu(), saved):
            report.notes.append(f"{module_name}: the checkpoint's frozen weight differs from base_model's")
    step = _single_step(steps, "kyegomez") if ramp_step is None else ramp_step
    report.notes.append("training_step counted training forward calls (micro-batches), carried over as optimizer steps")
    report.notes.append("out > in layers use the paper's orientation A[:out] @ A[:in].T (kyegomez's could not run)")
    r, pattern = rank_and_pattern({name: A.shape[1] for name, A in matrices.items() if A.dim() == 2})
    return _write(base_model, matrices, {"r": r, "alpha": alpha, "ramp_up_steps": ramp_up_steps,
                                         "rank_pattern": pattern}, step, out_dir, report)


def _find(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def convert_peft_singlora(
    adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, *, base_model: nn.Module,
    ramp_up_steps: int | None = None, ramp_step: int | None = None, adapter_name: str = "default",
) -> ConversionReport:
    """Convert a ``peft-singlora`` adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    Args:
        base_model: The un-adapted model (names and shapes are checked against it; not modified).
        ramp_up_steps: T, if the config does not hold it (the plug-in's default was 1000).
        ramp_step: The ramp step, required when the file has no ``training_step_<adapter>``.
        adapter_name: The adapter name the keys may carry (``lora_A.<adapter>``, ``training_step_<adapter>``).
    """
    directory = Path(adapter_dir)
    config_path = directory / CONFIG_FILE
    document = read_json(config_path, what="a PEFT adapter config")
    if not isinstance(document, dict) or document.get("peft_type") != "LORA":
        found = document.get("peft_type") if isinstance(document, dict) else type(document).__name__
        raise AdapterFileError(f"{config_path}: peft_type={found!r}, expected 'LORA'")
    report = ConversionReport("peft-singlora", Path(out_dir))
    T = document.get("ramp_up_steps", ramp_up_steps)
    if T is None:
        raise SingLoRAError(f"{config_path} does not record ramp_up_steps: pass ramp_up_steps= (the plug-in's default "
                            "was 1000)")
    state = _read_tensors(directory, "peft-singlora")
    matrices: dict[str, Tensor] = {}
    steps: dict[str, Tensor] = {}
    a_key = re.compile(rf"{re.escape(PEFT_PREFIX)}(.+)\.lora_A(?:\.{re.escape(adapter_name)})?(?:\.weight)?")
    step_key = re.compile(rf"{re.escape(PEFT_PREFIX)}(.+)\.training_step_{re.escape(adapter_name)}")
    for key, value in state.items():
        if match := a_key.fullmatch(key):
            matrices[match.group(1)] = value
        elif match := step_key.fullmatch(key):
            steps[match.group(1)] = value
        else:
            raise SingLoRAError(f"{directory / WEIGHTS_FILE}: key {key!r} is not a peft-singlora tensor (lora_B, "
                                "modules_to_save and bias tensors cannot be mapped)")
    if ramp_step is None:
        if not steps:
            raise SingLoRAError(
                f"{directory}: no training_step_{adapter_name} saved (the plug-in did not save it): pass ramp_step= "
                f"(e.g. ramp_step={T} for a fully ramped adapter)"
            )
        ramp_step = _single_step(steps, "peft-singlora")
        report.notes.append("training_step counted training forward calls, carried over as optimizer steps")
    fields = {
        "r": document.get("r", 8), "alpha": float(document.get("lora_alpha", 8)), "ramp_up_steps": int(T),
        "rank_pattern": document.get("rank_pattern") or {}, "alpha_pattern": document.get("alpha_pattern") or {},
        "use_rslora": bool(document.get("use_rslora", False)), "dropout": float(document.get("lora_dropout") or 0.0),
    }
    return _write(base_model, matrices, fields, ramp_step, out_dir, report)
