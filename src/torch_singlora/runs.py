"""The output folder of ``singlora train``: what a run writes, when it may write it, and how to load it back.
Training writes it (``train.loop``); ``evaluate``, ``merge``, ``export``, ``generate``, ``chat`` and ``serve`` read it.

    <output-dir>/adapter/          the adapter files (or the whole model for ``full``) + run_info.json
    <output-dir>/checkpoint.pt     the training state (``checkpoint``)
    <output-dir>/metrics.jsonl     one line per logged step and per evaluation (``metrics``)
    <output-dir>/summary.json      the finished run's numbers
    <output-dir>/curves.png        training loss and eval metric per step
    <output-dir>/config.yaml       the resolved config: ``singlora train --config`` repeats the run (``run_config``)

Data safety: a new run refuses a folder that already holds a run (any of the files above), naming what is there:
``--resume`` continues it, ``--overwrite`` replaces it (only these files go; anything else in the folder stays).
``--resume`` checks the run's identity, not the spelling of paths: the settings that shape training, and
fingerprints of the tokenized data and of the base model; a folder moved elsewhere resumes fine.

``run_info.json`` (task, method, base model and tokenizer paths, target modules, plus the task's ``info``: labels,
max length, columns, ...; and ``config``, the resolved config) is what ``evaluate`` / ``merge`` / ``export`` read to rebuild the model.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any, Iterable

import torch

from .errors import SingLoRAError

ADAPTER_DIR = "adapter"
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CURVES_FILE = "curves.png"
CONFIG_FILE = "config.yaml"
RUN_FILES = (ADAPTER_DIR, CHECKPOINT_FILE, METRICS_FILE, SUMMARY_FILE, CURVES_FILE, CONFIG_FILE)
RUN_INFO = "run_info.json"
MAX_RUN_INFO_BYTES = 16 * 2**20
MAX_LABELS = 100_000  # classes of a classification head (a 2-million-label file would build a 3 GB head)
RUN_INFO_KEYS = {"task": str, "method": str, "base_model": str, "tokenizer": str, "target_modules": list}
# What ``atomic_directory`` leaves when killed: ``.adapter.XXXXXXXX.tmp`` (and ``.old`` during the swap).
_STALE_DIR = re.compile(r"\.adapter\.[A-Za-z0-9_]{8}\.tmp(\.old)?")


class RunFolder:
    """Paths of one run's output folder, and the checks before writing into it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.adapter = self.path / ADAPTER_DIR
        self.checkpoint = self.path / CHECKPOINT_FILE
        self.metrics = self.path / METRICS_FILE
        self.summary = self.path / SUMMARY_FILE
        self.curves = self.path / CURVES_FILE
        self.config = self.path / CONFIG_FILE

    def existing_run_files(self) -> list[str]:
        """Names of the run files already in the folder (``adapter/`` with a slash)."""
        found = [name for name in RUN_FILES if (self.path / name).exists() or (self.path / name).is_symlink()]
        return [f"{name}/" if name == ADAPTER_DIR else name for name in found]

    def check_inputs(self, inputs: dict[str, Any]) -> None:
        """The output rule (``atomic.check_not_input``) for the run: the folder is not an input nor inside one, and
        no run file it writes or ``--overwrite`` removes is, holds or lies inside one (the folder may hold inputs
        elsewhere, e.g. its own ``data/``)."""
        from .atomic import check_not_input

        advice = "choose another --output-dir"
        check_not_input(self.path, inputs, what="--output-dir", advice=advice, may_hold=True)
        for name in RUN_FILES:
            check_not_input(self.path / name, inputs, what="run file", advice=advice)

    def check_new_run(self, overwrite: bool) -> None:
        """Refuse to start a new run over a previous one unless ``overwrite`` (the files go in ``clear``)."""
        if self.path.exists() and not self.path.is_dir():
            raise SingLoRAError(f"--output-dir {self.path}: exists and is not a folder")
        found = self.existing_run_files()
        if found and not overwrite:
            if CHECKPOINT_FILE not in found and SUMMARY_FILE not in found:
                raise SingLoRAError(f"--output-dir {self.path} holds a run that stopped before its first checkpoint "
                                    f"(--save-every): {', '.join(found)}; nothing to resume: start it again with "
                                    "--overwrite (or choose another --output-dir)")
            finished = " (a finished run)" if SUMMARY_FILE in found else ""
            raise SingLoRAError(f"--output-dir {self.path} already holds a run{finished}: {', '.join(found)}; "
                                "continue it with --resume, or replace it with --overwrite")

    def check_resumable_folder(self) -> None:
        """``--resume`` needs a checkpoint: without one, say what is there and how to start (never "--resume")."""
        if self.checkpoint.is_file():
            return
        found = self.existing_run_files()
        if found:
            raise SingLoRAError(f"--resume: {self.path} holds a run that stopped before its first checkpoint "
                                f"(--save-every), no {CHECKPOINT_FILE}: nothing to resume; start it again with "
                                "--overwrite instead of --resume")
        raise SingLoRAError(f"--resume: no run to resume in {self.path} (no {CHECKPOINT_FILE}); start one without "
                            "--resume")

    def clear(self) -> list[str]:
        """Remove a previous run's files (``--overwrite``); other files stay. Returns what was removed."""
        removed = self.existing_run_files()
        for name in removed:
            path = self.path / name.rstrip("/")
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except OSError as exc:
                raise SingLoRAError(f"--overwrite: cannot remove {path}: {exc.strerror or exc}") from exc
        return removed

    def resume_advice(self) -> str:
        """How a stopped run goes on, for error messages."""
        return (f"the last checkpoint ({self.checkpoint}) is intact: resume with --resume" if self.checkpoint.exists()
                else "no checkpoint was written yet: start again with --overwrite")

    def create(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SingLoRAError(f"--output-dir {self.path}: cannot create it: {exc.strerror}") from exc

    def remove_stale_temps(self) -> list[Path]:
        """Delete temp files and folders that writes of a killed run left (the files they replaced are intact)."""
        from .atomic import remove_stale_temps

        stale = remove_stale_temps(self.path) + remove_stale_temps(self.adapter)
        for folder in self.path.glob(".adapter.*") if self.path.is_dir() else []:
            if _STALE_DIR.fullmatch(folder.name) and folder.is_dir() and not folder.is_symlink():
                shutil.rmtree(folder, ignore_errors=True)
                stale.append(folder)
        return stale


# ---- the run's identity (``--resume``) ----------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    return value.tolist() if isinstance(value, torch.Tensor) else repr(value)


def data_fingerprint(datasets: Iterable[Any]) -> str:
    """sha256 of every tokenized example of ``datasets`` (None entries count as empty)."""
    digest = hashlib.sha256()
    for dataset in datasets:
        digest.update(b"|dataset|")
        for index in range(len(dataset) if dataset is not None else 0):
            digest.update(json.dumps(dataset[index], sort_keys=True, default=_jsonable).encode())
            digest.update(b"\n")
    return digest.hexdigest()


def model_fingerprint(path: str | Path) -> str:
    """sha256 of a model folder's ``config.json`` and of the names and sizes of its weight files."""
    folder = Path(path)
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for file in sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file()):
        digest.update(f"{file.name}:{file.stat().st_size}\n".encode())
    return digest.hexdigest()


