"""Training checkpoints: one file, written atomically (temp file + fsync + rename), so a killed run leaves either
the previous checkpoint or the new one, never a torn file.

``<output_dir>/checkpoint.pt`` (``torch.save`` of a dict; loaded with ``weights_only=True``) holds exactly the
fields of ``TrainingState``:

    trainable     {parameter name: tensor} of every trainable parameter (adapter + heads, or all for ``full``)
    optimizer     the optimizer's ``state_dict()``
    scheduler     the learning-rate scheduler's ``state_dict()``
    ramp_step     SingLoRA's t (0 for other methods)
    rng           {"torch": CPU generator state, "cuda": the CUDA states when there is a GPU}
    step          optimizer steps done
    epoch         the epoch of the next micro-batch
    batch         micro-batches of that epoch already done
    skipped       optimizer steps dropped so far (``--on-nonfinite skip``)
    log_records   lines of ``metrics.jsonl`` written up to this checkpoint (a resumed run keeps exactly those)
    base_metrics  the step-0 evaluation (tasks that evaluate the base model), or None
    config        the settings that must not change on ``--resume``
    identity      fingerprints of the data and of the base model (``--resume`` refuses a run whose inputs changed)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write
from ..errors import SingLoRAError


@dataclass
class TrainingState:
    """Everything a run needs to continue exactly where it was (the module docstring explains each field)."""

    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    ramp_step: int
    rng: dict[str, Any]
    step: int
    epoch: int
    batch: int
    skipped: int
    log_records: int
    base_metrics: dict[str, Any] | None
    config: dict[str, Any]
    identity: dict[str, Any]


def save_checkpoint(path: Path, state: TrainingState) -> None:
    """Write ``state`` to ``path`` atomically; a full disk is a ``SingLoRAError`` naming ``path``."""
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            try:
                torch.save(fields, handle)
            except RuntimeError as exc:  # torch's writer wraps the OSError of a failed write (e.g. a full disk)
                cause = exc.__cause__ or exc.__context__
                if isinstance(cause, OSError):
                    raise cause from exc
                raise

    atomic_write(path, write)


def load_checkpoint(path: Path) -> TrainingState:
    """Read a checkpoint written by ``save_checkpoint`` (no arbitrary unpickling: ``weights_only=True``)."""
    if not path.is_file():
        raise SingLoRAError(f"--resume: no checkpoint at {path}")
    try:
        fields = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated / foreign files
        raise SingLoRAError(f"{path}: not a readable checkpoint: {exc}") from None
    names = {f.name for f in dataclasses.fields(TrainingState)}
    if not isinstance(fields, dict) or set(fields) != names:
        have = set(fields) if isinstance(fields, dict) else set()
        raise SingLoRAError(f"{path}: not a checkpoint of this version of singlora train (missing "
                            f"{sorted(names - have)}, unexpected {sorted(map(str, have - names))}); start the run "
                            "again with --overwrite")
    for name, expected in _FIELD_TYPES.items():
        value = fields[name]
        if not _has_type(value, expected):
            raise SingLoRAError(f"{path}: field {name!r} has the wrong type ({type(value).__name__}); not a "
                                "checkpoint of singlora train: start the run again with --overwrite")
    return TrainingState(**fields)


def _has_type(value: Any, expected: Any) -> bool:
    if expected == "count":  # a non-negative int
        return type(value) is int and value >= 0
    if expected == "tensors":
        return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in value.items())
    if expected == "rng":
        return isinstance(value, dict) and isinstance(value.get("torch"), torch.Tensor)
    return isinstance(value, expected)


_FIELD_TYPES: dict[str, Any] = {
    "trainable": "tensors", "optimizer": dict, "scheduler": dict, "ramp_step": "count", "rng": "rng",
    "step": "count", "epoch": "count", "batch": "count", "skipped": "count", "log_records": "count",
    "base_metrics": (dict, type(None)), "config": dict, "identity": dict,
}


def restore_parameters(named: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], path: Path) -> None:
    """Copy saved trainable tensors into the model's parameters; names and shapes must match exactly."""
    missing, unexpected = sorted(set(named) - set(saved)), sorted(set(saved) - set(named))
    if missing or unexpected:
        raise SingLoRAError(
            f"{path}: checkpoint does not fit this model (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    for name, parameter in named.items():
        if saved[name].shape != parameter.shape:
            raise SingLoRAError(f"{path}: {name} has shape {tuple(saved[name].shape)}, the model's is "
                                f"{tuple(parameter.shape)}")
    with torch.no_grad():
        for name, parameter in named.items():
            parameter.copy_(saved[name])
