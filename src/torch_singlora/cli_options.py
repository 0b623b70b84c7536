"""Command-line flags built from dataclasses, and each task's own flags (``Task.options``), for ``singlora`` and
its subcommands in other modules (``serving.cli``)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import typing
from typing import Any, Sequence

from .errors import SingLoRAError


# ---- argparse from a dataclass ----------------------------------------------------------------------------------

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_at_least(options: Any, bound: int, *names: str) -> None:
    """A ``SingLoRAError`` naming the flag (``--name=value must be >= bound``) for the first field of ``options``
    among ``names`` that is below ``bound``."""
    for name in names:
        value = getattr(options, name)
        if value < bound:
            raise SingLoRAError(f"{_flag(name)}={value} must be >= {bound}")


def add_dataclass_arguments(parser: Any, cls: type, *, suppress: bool = False, skip: Sequence[str] = ()) -> None:
    """One ``--flag`` per field of dataclass ``cls`` but those in ``skip``; the help is the field's
    ``metadata["help"]``. Fields with ``metadata["cli"] = False`` get no flag; ``metadata["aliases"]`` are other
    spellings of the flag. ``suppress``: a flag not given leaves no attribute (its default is the dataclass's)."""
    hints = typing.get_type_hints(cls)
    for spec in dataclasses.fields(cls):
        if not spec.metadata.get("cli", True) or spec.name in skip:
            continue
        kind = hints[spec.name]
        help_text = spec.metadata.get("help", "")
        default = spec.default if spec.default is not dataclasses.MISSING else None
        names = [_flag(spec.name), *spec.metadata.get("aliases", ())]
        extra: dict[str, Any] = {"default": argparse.SUPPRESS} if suppress else {"default": default}
        if kind is bool:
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, help=help_text, **extra)
            continue
        base = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
        shown = "" if default is None and "default:" in help_text else f" (default: {default})"  # said in the help
        parser.add_argument(*names, type=base, help=f"{help_text}{shown}", **extra)


def dataclass_from_args(cls: type, args: argparse.Namespace, **values: Any) -> Any:
    fields = {spec.name: getattr(args, spec.name) for spec in dataclasses.fields(cls) if spec.metadata.get("cli", True)}
    return cls(**fields, **values)


# ---- task options: each task's own flags (``Task.options``) -------------------------------------------------------

def _task_option_owners() -> dict[str, list[str]]:
    """``{option field name: the tasks that have it}`` over the registered tasks whose module is installed."""
    from .train.registry import TASKS, task_class

    owners: dict[str, list[str]] = {}
    for name, target in TASKS.items():
        if importlib.util.find_spec(target.partition(":")[0]) is None:
            continue
        options = task_class(name).options
        for spec in dataclasses.fields(options) if options is not None else ():
            owners.setdefault(spec.name, []).append(name)
    return owners


def add_task_options(parser: argparse.ArgumentParser) -> None:
    """One argument group per task with options (``Task.options``); an option two tasks share gets one flag.
    Absent flags leave no attribute (``task_options`` collects the given ones)."""
    from .train.registry import task_class

    added: set[str] = set()
    for name in dict.fromkeys(task for tasks in _task_option_owners().values() for task in tasks):
        options = task_class(name).options
        add_dataclass_arguments(parser.add_argument_group(f"options of --task {name}"), options, suppress=True,
                                skip=sorted(added))
        added.update(spec.name for spec in dataclasses.fields(options))


def task_options(args: argparse.Namespace, task: str) -> dict[str, Any]:
    """The task options given on the command line; an option of another task is an error naming it."""
    owners = _task_option_owners()
    given = {name: getattr(args, name) for name in owners if hasattr(args, name)}
    for name in given:
        if task not in owners[name]:
            raise SingLoRAError(f"{_flag(name)} is an option of --task {' / '.join(owners[name])}, not of "
                                f"--task {task or '(none given)'}")
    return given
