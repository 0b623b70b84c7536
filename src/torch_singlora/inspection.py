"""``singlora inspect``: what an adapter folder holds, read as warily as a loader reads it.

The config goes through ``read_adapter_config`` and the weights' header through ``read_adapter_header`` (the
loaders' own checks), then everything a loader checks that needs no base model: every ``<module>.singlora_A`` is a
floating ``(n, r)`` matrix (``(experts, n, r)`` for expert parameters) with ``r = config.rank_for(module) <= n``;
every other key belongs to a ``modules_to_save`` entry; no value is NaN/Inf. Tensors are read block by block (at
most ``BLOCK_ELEMENTS`` values at a time, at the offsets of the checked header), so memory stays small whatever
the file's size. What needs the base model (each module exists, its ``n``, the saved tensors' dtypes) is checked
when the adapter is loaded or exported.

Every string that comes from the files is shown escaped: no terminal control sequence reaches the terminal.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import IO, Any, Iterator

import torch

from .adapter_file import A_SUFFIX, WEIGHTS_FILE, as_directory, read_adapter_config, read_adapter_header
from .errors import AdapterFileError
from .functional import saved_coefficient
from .names import name_matches
from .untrusted import SAFETENSORS_DTYPES, open_regular, read_bytes

BLOCK_ELEMENTS = 2**22  # values read at once
MAX_SHOWN = 160  # characters of one file-provided name or value in the text output (a 1 MiB key stays one line)
MAX_NORM_RANK = 4096  # ||A^T A|| needs an r x r float64 matrix: above this rank it is not computed


def printable(text: Any) -> str:
    """``text`` with every non-printable character (terminal escapes, newlines...) written as a Python escape."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text))


def shown(text: Any, limit: int = MAX_SHOWN) -> str:
    """``printable(text)``, cut in the middle to at most about ``limit`` characters (saying how long it was)."""
    escaped = printable(text)
    if len(escaped) <= limit:
        return escaped
    return f"{escaped[: limit // 2]}...<{len(escaped):,} characters>...{escaped[-(limit // 4):]}"


