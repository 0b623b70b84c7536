"""What the server serves: one base model, its tokenizer, an ``AdapterBank`` of adapters under public names, the
batching engine, and the limits. Independent of HTTP (``app.py`` maps routes onto it).

Adapters come only from folders the operator named: ``--adapter NAME=DIR`` and the sub-folders of each
``--adapter-dir``. At run time an adapter is (re)loaded by the *name* of a sub-folder of an adapter dir: the name is
matched against the folders' listings, never joined into a path, so nothing a request says reaches the file
system. Replacing or removing an adapter never disturbs requests in flight: a new version loads under a new bank
key and takes the name for new requests, and a version leaves the bank only when its last request has finished.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..bank import AdapterBank
from ..errors import SingLoRAError
from ..llm.tokenization import stop_token_ids
from ..mixed import BASE
from .engine import ClassificationEngine, GenerationEngine

Task = Literal["generate", "classify"]
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # adapter names and folder names a request may give


def _limit(default: Any, help_text: str) -> Any:
    return field(default=default, metadata={"help": help_text})


@dataclass
class Limits:
    """Per-request and engine limits (each a ``singlora serve`` flag)."""

    max_prompt_tokens: int = _limit(2048, "tokens of one prompt")
    max_tokens: int = _limit(512, "the most tokens one request may generate (also the chat default)")
    max_batch_size: int = _limit(16, "rows in one forward")
    batch_window_ms: float = _limit(10.0, "an idle server waits this long for more requests to batch")
    max_body_bytes: int = _limit(1 << 20, "request body size; larger gets a 413")
    max_queue: int = _limit(256, "requests waiting for a batch slot; more get a 429")
    max_choices: int = _limit(16, "prompts x n of one completion request, texts of one classify request")


class NotFound(SingLoRAError):
    """A model name that is neither the base model nor a served adapter."""


class Service:
    """The served base model and adapters (module docstring).

    Attributes:
        name: The base model's id in the API. task: ``"generate"`` or ``"classify"``.
        bank: The ``AdapterBank``. engine: The running engine. keys: ``{adapter name: bank key}``.
        adapter_dirs: Folders whose sub-folders may be loaded at run time.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, name: str, task: Task = "generate",
                 limits: Limits | None = None, max_rank: int | None = None, capacity: int = 16) -> None:
        if task not in ("generate", "classify"):
            raise SingLoRAError(f"task={task!r} must be 'generate' or 'classify'")
        self.name, self.task, self.tokenizer = name, task, tokenizer
        self.limits = limits or Limits()
        self.bank = AdapterBank(model.eval(), max_rank=max_rank, capacity=capacity)
        engine_class = GenerationEngine if task == "generate" else ClassificationEngine
        options = dict(max_batch_size=self.limits.max_batch_size, batch_window_s=self.limits.batch_window_ms / 1000,
                       max_queue=self.limits.max_queue)
        if task == "classify":
            options["pad_token_id"] = tokenizer.pad_token_id or 0
        self.engine = engine_class(self.bank.model, self.bank.use, **options)
        self.keys: dict[str, str] = {}
        self.inflight: Counter[str] = Counter()
        self.retired: set[str] = set()
        self.versions: Counter[str] = Counter()
        self.adapter_dirs: list[Path] = []
        self.created = int(time.time())
        config = getattr(model, "config", None)
        self.max_model_len = getattr(config, "max_position_embeddings", None) or 1 << 30
        self.labels = [config.id2label[i] for i in range(config.num_labels)] if task == "classify" else []
        self.adapter_labels: dict[str, list[str]] = {}  # bank key -> class names from its run_info.json
        self.stop_token_ids = frozenset(stop_token_ids(tokenizer, getattr(model, "generation_config", None)))

    @classmethod
    def from_folder(cls, path: str | os.PathLike, *, task: Task = "generate", name: str | None = None,
                    dtype: torch.dtype = torch.float32, num_labels: int | None = None, **options: Any) -> "Service":
        """Load a local transformers folder (model + tokenizer) for ``task``."""
        import transformers

        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise SingLoRAError(f"--model {folder}: not a transformers model folder (no config.json)")
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        if task == "generate":
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        else:
            extra = {"num_labels": num_labels} if num_labels else {}
            model = transformers.AutoModelForSequenceClassification.from_pretrained(folder, dtype=dtype, **extra)
        return cls(model, tokenizer, name=name or folder.name, task=task, **options)

    # ---- adapters -----------------------------------------------------------------------------------------------

    def check_name(self, name: str) -> None:
        if not isinstance(name, str) or not NAME.fullmatch(name) or name in (self.name, BASE):
            raise SingLoRAError(f"adapter name {name!r} must match {NAME.pattern} and differ from the base model's "
                                f"name {self.name!r}")

    def add_adapter_dir(self, directory: str | os.PathLike) -> list[str]:
        """Serve every sub-folder of ``directory`` holding an ``adapter_config.json`` under its folder name, and
        allow run-time loads from it. Returns the names loaded."""
        folder = Path(directory)
        if not folder.is_dir():
            raise SingLoRAError(f"--adapter-dir {folder}: not a folder")
        self.adapter_dirs.append(folder)
        names = sorted(entry.name for entry in os.scandir(folder)
                       if entry.is_dir() and (Path(entry.path) / "adapter_config.json").is_file())
        for name in names:
            self.add_adapter(name, folder / name)
        return names

    def add_adapter(self, name: str, directory: str | os.PathLike) -> None:
        """Load an adapter before the engine starts (``--adapter NAME=DIR``)."""
        self.check_name(name)
        if name in self.keys:
            raise SingLoRAError(f"adapter name {name!r} is given twice")
        labels = self._labels(directory)
        self.bank.load(name, directory)
        self._set_labels(name, labels)
        self.keys[name] = name
        self.versions[name] = 1

    def _labels(self, directory: str | os.PathLike) -> list[str] | None:
        """A classification adapter's class names, from the ``run_info.json`` ``singlora train`` writes beside it
        (None if there is none); they must match the head's number of classes."""
        if self.task != "classify" or not (Path(directory) / "run_info.json").is_file():
            return None
        from ..runs import read_run_info

        labels = read_run_info(directory).get("labels")
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            return None
        if len(labels) != len(self.labels):
            raise SingLoRAError(f"{directory}: run_info.json names {len(labels)} classes, the served model's head has "
                                f"{len(self.labels)} (give --num-labels {len(labels)})")
        return labels

    def _set_labels(self, key: str, labels: list[str] | None) -> None:
        if labels is not None:
            self.adapter_labels[key] = labels

    def labels_for(self, key: str) -> list[str]:
        """The class names of bank key ``key`` (its own, else the base model's ``id2label``)."""
        return self.adapter_labels.get(key, self.labels)

    def find_folder(self, folder_name: str) -> Path:
        """The sub-folder called ``folder_name`` of an adapter dir: names are compared with the listings."""
        if not isinstance(folder_name, str) or not NAME.fullmatch(folder_name):
            raise SingLoRAError(f"lora_path={folder_name!r} must be the name of a folder in an --adapter-dir "
                                f"(matching {NAME.pattern}), not a path")
        for directory in self.adapter_dirs:
            for entry in os.scandir(directory):
                if entry.name == folder_name and entry.is_dir():
                    return Path(entry.path)
        raise NotFound(f"no adapter folder {folder_name!r} in the server's adapter dirs")

    def resolve(self, model: str) -> str:
        """The bank key serving API model name ``model`` (``"__base__"`` for the base model)."""
        if model == self.name:
            return BASE
        if isinstance(model, str) and model in self.keys:
            return self.keys[model]
        raise NotFound(f"The model `{model}` does not exist.")

    def acquire(self, key: str) -> None:
        self.inflight[key] += 1

    def release(self, key: str) -> None:
        """A request on bank key ``key`` finished; a retired key leaves the bank with its last request."""
        self.inflight[key] -= 1
        if self.inflight[key] <= 0:
            del self.inflight[key]
            if key in self.retired:
                self.retired.discard(key)
                self._unload(key)

    async def load_runtime(self, name: str, folder_name: str | None, replace: bool) -> None:
        """Load adapter ``name`` from adapter-dir sub-folder ``folder_name`` (default: ``name``) while serving."""
        self.check_name(name)
        if name in self.keys and not replace:
            raise SingLoRAError(f"adapter {name!r} is already served; give replace=true to replace it")
        if name not in self.keys and replace:
            raise NotFound(f"adapter {name!r} is not served; nothing to replace")
        folder = self.find_folder(folder_name or name)
        self.versions[name] += 1
        key = name if self.versions[name] == 1 else f"{name}@{self.versions[name]}"
        labels = self._labels(folder)
        await asyncio.wrap_future(self.engine.run_in_worker(lambda: self.bank.load(key, folder)))
        self._set_labels(key, labels)
        old = self.keys.get(name)
        self.keys[name] = key
        if old is not None:
            self._retire(old)

    def unload_runtime(self, name: str) -> None:
        """Stop serving adapter ``name``; its weights leave once its requests in flight have finished."""
        if name not in self.keys:
            raise NotFound(f"adapter {name!r} is not served")
        self._retire(self.keys.pop(name))

    def _retire(self, key: str) -> None:
        if self.inflight[key] > 0:
            self.retired.add(key)
        else:
            self.inflight.pop(key, None)
            self._unload(key)

    def _unload(self, key: str) -> None:
        self.adapter_labels.pop(key, None)
        self.engine.run_in_worker(lambda: self.bank.unload(key))

    # ---- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        self.engine.start()

    def stop(self) -> None:
        self.engine.stop()
