"""Run configs: ``singlora train --config run.yaml``, ``--print-config``, and the resolved config a run keeps.

A config file holds one flat mapping: every flag of ``singlora train`` by its name (``lr`` or ``--lr``'s spelling
``max-steps`` / ``max_steps``), the task's own flags included (``beta``, ``chat_template``, ...), as axolotl and
LLaMA-Factory write theirs:

    task: sft
    model: /models/SmolLM2-135M-Instruct
    train_data: data/train.jsonl
    output_dir: runs/chat
    target_modules: [q_proj, v_proj]      # a list, or the flag's comma-separated text
    lr: 1.0e-3                            # "1e-3" (YAML reads it as text) is read as the number too
    max_steps: 30
    eval_generations: 40

YAML (``.yaml`` / ``.yml``, through PyYAML), TOML (``.toml``, Python's ``tomllib``) or JSON (``.json``). Flags on
the command line override the file. An unknown key is refused by name with the nearest valid one; a value of the
wrong type (a list for ``r``, text for a switch) is refused naming the key; nothing else is converted (numbers
given for a text flag such as ``warmup: 10`` are read as that text, and a number written as text for a number
flag as that number, as on the command line).

The resolved config (defaults filled in, paths made absolute, the chosen task's options) is what
``--print-config`` prints and what a run keeps, in ``<output-dir>/config.yaml`` and in ``run_info.json``'s
``config``; ``singlora train --config RUN/config.yaml --output-dir RUN2`` repeats the run. The file read is an input
of the run (``TrainConfig.inputs``): a run whose ``--output-dir`` would rewrite it (RUN itself, with ``--overwrite``
or ``--resume``) is refused.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import typing
from pathlib import Path
from typing import Any

from ..errors import SingLoRAError
from .config import TrainConfig

CONFIG_SUFFIXES = (".yaml", ".yml", ".toml", ".json")
# transformers / TRL / PEFT names people carry over -> ours (only to suggest the key, never read as it)
TRAINER_NAMES = {"learning_rate": "lr", "per_device_train_batch_size": "batch_size", "num_train_epochs": "epochs",
                 "gradient_accumulation_steps": "grad_accum", "per_device_eval_batch_size": "eval_batch_size",
                 "warmup_steps": "warmup", "warmup_ratio": "warmup", "lr_scheduler_type": "scheduler",
                 "logging_steps": "log_every", "save_steps": "save_every", "eval_steps": "eval_every",
                 "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "adapter_dropout",
                 "model_name_or_path": "model", "dataset": "train_data", "max_seq_length": "max_length"}
MAX_CONFIG_BYTES = 1 << 20


def train_fields() -> dict[str, dataclasses.Field]:
    """The ``TrainConfig`` fields that are flags (all but ``task_options`` and ``config_file``)."""
    return {f.name: f for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli", True)}


def _task_options() -> dict[str, tuple[dataclasses.Field, Any, list[str]]]:
    """``{option name: (field, its type, the tasks that have it)}`` over every registered task."""
    from ..cli_options import _task_option_owners
    from .registry import task_class

    found = {}
    for name, tasks in _task_option_owners().items():
        options = task_class(tasks[0]).options
        hints = typing.get_type_hints(options)
        found[name] = (next(f for f in dataclasses.fields(options) if f.name == name), hints[name], tasks)
    return found


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in config file ``path`` (YAML, TOML or JSON by its suffix); errors name the file."""
    from ..untrusted import open_regular, parse_json, read_bytes

    path = Path(path)
    if path.suffix.lower() not in CONFIG_SUFFIXES:
        raise SingLoRAError(f"--config {path}: use a {', '.join(CONFIG_SUFFIXES)} file")
    handle, _ = open_regular(path, MAX_CONFIG_BYTES, "a config file of `singlora train`")
    with handle:
        data = read_bytes(handle, MAX_CONFIG_BYTES + 1, path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SingLoRAError(f"--config {path}: not UTF-8 text ({exc})") from None
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            document = tomllib.loads(text)
        elif path.suffix.lower() == ".json":
            document = parse_json(data, path)  # strict: no NaN, no duplicate keys
        else:
            document = _load_yaml(text)
    except ImportError as exc:
        raise SingLoRAError(f"--config {path}: reading it needs {exc.name} (pip install pyyaml; TOML needs Python "
                            ">= 3.11)") from None
    except SingLoRAError:
        raise
    except Exception as exc:  # yaml.YAMLError, tomllib.TOMLDecodeError
        raise SingLoRAError(f"--config {path}: not valid {path.suffix[1:].upper()}: {' '.join(str(exc).split())}"
                            ) from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise SingLoRAError(f"--config {path}: expected a mapping of flag names to values, got "
                            f"{type(document).__name__}")
    return document


def _load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses a key given twice (PyYAML keeps the last one silently)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict:
            keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
            repeated = sorted({str(k) for k in keys if keys.count(k) > 1})
            if repeated:
                raise yaml.constructor.ConstructorError(None, None, f"key(s) {repeated} given twice",
                                                        node.start_mark)
            return super().construct_mapping(node, deep=deep)

    return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass


def _value(kind: Any, value: Any, where: str) -> Any:
    """``value`` checked against the flag's type ``kind`` (see the module docstring)."""
    optional = type(None) in typing.get_args(kind)
    base = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
    if value is None:
        if optional:
            return None
        raise SingLoRAError(f"{where}: null is not allowed (a {base.__name__})")
    if base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif base is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return ",".join(value)  # the flag's comma-separated list (--target-modules, --report-to)
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "text"}.get(base, base.__name__)
    raise SingLoRAError(f"{where}: expected {expected}, got {json.dumps(value, default=str)[:80]}")


