"""Readers for files that may be hostile: every JSON and safetensors file singlora reads goes through here.

Self-contained (stdlib, torch, safetensors; nothing else from this package but its errors), so it can be fuzzed
alone. Every refusal is an ``AdapterFileError`` naming the file (and the key or field):

- ``open_regular``: regular files only (symlinks to one are fine, as in the HF cache; FIFOs, devices and folders are
  refused unopened), under a size cap; read errors (``EIO``...) are wrapped, never a bare ``OSError``.
- ``read_json``: the one strict JSON reader: size-capped, UTF-8, no ``NaN``/``Infinity``, no duplicate keys, no
  absurd nesting or integers (``parse_json``; the rows of data files are parsed by it too, see ``datafiles``).
- ``read_safetensors_header``: the header parsed here, not by safetensors: the 8-byte length at most
  ``MAX_HEADER_BYTES`` and inside the file; each entry a known dtype, a shape of non-negative ints and offsets
  spanning exactly ``numel * itemsize`` bytes; the spans tile the data section.
- ``read_expected``: keys, shapes and dtypes checked against what the caller expects *before* any tensor is read
  (the data is then bounded by the caller's own expectation), read once, re-checked, refused if NaN/Inf.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from pathlib import Path
from typing import IO, Any, Optional

import torch
from safetensors.torch import load as load_safetensors_bytes

from .errors import AdapterFileError

MAX_JSON_BYTES = 16 * 2**20  # any JSON file singlora reads (adapter_config.json, run_info.json, manifests)
MAX_HEADER_BYTES = 16 * 2**20  # the JSON header of a safetensors file
# safetensors dtype name -> (torch dtype, bytes per element). Unknown names are refused.
SAFETENSORS_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")  # never opened: unpickling runs code
Entries = dict[str, tuple[str, tuple[int, ...], int, int]]  # key -> (dtype name, shape, begin, end)
Expected = dict[str, tuple[tuple[int, ...], Optional[torch.dtype]]]  # key -> (shape, dtype the caller holds)


def open_regular(path: str | os.PathLike, limit: int | None, what: str) -> tuple[IO[bytes], int]:
    """Open ``path`` for reading if it is a regular file (symlinks to one are fine) no larger than ``limit`` bytes;
    returns ``(handle, size)``. FIFOs, devices and directories are refused unopened."""
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise AdapterFileError(f"{path}: no such file ({what})") from None
    except OSError as exc:
        raise AdapterFileError(f"{path}: cannot stat: {exc.strerror} ({what})") from None
    if not stat.S_ISREG(info.st_mode):
        raise AdapterFileError(f"{path}: not a regular file ({what})")
    try:  # O_NONBLOCK: should the path become a FIFO after the stat, opening it still returns at once
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise AdapterFileError(f"{path}: cannot open: {exc.strerror} ({what})") from None
    info = os.fstat(fd)  # what was actually opened
    if not stat.S_ISREG(info.st_mode) or (limit is not None and info.st_size > limit):
        os.close(fd)
        regular = stat.S_ISREG(info.st_mode)
        reason = f"{info.st_size} bytes, over the {limit}-byte limit" if regular else "not a regular file"
        raise AdapterFileError(f"{path}: {reason} ({what})")
    return os.fdopen(fd, "rb"), info.st_size


def pickle_hint(directory: str | os.PathLike, safetensors_name: str, metadata: dict[str, str]) -> str:
    """``""``, or a note naming the pickled weights in ``directory`` (never opened) and a one-line conversion into
    ``safetensors_name`` (with ``metadata``) through torch's weights-only unpickler, to run in a process one trusts."""
    try:
        pickles = sorted(p.name for p in Path(directory).iterdir() if p.suffix in PICKLE_SUFFIXES)
    except OSError:
        return ""
    if not pickles:
        return ""
    return (f"; found pickled weights {pickles}, which singlora never loads (unpickling can run arbitrary code). "
            "Convert them once, in a process you trust, with torch's weights-only unpickler: python -c \"import torch; "
            f"from safetensors.torch import save_file; save_file(torch.load('{pickles[0]}', weights_only=True), "
            f"'{safetensors_name}', metadata={metadata!r})\"")


