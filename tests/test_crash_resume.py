"""Training runs survive crashes: SIGKILL at several points (between checkpoints, half-way through writing a
checkpoint, half-way through writing the final adapter) and a full disk. Each killed run, resumed with
``--resume``, finishes with exactly the adapter of an uninterrupted run (CPU, same seed); the last good checkpoint
is never damaged.

The kill points inside a write come from a launcher that runs the real CLI with ``torch.save`` / safetensors'
``adapter_file.save_safetensors`` replaced by versions that write half of the bytes to the temp file, fsync, then
wait to be killed.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import save_tiny_bert

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from safetensors.torch import load_file  # noqa: E402

from torch_singlora.cli import main  # noqa: E402

WORDS = {"sport": ["goal", "match", "team", "player"], "tech": ["computer", "software", "chip", "internet"]}
STEPS, SAVE_EVERY = 12, 4

LAUNCHER = r"""
import io, os, sys, time
import torch
import safetensors.torch
import torch_singlora.adapter_file

crash_at, marker = os.environ["CRASH_AT"], os.environ["CRASH_MARKER"]
writes = {"checkpoint": 0, "adapter": 0}

def torn(kind, serialize, target):
    writes[kind] += 1
    if crash_at != f"{kind}:{writes[kind]}":
        return False
    data = serialize()
    handle = target if hasattr(target, "write") else open(target, "wb")
    handle.write(data[: len(data) // 2])  # half the bytes reach the temp file, then the process dies
    handle.flush()
    os.fsync(handle.fileno())
    open(marker, "w").close()
    time.sleep(600)

real_save = torch.save
def save(obj, target, *args, **kwargs):
    def serialize():
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        return buffer.getvalue()
    if not torn("checkpoint", serialize, target):
        real_save(obj, target, *args, **kwargs)
torch.save = save

real_save_safetensors = torch_singlora.adapter_file.save_safetensors
def save_safetensors(tensors, target, metadata):
    if not torn("adapter", lambda: safetensors.torch.save(tensors, metadata=metadata), target):
        real_save_safetensors(tensors, target, metadata)
torch_singlora.adapter_file.save_safetensors = save_safetensors

from torch_singlora.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny BERT classifier base, a tiny dataset, the training arguments and an uninterrupted reference run."""
    root = tmp_path_factory.mktemp("crash")
    save_tiny_bert(root / "bert", hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                   max_position_embeddings=32)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i in range(32):
        label = list(WORDS)[i % 2]
        picks = torch.randint(len(WORDS[label]), (5,), generator=generator).tolist()
        rows.append(json.dumps({"text": " ".join(WORDS[label][p] for p in picks), "label": label}))
    (root / "train.jsonl").write_text("\n".join(rows) + "\n")
    args = ["train", "--model", str(root / "bert"), "--train-data", str(root / "train.jsonl"), "--quiet",
            "--no-plot", "--batch-size", "4", "--grad-accum", "2", "--lr", "5e-3", "--target-modules", "query,value",
            "--adapter-dropout", "0.1", "--ramp-up", "0.25", "--max-steps", str(STEPS), "--save-every",
            str(SAVE_EVERY), "--max-length", "16"]
    assert main([*args, "--output-dir", str(root / "straight")]) == 0
    reference = load_file(root / "straight" / "adapter" / "adapter_model.safetensors")
    return {"root": root, "args": args, "reference": reference}


def launch(setup: dict[str, Any], out: Path, crash_at: str) -> tuple[subprocess.Popen, Path]:
    marker = out.parent / f"{out.name}.crashing"
    env = {**os.environ, "CRASH_AT": crash_at, "CRASH_MARKER": str(marker), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", LAUNCHER, *setup["args"], "--output-dir", str(out)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return process, marker


def kill_when(process: subprocess.Popen, ready: Any, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not ready() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, f"run ended before the kill point: {process.stderr.read().decode()[-2000:]}"
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL


def checkpoint_step(out: Path) -> int:
    return torch.load(out / "checkpoint.pt", weights_only=True)["step"]


def resume_and_compare(setup: dict[str, Any], out: Path, *extra: str) -> None:
    assert main([*setup["args"], "--output-dir", str(out), "--resume", *extra]) == 0
    resumed = load_file(out / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == setup["reference"].keys()
    for key, value in setup["reference"].items():
        assert torch.equal(resumed[key], value), key
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # no step lost or logged twice


def train_lines(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.parametrize("point", ["between checkpoints", "inside checkpoint write", "inside adapter write"])
def test_sigkill_then_resume_gives_the_same_adapter(setup: dict[str, Any], point: str) -> None:
    out = setup["root"] / point.replace(" ", "_")
    crash_at = {"between checkpoints": "none", "inside checkpoint write": "checkpoint:2",
                "inside adapter write": "adapter:1"}[point]
    process, marker = launch(setup, out, crash_at)
    if point == "between checkpoints":  # step 6: after the checkpoint of step 4, before that of step 8
        kill_when(process, lambda: train_lines(out) >= 6)
        assert checkpoint_step(out) == SAVE_EVERY
    else:
        kill_when(process, marker.exists)
        torn = list(out.glob(".checkpoint.pt.*.tmp")) + list(out.glob(".adapter.*.tmp"))  # the adapter's temp folder
        assert torn, "the kill should leave a half-written temp file"
        # the last good checkpoint is intact: step 4 (killed writing step 8's) or the last one (killed in the end)
        assert checkpoint_step(out) == (SAVE_EVERY if point == "inside checkpoint write" else STEPS)
        assert not (out / "adapter" / "adapter_model.safetensors").exists()
    resume_and_compare(setup, out)
    if point != "between checkpoints":  # the resumed run removed the torn temp file
        assert not any(path.exists() for path in torn)


def test_killed_during_first_checkpoint_refuses_resume_clearly(setup: dict[str, Any], capsys: Any) -> None:
    """Issue 24: the advice went round in a circle (--resume: no checkpoint; the plain rerun: use --resume). Both
    now say there is nothing to resume and that --overwrite starts the run again."""
    out = setup["root"] / "first"
    process, marker = launch(setup, out, "checkpoint:1")
    kill_when(process, marker.exists)
    assert not (out / "checkpoint.pt").exists()
    capsys.readouterr()
    assert main([*setup["args"], "--output-dir", str(out), "--resume"]) == 2
    error = capsys.readouterr().err
    assert "stopped before its first checkpoint" in error and "start it again with --overwrite" in error, error
    assert main([*setup["args"], "--output-dir", str(out)]) == 2
    error = capsys.readouterr().err
    assert "stopped before its first checkpoint" in error and "--resume" not in error, error


def test_disk_full_keeps_the_previous_checkpoint(setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                  capsys: Any) -> None:
    """The second checkpoint write fails half-way (ENOSPC): a clear error naming the file, no stray temp file, the
    first checkpoint intact, and resuming after space is freed gives the reference adapter."""
    out = setup["root"] / "full"
    real_save, calls = torch.save, []

    def full_disk(obj: Any, target: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(target)
        if len(calls) == 2:
            target.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, target, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    capsys.readouterr()
    assert main([*setup["args"], "--output-dir", str(out)]) == 2
    error = capsys.readouterr().err
    assert f"{out / 'checkpoint.pt'}: cannot write: No space left on device" in error
    assert checkpoint_step(out) == SAVE_EVERY
    assert list(out.glob("*.tmp")) == [] and not (out / "adapter").exists()
    monkeypatch.setattr(torch, "save", real_save)
    resume_and_compare(setup, out)


def test_output_dir_that_cannot_be_created(setup: dict[str, Any], capsys: Any) -> None:
    blocker = setup["root"] / "a_file"
    blocker.write_text("not a directory")
    capsys.readouterr()
    assert main([*setup["args"], "--output-dir", str(blocker / "run")]) == 2
    assert str(blocker / "run") in capsys.readouterr().err


def poison_loss(monkeypatch: pytest.MonkeyPatch, calls_to_poison: set[int]) -> list[int]:
    """Make the training loss NaN on the given cross-entropy calls (1-based, one per micro-batch)."""
    real, calls = torch.nn.functional.cross_entropy, []

    def cross_entropy(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) in calls_to_poison else loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", cross_entropy)
    return calls


def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(
    setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    out = setup["root"] / "nan_stop"
    calls = poison_loss(monkeypatch, {11})  # 8 micro-batches an epoch, 2 a step: call 11 = epoch 1, step 6
    capsys.readouterr()
    assert main([*setup["args"], "--output-dir", str(out)]) == 2
    error = capsys.readouterr().err
    assert "non-finite loss (nan) at optimizer step 6 (epoch 1, micro-batches 2-3)" in error
    assert f"the last checkpoint ({out / 'checkpoint.pt'}) is intact" in error
    assert len(calls) == 12 and checkpoint_step(out) == SAVE_EVERY
    assert not (out / "adapter").exists()
    monkeypatch.undo()  # the cause is gone: resuming gives the reference adapter
    resume_and_compare(setup, out)


def test_nan_loss_skip_drops_the_step(setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    out = setup["root"] / "nan_skip"
    poison_loss(monkeypatch, {3, 8})  # calls 3-4 would be step 2 (skipped); 5-6 are step 2; 7-8 step 3 (skipped)
    capsys.readouterr()
    assert main([*setup["args"], "--output-dir", str(out), "--on-nonfinite", "skip"]) == 0
    error = capsys.readouterr().err
    assert "non-finite loss (nan) at optimizer step 2 (epoch 0, micro-batches 2-3); step skipped" in error
    assert "at optimizer step 3 (epoch 0, micro-batches 6-7); step skipped" in error
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["skipped_steps"] == 2
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in adapter.values())
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["ramp_step"] == STEPS  # skipped steps do not advance the ramp


def test_nan_every_step_gives_up_after_the_skip_limit(setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                      capsys: Any) -> None:
    from torch_singlora.train.loop import NONFINITE_SKIP_LIMIT

    out = setup["root"] / "nan_always"
    poison_loss(monkeypatch, set(range(1, 1000)))
    capsys.readouterr()
    assert main([*setup["args"], "--output-dir", str(out), "--on-nonfinite", "skip"]) == 2
    assert f"after {NONFINITE_SKIP_LIMIT} skipped steps in a row" in capsys.readouterr().err
    assert not (out / "adapter").exists()


def test_resume_checks_identity_not_spelling(setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                             capsys: Any) -> None:
    """A run stopped at step 6 (checkpoint of step 4), moved elsewhere with its base model, its metrics log torn
    mid-line, resumes from a path spelled with ``..`` and a trailing slash to the reference adapter; changed
    training data are refused."""
    import shutil

    root, args = setup["root"], list(setup["args"])
    out = root / "to_move"
    poison_loss(monkeypatch, {11})
    assert main([*args, "--output-dir", str(out)]) == 2
    monkeypatch.undo()
    moved = root / "elsewhere" / "run"
    shutil.copytree(out, moved)
    shutil.rmtree(out)
    shutil.copytree(root / "bert", root / "elsewhere" / "bert")
    args[args.index("--model") + 1] = str(root / "elsewhere" / "bert")
    with open(moved / "metrics.jsonl", "a") as handle:
        handle.write('{"kind": "train", "step": 7, "lo')  # a write cut short by a crash or a full disk
    spelled = f"{root}/elsewhere/../elsewhere/run/"

    rows = (root / "train.jsonl").read_text().splitlines()
    (root / "changed.jsonl").write_text("\n".join([rows[0].replace("goal", "team", 1), *rows[1:]]) + "\n")
    changed = [*args]
    changed[changed.index("--train-data") + 1] = str(root / "changed.jsonl")
    capsys.readouterr()
    assert main([*changed, "--output-dir", spelled, "--resume"]) == 2
    assert "was written with different inputs (tokenized data / base model / init adapter): data" in capsys.readouterr().err

    assert main([*args, "--output-dir", spelled, "--resume"]) == 0
    resumed = load_file(moved / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == setup["reference"].keys()
    for key, value in setup["reference"].items():
        assert torch.equal(resumed[key], value), key
    steps = [json.loads(line)["step"] for line in (moved / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # the torn line and step 5 (after the checkpoint) logged once


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A real 1 MiB tmpfs (root only; skipped where mounting is not permitted) and ``fill(pages)``: leave that many
    free pages on it."""
    import shutil

    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    page = os.sysconf("SC_PAGE_SIZE")

    def fill(pages: int) -> Path:
        filler = mount / "filler"
        stats = os.statvfs(mount)
        filler.write_bytes(b"\0" * (stats.f_bavail * stats.f_frsize - pages * page))
        return filler

    try:
        yield mount, fill
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


# Pages (4 KiB) the tiny run writes: config.yaml 1 (first), metrics.jsonl 1 (12 lines), checkpoint.pt 4, the
# adapter's 3 files 1 each, summary.json 1, curves.png more than 1.
@pytest.mark.parametrize("full_at, pages, save_every", [
    ("metrics.jsonl", 1, SAVE_EVERY),  # the config fits; the first line of the log doesn't
    ("checkpoint.pt", 1 + 1 + 4 + 1, SAVE_EVERY),  # config, log, first checkpoint fit; the second's temp file doesn't
    ("adapter", 1 + 1 + 4, STEPS),  # config, log, the checkpoint of the last step fit; the final adapter doesn't
    ("curves.png", 1 + 1 + 4 + 3 + 1, STEPS),  # all but the plot
])
def test_full_disk_names_the_file_and_resumes_once_space_is_freed(setup: dict[str, Any], small_disk: Any,
                                                                  capsys: Any, full_at: str, pages: int,
                                                                  save_every: int) -> None:
    """On a real full disk every write fails with an error naming the file (no traceback), leaves no temp file and
    no torn checkpoint; after space is freed, --resume finishes with the reference adapter."""
    mount, fill = small_disk
    out = mount / "run"
    plot = ["--plot"] if full_at == "curves.png" else []
    args = [*setup["args"], "--output-dir", str(out), "--save-every", str(save_every), *plot]
    filler = fill(pages)
    capsys.readouterr()
    assert main(args) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("singlora train: error: ") and "No space left on device" in error, error
    assert f"{out / full_at}: cannot write" in error, error
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    assert (out / "adapter").exists() == (full_at == "curves.png")
    if full_at == "metrics.jsonl":
        assert not (out / "checkpoint.pt").exists()
        return
    assert checkpoint_step(out) == (SAVE_EVERY if full_at == "checkpoint.pt" else STEPS)
    filler.unlink()
    resume_and_compare(setup, out, "--save-every", str(save_every), *plot)
