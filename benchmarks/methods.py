"""The methods compared, each built on a fresh copy of a workload's base model.

- ``base``: the frozen base whose backward runs exactly as far as an adapter's: every adapted layer's output
  requires grad (``start_backward_at``), nothing below the first ones: the floor. (Until issue 27's second
  session the floor ran backward into the embeddings, computing the gradient of the first layer's input, which
  no adapter needs: 14 ms of MiniLM's 780 ms step, flattering every ratio over it by ~2 %.)
  ``base_compile``: the same under ``torch.compile`` (the floor of the compiled methods).
- ``lora`` / ``lora_again``: PEFT LoRA, same r, alpha and targets (``lora_again`` is a second, identical copy
  timed in the same round robin: the spread between the two is the noise floor of every ratio).
- ``singlora``: this library, eager. ``singlora_compile``: the same under ``torch.compile``.
- ``lora_compile``: PEFT LoRA under ``torch.compile`` (the fair comparison for ``singlora_compile``).
- ``dense_ref``: what the public SingLoRA implementations do, written here: build ``W0 + c * A A^T`` (the
  top-left block) on every forward, then one dense matmul (with a bf16 base: ``A`` float32, the update cast
  to bf16 before the add).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_singlora import SingLoRAConfig, get_singlora_model
from torch_singlora.functional import delta_matrix, init_A, ramp_value, scaling

METHODS = ("base", "lora", "lora_again", "singlora", "base_compile", "singlora_compile", "lora_compile", "dense_ref")
RAMP_STEPS = 1000  # T of the ramp (the paper's GLUE value); u stays a tensor, so compile never recompiles on it


@dataclass
class Method:
    """A model ready to train: ``module`` is what runs (maybe compiled), ``model`` the eager wrapper."""

    name: str
    module: Any
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    extra: dict[str, Any] = field(default_factory=dict)


class DenseUpdateLinear(nn.Module):
    """The dense-update reference: ``y = x @ (W0 + c * A[:out] @ A[:in].T).T + b`` with ``c = s * u(t)``.

    Builds the (out, in) update every forward: O(out * in * r) FLOPs and a full weight-sized tensor kept for
    backward, where the factored path costs O(tokens * n * r).
    """

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.d_out, self.d_in = base_layer.weight.shape
        device = base_layer.weight.device
        self.A = nn.Parameter(torch.empty(max(self.d_out, self.d_in), r, device=device))  # float32, like PEFT's
        init_A(self.A, "normal")
        self.register_buffer("step", torch.zeros((), dtype=torch.long, device=device))
        self.scale = scaling(r, alpha)

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        coefficient = ramp_value(self.step, RAMP_STEPS) * self.scale
        delta = delta_matrix(self.A, self.d_out, self.d_in, coefficient)  # no-op cast for a float32 base
        weight = self.base_layer.weight + delta.to(self.base_layer.weight.dtype)
        return F.linear(x, weight, self.base_layer.bias)


class _StartBackward(torch.autograd.Function):
    """The identity on a layer's output that makes it require grad (through ``anchor``, a 0-dim tensor that does):
    backward reaches the output and stops there, computing nothing for what came before. ``anchor``'s gradient is
    the first element of the output's: it depends on the whole backward, so that ``torch.compile`` cannot drop it
    as dead code (as it does a constant gradient)."""

    @staticmethod
    def forward(ctx: Any, output: Tensor, anchor: Tensor) -> Tensor:
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor]:
        return None, grad[(0,) * grad.dim()]


def start_backward_at(model: nn.Module, names: list[str]) -> Tensor:
    """Make the outputs of ``model``'s modules ``names`` require grad where nothing before them does, as an
    adapter's trainable ``A`` does: a frozen model's backward then runs as far as an adapted one's (forward hooks;
    no graph break under ``torch.compile``). Returns the 0-dim tensor whose gradient sums the first element of
    each such output's."""
    anchor = torch.zeros((), requires_grad=True, device=next(model.parameters()).device)  # where the grads are

    def hook(module: nn.Module, args: Any, output: Tensor) -> Tensor:
        return output if output.requires_grad else _StartBackward.apply(output, anchor)

    for name in names:
        model.get_submodule(name).register_forward_hook(hook)
    return anchor


def _freeze(model: nn.Module) -> nn.Module:
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def _adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def build_method(name: str, base: nn.Module, targets: list[str], r: int, alpha: float) -> Method:
    """Wrap ``base`` (a fresh model, modified in place) as method ``name``."""
    if name in ("base", "base_compile"):
        model = _freeze(base)
        start_backward_at(model, targets)
        return Method(name, torch.compile(model) if name == "base_compile" else model, model, None)
    if name in ("lora", "lora_again", "lora_compile"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0))
        module = torch.compile(model) if name == "lora_compile" else model
        return Method(name, module, model, _adamw(model))
    if name in ("singlora", "singlora_compile"):
        model = get_singlora_model(base, SingLoRAConfig(r=r, alpha=alpha, target_modules=targets,
                                                        ramp_up_steps=RAMP_STEPS))
        optimizer = _adamw(model)
        model.bind_optimizer(optimizer)
        module = torch.compile(model) if name == "singlora_compile" else model
        return Method(name, module, model, optimizer)
    if name == "dense_ref":
        model = _freeze(base)
        layers = []
        for target in targets:
            parent_name, _, child = target.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            layer = DenseUpdateLinear(getattr(parent, child), r, alpha)
            setattr(parent, child, layer)
            layers.append(layer)
        optimizer = _adamw(model)

        def bump(*_: Any) -> None:
            for layer in layers:
                layer.step += 1

        optimizer.register_step_post_hook(bump)
        return Method(name, model, model, optimizer)
    raise ValueError(f"method={name!r} is not one of {METHODS}")


def train_step(method: Method, batch: dict[str, Tensor]) -> None:
    """Forward + backward + optimizer step (+ zero_grad, grads freed)."""
    loss = method.module(**batch).loss
    loss.backward()
    if method.optimizer is not None:
        method.optimizer.step()
        method.optimizer.zero_grad(set_to_none=True)