def read_bytes(handle: IO[bytes], count: int, path: str | os.PathLike) -> bytes:
    """``handle.read(count)`` (``-1``: all) with an ``OSError`` (e.g. ``EIO``) turned into ``AdapterFileError``."""
    try:
        return handle.read(count)
    except OSError as exc:
        raise AdapterFileError(f"{path}: cannot read: {exc.strerror or exc}") from None


def parse_json(text: bytes | str, path: str | os.PathLike) -> Any:
    """``json.loads`` that refuses NaN/Infinity constants, duplicate keys, non-UTF-8 and absurd nesting. ``text``:
    UTF-8 bytes, or text already decoded (a data file in the user's ``--encoding``); ``path`` names it in errors."""

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
        document = text.decode("utf-8") if isinstance(text, bytes) else text
        return json.loads(document, parse_constant=no_constant, object_pairs_hook=no_duplicates)
    except UnicodeDecodeError as exc:
        raise AdapterFileError(f"{path}: not UTF-8 text: {exc}") from None
    except AdapterFileError:
        raise
    except ValueError as exc:  # JSONDecodeError, or an integer literal over Python's 4,300-digit limit
        raise AdapterFileError(f"{path}: not valid JSON: {exc}") from None
    except RecursionError:
        raise AdapterFileError(f"{path}: JSON nested too deeply") from None


def read_json(path: str | os.PathLike, *, what: str, limit: int = MAX_JSON_BYTES) -> Any:
    """The strict JSON document in ``path``: a regular file of at most ``limit`` bytes (``parse_json``).
    ``what`` says what the file should be, for the error message."""
    handle, _ = open_regular(path, limit, what)
    with handle:
        text = read_bytes(handle, limit + 1, path)
    if len(text) > limit:  # grew after the size check
        raise AdapterFileError(f"{path}: over the {limit}-byte limit ({what})")
    return parse_json(text, path)


def _is_size(value: Any) -> bool:
    """A dimension or byte offset: an int in [0, 2**63)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def read_safetensors_header(path: str | os.PathLike, what: str = "adapter weights") -> tuple[dict[str, str], Entries]:
    """Parse and check a safetensors header without the safetensors library and without reading any tensor.

    Returns ``(metadata, {key: (dtype name, shape, begin, end)})``, offsets relative to the data section.
    """
    path = Path(path)
    handle, size = open_regular(path, None, what)
    with handle:
        prefix = read_bytes(handle, 8, path)
        if len(prefix) < 8:
            raise AdapterFileError(f"{path}: {size} bytes, too short for a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES:
            raise AdapterFileError(f"{path}: header declares {length} bytes, over the {MAX_HEADER_BYTES}-byte limit")
        if 8 + length > size:
            raise AdapterFileError(f"{path}: header declares {length} bytes but the file has {size} (truncated?)")
        document = parse_json(read_bytes(handle, length, path), path)
    if not isinstance(document, dict):
        raise AdapterFileError(f"{path}: header is a JSON {type(document).__name__}, expected an object")
    metadata = document.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterFileError(f"{path}: __metadata__={metadata!r} must be an object of strings")
    entries: Entries = {}
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


def read_safetensors_data(path: str | os.PathLike, entries: Entries) -> dict[str, torch.Tensor]:
    """Read the whole file once, parse those bytes, and check they hold what the (checked) header ``entries`` said:
    a file swapped after the header check is refused, never copied."""
    handle, _ = open_regular(path, None, "adapter weights")
    with handle:
        blob = read_bytes(handle, -1, path)
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


def check_entries(path: str | os.PathLike, entries: Entries, expected: Expected) -> None:
    """Refuse unless ``entries`` hold exactly ``expected``'s keys and shapes, with compatible dtypes: a floating
    expected dtype needs a floating file dtype, an integer/bool one exactly its own; ``None`` accepts any."""
    missing = sorted(set(expected) - set(entries))
    if missing:
        raise AdapterFileError(f"{path}: missing tensor(s) for this model: {missing[:10]}")
    unexpected = sorted(set(entries) - set(expected))
    if unexpected:
        raise AdapterFileError(f"{path}: tensor(s) matching no module of this model: {unexpected[:10]}")
    for key, (shape, wanted) in expected.items():
        dtype, found, _, _ = entries[key]
        if found != tuple(shape):
            raise AdapterFileError(f"{path}: {key} has shape {found}, the model needs {tuple(shape)}")
        if wanted is None:
            continue
        if wanted.is_floating_point and dtype not in FLOAT_DTYPES:
            raise AdapterFileError(f"{path}: {key} has dtype {dtype}, expected a floating-point type {FLOAT_DTYPES}")
        if not wanted.is_floating_point and SAFETENSORS_DTYPES[dtype][0] != wanted:
            raise AdapterFileError(f"{path}: {key} has dtype {dtype}, the model holds {wanted}")


def check_finite(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                 dtypes: dict[str, Optional[torch.dtype]] | None = None) -> None:
    """Refuse NaN/Inf in any floating tensor, also after casting to ``dtypes[key]`` when given: an F64 value beyond
    float32's range would otherwise become Inf in a float32 parameter."""
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            continue
        if not torch.isfinite(tensor).all():
            raise AdapterFileError(f"{path}: {key} contains NaN or Inf")
        target = (dtypes or {}).get(key) or tensor.dtype
        if target.is_floating_point and target != tensor.dtype and not torch.isfinite(tensor.to(target)).all():
            raise AdapterFileError(f"{path}: {key} holds values beyond the range of {target} (they would load as "
                                   f"Inf); the file stores {tensor.dtype}")


