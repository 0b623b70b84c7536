"""Loading local transformers folders (a base model, its tokenizer) with errors that name the folder and the flag,
never a transformers traceback: a missing folder, a folder without ``config.json``, a folder without weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import SingLoRAError

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
        from .run_folder import run_folder_hint

        raise SingLoRAError(f"{flag} {path!r}: not a transformers model folder (no config.json){run_folder_hint(path)}")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise SingLoRAError(f"{flag} {path!r}: no weights (expected one of {', '.join(WEIGHT_FILES)})")
    return folder


def from_pretrained(cls: Any, path: str, flag: str = "--model", **kwargs: Any) -> Any:
    """``cls.from_pretrained(path, **kwargs)`` for a checked local folder; loading failures name the folder."""
    check_model_folder(path, flag)
    try:
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