def _blocks(handle: IO[bytes], path: Path, data_start: int, entry: tuple[str, tuple[int, ...], int, int]
            ) -> Iterator[torch.Tensor]:
    """The values of one tensor (a checked header ``entry``), read from the open file in flat blocks of at most
    ``BLOCK_ELEMENTS`` values, each a whole number of rows when a row is smaller than that."""
    dtype, shape, begin, _ = entry
    torch_dtype, itemsize = SAFETENSORS_DTYPES[dtype]
    numel, row = math.prod(shape), math.prod(shape[1:])
    step = max(1, BLOCK_ELEMENTS // max(row, 1)) * row if 0 < row <= BLOCK_ELEMENTS else BLOCK_ELEMENTS
    for start in range(0, numel, step):
        count = min(step, numel - start)
        handle.seek(data_start + begin + start * itemsize)
        raw = read_bytes(handle, count * itemsize, path)
        if len(raw) != count * itemsize:
            raise AdapterFileError(f"{path}: changed while being read (shorter than its header says)")
        yield torch.frombuffer(bytearray(raw), dtype=torch_dtype)


def _saved_owner(module: str, entries: list[str]) -> str | None:
    return next((e for e in entries if name_matches(module, e)), None)


def inspect_adapter(adapter: str | Path) -> dict[str, Any]:
    """A SingLoRA adapter folder's config, ramp (t, T, u), parameter counts, and per module the shape of ``A``,
    ``norm_A = ||A||_F`` and ``norm_update = s * u * ||A^T A||_F`` (the update's norm when the layer is square; an
    upper bound on the truncated block otherwise). Raises ``AdapterFileError`` for any file a loader refuses."""
    directory = as_directory(adapter)
    config, meta = read_adapter_config(directory)
    path = directory / WEIGHTS_FILE
    entries = read_adapter_header(path)
    saved_entries = config.modules_to_save or []
    ranks: dict[str, int] = {}
    saved: dict[str, list[str]] = {}
    for key, (dtype, shape, _, _) in sorted(entries.items()):
        module, _, tensor = key.rpartition(".")
        if tensor == A_SUFFIX:
            r = config.rank_for(module)
            if not module or len(shape) not in (2, 3) or shape[-1] != r or shape[-2] < r or \
                    not dtype.startswith(("F", "BF")):
                raise AdapterFileError(f"{path}: {shown(key)} has shape {list(shape)} of {dtype}; a loader needs a "
                                       f"floating (n, r) matrix (or (experts, n, r) stack) with r = {r} (the "
                                       "config's rank for it) <= n")
            ranks[module] = r
        else:
            owner = _saved_owner(module, saved_entries)
            if owner is None:
                raise AdapterFileError(f"{path}: {shown(key)} is neither <module>.{A_SUFFIX} nor a tensor of a "
                                       f"modules_to_save module {saved_entries}")
            saved.setdefault(owner, []).append(key)
    if not ranks:
        raise AdapterFileError(f"{path}: no <module>.{A_SUFFIX} tensor: not a SingLoRA adapter")
    T = config.resolve_ramp_up_steps()
    step = meta["ramp_step"]
    u = saved_coefficient(1.0, step, T)
    modules: dict[str, dict[str, Any]] = {}
    handle, size = open_regular(path, None, "adapter weights")
    data_start = size - max((end for _, _, _, end in entries.values()), default=0)
    with handle:
        for key, entry in sorted(entries.items()):
            shape = entry[1]
            is_A = key.endswith("." + A_SUFFIX)
            n, r = shape[-2:] if is_A else (0, 0)
            stacked = is_A and len(shape) == 3  # expert adapters: one (n, r) matrix per expert
            norms = is_A and r <= MAX_NORM_RANK and (not stacked or n * r <= BLOCK_ELEMENTS)
            gram = torch.zeros(r, r, dtype=torch.float64) if norms and not stacked else None
            square_sum, gram_squares = 0.0, 0.0
            for block in _blocks(handle, path, data_start, entry):
                if block.is_floating_point() and not torch.isfinite(block).all():
                    raise AdapterFileError(f"{path}: {shown(key)} contains NaN or Inf")
                if is_A:
                    block = block.double()
                    square_sum += float(block.square().sum())
                    if gram is not None:
                        rows = block.view(-1, r)
                        gram += rows.T @ rows
                    elif norms:  # whole experts per block: sum of ||A_e^T A_e||^2
                        experts = block.view(-1, n, r)
                        gram_squares += float((experts.mT @ experts).square().sum())
            if is_A:
                name = key[: -len(A_SUFFIX) - 1]
                gram_norm = float(gram.norm()) if gram is not None else math.sqrt(gram_squares)
                modules[name] = {
                    "shape": list(shape), "norm_A": math.sqrt(square_sum),
                    "norm_update": config.scale_for(name) * u * gram_norm if norms else None,
                }
    numel = {key: math.prod(shape) for key, (_, shape, _, _) in entries.items()}
    return {
        "adapter": str(adapter), "ramp_step": step, "ramp_up_steps": T, "u": u,
        "parameters": sum(numel.values()),
        "adapter_parameters": sum(numel[k] for k in numel if k.endswith("." + A_SUFFIX)),
        "saved_modules": sorted({key.rpartition(".")[0] for keys in saved.values() for key in keys}),
        "config": config.to_dict(), "modules": modules, **{k: v for k, v in meta.items() if k != "ramp_step"},
    }


def _config_line(config: dict[str, Any]) -> str:
    """``name=value`` pairs (``repr``, so escaped; long values cut, ``shown``); lists longer than 8 are summarised."""
    parts = []
    for name, value in config.items():
        if value in (None, {}, []):
            continue
        if isinstance(value, (list, dict)) and len(value) > 8:
            shown_value = f"<{len(value)} {'entries' if isinstance(value, dict) else 'names'}>"
        else:
            shown_value = shown(repr(value))
        parts.append(f"{name}={shown_value}")
    return ", ".join(parts)


def format_inspection(report: dict[str, Any]) -> str:
    """The text ``singlora inspect`` prints: a header, then one line per saved module and per adapted module."""
    T = report["ramp_up_steps"]
    lines = [
        f"adapter: {printable(report['adapter'])}  (format {printable(report['format'])} v{report['format_version']})",
        f"base model: {shown(report.get('base_model_name_or_path'))}",
        f"ramp: t = {report['ramp_step']}, T = {'unknown (a fraction of an unknown total)' if T is None else T}, "
        f"u = {report['u']:.4f}",
        f"parameters: {report['parameters']:,} ({report['adapter_parameters']:,} in A matrices, "
        f"{len(report['modules'])} modules)",
        "config: " + _config_line(report["config"]),
    ]
    if report["saved_modules"]:
        lines.append(f"trained fully and saved ({len(report['saved_modules'])}):")
        lines += [f"  {shown(name)}" for name in report["saved_modules"]]
    names = {name: shown(name) for name in report["modules"]}  # a long name is cut, not padded to on every line
    width = max((len(text) for text in names.values()), default=6)
    lines.append(f"{'module'.ljust(width)}  {'A shape':>12}  {'||A||':>9}  {'s*u*||AtA||':>12}")
    for name, row in report["modules"].items():
        update = "n/a" if row["norm_update"] is None else f"{row['norm_update']:.4f}"
        lines.append(f"{names[name].ljust(width)}  {'x'.join(map(str, row['shape'])):>12}  {row['norm_A']:9.4f}  "
                     f"{update:>12}")
    return "\n".join(lines)
