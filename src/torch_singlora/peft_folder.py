"""A PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``: a ``singlora export`` output, a
``--method lora`` run, a LoRA trained with PEFT) read through the hostile-input readers before PEFT sees it.

    model = load_peft_adapter(base, "lora_peft/", what="--adapter 'lora_peft/'")   # a peft.PeftModel

Checked first (``untrusted``): the config is strict JSON of at most 16 MiB naming a ``peft_type`` PEFT knows; the
weights come only from ``adapter_model.safetensors`` (pickled ``adapter_model.bin`` & co. are refused by name and
never opened, with a one-line conversion), whose header singlora parses (size caps, offsets tiling the data), whose
data is read once and refused if any value is NaN/Inf. Then PEFT builds the adapter from the config read here and
the file checked here; what PEFT refuses (modules the base lacks, other shapes) becomes one ``SingLoRAError``
naming the folder. Last, each LoRA module's update ``scaling * B @ A`` must stay finite in its dtype
(``check_lora_updates``): an adapter that would make the model compute Inf is refused by module name.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

from torch import nn

from .errors import AdapterFileError, SingLoRAError
from .untrusted import check_finite, check_update_range, pickle_hint, read_json, read_safetensors_file

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


@contextlib.contextmanager
def peft_without_deprecations() -> Iterator[None]:
    """Inside: PEFT 0.21 reads ``model.is_gradient_checkpointing`` while wrapping a model, which transformers >= 5
    answers with a ``FutureWarning`` the user can do nothing about (it names transformers' own rename); silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def read_peft_config(directory: str | Path) -> dict[str, Any]:
    """``adapter_config.json`` of a PEFT adapter folder: strict JSON, an object with a string ``peft_type``."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise AdapterFileError(f"{directory}: no {CONFIG_FILE} (not a PEFT adapter folder)")
    document = read_json(path, what="PEFT adapter config")
    if not isinstance(document, dict) or not isinstance(document.get("peft_type"), str):
        raise AdapterFileError(f"{path}: not a PEFT adapter config (no string 'peft_type')")
    return document


def check_peft_weights(directory: str | Path) -> None:
    """Refuse a PEFT folder whose weights are not a sound ``adapter_model.safetensors`` (pickles named, never
    opened; the header and data checked; no NaN/Inf)."""
    path = Path(directory) / WEIGHTS_FILE
    if not path.exists():
        hint = pickle_hint(directory, WEIGHTS_FILE, {"format": "pt"})
        raise AdapterFileError(f"{path}: no such file{hint or ' (PEFT weights are read only from safetensors)'}")
    _, tensors = read_safetensors_file(path)
    check_finite(path, tensors)


def _one_line(exc: BaseException, limit: int = 400) -> str:
    detail = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"{type(exc).__name__}: {detail[:limit]}{'...' if len(detail) > limit else ''}"


def check_lora_updates(model: nn.Module, where: str) -> None:
    """Refuse (naming the module) a loaded LoRA whose update ``scaling * B @ A`` has entries beyond the range of
    the dtype it is computed in: the model would produce Inf/NaN (``untrusted.check_update_range``)."""
    for name, module in model.named_modules():
        scaling = getattr(module, "scaling", None)
        pairs = [(getattr(module, "lora_A", None), getattr(module, "lora_B", None)),
                 (getattr(module, "lora_embedding_A", None), getattr(module, "lora_embedding_B", None))]
        if not isinstance(scaling, dict):
            continue
        for down, up in pairs:
            for adapter in (down.keys() if down is not None else ()):
                A, B = down[adapter], up[adapter]
                A, B = (A.weight if isinstance(A, nn.Module) else A), (B.weight if isinstance(B, nn.Module) else B)
                check_update_range(f"{where}: module {name!r}", float(scaling.get(adapter, 1.0)),
                               B.detach().reshape(B.shape[0], -1), A.detach().reshape(A.shape[0], -1), B.dtype)


def load_peft_adapter(base: nn.Module | Callable[[], nn.Module], directory: str | Path, *, what: str = "",
                      is_trainable: bool = False) -> nn.Module:
    """The base model with the PEFT adapter in ``directory`` (a ``peft.PeftModel``), after the checks of the module
    docstring; ``base``: the model, or a function loading it (called once the folder passed its checks). Every
    refusal is a ``SingLoRAError`` naming the file, after ``what`` (e.g. ``"--adapter 'x'"``) if given."""
    from peft import PeftConfig, PeftModel

    try:
        check_peft_weights(directory)
        document = read_peft_config(directory)
    except AdapterFileError as exc:
        raise AdapterFileError(f"{what}: {exc}" if what else str(exc)) from None
    model = base if isinstance(base, nn.Module) else base()
    try:
        config = PeftConfig.from_peft_type(**document)
        with peft_without_deprecations():
            model = PeftModel.from_pretrained(model, str(directory), config=config, is_trainable=is_trainable)
    except (ValueError, RuntimeError, TypeError, KeyError, OSError) as exc:  # PeftError is a ValueError
        raise SingLoRAError(f"{what or directory}: PEFT cannot load this LoRA onto the base model (is it a LoRA for "
                            f"another model?): {_one_line(exc)}") from exc
    check_lora_updates(model, what or str(directory))
    return model