def check_update_range(what: str, scale: float, B: torch.Tensor, A: torch.Tensor, dtype: torch.dtype) -> None:
    """Refuse (``AdapterFileError`` starting with ``what``) a low-rank update ``scale * B @ A`` (``B`` (d_out, r),
    ``A`` (r, d_in)) with an entry beyond the range of ``dtype``, the type it is computed in: the model would
    produce Inf/NaN. Bounded first by ``scale * max_i |B_i| * max_j |A_:j|`` (Cauchy-Schwarz, in float64); the
    dense product (float64) is formed only when that bound is over the range."""
    limit = torch.finfo(dtype).max
    if not scale <= limit:  # the layer multiplies by it in ``dtype``
        raise AdapterFileError(f"{what}: its scale {scale:.3g} is beyond the range of {dtype} ({limit:.3g}): the model "
                               "would compute Inf/NaN")
    B, A = B.double(), A.double()
    if not B.numel() or not A.numel():
        return
    bound = scale * float(B.norm(dim=1).max()) * float(A.norm(dim=0).max())
    if math.isfinite(bound) and bound <= limit:
        return
    largest = float((scale * (B @ A)).abs().max())
    if not largest <= limit:
        raise AdapterFileError(f"{what}: its update reaches {largest:.3g} (scale {scale:.3g}), beyond the range of "
                               f"{dtype} ({limit:.3g}): the model would compute Inf/NaN")


def read_expected(path: str | os.PathLike, entries: Entries, expected: Expected) -> dict[str, torch.Tensor]:
    """Tensors of ``path`` (header ``entries`` already parsed) after ``check_entries`` against ``expected``, read
    once (a bounded allocation: the data now equals what the caller expects) and checked finite in the caller's
    dtypes (``check_finite``)."""
    check_entries(path, entries, expected)
    tensors = read_safetensors_data(path, entries)
    check_finite(path, tensors, {key: dtype for key, (_, dtype) in expected.items()})
    return tensors


def read_safetensors_file(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """``(metadata, tensors)`` of any safetensors file, header checked first (``read_safetensors_header``): for
    tools that read a file without a model to bound it (converters). No NaN check."""
    metadata, entries = read_safetensors_header(path)
    return metadata, read_safetensors_data(path, entries)
