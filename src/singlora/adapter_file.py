"""Adapter files: ``adapter_config.json`` + ``adapter_model.safetensors``. No pickle anywhere; atomic writes.

Format ``singlora``, version 1:

``adapter_config.json``
    ``{"format": "singlora", "format_version": 1, "ramp_step": <int t>, "base_model_name_or_path": <str|null>,
    <every SingLoRAConfig field>}``

``adapter_model.safetensors`` (safetensors metadata ``{"format": "singlora", "format_version": "1"}``)
    - ``<module>.singlora_A``: ``(n, r)`` for every adapted module, ``<module>`` its name in the base model
      (e.g. ``encoder.layer.0.attention.self.query.singlora_A``); the adapter name is not part of the key.
    - ``<module>.<tensor>``: the full state of every ``modules_to_save`` module (e.g. ``classifier.weight``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import SingLoRAConfig
from .errors import AdapterFileError, SingLoRAError
from .functional import matrix_dims
from .layers import layer_kind, weight_shape
from .targets import resolve_modules_to_save, resolve_targets

if TYPE_CHECKING:
    from .model import SingLoRAModel

FORMAT_NAME = "singlora"
FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
A_SUFFIX = "singlora_A"
_META_FIELDS = ("format", "format_version", "ramp_step", "base_model_name_or_path")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def adapter_state_dict(model: "SingLoRAModel", adapter_name: str) -> dict[str, torch.Tensor]:
    """The tensors of one adapter under the documented file keys."""
    from .layers import SingLoRAAdapter

    tensors: dict[str, torch.Tensor] = {}
    for module_name, module in model.adapter_modules(adapter_name).items():
        if isinstance(module, SingLoRAAdapter):
            tensors[f"{module_name}.{A_SUFFIX}"] = module.A.detach()
        else:
            for key, value in module.state_dict().items():
                tensors[f"{module_name}.{key}"] = value.detach()
    return tensors


def save_adapter(model: "SingLoRAModel", directory: str | os.PathLike, adapter_name: str) -> None:
    """Write one adapter's two files into ``directory`` (created if missing), each atomically."""
    config = model.configs.get(adapter_name)
    if config is None:
        raise SingLoRAError(f"adapter {adapter_name!r} does not exist; adapters are {sorted(model.configs)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model, adapter_name).items()}
    metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)}
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    document = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "ramp_step": model.get_step(adapter_name),
        "base_model_name_or_path": getattr(getattr(model.model, "config", None), "name_or_path", None) or None,
        **config.to_dict(),
    }
    text = json.dumps(document, indent=2, sort_keys=True) + "\n"
    atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))


def read_adapter_config(directory: str | os.PathLike) -> tuple[SingLoRAConfig, dict[str, Any]]:
    """Parse and validate ``adapter_config.json``: ``(config, {format, format_version, ramp_step, ...})``."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise AdapterFileError(f"{path}: no such file (is {directory} a singlora adapter directory?)")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFileError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise AdapterFileError(f"{path}: expected a JSON object, got {type(document).__name__}")
    if document.get("format") != FORMAT_NAME:
        hint = " (a PEFT adapter: load it with peft)" if "peft_type" in document else ""
        raise AdapterFileError(f"{path}: format={document.get('format')!r}, expected {FORMAT_NAME!r}{hint}")
    version = document.get("format_version")
    if version != FORMAT_VERSION:
        raise AdapterFileError(
            f"{path}: format_version={version!r} is not supported (this singlora reads version {FORMAT_VERSION})"
        )
    step = document.get("ramp_step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise AdapterFileError(f"{path}: ramp_step={step!r} must be an int >= 0")
    meta = {k: document[k] for k in _META_FIELDS if k in document}
    fields = {k: v for k, v in document.items() if k not in _META_FIELDS}
    try:
        config = SingLoRAConfig.from_dict(fields, source=str(path))
    except SingLoRAError as exc:
        raise AdapterFileError(str(exc)) from None
    return config, meta


def expected_shapes(model: "SingLoRAModel", config: SingLoRAConfig) -> dict[str, tuple[int, ...]]:
    """File keys and shapes that ``config`` implies for ``model``'s modules (no change to the model)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name in resolve_targets(model.model, config):
        module = model.model.get_submodule(name)
        base = getattr(module, "base_layer", module)
        d_out, d_in = matrix_dims(layer_kind(base), weight_shape(base))
        shapes[f"{name}.{A_SUFFIX}"] = (max(d_out, d_in), config.rank_for(name))
    for name in resolve_modules_to_save(model.model, config):
        module = model.model.get_submodule(name)
        original = getattr(module, "original_module", module)
        for key, value in original.state_dict().items():
            shapes[f"{name}.{key}"] = tuple(value.shape)
    return shapes


def read_adapter_tensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Load ``path``'s tensors, checking keys, shapes (from the header, before loading), dtypes and finiteness."""
    if not path.is_file():
        raise AdapterFileError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT_NAME:
                raise AdapterFileError(f"{path}: metadata format={metadata.get('format')!r}, expected {FORMAT_NAME!r}")
            keys = set(handle.keys())
            missing = sorted(set(shapes) - keys)
            if missing:
                raise AdapterFileError(f"{path}: missing tensor(s) for this model: {missing[:10]}")
            unexpected = sorted(keys - set(shapes))
            if unexpected:
                raise AdapterFileError(f"{path}: tensor(s) matching no module of this model: {unexpected[:10]}")
            for key, shape in shapes.items():
                found = tuple(handle.get_slice(key).get_shape())
                if found != shape:
                    raise AdapterFileError(f"{path}: {key} has shape {found}, the model needs {shape}")
            tensors = {key: handle.get_tensor(key) for key in shapes}
    except AdapterFileError:
        raise
    except Exception as exc:  # safetensors raises its own types for corrupt headers and truncated data
        raise AdapterFileError(f"{path}: not a readable safetensors file: {exc}") from None
    for key, tensor in tensors.items():
        if key.endswith(A_SUFFIX) and not tensor.is_floating_point():
            raise AdapterFileError(f"{path}: {key} has dtype {tensor.dtype}, expected a floating-point type")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise AdapterFileError(f"{path}: {key} contains NaN or Inf")
    return tensors


def load_adapter(model: "SingLoRAModel", directory: str | os.PathLike, adapter_name: str) -> None:
    """Add adapter ``adapter_name`` to ``model`` from ``directory``. Everything is validated first: on any
    error the model is left exactly as it was."""
    config, meta = read_adapter_config(directory)
    if adapter_name in model.configs:
        raise SingLoRAError(f"adapter {adapter_name!r} already exists; delete_adapter() it first")
    path = Path(directory) / WEIGHTS_FILE
    try:
        shapes = expected_shapes(model, config)
    except SingLoRAError as exc:
        raise AdapterFileError(f"{Path(directory) / CONFIG_FILE}: does not fit this model: {exc}") from None
    tensors = read_adapter_tensors(path, shapes)
    model.add_adapter(adapter_name, config)
    state = adapter_state_dict(model, adapter_name)
    with torch.no_grad():
        for key, target in state.items():
            target.copy_(tensors[key])
    model.set_step(meta["ramp_step"], adapter_name)
