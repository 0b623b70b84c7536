"""Adapter files: ``adapter_config.json`` + ``adapter_model.safetensors``. No pickle anywhere; atomic writes.

Format ``singlora``, version 1:

``adapter_config.json``
    ``{"format": "singlora", "format_version": 1, "ramp_step": <int t>, "base_model_name_or_path": <str|null>,
    <every SingLoRAConfig field>}``

``adapter_model.safetensors`` (safetensors metadata ``{"format": "singlora", "format_version": "1"}``)
    - ``<module>.singlora_A``: ``(n, r)`` for every adapted module, ``<module>`` its name in the base model
      (e.g. ``encoder.layer.0.attention.self.query.singlora_A``); the adapter name is not part of the key.
    - ``<module>.<tensor>``: the full state of every ``modules_to_save`` module (e.g. ``classifier.weight``).

Loading treats both files as hostile: each must be a regular file under a size cap; the JSON is parsed strictly
(no NaN, no duplicate keys); the safetensors header (8-byte length + JSON) is parsed and checked here, against the
file size and against the keys, shapes and dtypes this model needs, before any tensor is read; then the data
(whose size is now bounded by the model's own adapter size) is read once and checked for NaN/Inf. Only then does
the model change. Pickled weights (``.bin``, ``.pt``, ...) are never opened.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import stat
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from .config import SingLoRAConfig
from .errors import AdapterFileError, SingLoRAError
from .plan import plan_adapter

if TYPE_CHECKING:
    from .model import SingLoRAModel

FORMAT_NAME = "singlora"
FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
A_SUFFIX = "singlora_A"
_META_FIELDS = ("format", "format_version", "ramp_step", "base_model_name_or_path")
MAX_CONFIG_BYTES = 16 * 2**20  # adapter_config.json
MAX_HEADER_BYTES = 16 * 2**20  # the JSON header of adapter_model.safetensors
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SAVE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# safetensors dtype name -> (torch dtype, bytes per element). Unknown names are refused.
SAFETENSORS_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, fsync it, then rename it over ``path``.

    A crash at any point leaves either the old ``path`` or the new one, never a torn file (at worst a stray
    ``.<name>.*.tmp`` beside it, which ``remove_stale_temps`` deletes). An I/O failure (disk full, unwritable
    directory) raises ``SingLoRAError`` naming ``path``, removes the temp file and leaves the old ``path`` untouched.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        tmp = None
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except (OSError, RuntimeError) as exc:  # RuntimeError: torch.save's writer on a full disk
        if isinstance(exc, RuntimeError) and "write" not in str(exc).lower():
            raise
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SingLoRAError(f"{path}: cannot write: {reason}; the previous {path.name}, if any, is unchanged") from exc
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``atomic_write`` of a UTF-8 text file."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside ``path`` to fill; on success it replaces ``path`` (a folder or nothing).

    If the body raises, the temp folder is removed and ``path`` is untouched. The swap is two renames (the old
    folder aside, the new one in), so a crash leaves either the old folder, or the new one, or the new one
    complete under a ``.<name>.*.tmp`` name; never a half-written ``path``.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SingLoRAError(f"{path}: exists and is not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise SingLoRAError(f"{path}: cannot write: {exc.strerror}") from exc
    try:
        yield tmp
        old = path.parent / f"{tmp.name}.old" if path.exists() else None
        if old is not None:
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        raise SingLoRAError(f"{path}: cannot write: {exc.strerror or exc}; the previous {path.name}, if any, is "
                            "unchanged") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_TEMP_NAME = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp")  # what ``tempfile.mkstemp`` makes in ``atomic_write``


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Delete the ``.<name>.XXXXXXXX.tmp`` files a process killed inside ``atomic_write`` left in ``directory``.

    Only for a directory one process owns (a training run's output folder): a concurrent writer's temp file would
    go too. Returns the removed paths; a missing directory removes nothing.
    """
    directory = Path(directory)
    stale = [p for p in directory.glob(".*.tmp") if _TEMP_NAME.fullmatch(p.name) and p.is_file()] \
        if directory.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


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


def _as_path(directory: Any) -> Path:
    """``directory`` as a Path; ``SingLoRAError`` naming the argument for a wrong type."""
    if not isinstance(directory, (str, os.PathLike)) or not str(directory):
        raise SingLoRAError(f"directory={directory!r} must be a path (str or os.PathLike)")
    return Path(directory)


def _check_arguments(directory: Any, adapter_name: Any) -> Path:
    """``directory`` as a Path, after checking ``adapter_name``."""
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise SingLoRAError(f"adapter_name={adapter_name!r} must be a non-empty string without '.'")
    return _as_path(directory)


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


