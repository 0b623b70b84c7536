"""Datasets for ``singlora train`` / ``singlora evaluate``.

Classification (``task="classification"``), one example = ``(text, label name)``:
    - ``.csv``: a header row; columns ``text_column`` and ``label_column``.
    - ``.jsonl``: one JSON object per line with keys ``text_column`` and ``label_column``.
    - a folder with one subfolder per class, one text file per example (``<folder>/<label>/<any>.txt``).
Causal LM (``task="causal-lm"``), texts only:
    - ``.txt`` (one document per file, or a folder of ``.txt`` files), or ``.jsonl`` with ``text_column``.
    Texts are tokenized, joined with the EOS token and cut into blocks of ``max_length`` tokens.

Text files are read as UTF-8, falling back to latin-1 (e.g. BBC News) unless an ``encoding`` is given.
Every problem is a ``SingLoRAError`` naming the file, column or label.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import SingLoRAError

TASKS = ("classification", "causal-lm")


def read_text(path: Path, encoding: str | None = None) -> str:
    """A text file's contents: ``encoding`` if given, else UTF-8 with a latin-1 fallback."""
    data = path.read_bytes()
    if encoding:
        try:
            return data.decode(encoding)
        except (UnicodeDecodeError, LookupError) as exc:
            raise SingLoRAError(f"{path}: cannot decode as {encoding!r}: {exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _check_path(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise SingLoRAError(f"{what} {str(path)!r} does not exist")
    return path


def _records(path: Path, encoding: str | None) -> list[dict[str, Any]]:
    """Rows of a ``.csv`` / ``.jsonl`` file as dicts."""
    text = read_text(path, encoding)
    if path.suffix.lower() == ".csv":
        return list(csv.DictReader(text.splitlines()))
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SingLoRAError(f"{path}:{number}: not valid JSON: {exc}") from None
            if not isinstance(row, dict):
                raise SingLoRAError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
        return rows
    raise SingLoRAError(f"{path}: unsupported file type {path.suffix!r} (use .csv, .jsonl, or a folder)")


def _column(rows: list[dict[str, Any]], column: str, path: Path, flag: str) -> list[str]:
    values = []
    for number, row in enumerate(rows, start=1):
        if column not in row:
            raise SingLoRAError(
                f"{path}: row {number} has no column {column!r} ({flag}); columns are {sorted(row)}"
            )
        values.append(str(row[column]))
    return values


def read_classification(
    path: str | Path, text_column: str = "text", label_column: str = "label", encoding: str | None = None
) -> tuple[list[str], list[str]]:
    """``(texts, label names)`` from a CSV / JSONL file or a folder of class subfolders."""
    path = _check_path(path, "data path")
    if path.is_dir():
        classes = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        texts, labels = [], []
        for folder in classes:
            for file in sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")):
                texts.append(read_text(file, encoding))
                labels.append(folder.name)
        if not texts:
            raise SingLoRAError(f"{path}: empty dataset: expected one subfolder per class holding text files")
        return texts, labels
    rows = _records(path, encoding)
    if not rows:
        raise SingLoRAError(f"{path}: empty dataset (no rows)")
    return _column(rows, text_column, path, "--text-column"), _column(rows, label_column, path, "--label-column")


def read_texts(path: str | Path, text_column: str = "text", encoding: str | None = None) -> list[str]:
    """Documents for causal LM from a ``.txt`` file, a folder of ``.txt`` files, or a ``.jsonl`` file."""
    path = _check_path(path, "data path")
    if path.is_dir():
        texts = [read_text(f, encoding) for f in sorted(path.rglob("*.txt"))]
    elif path.suffix.lower() in (".jsonl", ".json", ".csv"):
        texts = _column(_records(path, encoding), text_column, path, "--text-column")
    else:
        texts = [read_text(path, encoding)]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise SingLoRAError(f"{path}: empty dataset (no non-empty text)")
    return texts


def split_indices(labels: Sequence[str] | int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A fixed ``(train, held-out)`` split of ``range(n)``: ``fraction`` held out, per class when labels are given.

    Deterministic: depends only on the order of the examples, ``fraction`` and ``seed``.
    """
    if not 0.0 < fraction < 1.0:
        raise SingLoRAError(f"--eval-split={fraction} must be in (0, 1)")
    groups: dict[str, list[int]] = {}
    items = [""] * labels if isinstance(labels, int) else list(labels)
    for index, label in enumerate(items):
        groups.setdefault(label, []).append(index)
    rng = random.Random(seed)
    train, held = [], []
    for label in sorted(groups):
        members = groups[label]
        rng.shuffle(members)
        cut = round(len(members) * fraction)
        held += members[:cut]
        train += members[cut:]
    if not train or not held:
        raise SingLoRAError(f"--eval-split={fraction} leaves an empty split for {len(items)} examples")
    return sorted(train), sorted(held)


@dataclass
class TokenizedDataset(torch.utils.data.Dataset):
    """Tokenized examples: ``input_ids`` lists (variable length) and integer ``labels`` (class ids, or None for LM)."""

    input_ids: list[list[int]]
    labels: list[int] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {"input_ids": self.input_ids[index]}
        if self.labels is not None:
            item["labels"] = self.labels[index]
        return item


def label_ids(labels: list[str], label_names: list[str], source: str) -> list[int]:
    """Map label names to ids; a label outside ``label_names`` is an error naming it."""
    index = {name: i for i, name in enumerate(label_names)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise SingLoRAError(
            f"{source}: label(s) {unknown[:10]} are not among the training labels {label_names}"
        )
    return [index[label] for label in labels]


def tokenize_classification(tokenizer: Any, texts: list[str], labels: list[int], max_length: int) -> TokenizedDataset:
    """Truncate each text to ``max_length`` tokens (special tokens included); padding happens per batch."""
    encoded = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return TokenizedDataset(encoded, labels)


def tokenize_lm(tokenizer: Any, texts: list[str], max_length: int) -> TokenizedDataset:
    """Tokenize, join documents with EOS, cut into blocks of ``max_length`` tokens (the last one may be shorter)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream += ids + ([eos] if eos is not None else [])
    blocks = [stream[i : i + max_length] for i in range(0, len(stream), max_length)]
    blocks = [b for b in blocks if len(b) > 1]
    if not blocks:
        raise SingLoRAError("causal-lm dataset: fewer than 2 tokens after tokenization")
    return TokenizedDataset(blocks, None)


class Collator:
    """Pad a list of examples into a batch: ``input_ids`` / ``attention_mask`` (B, T); ``labels`` (B,) class ids or
    (B, T) token ids with -100 on padding for causal LM."""

    def __init__(self, pad_id: int, causal_lm: bool) -> None:
        self.pad_id = pad_id
        self.causal_lm = causal_lm

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(item["input_ids"]) for item in items)
        ids = torch.full((len(items), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, item in enumerate(items):
            ids[row, : len(item["input_ids"])] = torch.tensor(item["input_ids"])
            mask[row, : len(item["input_ids"])] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if self.causal_lm:
            batch["labels"] = ids.masked_fill(mask == 0, -100)
        else:
            batch["labels"] = torch.tensor([item["labels"] for item in items], dtype=torch.long)
        return batch
