"""Data files, read one way for every task: text files, and the rows of ``.jsonl`` / ``.json`` / ``.csv`` tables.

    .jsonl   one JSON object per line (blank lines skipped)                  where: ``data.jsonl line 3``
    .json    an array of objects, or JSON lines (as ``datasets`` reads them)  where: ``data.json row 2`` / ``line 2``
    .csv     a header row, then one row per line; every cell is text           where: ``data.csv row 2 (line 3)``

Each row comes with where it is, so every error about it names the file and the row. What the rows must hold is
checked by the task that reads them (``train.data``: the columns of classification and raw text; ``llm.data``: the
chat formats); this module only refuses what no task could read:

- Encoding, per file: the ``encoding`` given (``--encoding``); else UTF-8 (a leading byte-order mark skipped), and
  a file that is not UTF-8 is read as latin-1 (real corpora mix them: BBC News has 646 UTF-8 articles and one
  latin-1 one), unless it holds NUL bytes (UTF-16, or not text): that one is refused, naming ``--encoding``.
- JSON: the strict parser of ``untrusted.parse_json``: no ``NaN`` / ``Infinity``, no absurd nesting, and a key given
  twice in one object is refused (Python's ``json`` would keep the last value silently). A row must be an object.
- CSV: a header that names no column twice (the rule for JSON keys); each row exactly as many cells as the header
  (a missing or extra cell, often an unquoted comma, is refused rather than filled or dropped).
- A file without any row is refused (``empty dataset``).

Special files (FIFOs, devices) are refused unopened (``untrusted.open_regular``).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Iterator

from .errors import SingLoRAError
from .untrusted import open_regular, parse_json, read_bytes

FILE_TYPES = (".csv", ".jsonl", ".json")
Row = tuple[str, dict[str, Any]]  # (where, row): "data.csv row 2 (line 3)", {"text": ..., "label": ...}


def existing(path: str | Path) -> Path:
    """``path`` as a ``Path``; a ``SingLoRAError`` if nothing is there."""
    path = Path(path)
    if not path.exists():
        raise SingLoRAError(f"data path {str(path)!r} does not exist")
    return path


def read_text(path: str | Path, encoding: str | None = None) -> str:
    """A text file's contents, decoded as ``encoding`` if given, else as UTF-8 with a latin-1 fallback (see the
    module docstring)."""
    handle, _ = open_regular(path, None, "data file")
    with handle:
        data = read_bytes(handle, -1, path)
    if encoding:
        try:
            return data.decode(encoding)
        except LookupError:
            raise SingLoRAError(f"--encoding {encoding!r}: not a text encoding Python knows") from None
        except UnicodeDecodeError as exc:
            raise SingLoRAError(f"{path}: not {encoding} text ({exc.reason} at byte {exc.start}); give the file's "
                                "encoding with --encoding") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if b"\x00" in data:  # UTF-16 / UTF-32, or not text at all: latin-1 would read it as other text
            raise SingLoRAError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}) and it holds NUL bytes "
                                "(UTF-16?); give the file's encoding with --encoding") from None
        return data.decode("latin-1")


def _json_lines(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            where = f"{path} line {number}"
            yield where, parse_json(line, where)


def _json_rows(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    """A JSON array (rows numbered from 1), else JSON lines."""
    if path.suffix.lower() == ".jsonl" or not text.lstrip().startswith("["):
        yield from _json_lines(path, text)
        return
    for number, row in enumerate(parse_json(text, path), start=1):
        yield f"{path} row {number}", row


def _csv_rows(path: Path, text: str) -> list[tuple[str, Any]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[tuple[str, Any]] = []
    try:
        header = next(reader, None)
        if header is None:
            return rows
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            raise SingLoRAError(f"{path}: the header names column(s) {repeated} more than once")
        for cells in reader:
            if not cells:  # a blank line
                continue
            where = f"{path} row {len(rows) + 1} (line {reader.line_num})"
            if len(cells) != len(header):
                raise SingLoRAError(f"{where}: {len(cells)} cells, the header has {len(header)} ({header})")
            rows.append((where, dict(zip(header, cells))))
    except csv.Error as exc:  # a NUL byte, a cell over csv's field size limit, ...
        raise SingLoRAError(f"{path} line {reader.line_num}: not readable as CSV: {exc}") from None
    return rows


def read_rows(path: str | Path, encoding: str | None = None) -> list[Row]:
    """``(where, row)`` for every row of a ``.csv`` / ``.jsonl`` / ``.json`` file (see the module docstring)."""
    path = existing(path)
    suffix = path.suffix.lower()
    if suffix not in FILE_TYPES:
        raise SingLoRAError(f"{path}: unsupported file type {path.suffix!r} (use {', '.join(FILE_TYPES)})")
    text = read_text(path, encoding)
    rows = _csv_rows(path, text) if suffix == ".csv" else list(_json_rows(path, text))
    for where, row in rows:
        if not isinstance(row, dict):
            raise SingLoRAError(f"{where}: expected an object (one row), got {type(row).__name__}")
    if not rows:
        raise SingLoRAError(f"{path}: empty dataset (no rows)")
    return rows
