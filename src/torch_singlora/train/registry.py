"""The tasks ``singlora train`` knows, by name. A task's module is imported only when the task is used (or to
build ``--help``), so this module imports nothing of the training package, not even ``tasks.Task`` for a type hint:
``config`` validates ``--task`` here, and the tasks take a ``config.TrainConfig`` (no import circle).

A new task: subclass ``tasks.Task`` in its own module and add one line to ``TASKS`` (name -> "module:Class").
"""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import SingLoRAError

TASKS: dict[str, str] = {
    "classification": "torch_singlora.train.tasks:Classification",
    "causal-lm": "torch_singlora.train.tasks:CausalLM",
    "sft": "torch_singlora.llm.task:SFT",
    "dpo": "torch_singlora.llm.dpo:DPO",
}


def task_class(name: str) -> type:
    """The ``tasks.Task`` subclass registered as ``name`` (imports its module)."""
    if name not in TASKS:
        raise SingLoRAError(f"--task={name!r} must be one of {tuple(TASKS)}")
    module, _, attribute = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def get_task(name: str) -> Any:
    """A ``tasks.Task`` instance of the task registered as ``name``."""
    return task_class(name)()
