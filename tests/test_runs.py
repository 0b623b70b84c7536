"""``run_info.json`` (read by ``merge``, ``export``, ``evaluate``): strict, size-capped, schema-checked; and a
trained folder's weights are only ever read from safetensors files (no pickle, no ``torch.load``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from torch_singlora.cli import main

GOOD = {"task": "classification", "method": "singlora", "base_model": "/nonexistent/base", "tokenizer": "/nonexistent/t",
        "target_modules": ["query"], "labels": ["a", "b"], "max_length": 16, "text_column": "text",
        "label_column": "label"}


def _folder(tmp_path: Path, text: str | None = None, **changes) -> Path:
    folder = tmp_path / "adapter"
    folder.mkdir(exist_ok=True)
    info = {k: v for k, v in {**GOOD, **changes}.items() if v is not ...}
    (folder / "run_info.json").write_text(text if text is not None else json.dumps(info))
    return folder


def _refused(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture, *fragments: str) -> None:
    for argv in (["merge", str(folder), str(tmp_path / "merged")], ["export", str(folder), str(tmp_path / "lora")],
                 ["evaluate", str(folder), "--data", str(tmp_path / "data.csv")]):
        assert main(argv) == 2, argv
        error = capsys.readouterr().err
        assert str(folder / "run_info.json") in error and all(f in error for f in fragments), (argv, error)
        assert "Traceback" not in error
    assert not (tmp_path / "merged").exists() and not (tmp_path / "lora").exists()


@pytest.mark.parametrize("changes, fragments", [
    ({"text": "{not json"}, ["not valid JSON"]),
    ({"text": '{"task": "classification", "task": "causal-lm"}'}, ["duplicate JSON key 'task'"]),
    ({"text": "[1, 2]"}, ["expected a JSON object"]),
    ({"method": ...}, ["field 'method'", "missing"]),
    ({"method": "pickle"}, ["field 'method'", "one of"]),
    ({"task": 3}, ["field 'task'"]),
    ({"labels": [str(i) for i in range(200_000)]}, ["field 'labels'", "at most 100,000"]),  # (2 million: the size cap)
    ({"labels": ["a", "a"]}, ["field 'labels'", "distinct"]),
    ({"max_length": -1}, ["field 'max_length'"]),
])
def test_broken_run_info_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture, changes, fragments) -> None:
    _refused(_folder(tmp_path, **changes), tmp_path, capsys, *fragments)


def test_huge_run_info_is_refused_unread(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = _folder(tmp_path)
    os.truncate(folder / "run_info.json", 2_200_000_000)  # sparse: 2.2 GB declared, no disk used
    _refused(folder, tmp_path, capsys, "over the", "limit")


@pytest.mark.parametrize("method, weights", [("full", "pytorch_model.bin"), ("lora", "adapter_model.bin")])
def test_pickled_weights_of_a_trained_folder_are_never_loaded(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch, method: str,
                                                              weights: str) -> None:
    """``merge`` of a ``full`` / ``lora`` run whose folder holds only pickled weights: refused before any loader
    runs; ``torch.load`` is never called."""
    folder = _folder(tmp_path, method=method)
    torch.save({"x": torch.zeros(1)}, folder / weights)

    def no_torch_load(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_torch_load)
    assert main(["merge", str(folder), str(tmp_path / "merged")]) == 2
    error = capsys.readouterr().err
    assert "safetensors" in error and ("never pickled" in error or f"found pickled weights ['{weights}'], which "
                                       "singlora never loads" in error), error
