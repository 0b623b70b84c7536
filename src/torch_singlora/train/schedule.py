"""The learning-rate schedule of ``singlora train``: optimizer step k (1, 2, ..., total) runs at ``lr * factor(k)``.

    warm-up, k <= W:   k / W                      step 1 gets lr / W: no step is wasted at lr 0
    linear, k > W:     (total - k + 1) / (total - W)    1 at step W + 1, 1 / (total - W) at the last step
    cosine, k > W:     (1 + cos(pi * (k - 1 - W) / (total - W))) / 2
    constant, k > W:   1

The same shapes as transformers' ``get_scheduler`` (linear, cosine, constant_with_warmup), with one difference:
transformers evaluates the warm-up at the number of steps already taken, so its step 1 runs at lr 0 and only moves
the optimizer's moments; here the warm-up counts the step being taken. transformers' plain ``constant`` ignores the
warm-up; here ``--warmup`` applies to every schedule. A ``LambdaLR``: its state dict (the step count) is what
checkpoints save and ``--resume`` restores.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

SCHEDULES = ("linear", "cosine", "constant")


def lr_factor(name: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """``factor(i)`` for ``LambdaLR``, ``i`` = optimizer steps already taken (step ``k = i + 1`` is being taken)."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule {name!r} must be one of {SCHEDULES}")
    decay = max(1, total_steps - warmup_steps)

    def factor(i: int) -> float:
        if i < warmup_steps:
            return (i + 1) / warmup_steps
        if name == "linear":
            return max(0.0, (total_steps - i) / decay)
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * (i - warmup_steps) / decay))
        return 1.0

    return factor


def make_scheduler(name: str, optimizer: torch.optim.Optimizer, *, warmup_steps: int,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The ``LambdaLR`` of schedule ``name`` (see the module docstring) over ``total_steps`` optimizer steps."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(name, warmup_steps, total_steps))


def short_run_warnings(total_steps: int, warmup_steps: int, ramp_up_steps: int | None) -> list[str]:
    """What a run of ``total_steps`` optimizer steps will not reach: the end of the warm-up, or of SingLoRA's ramp
    (``ramp_up_steps`` T; None: no ramp). Every step trains (step k runs at ``lr * k / W`` and ``u = k / T``),
    but such a run ends below the peak learning rate, or saves its adapter at ``u < 1``."""
    found = []
    if warmup_steps > total_steps:
        found.append(f"the warm-up ({warmup_steps} steps, --warmup) is longer than the run ({total_steps} steps): the "
                     f"learning rate reaches only {total_steps / warmup_steps:.2g} x --lr")
    if ramp_up_steps and ramp_up_steps > total_steps:
        found.append(f"the ramp (T = {ramp_up_steps} steps, --ramp-up-steps) is longer than the run ({total_steps} "
                     f"steps): u reaches {total_steps / ramp_up_steps:.2g} at the last step, and the adapter is "
                     "saved at that u (the update is scaled down for good)")
    return found
