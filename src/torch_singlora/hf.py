"""Hugging Face model folders: loading a local transformers model or tokenizer with errors that name the folder
and the flag, never a transformers traceback (a missing folder, a folder without ``config.json``, a folder without
weights), and ``eval_mode`` for running a loaded model (evaluation, generation, serving).

transformers itself is imported inside the functions that need it: importing this module stays light.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .errors import SingLoRAError
from .runs import run_folder_hint

# Files that hold a transformers model's weights (single file or the index of a sharded checkpoint).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def check_model_folder(path: str, flag: str = "--model") -> Path:
    """``path`` as a folder holding ``config.json`` and weights; a ``SingLoRAError`` naming ``flag`` otherwise."""
    folder = Path(path)
    if not folder.exists():
        raise SingLoRAError(f"{flag} {path!r}: no such folder")
    if not folder.is_dir():
        raise SingLoRAError(f"{flag} {path!r}: not a folder (a local transformers model folder is expected)")
    if not (folder / "config.json").is_file():
        raise SingLoRAError(f"{flag} {path!r}: not a transformers model folder (no config.json){run_folder_hint(path)}")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise SingLoRAError(f"{flag} {path!r}: no weights (expected one of {', '.join(WEIGHT_FILES)})")
    return folder


class _HeldLoadReport(logging.Filter):
    """Holds back transformers' "LOAD REPORT" warning (missing / unexpected keys) instead of printing it."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in str(record.msg):
            self.held.append(record)
            return False
        return True


def _load_without_new_head_report(cls: Any, path: str, new_modules: Sequence[str], kwargs: dict[str, Any]) -> Any:
    """``cls.from_pretrained``; transformers' load report is shown only if it says more than that the weights of
    ``new_modules`` are missing (their newly initialised weights are what the caller expects)."""
    logger = logging.getLogger("transformers.modeling_utils")  # where transformers logs the load report
    report = _HeldLoadReport()
    logger.addFilter(report)
    try:
        model, loading = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    finally:
        logger.removeFilter(report)
    others = [k for k in loading["missing_keys"] if k.split(".")[0] not in new_modules]
    if others or loading["unexpected_keys"] or loading["mismatched_keys"]:
        for record in report.held:
            logger.handle(record)
    return model


def from_pretrained(cls: Any, path: str, flag: str = "--model", *, new_modules: Sequence[str] = (),
                    **kwargs: Any) -> Any:
    """``cls.from_pretrained(path, **kwargs)`` for a checked local folder; loading failures name the folder.
    ``new_modules``: top-level modules the caller builds afresh (a classification head that the run trains or its
    adapter replaces): transformers' "newly initialized" report about them alone is not shown (anything more is)."""
    check_model_folder(path, flag)
    try:
        if new_modules:
            return _load_without_new_head_report(cls, path, new_modules, kwargs)
        return cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SingLoRAError(f"{flag} {path!r}: cannot load it as {cls.__name__}: {reason}") from exc


def load_tokenizer(path: str, flag: str = "--tokenizer") -> Any:
    """A tokenizer that can pad (pad = EOS when the tokenizer has no pad token). ``flag`` names the option the
    folder came from (``--model`` when no ``--tokenizer`` was given)."""
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise SingLoRAError(f"{flag} {path!r}: no such folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SingLoRAError(f"{flag} {path!r}: no usable tokenizer: {reason}") from exc
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise SingLoRAError(f"{flag} {path!r}: the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@contextlib.contextmanager
def eval_mode(model: nn.Module, *, inference: bool = False) -> Iterator[None]:
    """``model.eval()`` and no gradients inside (``torch.inference_mode`` with ``inference``: tensors made inside
    never take part in autograd later, as in generation); the previous mode after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode() if inference else torch.no_grad():
            yield
    finally:
        model.train(was_training)
