"""One optimizer step over a group of micro-batches, with the non-finite policy; used by ``singlora train`` and by
DreamBooth alike.

    stepper = OptimizerStep(accelerator, model, optimizer, scheduler, parameters, max_grad_norm=1.0)
    for each micro-batch of the group (``size`` of them, ``last`` = the final one):
        with stepper.accumulating(last):            # no gradient sync across processes but on the last
            stepper.backward(loss, size)            # backward of loss / size; keeps the group's mean loss
    loss = stepper.step(where)                      # -> the mean loss over processes, or None if skipped

``step`` first checks the loss and the gradients for NaN/Inf (every process decides alike). A bad step stops the
run with a ``SingLoRAError`` naming ``where`` (the caller's "optimizer step 6 (epoch 1, micro-batches 2-3)") and
saying how to go on; with ``on_nonfinite="skip"`` the step's gradients are dropped instead, at most ``skip_limit``
steps in a row. A good step clips the gradients, steps the optimizer (SingLoRA's ramp t advances through a
post-hook on the real optimizer, so t counts optimizer steps only), checks the weights, steps the scheduler and
zeroes the gradients.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, ContextManager, Sequence

import torch

from ..errors import SingLoRAError


def all_finite(tensors: Sequence[torch.Tensor | None]) -> bool:
    """Whether no tensor holds NaN/Inf (one host sync)."""
    present = [t for t in tensors if t is not None]
    return not present or bool(torch.stack([torch.isfinite(t).all() for t in present]).all())


class OptimizerStep:
    """The optimizer step of a training loop (see the module docstring). ``skipped``: steps dropped so far."""

    def __init__(self, accelerator: Any, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                 parameters: Sequence[torch.Tensor], *, max_grad_norm: float = 0.0, on_nonfinite: str = "stop",
                 skip_limit: int = 10, check_gradients: bool = True,
                 advice: Callable[[], str] = lambda: "") -> None:
        """``check_gradients=False`` when a GradScaler (fp16) already skips steps with non-finite gradients;
        ``advice()`` ends the error message of a stopped run (e.g. where its last checkpoint is)."""
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.parameters = list(parameters)
        self.max_grad_norm, self.on_nonfinite, self.skip_limit = max_grad_norm, on_nonfinite, skip_limit
        self.check_gradients, self.advice = check_gradients, advice
        self.skipped, self.in_a_row = 0, 0
        self.running = torch.zeros(())
        self.grad_norm: float | None = None  # of the last step, before clipping

    def accumulating(self, last: bool) -> ContextManager[Any]:
        """Gradients of a micro-batch that is not the ``last`` of its group are not synced across processes."""
        return contextlib.nullcontext() if last else self.accelerator.no_sync(self.model)

    def backward(self, loss: torch.Tensor, group_size: int) -> None:
        """Backward of ``loss / group_size``: the group's gradients add up to those of its mean loss."""
        self.accelerator.backward(loss / group_size)
        self.running += loss.detach().float().cpu() / group_size

    def step(self, where: str) -> float | None:
        """End the group: the optimizer step, or None when the non-finite policy skipped it."""
        loss, self.running = self.running, torch.zeros(())
        loss_ok = bool(torch.isfinite(loss))
        grads_ok = not self.check_gradients or all_finite([p.grad for p in self.parameters])
        bad = torch.tensor(float(not (loss_ok and grads_ok)), device=self.accelerator.device)
        if float(self.accelerator.reduce(bad, "sum")) > 0:
            self._nonfinite(f"non-finite loss ({float(loss)})" if not loss_ok else "non-finite gradients", where)
            return None
        self.in_a_row = 0
        # the total norm (all processes' gradients); max_norm inf multiplies by exactly 1 (no clipping)
        norm = self.accelerator.clip_grad_norm_(self.parameters, self.max_grad_norm or float("inf"))
        self.grad_norm = float(norm) if norm is not None else None
        self.optimizer.step()
        if not all_finite(self.parameters):
            raise SingLoRAError(f"non-finite weights after {where}; stopped without writing an adapter; "
                                f"{self.advice()}")
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(self.accelerator.reduce(loss.to(self.accelerator.device), "mean"))

    def _nonfinite(self, what: str, where: str) -> None:
        """Drop this step's gradients; stop (``SingLoRAError``) unless skipping is allowed."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.on_nonfinite == "skip" and self.in_a_row < self.skip_limit:
            self.skipped, self.in_a_row = self.skipped + 1, self.in_a_row + 1
            if self.accelerator.is_main_process:
                print(f"singlora: warning: {what} at {where}; step skipped", file=sys.stderr)
            return
        after = f" after {self.in_a_row} skipped steps in a row" if self.in_a_row else ""
        raise SingLoRAError(f"{what} at {where}{after}; stopped without writing an adapter; {self.advice()}")
