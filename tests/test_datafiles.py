"""Data files are read one way for every task (``torch_singlora.datafiles``): the same rows, the same places in
errors, one JSON rule (strict: a duplicate key is refused) and one encoding policy, whether the file feeds
``--task classification`` / ``causal-lm`` (``train.data``) or ``--task sft`` / ``generate`` (``llm.data``)."""

from __future__ import annotations

import csv
import io
import json
import os

import pytest

from torch_singlora import SingLoRAError
from torch_singlora.datafiles import read_rows, read_text
from torch_singlora.llm.data import read_conversations
from torch_singlora.train.data import read_classification, read_texts

ROW = {"text": "t", "label": "a", "prompt": "q", "completion": "c"}  # a row every task can read


def _readers(path):
    """Each task's reader of ``path``: what it returns, or the error message."""
    results = {}
    for name, read in (("classification", lambda: read_classification(path)), ("causal-lm", lambda: read_texts(path)),
                       ("sft", lambda: read_conversations(path)[0][0].messages)):
        try:
            results[name] = read()
        except SingLoRAError as exc:
            results[name] = f"error: {exc}"
    return results


@pytest.mark.parametrize("name, content, message", [
    ("dup.jsonl", '{"text": "t", "label": "a", "prompt": "q", "completion": "c", "label": "b"}\n',
     "dup.jsonl line 1: duplicate JSON key 'label'"),
    ("dup.json", '[{"text": "t", "label": "a", "prompt": "q", "completion": "c", "text": "u"}]',
     "dup.json: duplicate JSON key 'text'"),
    ("nan.jsonl", '{"text": "t", "label": NaN, "prompt": "q", "completion": "c"}\n',
     "nan.jsonl line 1: JSON constant NaN is not allowed"),
    ("torn.jsonl", json.dumps(ROW) + '\n{"text": "t", "lab\n', "torn.jsonl line 2: not valid JSON"),
    ("list.jsonl", json.dumps(ROW) + "\n\n[1, 2]\n", "list.jsonl line 3: expected an object (one row), got list"),
    ("short.csv", "text,label,prompt,completion\nt,a,q,c\n\nt,a,q\n",
     "short.csv row 2 (line 4): 3 cells, the header has 4"),
    ("twice.csv", "text,label,prompt,completion,label\nt,a,q,c,b\n",
     "twice.csv: the header names column(s) ['label'] more than once"),
    ("empty.jsonl", "\n\n", "empty.jsonl: empty dataset (no rows)"),
    ("long.csv", "text,label,prompt,completion\nt,a,q,c\n" + "x" * 200_000 + ",a,q,c\n",
     "long.csv line 3: not readable as CSV: field larger than field limit"),
])
def test_every_task_refuses_the_same_file_with_the_same_message(tmp_path, name, content, message) -> None:
    """One reader under every task: a duplicate key (``train.data`` used to keep the last value), NaN, a torn line,
    a non-object row, a short CSV row, a CSV header naming a column twice, no rows, a cell csv cannot hold."""
    (tmp_path / name).write_text(content)
    (error,) = set(_readers(tmp_path / name).values())
    assert error.startswith(f"error: {tmp_path / name}{message.removeprefix(name)}")


def test_rows_and_their_places(tmp_path) -> None:
    """Rows as the stdlib parsers read them, each with its place: JSON lines by line (blank lines counted), a JSON
    array by row from 1, CSV by row (blank lines not counted) and physical line (a quoted cell spans two)."""
    rows = [{"text": "a,b\nc", "n": "1"}, {"text": "\u00e9\u20ac", "n": "2"}]
    (tmp_path / "d.jsonl").write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    with open(tmp_path / "d.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, ["text", "n"])
        writer.writeheader()
        writer.writerow(rows[0])
        handle.write("\r\n")
        writer.writerow(rows[1])
    assert list(csv.DictReader(io.StringIO((tmp_path / "d.csv").read_text(encoding="utf-8"), newline=""))) == rows
    for name, places in (("d.jsonl", ["line 1", "line 3"]), ("d.json", ["row 1", "row 2"]),
                         ("d.csv", ["row 1 (line 3)", "row 2 (line 5)"])):
        assert read_rows(tmp_path / name) == [(f"{tmp_path / name} {p}", row) for p, row in zip(places, rows)]


def test_one_encoding_policy_for_every_task(tmp_path) -> None:
    """Per file: UTF-8 (a byte-order mark skipped), else latin-1; ``encoding`` when given; a file with NUL bytes
    that is not UTF-8 (UTF-16) is refused naming --encoding. The same for table rows and for text files."""
    header, cells = "text,label,prompt,completion\n", "caf\u00e9,a,q\u00e9,c\n"
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + (header + cells).encode("utf-8"))
    (tmp_path / "latin.csv").write_bytes((header + cells).encode("latin-1"))
    (tmp_path / "utf16.csv").write_bytes((header + cells).encode("utf-16"))
    for name in ("bom.csv", "latin.csv"):  # the BOM used to hide column 'text' from train.data
        results = _readers(tmp_path / name)  # sft used to refuse latin-1 that train.data read
        assert results["classification"] == (["caf\u00e9"], ["a"]) and results["causal-lm"] == ["caf\u00e9"]
        assert results["sft"] == [{"role": "user", "content": "q\u00e9"}, {"role": "assistant", "content": "c"}]
    refused = _readers(tmp_path / "utf16.csv")
    assert set(refused.values()) == {f"error: {tmp_path / 'utf16.csv'}: not UTF-8 text (invalid start byte at byte "
                                     "0) and it holds NUL bytes (UTF-16?); give the file's encoding with --encoding"}
    assert read_rows(tmp_path / "utf16.csv", encoding="utf-16")[0][1]["text"] == "caf\u00e9"
    (tmp_path / "doc.txt").write_bytes("\u00a315.8m".encode("latin-1"))  # BBC News sports/199.txt has one
    assert read_text(tmp_path / "doc.txt") == "\u00a315.8m" and read_texts(tmp_path / "doc.txt") == ["\u00a315.8m"]
    with pytest.raises(SingLoRAError, match=r"doc.txt: not ascii text \(ordinal not in range\(128\) at byte 0\)"):
        read_text(tmp_path / "doc.txt", encoding="ascii")
    with pytest.raises(SingLoRAError, match="--encoding 'klingon': not a text encoding Python knows"):
        read_text(tmp_path / "doc.txt", encoding="klingon")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_is_refused_unopened(tmp_path) -> None:
    """Reading a FIFO would block forever: it is refused before it is opened."""
    os.mkfifo(tmp_path / "pipe.jsonl")
    with pytest.raises(SingLoRAError, match="pipe.jsonl: not a regular file"):
        read_rows(tmp_path / "pipe.jsonl")