def file_values(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(TrainConfig values, task option values)`` of config file ``path``, each checked (module docstring)."""
    document = read_config_file(path)
    fields, options = train_fields(), _task_options()
    hints = typing.get_type_hints(TrainConfig)
    train, task = {}, {}
    for key, value in document.items():
        name = str(key).removeprefix("--").replace("-", "_")
        where = f"--config {path}: {key}"
        if name in fields:
            train[name] = _value(hints[name], value, where)
        elif name in options:
            task[name] = _value(options[name][1], value, where)
        else:
            near = difflib.get_close_matches(name, [*fields, *options, *TRAINER_NAMES], n=1, cutoff=0.6)
            hint = (f"; did you mean {TRAINER_NAMES.get(near[0], near[0])!r}?" if near
                    else "; the keys are the flags of `singlora train`")
            raise SingLoRAError(f"--config {path}: unknown key {key!r}{hint}")
    return train, task


def check_task_options(values: dict[str, Any], task: str, source: str) -> None:
    """Refuse an option of another task than ``task`` (``source`` says where it was given)."""
    owners = _task_options()
    for name in values:
        if task not in owners[name][2]:
            raise SingLoRAError(f"{source}: {name} is an option of --task {' / '.join(owners[name][2])}, not of "
                                f"--task {task}")


PATH_FIELDS = ("model", "train_data", "eval_data", "tokenizer", "output_dir", "init_adapter", "chat_template")


def resolved(config: TrainConfig) -> dict[str, Any]:
    """The flat config of a run: every flag's value (defaults filled in by ``TrainConfig.validate``), the task's
    options (defaults included), paths absolute; what ``--print-config`` prints and a run keeps."""
    from .registry import task_class

    options = task_class(config.task)().parse_options(config.task_options)
    document = {name: getattr(config, name) for name in train_fields()}
    if options is not None:
        document.update(dataclasses.asdict(options))
    for name in PATH_FIELDS:
        if document.get(name):
            document[name] = str(Path(document[name]).resolve())
    return document


def to_yaml(document: dict[str, Any]) -> str:
    import yaml

    header = "# singlora train --config: every flag of the run (flags on the command line override these)\n"
    return header + yaml.safe_dump(document, sort_keys=False, allow_unicode=True)