def save_adapter(model: "SingLoRAModel", directory: str | os.PathLike, adapter_name: str,
                 dtype: str | torch.dtype | None = None) -> None:
    """Write one adapter's two files into ``directory`` (created if missing), each atomically.

    ``dtype``: storage type of every floating tensor (``A`` and ``modules_to_save`` tensors): ``"float32"``,
    ``"bfloat16"`` or ``"float16"`` (half the size); ``None`` keeps the training dtype. Loading casts back to the
    model's dtypes; the file's safetensors header (and its metadata ``dtype``) records what was stored.
    """
    directory = _check_arguments(directory, adapter_name)
    config = model.configs.get(adapter_name)
    if config is None:
        raise SingLoRAError(f"adapter {adapter_name!r} does not exist; adapters are {sorted(model.configs)}")
    stored = storage_dtype(dtype)
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model, adapter_name).items()}
    tensors = cast_for_storage(tensors, stored)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)}
    if stored is not None:
        metadata["dtype"] = str(stored).removeprefix("torch.")
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    document = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "ramp_step": model.get_step(adapter_name),
        "base_model_name_or_path": getattr(getattr(model.model, "config", None), "name_or_path", None) or None,
        **config.to_dict(),
    }
    text = json.dumps(document, indent=2, sort_keys=True) + "\n"
    atomic_write_text(directory / CONFIG_FILE, text)


# ---- reading, hostile input first ---------------------------------------------------------------------------


def _open_regular(path: Path, limit: int | None, what: str) -> tuple[Any, int]:
    """Open ``path`` for reading if it is a regular file (symlinks to one are fine, as in the HF cache) no larger
    than ``limit`` bytes; returns ``(handle, size)``. FIFOs, devices and directories are refused unopened."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise AdapterFileError(f"{path}: no such file ({what})") from None
    except OSError as exc:
        raise AdapterFileError(f"{path}: cannot stat: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise AdapterFileError(f"{path}: not a regular file ({what})")
    try:  # O_NONBLOCK: should the path become a FIFO after the stat, opening it still returns at once
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise AdapterFileError(f"{path}: cannot open: {exc.strerror}") from None
    info = os.fstat(fd)  # what was actually opened
    if not stat.S_ISREG(info.st_mode) or (limit is not None and info.st_size > limit):
        os.close(fd)
        regular = stat.S_ISREG(info.st_mode)
        reason = f"{info.st_size} bytes, over the {limit}-byte limit" if regular else "not a regular file"
        raise AdapterFileError(f"{path}: {reason} ({what})")
    return os.fdopen(fd, "rb"), info.st_size


def _strict_json(text: bytes, path: Path) -> Any:
    """``json.loads`` that refuses NaN/Infinity constants, duplicate keys, non-UTF-8 and absurd nesting."""

    def no_constant(name: str) -> None:
        raise AdapterFileError(f"{path}: JSON constant {name} is not allowed")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        document: dict[str, Any] = {}
        for key, value in pairs:
            if key in document:
                raise AdapterFileError(f"{path}: duplicate JSON key {key!r}")
            document[key] = value
        return document

    try:
        return json.loads(text.decode("utf-8"), parse_constant=no_constant, object_pairs_hook=no_duplicates)
    except UnicodeDecodeError as exc:
        raise AdapterFileError(f"{path}: not UTF-8 text: {exc}") from None
    except AdapterFileError:
        raise
    except ValueError as exc:  # JSONDecodeError, or an integer literal over Python's 4,300-digit limit
        raise AdapterFileError(f"{path}: not valid JSON: {exc}") from None
    except RecursionError:
        raise AdapterFileError(f"{path}: JSON nested too deeply") from None


def _unsafe_regex(pattern: str) -> str | None:
    """Why a regex from a file could backtrack catastrophically (a repeat inside a repeat), or None.

    A heuristic, enough for module-name patterns: loading must not hang on a crafted ``target_modules``.
    """
    import re._parser as sre_parse  # the stdlib's own regex parser (3.11+)

    def repeats(items: Any, depth: int) -> str | None:
        for op, arg in items:
            name = str(op)
            if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                _, high, sub = arg
                if high > 1 and depth > 0:
                    return "a repeat nested inside a repeat"
                found = repeats(sub, depth + (high > 1))
            elif name == "SUBPATTERN":
                found = repeats(arg[-1], depth)
            elif name == "BRANCH":
                if depth > 0:
                    return "an alternation inside a repeat"
                found = next((r for branch in arg[1] if (r := repeats(branch, depth))), None)
            elif name in ("ASSERT", "ASSERT_NOT"):
                found = repeats(arg[1], depth)
            else:
                found = None
            if found:
                return found
        return None

    if len(pattern) > 1000:
        return f"{len(pattern)} characters long (limit 1000)"
    try:
        return repeats(sre_parse.parse(pattern), 0)
    except Exception as exc:  # re.error, or a parser internal on odd input
        return f"not a valid regex: {exc}"


def _check_file_patterns(path: Path, fields: dict[str, Any]) -> None:
    """Refuse regexes in a config file that could hang matching (``target_modules``, pattern-dict keys)."""
    checks: list[tuple[str, Any]] = []
    for name in ("target_modules", "exclude_modules"):
        if isinstance(fields.get(name), str) and fields[name] != "all-linear":
            checks.append((name, fields[name]))
    for name in ("rank_pattern", "alpha_pattern"):
        if isinstance(fields.get(name), dict):
            checks.extend((f"{name} key", key) for key in fields[name])
    for name, pattern in checks:
        reason = _unsafe_regex(pattern) if isinstance(pattern, str) else None
        if reason:
            raise AdapterFileError(f"{path}: {name} {pattern!r} is refused: {reason}")


def read_adapter_config(directory: str | os.PathLike) -> tuple[SingLoRAConfig, dict[str, Any]]:
    """Parse and validate ``adapter_config.json``: ``(config, {format, format_version, ramp_step, ...})``."""
    path = _as_path(directory) / CONFIG_FILE
    if not Path(directory).is_dir():
        raise AdapterFileError(f"{directory}: not a directory (expected a singlora adapter directory)")
    handle, _ = _open_regular(path, MAX_CONFIG_BYTES, f"is {directory} a singlora adapter directory?")
    with handle:
        document = _strict_json(handle.read(MAX_CONFIG_BYTES + 1), path)
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
    meta = {k: document[k] for k in _META_FIELDS if k in document}
    fields = {k: v for k, v in document.items() if k not in _META_FIELDS}
    _check_file_patterns(path, fields)
    try:
        config = SingLoRAConfig.from_dict(fields, source=str(path))
    except SingLoRAError as exc:
        raise AdapterFileError(str(exc)) from None
    except (TypeError, ValueError, re.error, RecursionError) as exc:  # a field value the validator did not foresee
        raise AdapterFileError(f"{path}: invalid config: {exc!r}") from None
    return config, meta


def _expected_tensors(model: "SingLoRAModel", config: SingLoRAConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{file key: (shape, dtype the model holds)}`` that ``config`` implies for ``model`` (no change to it)."""
    plan = plan_adapter(model.model, config)
    expected = {f"{name}.{A_SUFFIX}": (m.a_shape, torch.float32) for name, m in plan.modules.items()}
    expected.update(plan.saved_tensors)
    return expected


