"""The adapter file format: ``adapter_config.json`` + ``adapter_model.safetensors``. No pickle anywhere.

Format ``singlora``, version 1:

``adapter_config.json``
    ``{"format": "singlora", "format_version": 1, "ramp_step": <int t>, "base_model_name_or_path": <str|null>,
    <every SingLoRAConfig field>}``

``adapter_model.safetensors`` (safetensors metadata ``{"format": "singlora", "format_version": "1"}``)
    - ``<module>.singlora_A``: ``(n, r)`` for every adapted module, ``<module>`` its name in the base model
      (e.g. ``encoder.layer.0.attention.self.query.singlora_A``); the adapter name is not part of the key.
    - ``<module>.<tensor>``: the full state of every ``modules_to_save`` module (e.g. ``classifier.weight``).

This module writes and reads the two files given the tensors, or the keys, shapes and dtypes a caller expects; it
knows nothing of models (``plan.py`` decides what a model expects, ``adapter_io.py`` owns the load transaction).
Reading goes through ``untrusted`` (size caps, strict JSON, the safetensors header checked before any data is read).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import nn

from .atomic import atomic_write, atomic_write_text
from .config import SingLoRAConfig
from .errors import AdapterFileError, SingLoRAError
from .experts import owner_of
from .plan import AdapterPlan, plan_adapter
from .names import unmatched_entries, walk_adaptable
from .untrusted import (
    MAX_JSON_BYTES, Entries, Expected, check_update_range, pickle_hint, read_expected, read_json,
    read_safetensors_header,
)

FORMAT_NAME = "singlora"
FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
A_SUFFIX = "singlora_A"
META_FIELDS = ("format", "format_version", "ramp_step", "base_model_name_or_path")  # beside the config fields
MAX_CONFIG_BYTES = MAX_JSON_BYTES  # adapter_config.json
SAVE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def as_directory(directory: Any) -> Path:
    """``directory`` as a Path; ``SingLoRAError`` naming the argument for a wrong type."""
    if not isinstance(directory, (str, os.PathLike)) or not str(directory):
        raise SingLoRAError(f"directory={directory!r} must be a path (str or os.PathLike)")
    return Path(directory)


def storage_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """The storage dtype named by ``dtype`` (a name or a torch dtype of ``SAVE_DTYPES``); ``None``: as trained."""
    if dtype is None:
        return None
    named = {v: v for v in SAVE_DTYPES.values()} | SAVE_DTYPES
    if not isinstance(dtype, (str, torch.dtype)) or dtype not in named:
        raise SingLoRAError(f"dtype={dtype!r} must be one of {sorted(SAVE_DTYPES)} (or None: as trained)")
    return named[dtype]


def cast_for_storage(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """``tensors`` with every floating tensor cast to ``dtype`` (None: unchanged); ``SingLoRAError`` naming the first
    tensor whose values the cast would turn into Inf (float16 holds at most 65504), nothing cast silently."""
    if dtype is None:
        return tensors
    stored = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    for key, value in stored.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            largest = tensors[key].abs().max().item()
            raise SingLoRAError(f"{key}: values up to {largest:.4g} overflow {dtype} (they would be stored as Inf); "
                                "save with dtype='float32' or 'bfloat16'; nothing was written")
    return stored


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file`` with the metadata in sorted order: safetensors writes it from a hash map whose
    order changes from process to process, so two identical runs gave files differing by their bytes (checksums are
    how people compare adapters). The tensors and their bytes are safetensors' own; only the header is re-written."""
    blob = save(tensors, metadata=metadata)
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8: 8 + length])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps({"__metadata__": header.pop("__metadata__"), **header}, separators=(",", ":"),
                      ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to a multiple of 8 bytes
    Path(path).write_bytes(struct.pack("<Q", len(text)) + text + blob[8 + length:])


def write_adapter(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], config: SingLoRAConfig,
                  ramp_step: int, base_model_name_or_path: str | None, dtype: str | torch.dtype | None = None
                  ) -> None:
    """Write the two files of one adapter into ``directory`` (created if missing), each atomically.

    ``tensors``: ``{file key: tensor}`` (``<module>.singlora_A`` and saved modules' ``<module>.<tensor>``).
    ``dtype``: storage type of every floating tensor (``"float32"``, ``"bfloat16"`` or ``"float16"``: half the
    size; ``storage_dtype``); ``None`` keeps the training dtype. Loading casts back to the model's dtypes; the
    file's header (and its metadata ``dtype``) records what was stored.
    """
    directory = as_directory(directory)
    stored = storage_dtype(dtype)
    tensors = cast_for_storage({key: value.detach().contiguous().cpu() for key, value in tensors.items()}, stored)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)}
    if stored is not None:
        metadata["dtype"] = str(stored).removeprefix("torch.")
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_safetensors(tensors, tmp, metadata))
    document = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "ramp_step": ramp_step,
        "base_model_name_or_path": base_model_name_or_path, **config.to_dict(),
    }
    atomic_write_text(directory / CONFIG_FILE, json.dumps(document, indent=2, sort_keys=True) + "\n")


