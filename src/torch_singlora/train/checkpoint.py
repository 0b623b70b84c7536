"""Training checkpoints: one file, written atomically (temp file + fsync + rename), so a killed run leaves either
the previous checkpoint or the new one, never a torn file.

``<output_dir>/checkpoint.pt`` (``torch.save``; loaded with ``weights_only=True``) holds:
    ``trainable``: ``{parameter name: tensor}`` of every trainable parameter (adapter + head, or all for ``full``);
    ``optimizer`` / ``scheduler``: their ``state_dict()``; ``ramp_step``: SingLoRA's t;
    ``torch_rng``: the CPU generator state; ``step`` (optimizer steps done), ``epoch``, ``batch`` (micro-batches
    done in that epoch); ``config``: the training config, to refuse resuming with different settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write
from ..errors import SingLoRAError

CHECKPOINT_FILE = "checkpoint.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (tensors, ints, floats, strings, lists, dicts) to ``path`` atomically."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` (no arbitrary unpickling: ``weights_only=True``)."""
    if not path.is_file():
        raise SingLoRAError(f"--resume: no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated / foreign files
        raise SingLoRAError(f"{path}: not a readable checkpoint: {exc}") from None


def restore_parameters(named: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], path: Path) -> None:
    """Copy saved trainable tensors into the model's parameters; names must match exactly."""
    missing, unexpected = sorted(set(named) - set(saved)), sorted(set(saved) - set(named))
    if missing or unexpected:
        raise SingLoRAError(
            f"{path}: checkpoint does not fit this model (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    with torch.no_grad():
        for name, parameter in named.items():
            parameter.copy_(saved[name])