def folder_fingerprint(path: str | Path) -> str:
    """sha256 of the names and contents of the files directly in folder ``path`` (an adapter folder)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).iterdir() if p.is_file()):
        digest.update(f"{file.name}\n".encode())
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def check_resumable(checkpoint: Path, saved: dict[str, Any], current: dict[str, Any], what: str) -> None:
    """Refuse ``--resume`` when ``current`` differs from ``saved`` (settings or identity), naming the keys."""
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if changed:
        shown = ", ".join(f"{k} ({saved.get(k)!r} -> {current.get(k)!r})" if what == "settings" else k
                          for k in changed)
        raise SingLoRAError(f"--resume: {checkpoint} was written with different {what}: {shown}; resume with the "
                            "same ones, or start a new run with --overwrite")


# ---- run_info.json and loading a trained run back -----------------------------------------------------------------


def write_run_info(directory: Path, info: dict[str, Any]) -> None:
    from .atomic import atomic_write_text

    atomic_write_text(directory / RUN_INFO, json.dumps(info, indent=2, sort_keys=True) + "\n")


def run_folder_hint(path: str | Path) -> str:
    """For an error about ``path`` given where an adapter or model folder was expected: if it is the output folder
    of ``singlora train`` (its ``adapter/`` holds ``run_info.json``), a hint naming the adapter folder; else ``""``."""
    adapter = Path(path) / ADAPTER_DIR
    if not (adapter / RUN_INFO).is_file():
        return ""
    return f" ({path} is the output folder of `singlora train`: its adapter folder is {adapter})"


def read_run_info(directory: str | Path) -> dict[str, Any]:
    """``run_info.json`` of a trained output folder, checked: the strict size-capped JSON reader, then each field
    (the keys above; ``task`` and ``method`` known; ``labels``, if any, at most ``MAX_LABELS`` distinct non-empty
    strings; ``max_length`` a positive int). Errors name the file and the field."""
    from .train.methods import METHOD_NAMES
    from .train.registry import TASKS
    from .untrusted import read_json

    path = Path(directory) / RUN_INFO
    if not Path(directory).is_dir():
        raise SingLoRAError(f"adapter folder {str(directory)!r} does not exist")
    if not path.exists():
        hint = run_folder_hint(directory) or f" (is {directory} the adapter folder of a `singlora train` run?)"
        raise SingLoRAError(f"{path}: no such file{hint}")
    info = read_json(path, what="run info of `singlora train`", limit=MAX_RUN_INFO_BYTES)
    if not isinstance(info, dict):
        raise SingLoRAError(f"{path}: expected a JSON object, got {type(info).__name__}")

    def field(key: str, ok: bool, expected: str) -> None:
        if not ok:
            shown = repr(info.get(key)) if key in info else "missing"
            raise SingLoRAError(f"{path}: field {key!r} must be {expected}, got {shown[:100]}")

    for key, kind in RUN_INFO_KEYS.items():
        field(key, isinstance(info.get(key), kind), f"a {kind.__name__}")
    field("task", info["task"] in TASKS, f"one of {list(TASKS)}")
    field("method", info["method"] in METHOD_NAMES, f"one of {list(METHOD_NAMES)}")
    field("target_modules", all(isinstance(n, str) for n in info["target_modules"]), "a list of module names")
    labels = info.get("labels")
    field("labels", labels is None or (isinstance(labels, list) and len(labels) <= MAX_LABELS and all(
        isinstance(n, str) and n for n in labels) and len(set(labels)) == len(labels)),
        f"a list of at most {MAX_LABELS:,} distinct non-empty strings")
    length = info.get("max_length")
    field("max_length", length is None or (isinstance(length, int) and not isinstance(length, bool) and length > 0),
          "an int >= 1")
    return info


def load_trained(directory: str | Path, base_model: str | None = None) -> tuple[Any, dict[str, Any]]:
    """Rebuild a trained model from a ``singlora train`` adapter folder (adapter + ``run_info.json``).

    Returns ``(model, run_info)``; ``model`` is a ``SingLoRAModel``, a ``PeftModel`` or a plain transformers model.
    ``base_model`` replaces the recorded base model folder.
    """
    from .train.methods import method_class
    from .train.registry import get_task

    info = read_run_info(directory)
    task, method = get_task(info["task"]), method_class(info["method"])
    base = base_model or info["base_model"]
    return method.load(directory, lambda path: task.load_model(path or base, info)), info