# ---- reading ---------------------------------------------------------------------------------------------------


def read_adapter_config(directory: str | os.PathLike) -> tuple[SingLoRAConfig, dict[str, Any]]:
    """Parse and validate ``adapter_config.json``: ``(config, {format, format_version, ramp_step, ...})``."""
    path = as_directory(directory) / CONFIG_FILE
    if not Path(directory).is_dir():
        raise AdapterFileError(f"{directory}: not a directory (expected a singlora adapter directory)")
    document = read_json(path, what=f"is {directory} a singlora adapter directory?", limit=MAX_CONFIG_BYTES)
    if not isinstance(document, dict):
        raise AdapterFileError(f"{path}: expected a JSON object, got {type(document).__name__}")
    if document.get("format") != FORMAT_NAME:
        hint = " (a PEFT adapter: load it with peft)" if "peft_type" in document else ""
        raise AdapterFileError(f"{path}: format={document.get('format')!r}, expected {FORMAT_NAME!r}{hint}")
    version = document.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version != FORMAT_VERSION:
        raise AdapterFileError(
            f"{path}: format_version={version!r} is not supported (this singlora reads version {FORMAT_VERSION})"
        )
    step = document.get("ramp_step")
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < 2**63:
        raise AdapterFileError(f"{path}: ramp_step={step!r} must be an int in [0, 2**63)")
    base = document.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise AdapterFileError(f"{path}: base_model_name_or_path={base!r} must be a string or null")
    meta = {k: document[k] for k in META_FIELDS if k in document}
    fields = {k: v for k, v in document.items() if k not in META_FIELDS}
    try:
        config = SingLoRAConfig.from_dict(fields, source=str(path))
    except SingLoRAError as exc:
        raise AdapterFileError(str(exc)) from None
    except (TypeError, ValueError, RecursionError) as exc:  # a field value the validator did not foresee
        raise AdapterFileError(f"{path}: invalid config: {exc!r}") from None
    if step and config.resolve_ramp_up_steps() is None:  # no run steps without knowing T (RampControls)
        raise AdapterFileError(f"{path}: ramp_step={step} but ramp_up_steps={config.ramp_up_steps} is a fraction of "
                               "total_steps, which is null: u at that step is unknown (no singlora run writes this)")
    return config, meta


