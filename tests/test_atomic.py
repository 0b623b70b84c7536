"""The one output-folder policy (``torch_singlora.atomic.output_folder``): nothing a user owns is replaced silently."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from torch_singlora import SingLoRAError
from torch_singlora.atomic import MANIFEST_FILE, check_output_folder, output_folder


def write(folder: Path, command: str = "merge", **files: str) -> None:
    with output_folder(folder, command=command) as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text)


def test_new_and_own_folders_are_replaced_foreign_ones_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write(out, a="1", b="2")
    assert sorted(p.name for p in out.iterdir()) == ["a", "b", MANIFEST_FILE]
    write(out, a="3")  # its own previous output: replaced whole
    assert sorted(p.name for p in out.iterdir()) == ["a", MANIFEST_FILE] and (out / "a").read_text() == "3"
    (out / "notes.txt").write_text("mine")  # a file the user added is not the command's: refused, named
    with pytest.raises(SingLoRAError, match=r"not empty.*notes\.txt.*--overwrite"):
        write(out, a="4")
    assert (out / "notes.txt").read_text() == "mine" and (out / "a").read_text() == "3"
    with pytest.raises(SingLoRAError, match="singlora export"):  # another command's output is foreign too
        write(out, command="export", a="4")
    with output_folder(out, command="merge", overwrite=True) as tmp:
        (tmp / "a").write_text("5")
    assert sorted(p.name for p in out.iterdir()) == ["a", MANIFEST_FILE]
    (tmp_path / "empty").mkdir()
    assert check_output_folder(tmp_path / "empty", command="merge") == "new"
    (tmp_path / "file").write_text("x")
    with pytest.raises(SingLoRAError, match="not a folder"):
        check_output_folder(tmp_path / "file", command="merge", overwrite=True)


def test_a_folder_holding_the_input_is_never_replaced(tmp_path: Path) -> None:
    """Compared by file identity: other spellings (trailing slash, ``..``, a symlink) are caught, even with
    ``overwrite=True``."""
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    os.symlink(run, tmp_path / "link")
    spellings = [run / "adapter", str(run / "adapter") + "/", run / "adapter" / ".." / "adapter", run,
                 tmp_path / "link", tmp_path / "link" / "adapter"]
    for out in spellings:
        with pytest.raises(SingLoRAError, match="holds this command's input"):
            check_output_folder(out, command="export", inputs=[run / "adapter"], overwrite=True)
    assert (run / "adapter" / "adapter_config.json").read_text() == "{}"
    assert check_output_folder(run / "adapter" / "lora", command="export", inputs=[run / "adapter"]) == "new"
