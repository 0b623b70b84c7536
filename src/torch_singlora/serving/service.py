"""What the server serves: one base model, its tokenizer, an ``AdapterBank`` of adapters under public names, the
batching engine, the limits and the metrics; and the request lifecycle on top of them: ``open_session`` (a
generation: resolve the model name, acquire the adapter, submit the rows; ``session.py``) and ``classify``.
Independent of HTTP (``serving.py`` and ``app.py`` map the API onto it).

Adapters come only from folders the operator named: ``--adapter NAME=DIR`` and the sub-folders of each
``--adapter-dir``. At run time an adapter is (re)loaded by the *name* of a sub-folder of an adapter dir: the name is
matched against the folders' listings, never joined into a path, so nothing a request says reaches the file
system. Replacing or removing an adapter never disturbs requests in flight: a new version loads under a new bank
key and takes the name for new requests, and a version leaves the bank only when its last request has finished.
A folder of an ``--adapter-dir`` that cannot be loaded is refused alone, logged with its reason, and the server
starts with the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
from .engine import ClassificationEngine, GenerationEngine, SamplingParams
from .metrics import Metrics
from .responses import shorten
from .session import GenerationSession

log = logging.getLogger("torch_singlora.serving")

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
    max_step_tokens: int = _limit(256, "tokens one engine step may run: one per running row plus a chunk of a "
                                       "prompt being prefilled (chunked prefill); at least --max-batch-size")
    batch_window_ms: float = _limit(10.0, "an idle server waits this long for more requests to batch")
    max_body_bytes: int = _limit(1 << 20, "request body size; larger gets a 413")
    max_queue: int = _limit(256, "requests waiting for a batch slot; more get a 429")
    max_choices: int = _limit(16, "prompts x n of one completion request, texts of one classify request")
    header_timeout_s: float = _limit(10.0, "a connection must send a request's headers within this time")
    body_timeout_s: float = _limit(30.0, "a request's body must arrive within this time; later gets a 408")


class NotFound(SingLoRAError):
    """A model name that is neither the base model nor a served adapter."""


class RequestFailed(RuntimeError):
    """The engine could not compute a request (an internal error of that request alone)."""


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
        options: dict[str, Any] = dict(max_batch_size=self.limits.max_batch_size, max_queue=self.limits.max_queue,
                                       batch_window_s=self.limits.batch_window_ms / 1000)
        if task == "classify":
            self.engine: Any = ClassificationEngine(self.bank.model, self.bank.use, **options,
                                                    pad_token_id=tokenizer.pad_token_id or 0)
        else:
            self.engine = GenerationEngine(self.bank.model, self.bank.use, **options,
                                           max_step_tokens=self.limits.max_step_tokens, adapter_ok=self.served_key)
        self.metrics = Metrics(self.engine, lambda: len(self.bank.adapters), self.in_flight_by_name)
        self.engine.observer = self.metrics.forward
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
        self._token_texts: dict[int, str] = {}
        embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        # token ids a request may use: the tokenizer's and the model's embedding's, whichever is smaller
        self.vocab_size = min(len(tokenizer), getattr(embedding, "num_embeddings", None) or len(tokenizer))

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

    def add_adapter_dir(self, directory: str | os.PathLike) -> tuple[list[str], dict[str, str]]:
        """Serve every sub-folder of ``directory`` holding an ``adapter_config.json`` under its folder name, and
        allow run-time loads from it. A folder that cannot be loaded is refused alone (logged with its reason).
        Returns the names loaded and ``{refused folder name: reason}``."""
        folder = Path(directory)
        if not folder.is_dir():
            raise SingLoRAError(f"--adapter-dir {folder}: not a folder")
        self.adapter_dirs.append(folder)
        names = sorted(entry.name for entry in os.scandir(folder)
                       if entry.is_dir() and (Path(entry.path) / "adapter_config.json").is_file())
        loaded, refused = [], {}
        for name in names:
            try:
                self.add_adapter(name, folder / name)
                loaded.append(name)
            except (SingLoRAError, OSError) as exc:
                refused[name] = str(exc)
                log.warning("adapter folder %s refused: %s", folder / name, exc)
        return loaded, refused

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
        raise NotFound(f"The model `{shorten(model)}` does not exist.")

    def served_key(self, key: str) -> bool:
        """Whether bank key ``key`` is resident (the engine asks before each step)."""
        return key == BASE or key in self.bank.adapters

    def in_flight_by_name(self) -> dict[str, int]:
        """``{public name: requests running or waiting}`` (a retired version under its bank key)."""
        names = {key: name for name, key in self.keys.items()}
        return {self.name if key == BASE else names.get(key, key): count for key, count in list(self.inflight.items())}

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

    # ---- requests -----------------------------------------------------------------------------------------------

    def open_session(self, model: str, prompts: list[list[int]], n: int, params: SamplingParams, stops: list[str],
                     *, skip_special_tokens: bool = True) -> GenerationSession:
        """Start generating for API model name ``model`` (``NotFound`` if not served, ``Overloaded`` if the queue is
        full); close the session when done with it (``GenerationSession.close``)."""
        session = GenerationSession(self, model, self.resolve(model), prompts, n, params, stops,
                                    skip_special_tokens=skip_special_tokens)
        session.open()
        return session

    async def classify(self, model: str, sequences: list[list[int]]) -> tuple[torch.Tensor, list[str]]:
        """Class probabilities ``(N, labels)`` of ``sequences`` with API model name ``model``, and the class names."""
        from .engine import ClassificationRequest

        key = self.resolve(model)
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def emit(kind: str, value: Any) -> None:  # on the engine's thread
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result((kind, value)))

        job = ClassificationRequest(key, sequences, emit)
        outcome = "refused"
        self.acquire(key)
        try:
            self.engine.submit(job)
            outcome = "cancelled"
            kind, value = await done
            outcome = "ok" if kind == "done" else "error"
        finally:
            job.cancelled = True
            self.release(key)
            self.metrics.request_done(model, outcome, sum(map(len, sequences)), 0)
        if kind == "error":
            raise RequestFailed(value)
        return value, self.labels_for(key)

    def token_text(self, token: int) -> str:
        """One token's text (logprobs report tokens by it)."""
        text = self._token_texts.get(token)
        if text is None:
            text = self._token_texts[token] = self.tokenizer.decode([token])
        return text

    # ---- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        self.engine.start()

    def stop(self) -> None:
        self.engine.stop()