def expected_shapes(model: "SingLoRAModel", config: SingLoRAConfig) -> dict[str, tuple[int, ...]]:
    """File keys and shapes that ``config`` implies for ``model``'s modules (no change to the model)."""
    return {key: shape for key, (shape, _) in _expected_tensors(model, config).items()}


def _is_size(value: Any) -> bool:
    """A dimension or byte offset: an int in [0, 2**63)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def read_safetensors_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[str, tuple[int, ...], int, int]]]:
    """Parse and check a safetensors header without the safetensors library and without reading any tensor.

    Returns ``(metadata, {key: (dtype name, shape, begin, end)})``, offsets relative to the data section. Checks:
    a regular file; header length <= ``MAX_HEADER_BYTES`` and inside the file; strict JSON; every entry has a
    known dtype, a shape of non-negative ints and offsets whose span is exactly ``numel * itemsize``; the spans
    tile the data section (no gaps, overlaps, or bytes past the file's end).
    """
    handle, size = _open_regular(path, None, "adapter weights")
    with handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise AdapterFileError(f"{path}: {size} bytes, too short for a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES:
            raise AdapterFileError(f"{path}: header declares {length} bytes, over the {MAX_HEADER_BYTES}-byte limit")
        if 8 + length > size:
            raise AdapterFileError(f"{path}: header declares {length} bytes but the file has {size} (truncated?)")
        document = _strict_json(handle.read(length), path)
    if not isinstance(document, dict):
        raise AdapterFileError(f"{path}: header is a JSON {type(document).__name__}, expected an object")
    metadata = document.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterFileError(f"{path}: __metadata__={metadata!r} must be an object of strings")
    entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    data_size = size - 8 - length
    for key, entry in document.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise AdapterFileError(f"{path}: {key!r}: header entry {entry!r} needs exactly dtype, shape, data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise AdapterFileError(f"{path}: {key!r}: dtype {dtype!r} is not one of {sorted(SAFETENSORS_DTYPES)}")
        if not (isinstance(shape, list) and len(shape) <= 32 and all(_is_size(d) for d in shape)):
            raise AdapterFileError(f"{path}: {key!r}: shape {shape!r} must be a list of at most 32 ints in [0, 2**63)")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_size(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise AdapterFileError(f"{path}: {key!r}: data_offsets {offsets!r} must be [begin, end], 0 <= begin <= end")
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype][1]
        if offsets[1] - offsets[0] != nbytes:
            raise AdapterFileError(
                f"{path}: {key!r}: shape {shape} of {dtype} is {nbytes} bytes, data_offsets {offsets} span "
                f"{offsets[1] - offsets[0]}"
            )
        if offsets[1] > data_size:
            raise AdapterFileError(
                f"{path}: {key!r}: data_offsets {offsets} end past the {data_size} data bytes of the file (truncated?)"
            )
        entries[key] = (dtype, tuple(shape), offsets[0], offsets[1])
    position = 0
    for key, (_, _, begin, end) in sorted(entries.items(), key=lambda item: (item[1][2], item[1][3])):
        if begin != position:
            raise AdapterFileError(f"{path}: {key!r}: data starts at {begin}, expected {position} (gap or overlap)")
        position = end
    if position != data_size:
        raise AdapterFileError(f"{path}: tensors cover {position} data bytes, the file holds {data_size} (truncated?)")
    return metadata, entries


def _pickle_hint(directory: Path) -> str:
    """A note on pickled weights found in ``directory`` (never opened), with a safe conversion command."""
    try:
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    except OSError:
        return ""
    if not pickles:
        return ""
    return (
        f"; found pickled weights {pickles}, which singlora never loads (unpickling can run arbitrary code). "
        "Convert them once, in a process you trust, with torch's weights-only unpickler: python -c \"import torch; "
        "from safetensors.torch import save_file; "
        f"save_file(torch.load('{pickles[0]}', weights_only=True), '{WEIGHTS_FILE}', "
        f"metadata={{'format': '{FORMAT_NAME}', 'format_version': '{FORMAT_VERSION}'}})\" (keys must be "
        f"'<module>.{A_SUFFIX}')"
    )


def read_adapter_tensors(
    path: Path, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype] | None = None
) -> dict[str, torch.Tensor]:
    """Load ``path``'s tensors, checking keys, shapes and dtypes from the header (``read_safetensors_header``)
    before reading any data, then finiteness. ``A`` tensors need a floating dtype; ``dtypes`` (optional): the
    model's dtype per other key (a floating tensor needs a floating file dtype; an integer/bool one its own)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise AdapterFileError(f"{path}: no such file{_pickle_hint(path.parent)}")
    metadata, entries = read_safetensors_header(path)
    if metadata.get("format") != FORMAT_NAME:
        raise AdapterFileError(f"{path}: metadata format={metadata.get('format')!r}, expected {FORMAT_NAME!r}")
    missing = sorted(set(shapes) - set(entries))
    if missing:
        raise AdapterFileError(f"{path}: missing tensor(s) for this model: {missing[:10]}")
    unexpected = sorted(set(entries) - set(shapes))
    if unexpected:
        raise AdapterFileError(f"{path}: tensor(s) matching no module of this model: {unexpected[:10]}")
    for key, shape in shapes.items():
        dtype, found, _, _ = entries[key]
        if found != tuple(shape):
            raise AdapterFileError(f"{path}: {key} has shape {found}, the model needs {tuple(shape)}")
        wanted = torch.float32 if key.endswith(A_SUFFIX) else (dtypes or {}).get(key)
        if wanted is None:  # a saved module's tensor and no dtype given: any known dtype (cast on copy)
            continue
        if wanted.is_floating_point and dtype not in _FLOAT_DTYPES:
            raise AdapterFileError(f"{path}: {key} has dtype {dtype}, expected a floating-point type {_FLOAT_DTYPES}")
        if not wanted.is_floating_point and SAFETENSORS_DTYPES[dtype][0] != wanted:
            raise AdapterFileError(f"{path}: {key} has dtype {dtype}, the model holds {wanted}")
    # The data size now equals what this model's adapter needs: reading it is a bounded allocation.
    tensors = _read_data(path, entries)
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise AdapterFileError(f"{path}: {key} contains NaN or Inf")
    return tensors


def _read_data(path: Path, entries: dict[str, tuple[str, tuple[int, ...], int, int]]) -> dict[str, torch.Tensor]:
    """Read the whole file once, parse those bytes, and check they hold what the (checked) header ``entries`` said:
    a file swapped after the header check is refused, never copied."""
    handle, _ = _open_regular(path, None, "adapter weights")
    with handle:
        blob = handle.read()
    try:
        tensors = load_safetensors_bytes(blob)
    except Exception as exc:  # already checked; anything left is still a corrupt file, never a crash
        raise AdapterFileError(f"{path}: not a readable safetensors file: {exc}") from None
    if tensors.keys() != entries.keys() or any(
        tuple(tensors[key].shape) != shape or tensors[key].dtype != SAFETENSORS_DTYPES[dtype][0]
        for key, (dtype, shape, _, _) in entries.items()
    ):
        raise AdapterFileError(f"{path}: changed while being read (keys, shapes or dtypes differ from its header)")
    return tensors


def read_safetensors_file(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """``(metadata, tensors)`` of any safetensors file, header checked first (``read_safetensors_header``): for
    tools that read an adapter without a model (``singlora inspect``, converters). No NaN check."""
    metadata, entries = read_safetensors_header(Path(path))
    return metadata, _read_data(Path(path), entries)


def _read_fitting(model: "SingLoRAModel", directory: Path, config: SingLoRAConfig) -> dict[str, torch.Tensor]:
    """The tensors of ``directory`` after checking keys, shapes and dtypes against what ``config`` gives ``model``."""
    try:
        expected = _expected_tensors(model, config)
    except SingLoRAError as exc:
        raise AdapterFileError(f"{directory / CONFIG_FILE}: does not fit this model: {exc}") from None
    return read_adapter_tensors(
        directory / WEIGHTS_FILE, {k: shape for k, (shape, _) in expected.items()},
        {k: dtype for k, (_, dtype) in expected.items()},
    )


def _copy_into(model: "SingLoRAModel", adapter_name: str, tensors: dict[str, torch.Tensor], step: int,
               path: Path) -> None:
    """Copy checked ``tensors`` (read from ``path``) into the existing adapter's parameters (same objects) and set
    its ramp step. Each tensor is cast to its parameter's dtype and checked finite there before anything is copied:
    an F64 value beyond float32's range (or an F32 one beyond a float16 parameter's) would otherwise load as Inf."""
    targets = adapter_state_dict(model, adapter_name)
    cast = {key: tensors[key].to(target.dtype) for key, target in targets.items()}
    for key, value in cast.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise AdapterFileError(f"{path}: {key} holds values beyond the range of {value.dtype} (they would load "
                                   f"as Inf); the file stores {tensors[key].dtype}")
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(cast[key])
    model.set_step(step, adapter_name)


def load_adapter(model: "SingLoRAModel", directory: str | os.PathLike, adapter_name: str) -> None:
    """Add adapter ``adapter_name`` to ``model`` from ``directory``. Everything is validated first: on any
    error the model is left exactly as it was (modules, tensors, ``requires_grad`` flags)."""
    directory = _check_arguments(directory, adapter_name)
    config, meta = read_adapter_config(directory)
    if adapter_name in model.configs:
        raise SingLoRAError(f"adapter {adapter_name!r} already exists; delete_adapter() it first")
    tensors = _read_fitting(model, directory, config)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.add_adapter(adapter_name, config)
        _copy_into(model, adapter_name, tensors, meta["ramp_step"], directory / WEIGHTS_FILE)
    except BaseException:  # roll back: the model is as it was
        if adapter_name in model.configs:
            model.delete_adapter(adapter_name)
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        raise


def load_adapter_in_place(model: "SingLoRAModel", directory: str | os.PathLike, adapter_name: str) -> None:
    """Copy a saved adapter's tensors and ramp step into the existing adapter ``adapter_name`` (same parameter
    objects, so an optimizer holding them stays valid: resuming). The files must fit that adapter exactly (keys,
    shapes, dtypes, as its own config gives them); everything is checked before anything is copied."""
    directory = _check_arguments(directory, adapter_name)
    model.adapter_modules(adapter_name)  # the adapter must exist
    saved_config, meta = read_adapter_config(directory)
    tensors = _read_fitting(model, directory, model.configs[adapter_name])
    if model.get_ramp_up_steps(adapter_name) is None and saved_config.total_steps is not None:
        model.set_total_steps(saved_config.total_steps, adapter_name)  # the run's length, known when it was saved
    _copy_into(model, adapter_name, tensors, meta["ramp_step"], directory / WEIGHTS_FILE)
