"""Datasets for ``singlora train`` / ``singlora evaluate``: files -> checked columns -> tokenized examples -> batches.

Files are read by ``torch_singlora.datafiles`` (text files, and the rows of ``.csv`` / ``.jsonl`` / ``.json`` tables,
each row with where it is; its encoding and JSON rules). Checking the columns (``column_values``, the one place for
it): a value must exist and have the expected type; nothing is converted silently (a null, list or dict where text
is expected is an error, not ``"None"`` or ``"['a']"``).

Classification (``read_classification``), one example = ``(text, label name)``: a ``.csv`` / ``.jsonl`` / ``.json``
file with ``text_column`` and ``label_column`` (labels: non-empty strings, or integers), or a folder with one
subfolder per class, one text file per example (``<folder>/<label>/<any>.txt``).
Causal LM (``read_texts``): ``.txt`` (one document), a folder of ``.txt`` files, or ``.csv`` / ``.jsonl`` / ``.json``
with ``text_column``. Texts are tokenized, joined with the EOS token and cut into blocks of ``max_length`` tokens.

We read these small formats ourselves rather than through ``datasets``: exact row numbers in errors, no type
inference (a CSV label ``"01"`` stays ``"01"``), no cache written to disk.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..datafiles import FILE_TYPES, Row, existing, read_rows, read_text
from ..errors import SingLoRAError

TEXT = (str,)
LABEL = (str, int)


def column_values(rows: Sequence[Row], column: str, flag: str, *, types: tuple[type, ...] = TEXT,
                  allow_empty: bool = True, hint: str = "") -> list[Any]:
    """The values of ``column``, each checked: present, not null, of one of ``types`` (``bool`` is not an
    ``int``), and not blank unless ``allow_empty``. An error names the file, the row, the column and ``flag``."""
    values = []
    expected = " or ".join({str: "a string", int: "an integer", list: "a list", dict: "an object"}.get(t, t.__name__)
                           for t in types)
    for where, row in rows:
        if column not in row:
            raise SingLoRAError(f"{where} has no column {column!r} ({flag}); columns are {sorted(map(str, row))}"
                                + hint)
        value = row[column]
        if value is None:
            raise SingLoRAError(f"{where}: column {column!r} ({flag}) has no value")
        if isinstance(value, bool) or not isinstance(value, types):
            shown = json.dumps(value)[:60] if isinstance(value, (list, dict, float, bool)) else repr(value)[:60]
            raise SingLoRAError(f"{where}: column {column!r} ({flag}) must be {expected}, got "
                                f"{type(value).__name__} {shown}")
        if not allow_empty and isinstance(value, str) and not value.strip():
            raise SingLoRAError(f"{where}: column {column!r} ({flag}) is empty")
        values.append(value)
    return values


def read_classification(
    path: str | Path, text_column: str = "text", label_column: str = "label", encoding: str | None = None
) -> tuple[list[str], list[str]]:
    """``(texts, label names)`` from a CSV / JSONL file or a folder of class subfolders."""
    path = existing(path)
    if path.is_dir():
        refuse_dataset_folder(path, "classification reads a folder of class subfolders holding text files")
        classes = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        texts, labels = [], []
        for folder in classes:
            for file in sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")):
                texts.append(read_text(file, encoding))
                labels.append(folder.name)
        if not texts:
            raise SingLoRAError(f"{path}: empty dataset: expected one subfolder per class holding text files")
        return texts, labels
    rows = read_rows(path, encoding)
    texts = column_values(rows, text_column, "--text-column", hint=chat_hint(rows))
    hint = " (text without labels: --task causal-lm trains a language model on it)" if all(
        label_column not in row for _, row in rows) else ""
    labels = column_values(rows, label_column, "--label-column", types=LABEL, allow_empty=False, hint=hint)
    return texts, [str(label) for label in labels]


def chat_hint(rows: Sequence[Row]) -> str:
    """For an error about a missing column: a hint to ``--task sft`` when the first row has the columns of a chat
    format (``llm.data.FORMATS``: messages, prompt/completion, alpaca, ShareGPT), else ``""``."""
    from ..llm.data import FORMATS

    row = rows[0][1] if rows else {}
    found = [name for name, columns in FORMATS.items() if all(column in row for column in columns)]
    return f" (chat data in the {found[0]} format: --task sft trains on it)" if found else ""


def refuse_dataset_folder(path: Path, what: str) -> None:
    """Refuse a folder saved by ``datasets`` (``save_to_disk``): its subfolders are splits, not classes, and its
    files are Arrow, not text; ``--task sft`` reads such folders."""
    if any((path / name).is_file() for name in ("dataset_dict.json", "state.json", "dataset_info.json")):
        raise SingLoRAError(f"{path}: a dataset folder saved by `datasets`; {what} (--task sft reads dataset folders "
                            "of chat data)")


def read_texts(path: str | Path, text_column: str = "text", encoding: str | None = None) -> list[str]:
    """Documents for causal LM from a ``.txt`` file, a folder of ``.txt`` files, or a ``.csv`` / ``.jsonl`` file."""
    path = existing(path)
    if path.is_dir():
        refuse_dataset_folder(path, "causal-lm reads a folder of .txt files")
        texts = [read_text(f, encoding) for f in sorted(path.rglob("*.txt"))]
    elif path.suffix.lower() in FILE_TYPES:
        rows = read_rows(path, encoding)
        texts = column_values(rows, text_column, "--text-column", hint=chat_hint(rows))
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

    def subset(self, indices: Sequence[int]) -> "TokenizedDataset":
        labels = None if self.labels is None else [self.labels[i] for i in indices]
        return TokenizedDataset([self.input_ids[i] for i in indices], labels)


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