def read_adapter_header(path: str | os.PathLike) -> Entries:
    """The checked header entries of an ``adapter_model.safetensors`` (``untrusted.read_safetensors_header``)
    whose metadata says ``format=singlora``; a missing file mentions pickled weights found beside it."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        hint = pickle_hint(path.parent, WEIGHTS_FILE, {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)})
        raise AdapterFileError(f"{path}: no such file{hint} (keys must be '<module>.{A_SUFFIX}')" if hint
                               else f"{path}: no such file")
    metadata, entries = read_safetensors_header(path)
    if metadata.get("format") != FORMAT_NAME:
        raise AdapterFileError(f"{path}: metadata format={metadata.get('format')!r}, expected {FORMAT_NAME!r}")
    return entries


def expected_tensors(model: nn.Module, plan: AdapterPlan) -> Expected:
    """``{file key: (shape, dtype the model will hold)}`` of the adapter file that ``plan`` describes for ``model``
    (a base model, or one holding adapters): ``(n, r)`` (``(experts, n, r)``) for each ``A``, in the dtype
    ``SingLoRALayer`` gives it (float32, or float64 on a float64 weight), and the full state of each
    ``modules_to_save`` module."""
    expected: Expected = {}
    for name, module in plan.modules.items():
        if module.kind == "experts":  # a 3-D expert parameter ``<module>.<parameter>``
            owner, parameter = owner_of(model, name)
            weight = getattr(owner, parameter)
        else:
            weight = model.get_submodule(name).weight
        expected[f"{name}.{A_SUFFIX}"] = (module.a_shape, torch.promote_types(weight.dtype, torch.float32))
    expected.update(plan.saved_tensors)
    return expected


def plan_adapter_file(model: nn.Module, directory: Path, config: SingLoRAConfig) -> tuple[AdapterPlan, Entries]:
    """``(plan, header entries)`` of the adapter in ``directory`` (its config already read: ``config``) for
    ``model``, from the safetensors header alone: the adapted modules are exactly those the
    ``<module>.singlora_A`` keys name (the config's target patterns are metadata, never matched)."""
    path = Path(directory) / WEIGHTS_FILE
    entries = read_adapter_header(path)
    modules = [key[: -len(A_SUFFIX) - 1] for key in entries if key.endswith("." + A_SUFFIX)]
    if not modules:
        raise AdapterFileError(f"{path}: no <module>.{A_SUFFIX} tensor: not a SingLoRA adapter")
    try:
        plan = plan_adapter(model, config, modules)
    except SingLoRAError as exc:
        raise AdapterFileError(f"{Path(directory) / CONFIG_FILE} and {path}: the adapter does not fit this model: "
                               f"{exc}") from None
    _check_listed_modules(model, config, plan, Path(directory))
    return plan, entries


def _check_listed_modules(model: nn.Module, config: SingLoRAConfig, plan: AdapterPlan, directory: Path) -> None:
    """Refuse a file missing the tensors of modules its config lists: each entry of a ``target_modules`` /
    ``target_parameters`` list (``singlora train`` writes every adapted module's full name) must name an adapted
    module of the file (or one inside ``modules_to_save``). Names only, no pattern is matched; not checked with
    ``exclude_modules`` (an entry may then match only excluded modules)."""
    if config.exclude_modules is not None:
        return
    saved = plan.saved_modules
    inside = [n for n, _ in walk_adaptable(model) if any(n.startswith(s + ".") for s in saved)]
    names = [*plan.modules, *inside, *saved]
    listed = [*(config.target_modules if isinstance(config.target_modules, list) else []),
              *(config.target_parameters or [])]
    missing = unmatched_entries(listed, names)
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise AdapterFileError(f"{directory / WEIGHTS_FILE}: no tensor for {len(missing)} of the {len(listed)} "
                               f"modules {directory / CONFIG_FILE} lists in target_modules: {shown} (an incomplete "
                               "adapter file; the run that wrote it trained them)")


def read_adapter_for(model: nn.Module, directory: Path, config: SingLoRAConfig
                     ) -> tuple[AdapterPlan, dict[str, torch.Tensor]]:
    """``(plan, tensors)`` of the adapter in ``directory`` (``plan_adapter_file``) for ``model``, changing
    nothing; everything (modules, shapes, dtypes, values) is checked against the model before the data is read,
    and each module's update ``s * A[:d_out] A[:d_in]^T`` must stay within its dtype's range
    (``untrusted.check_update_range``: ``alpha: 1e308`` would make the model compute Inf)."""
    plan, entries = plan_adapter_file(model, directory, config)
    path, expected = Path(directory) / WEIGHTS_FILE, expected_tensors(model, plan)
    tensors = read_expected(path, entries, expected)
    for name, module in plan.modules.items():  # the update at u = 1, the most it reaches
        key = f"{name}.{A_SUFFIX}"
        for A in tensors[key] if module.experts else [tensors[key]]:  # (n, r), per expert for an expert stack
            check_update_range(f"{path}: module {name!r}", module.scale, A[: module.d_out], A[: module.d_in].T,
                               expected[key][1])
    return plan, tensors


def read_adapter_tensors(path: str | os.PathLike, expected: Expected) -> dict[str, torch.Tensor]:
    """The tensors of an ``adapter_model.safetensors``, checked against ``expected`` (``{key: (shape, dtype the
    caller holds, or None)}``) before any data is read, then for NaN/Inf in those dtypes (``untrusted.read_expected``).
    ``A`` tensors need a floating dtype: give them a floating expected dtype."""
    return read_expected(path, read_adapter_header(path), expected)

