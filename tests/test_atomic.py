"""The one output-folder policy (``torch_singlora.atomic.output_folder``): nothing a user owns is replaced silently."""

from __future__ import annotations

import os
import re
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
        with pytest.raises(SingLoRAError, match="(is|holds) this command's input"):
            check_output_folder(out, command="export", inputs=[run / "adapter"], overwrite=True)
    assert (run / "adapter" / "adapter_config.json").read_text() == "{}"
    assert check_output_folder(run / "lora", command="export", inputs=[run / "adapter"]) == "new"


def test_the_output_rule_compares_every_output_with_every_input_by_identity(tmp_path: Path) -> None:
    """Issue 24: an output file that is an input (any spelling, a hard link), lies inside an input folder, or an
    output folder lying inside one, is refused even with ``overwrite``; a file beside the inputs is not."""
    from torch_singlora.atomic import check_not_input, check_output_file

    adapter, prompts = tmp_path / "run" / "adapter", tmp_path / "prompts.jsonl"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    prompts.write_text("{}\n")
    os.link(prompts, tmp_path / "hard.jsonl")
    os.symlink(adapter, tmp_path / "alias")
    inputs = {"model": adapter, "--prompts-file": prompts, "--chat-template": None}
    cases = {adapter / "adapter_config.json": "lies inside this command's model", prompts: "is this command's "
             "--prompts-file", tmp_path / "x" / ".." / "prompts.jsonl": "is this command's --prompts-file",
             tmp_path / "hard.jsonl": "is this command's --prompts-file", tmp_path / "alias" / "new.json":
             "lies inside this command's model"}
    for output, message in cases.items():
        with pytest.raises(SingLoRAError, match=f"--output {re.escape(str(output))} {message} .*another file name"):
            check_output_file(output, flag="--output", inputs=inputs, overwrite=True)
    check_output_file(tmp_path / "answers.jsonl", flag="--output", inputs=inputs)
    with pytest.raises(SingLoRAError, match="output folder .* lies inside this command's model"):
        check_output_folder(adapter / "lora", command="export", inputs=inputs)
    with pytest.raises(SingLoRAError, match="holds this command's model"):
        check_not_input(tmp_path, inputs, what="output folder", advice="")
    check_not_input(tmp_path, inputs, what="output folder", advice="", may_hold=True)  # only "is" / "inside"
    assert (adapter / "adapter_config.json").read_text() == "{}" and prompts.read_text() == "{}\n"


def test_a_symlink_loop_is_refused_and_leaves_no_temp_folder(tmp_path: Path) -> None:
    """Issue 24: exporting to a symlink loop left an empty ``.NAME.XXXX.tmp/`` folder."""
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "dangling").symlink_to("nowhere")
    for name in ("loop", "dangling"):
        with pytest.raises(SingLoRAError, match=f"{name}: a symbolic link that leads to no folder"):
            write(tmp_path / name, a="1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "loop"]


@pytest.fixture
def mounts(tmp_path: Path):
    """A read-only and a writable tmpfs (root only; skipped where mounting is not permitted)."""
    import shutil
    import subprocess

    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    mounted = []
    for name, options in (("ro", "ro,size=1m"), ("rw", "size=1m")):
        (tmp_path / name).mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(tmp_path / name)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(tmp_path / name)
    try:
        yield mounted
    finally:
        for mount in mounted:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_read_only_mounts_and_mount_points_are_named_as_such(tmp_path: Path, mounts) -> None:
    """Issue 24: `merge` into a read-only mount said "Device or resource busy" (the rename of the mount point)."""
    read_only, writable = mounts
    with pytest.raises(SingLoRAError, match="output folder .*/ro: on a read-only file system"):
        check_output_folder(read_only, command="merge")
    with pytest.raises(SingLoRAError, match="/ro/merged: cannot write: Read-only file system"):
        write(read_only / "merged", a="1")
    with pytest.raises(SingLoRAError, match="/rw: a mount point; .* give a folder inside it, e.g. .*/rw/out"):
        write(writable, a="1")
    write(writable / "out", a="1")
    assert (writable / "out" / "a").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ro", "rw"]  # no temp folder left anywhere
